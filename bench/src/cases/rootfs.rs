//! Root filesystem build: gatevm's rootfs recipe built from scratch (cold) and what `gatevm
//! setup` costs when the rootfs is already there (cached), beside a plain `mmdebstrap
//! --variant=minbase` of the same suite (the package download and unpack floor).

use super::{summary, Bench};
use crate::markdown::{num, times, Align, Section, Table};
use crate::runner;
use crate::stats::{ratio, Summary};
use crate::trees;
use anyhow::Context;
use gatevm_runtime::rootfs::RootfsRecipe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SETUP_TIMEOUT: Duration = Duration::from_secs(900);
/// What `gatevm setup` says when it found everything in place.
const SETUP_NOTHING_TO_DO: &str = "nothing to do";

/// Removes the case's work directory when dropped (unless something is mounted inside).
struct RemoveTreeOnDrop(PathBuf);

impl Drop for RemoveTreeOnDrop {
    fn drop(&mut self) {
        if let Err(e) = trees::remove_tree(&self.0) {
            eprintln!("gatevm-bench: warning: {e:#}");
        }
    }
}

/// The baseline's command: mmdebstrap as gatevm's builder runs it (same variant, suite,
/// locale, stdin from /dev/null and so the same mirror), without the extra packages.
pub fn minbase_command(recipe: &RootfsRecipe, dir: &Path) -> Command {
    let mut c = Command::new("mmdebstrap");
    c.arg(format!("--variant={}", recipe.variant))
        .arg(&recipe.suite)
        .arg(dir)
        .env("LC_ALL", "C.UTF-8");
    c
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Bench<'_> {
    /// Runs the rootfs case.
    pub fn rootfs(&mut self) -> anyhow::Result<Section> {
        let kernel = trees::runtime_kernel()?;
        let recipe = RootfsRecipe::for_kernel(&kernel.release);
        let cache = trees::cache_dir(|k| std::env::var_os(k))?;
        let work = cache.join(format!("work-{}", std::process::id()));
        std::fs::create_dir_all(&work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        let _rm = RemoveTreeOnDrop(work.clone());
        let log = cache.join("rootfs-build.log");

        let (mut base, mut cold) = (Vec::new(), Vec::new());
        for i in 1..=self.rootfs_runs {
            let dir = work.join(format!("minbase-{i}"));
            eprintln!(
                "rootfs {i}/{}: mmdebstrap --variant={} {} (baseline)",
                self.rootfs_runs, recipe.variant, recipe.suite
            );
            let f = runner::run(
                &mut minbase_command(&recipe, &dir),
                trees::BUILD_TIMEOUT,
                self.scratch,
            )?
            .ok()?;
            base.push(secs(f.elapsed));
            trees::remove_tree(&dir)?;

            eprintln!(
                "rootfs {i}/{}: gatevm's recipe from scratch ({})",
                self.rootfs_runs,
                recipe.describe()
            );
            let root = work.join(format!("cold-{i}"));
            let (_tree, took) = trees::build_killable(&root, &recipe, &kernel, &log)?;
            cold.push(secs(took));
            trees::remove_tree(&root)?;
            eprintln!(
                "rootfs {i}/{}: minbase {} s, gatevm's recipe {} s",
                self.rootfs_runs,
                num(base[i - 1]),
                num(cold[i - 1])
            );
        }

        let mut cached = Vec::new();
        let mut setup_did = Vec::new();
        for i in 1..=self.runs {
            let mut c = Command::new(self.gv.bin());
            c.arg("setup");
            let f = runner::run(&mut c, SETUP_TIMEOUT, self.scratch)?.ok()?;
            cached.push(secs(f.elapsed));
            let out = format!("{}\n{}", f.stdout, f.stderr);
            if !out.contains(SETUP_NOTHING_TO_DO) {
                setup_did.push(format!("run {i}: {}", f.last_line()));
            }
            eprintln!(
                "rootfs: `gatevm setup` (set up) {i}/{}: {} s",
                self.runs,
                num(cached[i - 1])
            );
        }

        let b = summary(&base);
        let mut t = Table::new(&[
            ("measurement", Align::Left),
            ("n", Align::Right),
            ("min (s)", Align::Right),
            ("median (s)", Align::Right),
            ("max (s)", Align::Right),
            ("median / minbase", Align::Right),
        ]);
        let mut row = |what: &str, s: &Summary| {
            t.row(&[
                what.to_string(),
                s.n.to_string(),
                num(s.min),
                num(s.median),
                num(s.max),
                times(ratio(s.median, b.median)),
            ]);
        };
        row(
            &format!(
                "baseline: `mmdebstrap --variant={} {} DIR` (download + unpack floor)",
                recipe.variant, recipe.suite
            ),
            &b,
        );
        row(
            &format!(
                "cold: gatevm's rootfs recipe from scratch ({} packages, kernel modules, depmod)",
                recipe.packages.len()
            ),
            &summary(&cold),
        );
        row(
            "cached: `gatevm setup` with the runtime and rootfs in place",
            &summary(&cached),
        );
        let mut notes = vec![
            format!(
                "Cold: `gatevm_runtime::rootfs::build_rootfs` (what `gatevm setup` runs) of recipe `{}` ({}) into a fresh directory, wall time; the tree is deleted afterwards. Baseline: the same mmdebstrap call without `--include`, into a fresh directory, in the same run just before each cold build. Both fetch their packages afresh from the mirror mmdebstrap uses (the same for both), so both include the download.",
                recipe.id(),
                recipe.describe()
            ),
            format!(
                "Cached: wall time of `gatevm setup` on this set-up machine ({} run{}): it checks each component (host packages, kernel, QEMU, helpers, rootfs, initramfs) and finds it in place.",
                self.runs,
                if self.runs == 1 { "" } else { "s" }
            ),
        ];
        if !setup_did.is_empty() {
            notes.push(format!(
                "`gatevm setup` did not find everything in place in every run, so its row is not purely the cached case: {}.",
                setup_did.join("; ")
            ));
        }
        if self.rootfs_runs == 1 {
            notes.push("One cold build and one baseline (`--rootfs-runs 1`, the default: each downloads and unpacks every package again): min = median = max.".into());
        }
        match self.ssh_rootfs_build {
            Some(d) => {
                t.row(&[
                    format!(
                        "the exec case's ssh test rootfs (gatevm's recipe + {}), built in this run",
                        trees::SSH_PACKAGE
                    ),
                    "1".into(),
                    num(secs(d)),
                    num(secs(d)),
                    num(secs(d)),
                    times(ratio(secs(d), b.median)),
                ]);
            }
            None => notes.push(format!(
                "The exec case's ssh test rootfs (gatevm's recipe + {}) was not built in this run (reused from the cache, or the exec case did not run): not timed.",
                trees::SSH_PACKAGE
            )),
        }
        Ok(Section {
            title: "Root filesystem build".into(),
            intro: vec![format!(
                "Cold builds: {} (`--rootfs-runs`); cached: {} (`--runs`).",
                self.rootfs_runs, self.runs
            )],
            tables: vec![t],
            targets: vec![],
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_gatevms_mmdebstrap_call_without_the_packages() {
        let r = RootfsRecipe::for_kernel("k");
        let c = minbase_command(&r, Path::new("/w/minbase-1"));
        assert_eq!(
            runner::label(&c),
            format!(
                "mmdebstrap --variant={} {} /w/minbase-1",
                r.variant, r.suite
            )
        );
        assert_eq!(r.variant, "minbase");
        assert!(c
            .get_envs()
            .any(|(k, v)| k == "LC_ALL" && v == Some(std::ffi::OsStr::new("C.UTF-8"))));
    }
}
