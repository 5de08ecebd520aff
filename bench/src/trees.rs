//! Root filesystem trees the benchmarks build with gatevm's own recipe and builder
//! (`gatevm_runtime::rootfs`): the ssh test rootfs (gatevm's rootfs plus openssh-server, cached in
//! the benchmark's cache directory) and the throwaway trees of the rootfs build case.
//!
//! A build runs mmdebstrap for minutes: it runs on a thread of its own while the caller watches
//! for Ctrl-C and the timeout, and then sends SIGTERM to the child processes the build started
//! (by pid: the children of this process that were not there before it).

use crate::procs::{Procfs, RealProc};
use crate::runner;
use anyhow::{bail, Context};
use gatevm_runtime::rootfs::{self, RootfsRecipe};
use gatevm_runtime::KernelInfo;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The package the ssh test rootfs adds to gatevm's recipe.
pub const SSH_PACKAGE: &str = "openssh-server";
/// How long a rootfs build (mmdebstrap) may take.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long a stopped build gets to clean up and end.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// The benchmark's cache directory: `$GATEVM_BENCH_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/gatevm-bench`, else `$HOME/.cache/gatevm-bench`.
pub fn cache_dir(env: impl Fn(&str) -> Option<OsString>) -> anyhow::Result<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = set("GATEVM_BENCH_CACHE_DIR") {
        return Ok(d);
    }
    if let Some(d) = set("XDG_CACHE_HOME") {
        return Ok(d.join("gatevm-bench"));
    }
    match set("HOME") {
        Some(h) => Ok(h.join(".cache/gatevm-bench")),
        None => bail!("no cache directory for the benchmarks: set HOME or GATEVM_BENCH_CACHE_DIR"),
    }
}

/// The ssh test rootfs's recipe: gatevm's for `kernel_release`, plus openssh-server.
pub fn ssh_recipe(kernel_release: &str) -> RootfsRecipe {
    let mut r = RootfsRecipe::for_kernel(kernel_release);
    r.packages.push(SSH_PACKAGE.to_string());
    r.packages.sort();
    r.packages.dedup();
    r
}

/// The installed runtime's guest kernel (`gatevm setup` must have run).
pub fn runtime_kernel() -> anyhow::Result<KernelInfo> {
    let rt = gatevm_runtime::Runtime::load()?;
    Ok(rt.kernel().clone())
}

/// Runs `build_rootfs(root, recipe, kernel, log)` on a thread; on Ctrl-C or after
/// [`BUILD_TIMEOUT`] sends SIGTERM to the processes it started and fails. Returns the tree and
/// the build's wall time.
pub fn build_killable(
    root: &Path,
    recipe: &RootfsRecipe,
    kernel: &KernelInfo,
    log: &Path,
) -> anyhow::Result<(PathBuf, Duration)> {
    runner::check_interrupted()?;
    let me = std::process::id();
    let before = RealProc.children(me);
    let (tx, rx) = mpsc::channel();
    let (root2, recipe2, kernel2, log2) = (
        root.to_path_buf(),
        recipe.clone(),
        kernel.clone(),
        log.to_path_buf(),
    );
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let r = rootfs::build_rootfs(&root2, &recipe2, &kernel2, &log2);
        let _ = tx.send(r);
    });
    let deadline = t0 + BUILD_TIMEOUT;
    let mut why: Option<String> = None;
    let mut stopped_at = t0;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(tree)) => {
                if let Some(why) = why {
                    bail!("building the rootfs: {why}");
                }
                return Ok((tree, t0.elapsed()));
            }
            Ok(Err(e)) => {
                if let Some(why) = why {
                    bail!("building the rootfs: {why}");
                }
                return Err(anyhow::Error::from(e)).context(format!(
                    "building the rootfs {} in {}",
                    recipe.id(),
                    root.display()
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the rootfs build thread died"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(why) = &why {
            if stopped_at.elapsed() > STOP_GRACE {
                // The thread is left behind: it ends with this process.
                bail!(
                    "building the rootfs: {why}, and the build did not end within {} s of SIGTERM",
                    STOP_GRACE.as_secs()
                );
            }
        } else {
            let now = Instant::now();
            if runner::interrupted() {
                why = Some("interrupted".into());
            } else if now >= deadline {
                why = Some(format!(
                    "timed out after {} s (stopped)",
                    BUILD_TIMEOUT.as_secs()
                ));
            }
            if why.is_some() {
                stopped_at = Instant::now();
                // The build cleans up after its commands fail; the thread then ends.
                for pid in RealProc.children(me) {
                    if !before.contains(&pid) {
                        // SAFETY: kill(2) has no memory-safety preconditions. The pid is a child
                        // of this process the build started (not there before it), just listed
                        // as still a child, so unreaped; only if it exits and the build thread
                        // reaps it in the moment between the listing and this call could the pid
                        // be reused, which the kernel makes unlikely by not reusing pids at once.
                        unsafe {
                            libc::kill(pid as libc::pid_t, libc::SIGTERM);
                        }
                    }
                }
            }
        }
    }
}

/// The ssh test rootfs: found in `cache/rootfs/<recipe id>` or built there (with its build
/// time); older trees there are removed. `log` receives the build's output.
pub fn ensure_ssh_rootfs(
    cache: &Path,
    kernel: &KernelInfo,
    log: &Path,
) -> anyhow::Result<(PathBuf, Option<Duration>)> {
    let root = cache.join("rootfs");
    let recipe = ssh_recipe(&kernel.release);
    if let Some(tree) = rootfs::find_rootfs(&root, &recipe) {
        return Ok((tree, None));
    }
    eprintln!(
        "exec: building the ssh test rootfs {} ({}) in {}: a few minutes, once",
        recipe.id(),
        recipe.describe(),
        root.display()
    );
    let (tree, took) = build_killable(&root, &recipe, kernel, log)?;
    for old in rootfs::list_rootfs(&root) {
        if old.id != recipe.id() {
            if let Err(e) = remove_tree(&old.path) {
                eprintln!("gatevm-bench: warning: cannot remove the old ssh test rootfs: {e:#}");
            }
        }
    }
    Ok((tree, Some(took)))
}

/// Makes `tree` accept `public_key` for root and makes sure it has ssh host keys.
pub fn prepare_ssh_tree(
    tree: &Path,
    public_key: &str,
    scratch: &crate::scratch::Scratch,
) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let sshd = tree.join("usr/sbin/sshd");
    if !sshd.is_file() {
        bail!(
            "the ssh test rootfs {} has no /usr/sbin/sshd: delete it so that it is built again",
            tree.display()
        );
    }
    let dot_ssh = tree.join("root/.ssh");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&dot_ssh)
        .with_context(|| format!("cannot create {}", dot_ssh.display()))?;
    let keys = dot_ssh.join("authorized_keys");
    std::fs::write(&keys, public_key)
        .with_context(|| format!("cannot write {}", keys.display()))?;
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", keys.display()))?;
    if !tree.join("etc/ssh/ssh_host_ed25519_key").is_file() {
        // openssh-server's postinst normally made them; `ssh-keygen -A -f ROOT` makes the missing.
        let mut c = Command::new("ssh-keygen");
        c.arg("-A").arg("-f").arg(tree);
        runner::run(&mut c, Duration::from_secs(60), scratch)?.ok()?;
    }
    Ok(())
}

/// The mount points in a /proc/self/mountinfo text (octal escapes decoded).
pub fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            let b = m.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                // `\ooo`: three octal digits, at most 0o377.
                let escaped = b
                    .get(i + 1..i + 4)
                    .filter(|o| b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)))
                    .and_then(|o| {
                        let v = o.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                        u8::try_from(v).ok()
                    });
                match escaped {
                    Some(v) => {
                        out.push(v);
                        i += 4;
                    }
                    None => {
                        out.push(b[i]);
                        i += 1;
                    }
                }
            }
            PathBuf::from(OsString::from_vec(out))
        })
        .collect()
}

/// Removes a tree the benchmark built, unless something is mounted inside it (an interrupted
/// mmdebstrap may leave /proc or /dev mounted: deleting through those would reach the host's).
pub fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let inside: Vec<PathBuf> = parse_mount_points(&info)
        .into_iter()
        .filter(|m| m.starts_with(&abs))
        .collect();
    if !inside.is_empty() {
        bail!(
            "{} still has mounts inside ({}): unmount them (umount -R) and delete it by hand",
            dir.display(),
            inside
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn cache_dir_lookup() {
        assert_eq!(
            cache_dir(env(&[("GATEVM_BENCH_CACHE_DIR", "/c"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/c")
        );
        assert_eq!(
            cache_dir(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/x/gatevm-bench")
        );
        assert_eq!(
            cache_dir(env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "")])).unwrap(),
            PathBuf::from("/h/.cache/gatevm-bench")
        );
        assert!(cache_dir(env(&[])).is_err());
    }

    #[test]
    fn ssh_recipe_is_gatevms_plus_openssh() {
        let base = RootfsRecipe::for_kernel("6.1.0-test");
        let r = ssh_recipe("6.1.0-test");
        assert_eq!(
            (r.revision, &r.suite, &r.variant, &r.kernel_release),
            (
                base.revision,
                &base.suite,
                &base.variant,
                &base.kernel_release
            )
        );
        let mut want = base.packages.clone();
        want.push(SSH_PACKAGE.into());
        want.sort();
        assert_eq!(r.packages, want);
        assert_ne!(r.id(), base.id());
        assert_eq!(ssh_recipe("6.1.0-test").id(), r.id());
    }

    #[test]
    fn mount_points() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    35 22 0:5 / /tmp/build\\040dir/proc rw - proc proc rw\n\
                    36 22 0:6 / /odd\\134name rw - tmpfs t rw\n";
        assert_eq!(
            parse_mount_points(text),
            vec![
                PathBuf::from("/"),
                PathBuf::from("/tmp/build dir/proc"),
                PathBuf::from("/odd\\name")
            ]
        );
        assert!(parse_mount_points("").is_empty());
    }

    #[test]
    fn remove_tree_removes_a_plain_tree() {
        let s = crate::scratch::Scratch::new("gatevm-bench-test").unwrap();
        let d = s.path().join("tree");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), b"x").unwrap();
        remove_tree(&d).unwrap();
        assert!(!d.exists());
        remove_tree(&d).unwrap();
    }

    #[test]
    fn prepare_needs_sshd_and_writes_the_key() {
        let s = crate::scratch::Scratch::new("gatevm-bench-test").unwrap();
        let t = s.path().join("tree");
        std::fs::create_dir_all(&t).unwrap();
        let e = prepare_ssh_tree(&t, "ssh-ed25519 AAAA x\n", &s).unwrap_err();
        assert!(e.to_string().contains("has no /usr/sbin/sshd"), "{e}");
        std::fs::create_dir_all(t.join("usr/sbin")).unwrap();
        std::fs::write(t.join("usr/sbin/sshd"), b"").unwrap();
        std::fs::create_dir_all(t.join("etc/ssh")).unwrap();
        std::fs::write(t.join("etc/ssh/ssh_host_ed25519_key"), b"").unwrap();
        prepare_ssh_tree(&t, "ssh-ed25519 AAAA x\n", &s).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.join("root/.ssh/authorized_keys")).unwrap(),
            "ssh-ed25519 AAAA x\n"
        );
    }
}
