//! Benchmarks of gatevm, each beside a baseline measured in the same run: boot (against a bare
//! QEMU boot of the same kernel), exec round trip (against ssh into the same VM), host memory
//! (against the guest RAM configured), image import throughput (against a host-side copy; the
//! host's `ctr` through the instance's containerd socket beside it), shared-directory
//! throughput (against the same reads and writes on the host), port-forward throughput and
//! latency (against QEMU's user networking) and the rootfs build (against a plain minbase
//! mmdebstrap).
//!
//! The tool drives the `gatevm` binary on the instances `bench`, `bench-vol` and `benchnet` (and
//! a `gatevm vm-run` VM), which it deletes at the end, on failure and on Ctrl-C. It prints each case's
//! tables as they finish and writes them all, with a description of the machine, to
//! docs/benchmarks.md.

pub mod cases;
pub mod docker;
pub mod gatevm;
pub mod host;
pub mod markdown;
pub mod netproto;
pub mod previous;
pub mod procs;
pub mod report;
pub mod runner;
pub mod scratch;
pub mod stats;
pub mod trees;

use anyhow::{bail, Context};
use cases::Bench;
use gatevm::{DeleteOnDrop, Gatevm};
use host::Machine;
use markdown::Section;
use scratch::Scratch;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The instance the benchmarks create, use and delete.
pub const INSTANCE: &str = "bench";

/// A benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Case {
    /// Bare QEMU boot against cold and warm `gatevm start`.
    Boot,
    /// `gatevm exec -- true` round trip beside ssh into the same VM.
    Exec,
    /// Host memory of the supervisor, helpers and VM.
    Memory,
    /// `gatevm image import` (and the host's `ctr images import`) throughput.
    Import,
    /// Shared-directory (`-v`, virtio-fs) sequential write and read throughput.
    Volume,
    /// Port-forward throughput and latency: gvproxy, passt, QEMU user networking.
    Net,
    /// Rootfs build, cold and cached, beside a minbase mmdebstrap.
    Rootfs,
}

impl Case {
    /// Every case, in the order they run.
    pub const ALL: [Case; 7] = [
        Case::Boot,
        Case::Exec,
        Case::Memory,
        Case::Import,
        Case::Volume,
        Case::Net,
        Case::Rootfs,
    ];

    /// The name `--only` takes.
    pub fn name(self) -> &'static str {
        match self {
            Case::Boot => "boot",
            Case::Exec => "exec",
            Case::Memory => "memory",
            Case::Import => "import",
            Case::Volume => "volume",
            Case::Net => "net",
            Case::Rootfs => "rootfs",
        }
    }

    /// The title of its section in the report.
    pub fn title(self) -> &'static str {
        match self {
            Case::Boot => "Boot",
            Case::Exec => "Exec round trip",
            Case::Memory => "Host memory",
            Case::Import => "Image import throughput",
            Case::Volume => "Shared directory throughput",
            Case::Net => "Network: port forward host -> guest",
            Case::Rootfs => "Root filesystem build",
        }
    }

    /// Whether it runs gatevm as the ordinary user as well as root.
    pub fn as_user_too(self) -> bool {
        matches!(self, Case::Boot | Case::Memory)
    }
}

/// What to run and where.
#[derive(Debug, Clone)]
pub struct Options {
    /// The gatevm binary.
    pub gatevm: PathBuf,
    /// Repetitions per case.
    pub runs: usize,
    /// Round trips of the exec case.
    pub exec_runs: usize,
    /// Size of the import case's archive, MiB.
    pub import_mib: u64,
    /// The host's `ctr` for the import case's row through the containerd socket; none: the row
    /// is left out.
    pub host_ctr: Option<PathBuf>,
    /// Size of the volume case's file, MiB.
    pub volume_mib: u64,
    /// MiB sent per throughput measurement of the net case.
    pub net_mib: u64,
    /// Round trips per latency measurement of the net case.
    pub net_pings: usize,
    /// Cold builds of the rootfs case.
    pub rootfs_runs: usize,
    /// Where the report goes.
    pub out: PathBuf,
    /// The cases to run.
    pub cases: Vec<Case>,
    /// The ordinary user the boot and memory cases also run gatevm as (from root), and whom the
    /// volume case's shared directory belongs to.
    pub user: String,
    /// The gatevm repository (for its commit).
    pub repo: PathBuf,
    /// How the tool was invoked, for the report.
    pub command: String,
}

/// `git rev-parse --short HEAD` of `repo`, and whether tracked files other than the report have
/// uncommitted changes.
fn commit(repo: &Path, scratch: &Scratch) -> (String, bool) {
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.arg("-C").arg(repo).args(args);
        runner::run(&mut c, Duration::from_secs(20), scratch)
            .and_then(|f| f.ok())
            .map(|f| f.stdout.trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Ok(c) if !c.is_empty() => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!docs/benchmarks.md",
            ])
            .map(|s| !s.is_empty())
            .unwrap_or(false);
            (c, dirty)
        }
        _ => ("unknown".to_string(), false),
    }
}

/// The first line of `qemu --version` and which binary, or why there is none.
fn qemu_description(qemu: &Result<host::Qemu, String>, scratch: &Scratch) -> String {
    match qemu {
        Ok(q) => {
            let mut c = Command::new(&q.bin);
            c.arg("--version");
            let v = runner::run(&mut c, Duration::from_secs(30), scratch)
                .and_then(|f| f.ok())
                .map(|f| {
                    runner::last_line(f.stdout.lines().next().unwrap_or(""))
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_else(|e| format!("version unknown ({e:#})"));
            format!("{v} ({})", q.bin.display())
        }
        Err(e) => format!("not found: {e}"),
    }
}

/// The sentence on the host's load around a case: other work on a machine of few cores slows
/// every row, the baseline included.
pub fn load_note(before: &str, after: &str, cores: usize) -> String {
    format!(
        "Host load average (1 / 5 / 15 min, /proc/loadavg) on {cores} cores: {before} before the case, {after} after it. Other work on the machine slows every row, the baseline included, and widens min..max."
    )
}

/// The ordinary user `name` to run gatevm as, or why the tool cannot.
pub(crate) fn ordinary_user(name: &str) -> Result<gatevm::AsUser, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "the tool ran as uid {euid}, not root, so it cannot run gatevm as another user (run scripts/bench.sh as root)"
        ));
    }
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    let (uid, gid, home) = gatevm::parse_passwd(&passwd, name).ok_or_else(|| {
        format!("there is no user {name} (scripts/bench.sh creates it: `useradd --create-home --shell /bin/sh {name}`)")
    })?;
    if uid == 0 {
        return Err(format!("{name} has uid 0: not an ordinary user"));
    }
    Ok(gatevm::AsUser {
        name: name.to_string(),
        uid,
        gid,
        home,
    })
}

/// Runs the selected cases, prints their tables and writes the report. Targets that are missed
/// are reported, not errors.
pub fn run(o: &Options) -> anyhow::Result<()> {
    if !o.gatevm.is_file() {
        bail!(
            "no gatevm binary at {}: run scripts/build.sh (or pass --gatevm)",
            o.gatevm.display()
        );
    }
    let scratch = Scratch::new("gatevm-bench")?;
    let machine = Machine::probe();
    let runtime = gatevm_runtime::dirs::runtime_dir()?;
    let qemu = host::find_qemu(&runtime, std::env::var_os("PATH")).map_err(|e| format!("{e:#}"));
    let (commit, dirty) = commit(&o.repo, &scratch);
    let mut meta = report::Meta {
        date: report::utc_date(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        ),
        commit,
        dirty,
        machine: machine.clone(),
        qemu: qemu_description(&qemu, &scratch),
        backend: None,
        command: o.command.clone(),
        skipped: Case::ALL
            .iter()
            .filter(|c| !o.cases.contains(c))
            .map(|c| c.name().to_string())
            .collect(),
        kept: Vec::new(),
    };
    // The report this run replaces: the sections of the cases not run are kept from it.
    let previous = std::fs::read_to_string(&o.out).ok();
    println!(
        "## Machine\n\n{}",
        report::machine_table(&meta, false).render()
    );

    let _cleanup = DeleteOnDrop(Gatevm::new(&o.gatevm, INSTANCE, &scratch));
    let _cleanup_net = o
        .cases
        .contains(&Case::Net)
        .then(|| DeleteOnDrop(Gatevm::new(&o.gatevm, cases::net::NET_INSTANCE, &scratch)));
    let _cleanup_vol = o.cases.contains(&Case::Volume).then(|| {
        DeleteOnDrop(Gatevm::new(
            &o.gatevm,
            cases::volume::VOL_INSTANCE,
            &scratch,
        ))
    });
    let root_gv = Gatevm::new(&o.gatevm, INSTANCE, &scratch);
    let user = if o.cases.iter().any(|c| c.as_user_too()) {
        ordinary_user(&o.user).map(|u| root_gv.as_user(u))
    } else {
        Err("not run".to_string())
    };
    let _cleanup_user = user.as_ref().ok().map(|u| DeleteOnDrop(u.on(INSTANCE)));
    if let Ok(u) = &user {
        eprintln!("gatevm-bench: `gatevm setup` as {} (untimed)", u.who());
        u.setup()
            .with_context(|| format!("`gatevm setup` as {}", u.who()))?;
    }
    let machine_cores = machine.cores;
    let mut bench = Bench {
        runs: o.runs,
        exec_runs: o.exec_runs,
        import_mib: o.import_mib,
        host_ctr: o.host_ctr.clone(),
        volume_mib: o.volume_mib,
        user_name: o.user.clone(),
        net_mib: o.net_mib,
        net_pings: o.net_pings,
        rootfs_runs: o.rootfs_runs,
        gv: root_gv,
        user,
        previous: previous.clone(),
        scratch: &scratch,
        machine,
        runtime,
        qemu,
        backend: None,
        ssh_rootfs_build: None,
        not_measured: Vec::new(),
    };
    let mut sections: Vec<(Case, Section)> = Vec::new();
    for case in Case::ALL.iter().filter(|c| o.cases.contains(c)) {
        eprintln!("gatevm-bench: {} ...", case.name());
        let load_before = host::loadavg();
        let mut section = match case {
            Case::Boot => bench.boot(),
            Case::Exec => bench.exec(),
            Case::Memory => bench.memory(),
            Case::Import => bench.import(),
            Case::Volume => bench.volume(),
            Case::Net => bench.net(),
            Case::Rootfs => bench.rootfs(),
        }
        .with_context(|| format!("{} benchmark", case.name()))?;
        section
            .intro
            .push(load_note(&load_before, &host::loadavg(), machine_cores));
        print!("{}", section.render());
        let _ = std::io::stdout().flush();
        sections.push((*case, section));
    }
    meta.backend = bench.backend.clone();
    let old = previous
        .as_deref()
        .map(previous::sections)
        .unwrap_or_default();
    let old_from = previous.as_deref().and_then(previous::measured);
    let mut body = Vec::new();
    for case in Case::ALL {
        if let Some((_, s)) = sections.iter().find(|(c, _)| *c == case) {
            body.push(s.render());
        } else if let (Some(text), Some((date, commit))) =
            (previous::section(&old, case.title()), &old_from)
        {
            body.push(previous::kept_section(text, date, commit));
            meta.kept.push(case.name().to_string());
        }
    }
    let md = report::render(&meta, &body, &bench.not_measured);
    if let Some(dir) = o.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&o.out, md).with_context(|| format!("cannot write {}", o.out.display()))?;
    eprintln!("gatevm-bench: wrote {}", o.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_sentence() {
        assert_eq!(
            load_note("2.85 / 3.37 / 3.63", "1.00 / 2.00 / 3.00", 2),
            "Host load average (1 / 5 / 15 min, /proc/loadavg) on 2 cores: 2.85 / 3.37 / 3.63 before the case, 1.00 / 2.00 / 3.00 after it. Other work on the machine slows every row, the baseline included, and widens min..max."
        );
    }

    #[test]
    fn case_titles_match_the_sections() {
        assert_eq!(Case::Memory.title(), "Host memory");
        assert!(Case::Boot.as_user_too() && Case::Memory.as_user_too());
        assert!(!Case::Net.as_user_too() && !Case::Volume.as_user_too());
        assert_eq!(Case::Volume.name(), "volume");
        let mut names: Vec<&str> = Case::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Case::ALL.len());
        let mut titles: Vec<&str> = Case::ALL.iter().map(|c| c.title()).collect();
        titles.dedup();
        assert_eq!(titles.len(), Case::ALL.len());
    }
}
