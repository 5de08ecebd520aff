//! `container run`: check the image and the name, set up the network namespace and CNI, create
//! the container with `ctr containers create`, then start it with `ctr tasks start` (attached, or
//! `-d` with its output in a log file). An attached run always undoes everything when it ends:
//! the container (like `ctr run --rm`), the CNI attachment, the namespace and the state.
//!
//! Creating and starting are two ctr calls (rather than one `ctr run`) so that a failure to
//! create (bad image, bad option) is told apart from the container's own exit code.

use super::args::{self, ports_label, RunOpts};
use super::network::{self, State};
use super::signals::{Forwarder, LaunchError};
use super::{ctr, error, exit_code, image, print, rm, Failure};
use crate::log::error_chain;
use crate::reaper::{Reaper, Spawned};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// How long a container's start waits for the boot's network modules (see
/// [`crate::modules::background`]).
const MODULES_WAIT: Duration = Duration::from_secs(30);

/// Exit code of setup failures (like docker).
pub(crate) const SETUP_FAILED: i32 = 125;
/// The guest's resolver configuration, bind-mounted read-only into containers.
pub(crate) const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Label holding the published ports (`8080:80/tcp,53:53/udp`).
pub(crate) const PORTS_LABEL: &str = "gatevm.ports";

fn setup_failure(msg: impl Into<String>) -> Failure {
    Failure::new(SETUP_FAILED, msg)
}

/// A setup failure from an error and its causes.
fn setup_error(e: &dyn std::error::Error) -> Failure {
    setup_failure(error_chain(e))
}

/// Arguments of `ctr containers create` for a run.
///
/// Every flag is written `--flag=value` and the image follows `--`: some ctr versions reorder
/// arguments, take the word after a flag without `=` as its possible value (so a `--` right after
/// `--tty` would be swallowed) and would then take flags of the command (`sh -c …`) as their own.
pub(crate) fn create_args(o: &RunOpts, image: &str, mount_resolv: bool) -> Vec<String> {
    let mut a: Vec<String> = vec!["containers".into(), "create".into()];
    a.push(format!(
        "--with-ns=network:{}",
        network::netns_path(&o.name).display()
    ));
    if mount_resolv {
        a.push(format!(
            "--mount=type=bind,src={RESOLV_CONF},dst={RESOLV_CONF},options=rbind:ro"
        ));
    }
    for v in &o.volumes {
        a.push(format!(
            "--mount=type=bind,src={},dst={},options=rbind:{}",
            v.src,
            v.dst,
            if v.read_only { "ro" } else { "rw" }
        ));
    }
    if o.tty {
        a.push("--tty=true".into());
    }
    for e in &o.env {
        a.push(format!("--env={e}"));
    }
    if let Some(w) = &o.workdir {
        a.push(format!("--cwd={w}"));
    }
    if !o.publish.is_empty() {
        a.push(format!("--label={PORTS_LABEL}={}", ports_label(&o.publish)));
    }
    a.push("--".into());
    a.push(image.into());
    a.push(o.name.clone());
    a.extend(o.command.iter().cloned());
    a
}

/// Arguments of `ctr tasks start`.
pub(crate) fn start_args(name: &str, detach: bool) -> Vec<String> {
    let mut a: Vec<String> = vec!["tasks".into(), "start".into()];
    if detach {
        a.push("--detach".into());
        a.push("--log-uri".into());
        a.push(format!("file://{}", network::log_path(name).display()));
    }
    a.push(name.into());
    a
}

/// The exit code for a container that could not be started, from ctr's message: 127 when the
/// command is not found, 126 when it cannot be executed, else 125.
pub(crate) fn start_failure_code(msg: &str) -> i32 {
    let m = msg.to_ascii_lowercase();
    if m.contains("executable file not found") || m.contains("no such file or directory") {
        127
    } else if m.contains("permission denied") {
        126
    } else {
        SETUP_FAILED
    }
}

/// The exit code of an attached `ctr tasks start` from its status and the end of its stderr:
/// ctr reports its own failures with status 1 and a last line `ctr: …`; anything else is the
/// container's code.
pub(crate) fn foreground_code(code: i32, stderr_tail: &str) -> i32 {
    let last = stderr_tail
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    match last.strip_prefix("ctr: ") {
        Some(msg) if code == 1 => start_failure_code(msg),
        _ => code,
    }
}

/// `gatevm-guest container run ARGS…`.
pub(crate) fn main(argv: &[String]) -> i32 {
    let o = match args::parse_run(argv) {
        Ok(o) => o,
        Err(e) => return setup_error(&e).report(),
    };
    let fwd = Forwarder::start();
    match run(&o, &fwd) {
        Ok(code) => code,
        Err(f) => f.report(),
    }
}

/// Prints cleanup problems (they do not change the outcome).
fn report_problems(problems: Vec<String>) {
    for p in problems {
        error(&format!("cleanup: {p}"));
    }
}

/// Undoes a run: the container (when it was created), the network, the state.
fn undo(ns: &str, name: &str, container: bool) {
    let mut problems = Vec::new();
    // The container may be gone already (an `rm --force` while it ran).
    if container && ctr::container_ids(ns).is_ok_and(|ids| ids.iter().any(|c| c == name)) {
        match rm::remove_container(ns, name, true) {
            Err(f) if !f.message.contains("not found") => problems.push(f.message),
            _ => {}
        }
    }
    problems.extend(network::teardown(name));
    report_problems(problems);
}

/// Makes sure the name is free: no container of that name in `ns`, no live setup of it, no
/// container of that name in another namespace (names share the network namespace name). A
/// leftover network of a container that is gone is removed.
fn check_name_free(ns: &str, name: &str) -> Result<(), Failure> {
    if ctr::container_ids(ns)
        .map_err(|e| setup_error(&e))?
        .iter()
        .any(|c| c == name)
    {
        return Err(setup_failure(format!(
            "container {name:?} already exists: remove it first with gatevm rm"
        )));
    }
    match network::load(name) {
        Ok(Some(st)) => {
            if network::owner_alive(st.owner_pid) {
                return Err(setup_failure(format!(
                    "container {name:?} is being run by another command"
                )));
            }
            if st.namespace != ns
                && ctr::container_ids(&st.namespace).is_ok_and(|ids| ids.iter().any(|c| c == name))
            {
                return Err(setup_failure(format!(
                    "the name {name:?} is used by a container in namespace {}",
                    st.namespace
                )));
            }
            report_problems(network::teardown(name));
        }
        Ok(None) | Err(_) => {
            if network::exists(name) {
                report_problems(network::teardown(name));
            }
        }
    }
    Ok(())
}

fn check_signal(fwd: &Forwarder, ns: &str, name: &str, container: bool) -> Result<(), Failure> {
    match fwd.pending() {
        Some(sig) => {
            undo(ns, name, container);
            Err(Failure::new(
                128 + sig,
                format!("interrupted by signal {sig} while setting up {name:?}"),
            ))
        }
        None => Ok(()),
    }
}

fn run(o: &RunOpts, fwd: &Forwarder) -> Result<i32, Failure> {
    let (ns, name) = (o.namespace.as_str(), o.name.as_str());
    ctr::check_running().map_err(|e| setup_error(&e))?;
    if o.tty && o.detach {
        return Err(setup_failure(
            "--tty cannot be used with --detach: the terminal ends with this command",
        ));
    }
    if o.tty && !std::io::stdin().is_terminal() && !std::io::stdout().is_terminal() {
        return Err(setup_failure(
            "--tty needs a terminal: run it with a terminal, or without --tty",
        ));
    }
    let stored = ctr::images(ns).map_err(|e| setup_error(&e))?;
    let image = image::find(&o.image, &stored).ok_or_else(|| {
        setup_failure(format!(
            "image \"{}\" is not in this VM: import it with gatevm image import",
            o.image
        ))
    })?;
    // A bind's guest directory must be there: runc would otherwise create it (outside a share)
    // or fail later with a less clear message.
    for v in &o.volumes {
        match std::fs::metadata(&v.src) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(setup_failure(format!(
                    "--volume {}: {} is not a directory in the guest",
                    v.src, v.src
                )))
            }
            Err(e) => {
                return Err(setup_failure(format!(
                    "--volume {}: {} in the guest: {e} (shares are mounted where `gatevm start -v` put them)",
                    v.src, v.src
                )))
            }
        }
    }
    check_name_free(ns, name)?;
    check_signal(fwd, ns, name, false)?;

    // Bridges, veths and netfilter load beside containerd at boot.
    if !crate::modules::wait_loaded(MODULES_WAIT) {
        eprintln!(
            "gatevm-guest: kernel modules are still loading after {} s; setting up the network anyway",
            MODULES_WAIT.as_secs()
        );
    }
    let state = State::new(ns, name, &o.publish);
    network::claim(&state).map_err(|e| setup_error(&e))?;
    if let Err(e) = network::setup(&state) {
        undo(ns, name, false);
        return Err(setup_error(&e));
    }
    check_signal(fwd, ns, name, false)?;

    let create = create_args(o, image, Path::new(RESOLV_CONF).exists());
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    if let Err(e) = ctr::output(ns, &create) {
        undo(ns, name, false);
        return Err(setup_failure(format!(
            "cannot create container {name:?}: {}",
            error_chain(&e)
        )));
    }
    check_signal(fwd, ns, name, true)?;

    if o.detach {
        let log = network::log_path(name);
        if let Some(dir) = log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::remove_file(&log);
        let start = start_args(name, true);
        let start: Vec<&str> = start.iter().map(String::as_str).collect();
        if let Err(e) = ctr::output(ns, &start) {
            undo(ns, name, true);
            let e = error_chain(&e);
            return Err(Failure::new(
                start_failure_code(&e),
                format!("cannot start container {name:?}: {e}"),
            ));
        }
        fwd.finish();
        print(&format!("{name}\n"));
        return Ok(0);
    }
    foreground(o, fwd)
}

/// Whether stdin is a terminal whose foreground process group is ours (then ctr gets the
/// terminal's foreground while it runs, so it can read it, set raw mode and receive SIGWINCH).
fn owns_terminal() -> bool {
    let stdin = std::io::stdin();
    stdin.is_terminal() && nix::unistd::tcgetpgrp(&stdin).is_ok_and(|p| p == nix::unistd::getpgrp())
}

/// Takes the terminal's foreground back after ctr ended (SIGTTOU blocked: we are a background
/// group at that point).
fn reclaim_terminal() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTTOU);
    if set.thread_block().is_ok() {
        let _ = nix::unistd::tcsetpgrp(std::io::stdin(), nix::unistd::getpgrp());
        let _ = set.thread_unblock();
    }
}

fn spawn_ctr(ns: &str, name: &str, take_terminal: bool) -> std::io::Result<Spawned> {
    let start = start_args(name, false);
    let start: Vec<&str> = start.iter().map(String::as_str).collect();
    let mut cmd = ctr::command(ns, &start);
    cmd.stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec and calls only async-signal-safe functions
    // (sigprocmask, setpgid, tcsetpgrp, getpid, prctl) on local data.
    unsafe {
        cmd.pre_exec(move || {
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            // Its own process group: signals the agent sends to our group are forwarded once,
            // by us, and never reach ctr twice.
            if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if take_terminal {
                let mut ttou = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(ttou.as_mut_ptr());
                libc::sigaddset(ttou.as_mut_ptr(), libc::SIGTTOU);
                libc::pthread_sigmask(libc::SIG_SETMASK, ttou.as_ptr(), std::ptr::null_mut());
                libc::tcsetpgrp(0, libc::getpid());
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
            // If this process dies, ctr gets SIGTERM (and passes it on to the task).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
            Ok(())
        });
    }
    Reaper::global().spawn(&mut cmd)
}

/// Copies ctr's stderr to ours as it comes and returns the last few KiB of it (`None` when the
/// thread cannot start: ctr's stderr is then closed).
fn relay_stderr(mut from: impl Read + Send + 'static) -> Option<std::thread::JoinHandle<String>> {
    let relay = std::thread::Builder::new().name("ctr-stderr".into());
    relay
        .spawn(move || {
            const KEEP: usize = 4096;
            let mut tail: Vec<u8> = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut err = std::io::stderr().lock();
                        let _ = err.write_all(&buf[..n]);
                        let _ = err.flush();
                        tail.extend_from_slice(&buf[..n]);
                        if tail.len() > 2 * KEEP {
                            tail.drain(..tail.len() - KEEP);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            String::from_utf8_lossy(&tail).into_owned()
        })
        .ok()
}

fn foreground(o: &RunOpts, fwd: &Forwarder) -> Result<i32, Failure> {
    let (ns, name) = (o.namespace.as_str(), o.name.as_str());
    let take_terminal = owns_terminal();
    let mut child = match fwd.launch(|| spawn_ctr(ns, name, take_terminal), ns, name, o.tty) {
        Ok(c) => c,
        Err(LaunchError::Signalled(sig)) => {
            undo(ns, name, true);
            return Err(Failure::new(
                128 + sig,
                format!("interrupted by signal {sig} while setting up {name:?}"),
            ));
        }
        Err(LaunchError::Spawn(e)) => {
            undo(ns, name, true);
            return Err(setup_failure(format!("cannot run ctr: {e}")));
        }
    };
    let relay = child.stderr.take().and_then(relay_stderr);
    let status = fwd.wait(&child);
    if take_terminal {
        reclaim_terminal();
    }
    let tail = relay.and_then(|h| h.join().ok()).unwrap_or_default();
    undo(ns, name, true);
    match status {
        Some(st) => Ok(foreground_code(exit_code(&st), &tail)),
        None => Err(setup_failure("lost the exit status of ctr")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RunOpts {
        args::parse_run(
            &[
                "-n",
                "default",
                "--name",
                "web",
                "-p",
                "8080:80",
                "-p",
                "53:53/udp",
                "-e",
                "A=1",
                "-w",
                "/srv",
                "--tty",
                "-v",
                "/data:/srv/data:ro",
                "--volume=/mnt/x/:/x",
                "nginx",
                "nginx",
                "-g",
                "daemon off;",
            ]
            .map(String::from),
        )
        .unwrap()
    }

    #[test]
    fn ctr_create_arguments() {
        let a = create_args(&opts(), "docker.io/library/nginx:latest", true);
        assert_eq!(
            a,
            [
                "containers",
                "create",
                "--with-ns=network:/run/netns/gatevm-web",
                "--mount=type=bind,src=/etc/resolv.conf,dst=/etc/resolv.conf,options=rbind:ro",
                "--mount=type=bind,src=/data,dst=/srv/data,options=rbind:ro",
                "--mount=type=bind,src=/mnt/x,dst=/x,options=rbind:rw",
                "--tty=true",
                "--env=A=1",
                "--cwd=/srv",
                "--label=gatevm.ports=8080:80/tcp,53:53/udp",
                "--",
                "docker.io/library/nginx:latest",
                "web",
                "nginx",
                "-g",
                "daemon off;",
            ]
        );
        let plain =
            args::parse_run(&["-n", "d", "--name", "c", "busybox"].map(String::from)).unwrap();
        let a = create_args(&plain, "docker.io/library/busybox:latest", false);
        assert_eq!(
            a,
            [
                "containers",
                "create",
                "--with-ns=network:/run/netns/gatevm-c",
                "--",
                "docker.io/library/busybox:latest",
                "c",
            ]
        );
        // No flag leaves its value to the next word, so ctr cannot take `--` as a value.
        for w in a.iter().take_while(|w| *w != "--").skip(2) {
            assert!(w.starts_with("--") && w.contains('='), "{w}");
        }
    }

    #[test]
    fn ctr_start_arguments() {
        assert_eq!(start_args("web", false), ["tasks", "start", "web"]);
        assert_eq!(
            start_args("web", true),
            [
                "tasks",
                "start",
                "--detach",
                "--log-uri",
                "file:///var/lib/gatevm/logs/web.log",
                "web"
            ]
        );
    }

    #[test]
    fn exit_codes_of_attached_runs() {
        // The container's own codes pass through.
        assert_eq!(foreground_code(0, ""), 0);
        assert_eq!(foreground_code(3, "some output\n"), 3);
        assert_eq!(foreground_code(1, "error: bad input\n"), 1);
        assert_eq!(foreground_code(137, ""), 137);
        // ctr's own failures.
        assert_eq!(
            foreground_code(
                1,
                "ctr: failed to create shim task: OCI runtime create failed: runc create failed: \
                 unable to start container process: exec: \"nope\": executable file not found in $PATH: unknown\n"
            ),
            127
        );
        assert_eq!(
            foreground_code(
                1,
                "ctr: failed to create shim task: exec: \"/etc\": permission denied\n"
            ),
            126
        );
        assert_eq!(
            foreground_code(1, "ctr: container \"web\" not found\n"),
            125
        );
        // Only status 1 is ctr's error status.
        assert_eq!(foreground_code(2, "ctr: something\n"), 2);
    }

    #[test]
    fn start_failure_codes() {
        assert_eq!(
            start_failure_code("exec: \"x\": executable file not found in $PATH"),
            127
        );
        assert_eq!(
            start_failure_code("exec: \"/bin/x\": stat /bin/x: no such file or directory"),
            127
        );
        assert_eq!(start_failure_code("exec: \"/x\": Permission denied"), 126);
        assert_eq!(start_failure_code("failed to mount rootfs"), 125);
    }
}
