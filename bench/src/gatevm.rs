//! The gatevm commands the benchmarks drive, each with a timeout, on one instance.

use crate::runner::{self, Finished};
use crate::scratch::Scratch;
use anyhow::{bail, Context};
use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `gatevm start` of a new instance may build its state disk first.
pub const START_TIMEOUT: Duration = Duration::from_secs(300);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
const DELETE_TIMEOUT: Duration = Duration::from_secs(120);
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
const RM_TIMEOUT: Duration = Duration::from_secs(120);
/// `gatevm setup` of a user on the system runtime builds at most the agent's initramfs.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// The `PATH` gatevm gets when it runs as an ordinary user (a login's default).
pub const USER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An ordinary user the benchmarks run gatevm as (through `runuser`, from root), with their own
/// home and so their own data, cache and runtime directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsUser {
    /// The user name.
    pub name: String,
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// The home directory.
    pub home: PathBuf,
}

/// The user's uid, primary gid and home directory in an /etc/passwd text.
pub fn parse_passwd(text: &str, user: &str) -> Option<(u32, u32, PathBuf)> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || f[0] != user {
            return None;
        }
        Some((f[2].parse().ok()?, f[3].parse().ok()?, PathBuf::from(f[5])))
    })
}

/// The argument vector that runs `bin` as `u`: `runuser -u USER -- env -i HOME=.. USER=..
/// LOGNAME=.. PATH=.. BIN`, so that nothing of root's environment (`GATEVM_*`, `XDG_*`) reaches
/// the user's gatevm: it finds its directories as a login of that user would.
pub fn user_argv(u: &AsUser, bin: &Path) -> Vec<OsString> {
    let mut home = OsString::from("HOME=");
    home.push(&u.home);
    vec![
        "runuser".into(),
        "-u".into(),
        u.name.clone().into(),
        "--".into(),
        "env".into(),
        "-i".into(),
        home,
        format!("USER={}", u.name).into(),
        format!("LOGNAME={}", u.name).into(),
        format!("PATH={USER_PATH}").into(),
        bin.as_os_str().to_owned(),
    ]
}

/// The fields of `gatevm status NAME --json` the benchmarks read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// `running`, `stopped`, ...
    pub state: String,
    /// VMM and acceleration, e.g. `qemu/tcg`.
    pub backend: Option<String>,
    /// Guest RAM configured.
    pub memory_mib: Option<u64>,
    /// The supervisor's pid.
    pub supervisor_pid: Option<u32>,
    /// The VM process's pid.
    pub vm_pid: Option<u32>,
    /// Milliseconds from start to the guest agent answering.
    pub agent_ready_ms: Option<u64>,
    /// Milliseconds from start to containerd being ready.
    pub ready_ms: Option<u64>,
    /// The network helper (`gvproxy`, `passt`).
    pub net: Option<String>,
    /// The host-side socket of the guest's containerd API.
    pub containerd_socket: Option<String>,
}

/// Parses the status document.
pub fn parse_status(json: &str) -> anyhow::Result<Status> {
    let v: Value = serde_json::from_str(json).context("the status is not JSON")?;
    if !v.is_object() {
        bail!("the status is not a JSON object");
    }
    let u64_of = |k: &str| v.get(k).and_then(Value::as_u64);
    let u32_of = |k: &str| u64_of(k).and_then(|n| u32::try_from(n).ok());
    Ok(Status {
        state: v
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        backend: v.get("backend").and_then(Value::as_str).map(str::to_string),
        memory_mib: u64_of("memory_mib"),
        supervisor_pid: u32_of("supervisor_pid"),
        vm_pid: u32_of("vm_pid"),
        agent_ready_ms: u64_of("agent_ready_ms"),
        ready_ms: u64_of("ready_ms"),
        net: v.get("net").and_then(Value::as_str).map(str::to_string),
        containerd_socket: v
            .get("containerd_socket")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// The names in `gatevm list --json` (an array of status documents).
pub fn parse_list_names(json: &str) -> anyhow::Result<Vec<String>> {
    let v: Value = serde_json::from_str(json).context("the instance list is not JSON")?;
    let Some(a) = v.as_array() else {
        bail!("the instance list is not a JSON array");
    };
    Ok(a.iter()
        .filter_map(|d| d.get("name").and_then(Value::as_str))
        .map(str::to_string)
        .collect())
}

/// Whether `gatevm start --help` offers the option `--NAME`.
pub fn help_has_option(help: &str, name: &str) -> bool {
    let opt = format!("--{name}");
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[')
        .any(|w| w == opt)
}

/// Deletes the instance when dropped: at the end, on an error, after Ctrl-C.
pub struct DeleteOnDrop<'a>(pub Gatevm<'a>);

impl Drop for DeleteOnDrop<'_> {
    fn drop(&mut self) {
        eprintln!("gatevm-bench: deleting instance {:?}", self.0.name);
        if let Err(e) = self.0.delete_uninterruptible() {
            eprintln!(
                "gatevm-bench: warning: could not delete instance {:?}: {e:#} (run `gatevm delete {} --force`)",
                self.0.name, self.0.name
            );
        }
    }
}

/// The gatevm binary and the instance it works on, run as root (the caller) or as an ordinary
/// user.
pub struct Gatevm<'a> {
    bin: PathBuf,
    /// The instance.
    pub name: String,
    scratch: &'a Scratch,
    user: Option<AsUser>,
}

impl<'a> Gatevm<'a> {
    /// Drives `bin` on instance `name`.
    pub fn new(bin: &Path, name: &str, scratch: &'a Scratch) -> Gatevm<'a> {
        Gatevm {
            bin: bin.to_owned(),
            name: name.to_string(),
            scratch,
            user: None,
        }
    }

    /// The same binary on the same instance name, run as the ordinary user `u` (in that user's
    /// own data directory).
    pub fn as_user(&self, u: AsUser) -> Gatevm<'a> {
        Gatevm {
            user: Some(u),
            ..self.on(&self.name)
        }
    }

    /// The user gatevm runs as, when not the caller.
    pub fn user(&self) -> Option<&AsUser> {
        self.user.as_ref()
    }

    /// Who runs it, for the report: `root` (the caller) or `user NAME`.
    pub fn who(&self) -> String {
        match &self.user {
            Some(u) => format!("user {}", u.name),
            None => "root".to_string(),
        }
    }

    /// A command that runs the binary (through `runuser` for a user).
    fn command(&self) -> Command {
        match &self.user {
            None => Command::new(&self.bin),
            Some(u) => {
                let argv = user_argv(u, &self.bin);
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        }
    }

    /// `gatevm setup` (as a user on the system runtime: checks it and builds the agent's
    /// initramfs in the user's cache once).
    pub fn setup(&self) -> anyhow::Result<()> {
        self.run(&["setup"], SETUP_TIMEOUT)?.ok()?;
        Ok(())
    }

    /// The binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The same binary on another instance.
    pub fn on(&self, name: &str) -> Gatevm<'a> {
        Gatevm {
            user: self.user.clone(),
            ..Gatevm::new(&self.bin, name, self.scratch)
        }
    }

    fn run<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> anyhow::Result<Finished> {
        let mut c = self.command();
        c.args(args);
        runner::run(&mut c, timeout, self.scratch)
    }

    /// `gatevm start NAME`: the wall time.
    pub fn start(&self) -> anyhow::Result<Duration> {
        Ok(self
            .run(&["start", &self.name], START_TIMEOUT)?
            .ok()?
            .elapsed)
    }

    /// `gatevm start NAME ARGS...`: the wall time.
    pub fn start_with(&self, args: &[&str]) -> anyhow::Result<Duration> {
        let mut a = vec!["start", self.name.as_str()];
        a.extend_from_slice(args);
        Ok(self.run(&a, START_TIMEOUT)?.ok()?.elapsed)
    }

    /// `gatevm SUBCOMMAND --help`.
    pub fn help(&self, subcommand: &str) -> anyhow::Result<String> {
        Ok(self
            .run(&[subcommand, "--help"], STATUS_TIMEOUT)?
            .ok()?
            .stdout)
    }

    /// The instances' names (`gatevm list --json`).
    pub fn list_names(&self) -> anyhow::Result<Vec<String>> {
        let f = self.run(&["list", "--json"], STATUS_TIMEOUT)?.ok()?;
        parse_list_names(&f.stdout).with_context(|| format!("reading the output of `{}`", f.label))
    }

    /// Stops the instance if it runs (to keep its VM from competing for the CPUs).
    pub fn stop_if_running(&self) -> anyhow::Result<()> {
        if matches!(self.status(), Ok(s) if s.state == "running") {
            eprintln!("gatevm-bench: stopping instance {:?} meanwhile", self.name);
            self.stop()?;
        }
        Ok(())
    }

    /// `gatevm exec -i NAME -- ARGV...` with standard input from `stdin`.
    pub fn exec_with_stdin(&self, argv: &[&str], stdin: std::fs::File) -> anyhow::Result<()> {
        let mut c = self.command();
        c.args(["exec", "-i", &self.name, "--"]).args(argv);
        runner::run_with_stdin(&mut c, stdin, EXEC_TIMEOUT, self.scratch)?.ok()?;
        Ok(())
    }

    /// `gatevm exec NAME -- ARGV...` with a timeout; a non-zero exit is an error.
    pub fn exec_output(&self, argv: &[&str], timeout: Duration) -> anyhow::Result<Finished> {
        let mut c = self.command();
        c.args(["exec", &self.name, "--"]).args(argv);
        runner::run(&mut c, timeout, self.scratch)?.ok()
    }

    /// `gatevm stop NAME`.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run(&["stop", &self.name], STOP_TIMEOUT)?.ok()?;
        Ok(())
    }

    /// `gatevm delete NAME --force`; an instance that does not exist is fine.
    pub fn delete(&self) -> anyhow::Result<()> {
        self.delete_with(true)
    }

    /// [`Gatevm::delete`], even after Ctrl-C (the clean-up on the way out).
    pub fn delete_uninterruptible(&self) -> anyhow::Result<()> {
        self.delete_with(false)
    }

    fn delete_with(&self, interruptible: bool) -> anyhow::Result<()> {
        let mut c = self.command();
        c.args(["delete", &self.name, "--force"]);
        let f = if interruptible {
            runner::run(&mut c, DELETE_TIMEOUT, self.scratch)?
        } else {
            runner::run_uninterruptible(&mut c, DELETE_TIMEOUT, self.scratch)?
        };
        if !f.status.success() && f.stderr.contains("does not exist") {
            return Ok(());
        }
        f.ok()?;
        Ok(())
    }

    /// `gatevm status NAME --json`.
    pub fn status(&self) -> anyhow::Result<Status> {
        let f = self
            .run(&["status", &self.name, "--json"], STATUS_TIMEOUT)?
            .ok()?;
        parse_status(&f.stdout).with_context(|| format!("reading the output of `{}`", f.label))
    }

    /// Starts the instance unless it runs.
    pub fn ensure_running(&self) -> anyhow::Result<Status> {
        let running = matches!(self.status(), Ok(s) if s.state == "running");
        if !running {
            eprintln!("gatevm-bench: starting instance {:?}", self.name);
            self.start()?;
        }
        let st = self.status()?;
        if st.state != "running" {
            bail!(
                "instance {:?} is {} after `gatevm start {}`",
                self.name,
                st.state,
                self.name
            );
        }
        Ok(st)
    }

    /// `gatevm exec NAME -- true`: the wall time.
    pub fn exec_true(&self) -> anyhow::Result<Duration> {
        Ok(self
            .run(&["exec", &self.name, "--", "true"], EXEC_TIMEOUT)?
            .ok()?
            .elapsed)
    }

    /// `gatevm image import NAME FILE`: the wall time.
    pub fn image_import(&self, file: &Path, timeout: Duration) -> anyhow::Result<Duration> {
        let args = [
            OsStr::new("image"),
            OsStr::new("import"),
            OsStr::new(&self.name),
            file.as_os_str(),
        ];
        Ok(self.run(&args, timeout)?.ok()?.elapsed)
    }

    /// `gatevm image rm NAME REF`.
    pub fn image_rm(&self, reference: &str) -> anyhow::Result<()> {
        self.run(&["image", "rm", &self.name, reference], RM_TIMEOUT)?
            .ok()?;
        Ok(())
    }
}

/// A status field that must be there after a start.
pub fn need<T>(v: Option<T>, field: &str, name: &str) -> anyhow::Result<T> {
    v.with_context(|| format!("`gatevm status {name} --json` has no {field}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let st = parse_status(
            r#"{"name":"bench","state":"running","healthy":true,"backend":"qemu/tcg",
                "cpus":2,"memory_mib":2048,"forwards":[],"supervisor_pid":101,"vm_pid":202,
                "agent":{"connected":true},"payloads":[],"started_at_ms":1,
                "agent_ready_ms":3400,"ready_ms":5100,"stop_reason":null,"last_error":null,
                "logs":"/x","containerd_socket":"/run/gatevm/bench/containerd.sock"}"#,
        )
        .unwrap();
        assert_eq!(
            st,
            Status {
                state: "running".into(),
                backend: Some("qemu/tcg".into()),
                memory_mib: Some(2048),
                supervisor_pid: Some(101),
                vm_pid: Some(202),
                agent_ready_ms: Some(3400),
                ready_ms: Some(5100),
                net: None,
                containerd_socket: Some("/run/gatevm/bench/containerd.sock".into()),
            }
        );
        let user =
            parse_status(r#"{"state":"running","net":"passt","backend":"qemu/tcg"}"#).unwrap();
        assert_eq!(user.net.as_deref(), Some("passt"));
        let stopped =
            parse_status(r#"{"state":"stopped","supervisor_pid":null,"vm_pid":null}"#).unwrap();
        assert_eq!(stopped.state, "stopped");
        assert_eq!(stopped.vm_pid, None);
        assert_eq!(stopped.containerd_socket, None);
        assert!(parse_status("[]").is_err());
        assert!(parse_status("not json").is_err());
        assert!(need(stopped.ready_ms, "ready_ms", "bench")
            .unwrap_err()
            .to_string()
            .contains("has no ready_ms"));
    }

    #[test]
    fn list_names() {
        assert_eq!(
            parse_list_names(r#"[{"name":"bench","state":"running"},{"name":"vmrun-12-ab","ephemeral":true},{"x":1}]"#)
                .unwrap(),
            vec!["bench", "vmrun-12-ab"]
        );
        assert_eq!(parse_list_names("[]").unwrap(), Vec::<String>::new());
        assert!(parse_list_names("{}").is_err());
        assert!(parse_list_names("").is_err());
    }

    #[test]
    fn options_in_help() {
        let help = "Options:\n      --cpus <CPUS>\n          Virtual CPUs\n      --net <HELPER>\n          The network helper\n      --no-publish\n";
        assert!(help_has_option(help, "net"));
        assert!(help_has_option(help, "cpus"));
        assert!(!help_has_option(help, "publish"));
        assert!(!help_has_option(
            "      --network <X>\n      --net-foo\n",
            "net"
        ));
        assert!(help_has_option("  -n, --net=<HELPER>  x", "net"));
    }

    #[test]
    fn passwd_entries() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      gatevm-ci:x:1002:1003::/home/gatevm-ci:/bin/sh\n\
                      broken:x:notanumber:1::/home/broken:/bin/sh\n\
                      short:x:5\n";
        assert_eq!(
            parse_passwd(passwd, "gatevm-ci"),
            Some((1002, 1003, PathBuf::from("/home/gatevm-ci")))
        );
        assert_eq!(
            parse_passwd(passwd, "root"),
            Some((0, 0, PathBuf::from("/root")))
        );
        assert_eq!(parse_passwd(passwd, "gatevm"), None);
        assert_eq!(parse_passwd(passwd, "broken"), None);
        assert_eq!(parse_passwd(passwd, "short"), None);
    }

    #[test]
    fn runs_as_the_user_with_a_clean_environment() {
        let u = AsUser {
            name: "gatevm-ci".into(),
            uid: 1002,
            gid: 1002,
            home: PathBuf::from("/home/gatevm-ci"),
        };
        let argv = user_argv(&u, Path::new("/w/target/release/gatevm"));
        let argv: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            argv,
            [
                "runuser",
                "-u",
                "gatevm-ci",
                "--",
                "env",
                "-i",
                "HOME=/home/gatevm-ci",
                "USER=gatevm-ci",
                "LOGNAME=gatevm-ci",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "/w/target/release/gatevm",
            ]
        );
        let scratch = Scratch::new("gatevm-bench-test").unwrap();
        let root = Gatevm::new(Path::new("/w/gatevm"), "bench", &scratch);
        assert_eq!(root.who(), "root");
        assert_eq!(root.command().get_program(), "/w/gatevm");
        let user = root.as_user(u.clone());
        assert_eq!(user.who(), "user gatevm-ci");
        assert_eq!(user.name, "bench");
        assert_eq!(user.command().get_program(), "runuser");
        // Another instance of the user's stays the user's.
        assert_eq!(user.on("benchnet").user(), Some(&u));
        assert_eq!(root.on("benchnet").user(), None);
    }
}
