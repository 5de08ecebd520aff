//! The supervisor's child processes: spawned with their output in a capped log and a death signal
//! tied to the supervisor, tracked by pid and start time, terminated and reaped on every exit path.

use super::{io_err, SupervisorError};
use crate::state::ProcId;
use gatevm_net::confine::HelperConfine;
use gatevm_net::loopback::LoopbackGuard;
use std::os::fd::RawFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The environment variable naming the instance a process belongs to.
pub const INSTANCE_ENV: &str = "GATEVM_INSTANCE";

/// A child process the supervisor owns (a helper or the VMM).
pub(crate) struct OwnedChild {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) id: ProcId,
    /// The end of the drain that copies its output into its capped log.
    pub(crate) drained: crate::logcap::Drained,
}

impl OwnedChild {
    /// Terminates the process (SIGTERM, then SIGKILL after `grace`) and reaps it.
    pub(crate) async fn terminate(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal(self.id.pid, libc::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// Sends `sig` to `pid`.
pub(crate) fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects; pid is a child we have not reaped yet.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// What a child gets besides its command: where it runs and what it inherits.
pub(crate) struct SpawnSpec<'a> {
    /// Its capped log.
    pub(crate) log: &'a Path,
    /// Its working directory (the instance's runtime directory, named like the instance).
    pub(crate) cwd: &'a Path,
    /// The loopback guard it enters (no way to the host's loopback).
    pub(crate) guard: Option<LoopbackGuard>,
    /// Descriptors it keeps across exec.
    pub(crate) inherit: Vec<RawFd>,
    /// The confinement applied to it (uid, Landlock).
    pub(crate) confine: Option<Arc<HelperConfine>>,
    /// The uid and gid it runs as (set by root only; it then runs in `/`).
    pub(crate) run_as: Option<(u32, u32)>,
    /// A seccomp filter installed last before exec (with no_new_privs).
    pub(crate) seccomp: Option<Arc<Vec<libc::sock_filter>>>,
}

impl<'a> SpawnSpec<'a> {
    /// A child that runs in `cwd` with its output in `log`, and nothing more.
    pub(crate) fn plain(log: &'a Path, cwd: &'a Path) -> SpawnSpec<'a> {
        SpawnSpec {
            log,
            cwd,
            guard: None,
            inherit: vec![],
            confine: None,
            run_as: None,
            seccomp: None,
        }
    }
}

/// Spawns a helper with its output in a capped log (through a pipe the supervisor drains) and a
/// death signal tied to this thread.
pub(crate) fn spawn_owned(
    name: &'static str,
    mut cmd: Command,
    spec: SpawnSpec<'_>,
) -> Result<OwnedChild, SupervisorError> {
    let (rd, logf) = crate::logcap::pipe().map_err(io_err("creating a log pipe"))?;
    let logf2 = logf
        .try_clone()
        .map_err(io_err("duplicating a log pipe descriptor"))?;
    let drained = crate::logcap::drain_into(rd, spec.log, crate::logcap::HELPER_LOG_CAP)
        .map_err(io_err(format!("opening {}", spec.log.display())))?;
    // Every process of an instance carries its name in the environment, so tools (and the tests'
    // leak checks) find even one whose command line names no path of the instance (passt).
    let instance = spec
        .cwd
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    cmd.stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2)
        .current_dir(spec.cwd)
        .env(INSTANCE_ENV, instance)
        .kill_on_drop(true);
    // The identity changes before the working directory is entered (and before the pre-exec
    // steps, so the death signal set there is not cleared by the change): the run directory is
    // root's own, so such a child runs in `/`.
    if let Some((uid, gid)) = spec.run_as {
        cmd.uid(uid).gid(gid).current_dir("/");
    }
    set_pre_exec(
        &mut cmd,
        spec.guard,
        spec.inherit,
        spec.confine,
        spec.seccomp,
    );
    let child = cmd.spawn().map_err(io_err(format!("starting {name}")))?;
    // Our copies of the pipe's write end go with the command, so the drain ends with the child.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    let id = ProcId::of(pid).unwrap_or(ProcId {
        pid,
        start_ticks: 0,
        boot_id: None,
    });
    tracing::info!("started {name} as pid {pid}");
    Ok(OwnedChild {
        name,
        child,
        id,
        drained,
    })
}

/// What runs in the child between fork and exec: the death signal, the loopback guard, the
/// inherited descriptor and the confinement.
fn set_pre_exec(
    cmd: &mut Command,
    guard: Option<LoopbackGuard>,
    inherit: Vec<RawFd>,
    confine: Option<Arc<HelperConfine>>,
    seccomp: Option<Arc<Vec<libc::sock_filter>>>,
) {
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe functions
    // (prctl, getppid, _exit, open/write/close in enter_self, and the system calls of
    // HelperConfine::apply_in_child).
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            if let Some(g) = &guard {
                g.enter_self()?;
            }
            // A descriptor the child is told about by number keeps it across exec.
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Last: the uid change and Landlock come after entering the guard's cgroup.
            if let Some(c) = &confine {
                c.apply_in_child(parent)?;
            }
            if let Some(p) = &seccomp {
                super::seccomp::install(p)?;
            }
            Ok(())
        });
    }
}

/// Last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

/// Waits for a socket file to appear while its creator runs.
pub(crate) async fn wait_socket(
    p: &Path,
    owner: &mut OwnedChild,
    log: &Path,
    timeout: Duration,
) -> Result<(), SupervisorError> {
    let start = Instant::now();
    loop {
        if p.exists() {
            return Ok(());
        }
        if let Ok(Some(st)) = owner.child.try_wait() {
            // Its last words are in the log once the drain has copied them.
            owner.drained.wait(Duration::from_secs(1)).await;
            return Err(SupervisorError::Boot(format!(
                "{} exited ({st}) before creating {}: {}",
                owner.name,
                p.display(),
                log_tail(log, 3)
            )));
        }
        if start.elapsed() > timeout {
            return Err(SupervisorError::Boot(format!(
                "{} did not create {} in time",
                owner.name,
                p.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for a helper's socket (10 s at most) and keeps the helper among `children` either way,
/// so a failure still tears it down.
pub(crate) async fn keep_when_listening(
    mut helper: OwnedChild,
    socket: &Path,
    log: &Path,
    children: &mut Vec<OwnedChild>,
) -> Result<(), SupervisorError> {
    let mut waited = wait_socket(socket, &mut helper, log, Duration::from_secs(10)).await;
    if waited.is_ok() {
        waited = wait_listening(socket, &mut helper, log).await;
    }
    children.push(helper);
    waited
}

/// Waits until the socket at `p` listens: a helper binds its path a moment before it listens,
/// and a VMM that connects in between is refused (seen with passt once virtiofsd no longer
/// started first). Read from `/proc/net/unix` without connecting (passt's vhost-user socket takes
/// one client). A path that does not show there at all (bound in another network namespace)
/// counts as listening after a short grace.
async fn wait_listening(
    p: &Path,
    owner: &mut OwnedChild,
    log: &Path,
) -> Result<(), SupervisorError> {
    let start = Instant::now();
    loop {
        // Whether the helper still runs comes first: a helper killed after binding leaves its
        // path behind and no socket in the table, which must not read as "listening elsewhere".
        if let Ok(Some(st)) = owner.child.try_wait() {
            owner.drained.wait(Duration::from_secs(1)).await;
            return Err(SupervisorError::Boot(format!(
                "{} exited ({st}) before listening on {}: {}",
                owner.name,
                p.display(),
                log_tail(log, 3)
            )));
        }
        let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        match unix_socket_listening(&table, p) {
            Some(true) => return Ok(()),
            None if start.elapsed() > Duration::from_millis(200) => return Ok(()),
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(SupervisorError::Boot(format!(
                "{} did not listen on {} in time",
                owner.name,
                p.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Whether `/proc/net/unix` (`table`) shows a socket bound to `p` listening (`__SO_ACCEPTCON`,
/// 0x10000, in its flags): `Some(true)` listening, `Some(false)` bound only, `None` not there.
pub(crate) fn unix_socket_listening(table: &str, p: &Path) -> Option<bool> {
    let want = p.to_str()?;
    let mut seen = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[7..].join(" ") != want {
            continue;
        }
        let flags = u32::from_str_radix(f[3], 16).unwrap_or(0);
        if flags & 0x1_0000 != 0 {
            return Some(true);
        }
        seen = Some(false);
    }
    seen
}

/// The first helper to exit, with its status (pending forever when there are none).
pub(crate) async fn first_exit(
    helpers: &mut [OwnedChild],
) -> (&'static str, std::io::Result<std::process::ExitStatus>) {
    let waits: Vec<_> = helpers
        .iter_mut()
        .map(|h| {
            let name = h.name;
            Box::pin(async move { (name, h.child.wait().await) })
        })
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    let mut waits = waits;
    std::future::poll_fn(move |cx| {
        for w in waits.iter_mut() {
            if let std::task::Poll::Ready(r) = std::future::Future::poll(w.as_mut(), cx) {
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// An exit status in words: `exit code N`, `killed by signal N`.
pub(crate) fn describe(st: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "unknown status".into(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

/// The boot's error when the helper `name` exited before the VM was ready: the helper named as
/// the cause, how it ended, and its log.
pub(crate) fn helper_exited_during_boot(
    paths: &crate::paths::InstancePaths,
    name: &str,
    st: std::io::Result<std::process::ExitStatus>,
) -> super::SupervisorError {
    super::SupervisorError::Boot(format!(
        "{name} exited during boot ({}); see {}",
        describe(st),
        paths.log(name).display()
    ))
}

/// How the VM process ended, as the stop reason says it.
pub(crate) fn describe_vm_exit(st: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match &st {
        Ok(s) if s.success() => "the guest powered off".into(),
        Ok(s) if s.signal().is_some() => {
            format!("the VM process was {} from outside", describe(st))
        }
        _ => format!("the VM process ended ({})", describe(st)),
    }
}

#[cfg(test)]
mod listening_tests {
    use super::*;

    #[test]
    fn a_bound_socket_is_not_listening_until_its_flag_says_so() {
        let head = "Num       RefCount Protocol Flags    Type St Inode Path\n";
        let bound = "0000000000000000: 00000002 00000000 00000000 0001 01 4242 /run/g/x/net.sock\n";
        let listening =
            "0000000000000000: 00000002 00000000 00010000 0001 01 4243 /run/g/x/net.sock\n";
        let other = "0000000000000000: 00000002 00000000 00010000 0001 01 9 /run/g/y/net.sock\n";
        let p = Path::new("/run/g/x/net.sock");
        assert_eq!(unix_socket_listening(&format!("{head}{other}"), p), None);
        assert_eq!(
            unix_socket_listening(&format!("{head}{bound}{other}"), p),
            Some(false)
        );
        assert_eq!(
            unix_socket_listening(&format!("{head}{bound}{listening}"), p),
            Some(true)
        );
        let spaced = "0000000000000000: 00000002 00000000 00010000 0001 01 7 /run/a b/net.sock\n";
        assert_eq!(
            unix_socket_listening(&format!("{head}{spaced}"), Path::new("/run/a b/net.sock")),
            Some(true)
        );
        // A real listener of this process shows as listening.
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("l.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let table = std::fs::read_to_string("/proc/net/unix").unwrap();
        assert_eq!(unix_socket_listening(&table, &sock), Some(true));
    }
}
