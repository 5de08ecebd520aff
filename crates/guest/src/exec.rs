//! Starting exec processes: environment, working directory, `PATH` lookup with the shell's
//! 126/127 conventions, optional pseudo-terminal, own session per process.

use crate::reaper::{Reaper, Spawned};
use gatevm_abi::{ExecRequest, ExitStatus};
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;

/// `PATH` of exec'd processes unless the request sets one.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `HOME` of exec'd processes unless the request sets one.
pub(crate) const DEFAULT_HOME: &str = "/root";
/// `TERM` of terminal sessions unless the request sets one.
pub(crate) const DEFAULT_TERM: &str = "xterm-256color";
/// Terminal size used when the request gives 0 rows or columns.
pub(crate) const DEFAULT_WINSIZE: (u16, u16) = (24, 80);

/// Why a process could not start, as sent in `ExecFailed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecFailure {
    /// 127 not found, 126 found but not runnable, 1 anything else.
    pub code: i32,
    /// Human-readable reason.
    pub message: String,
}

impl ExecFailure {
    fn new(code: i32, message: impl Into<String>) -> Self {
        ExecFailure {
            code,
            message: message.into(),
        }
    }
}

/// A started exec process.
#[derive(Debug)]
pub(crate) struct Process {
    /// Its pid (also its session and process group id).
    pub pid: i32,
    /// The pty master in terminal mode (output is read from it, input written to it).
    pub tty: Option<File>,
    /// Where `Data{Stdin}` goes: the stdin pipe, or a dup of the pty master.
    pub stdin: Option<File>,
    /// Output fds to forward, with the stream they are reported as.
    pub outputs: Vec<(gatevm_abi::Fd, OwnedFd)>,
    /// Receives the exit status from the reaper.
    pub exit: Receiver<ExitStatus>,
}

fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

/// Builds the environment: defaults, then the request's variables (a request variable replaces a
/// default of the same name).
pub(crate) fn build_env(req: &ExecRequest) -> Result<Vec<(String, String)>, ExecFailure> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), DEFAULT_HOME.into()),
    ];
    if req.tty {
        env.push(("TERM".into(), DEFAULT_TERM.into()));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || has_nul(k) || has_nul(v) {
            return Err(ExecFailure::new(
                1,
                format!("invalid environment variable {k:?}"),
            ));
        }
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    Ok(env)
}

/// The working directory: the request's (relative ones are taken from `/`) or `/`; it must be an
/// existing directory.
pub(crate) fn resolve_cwd(cwd: Option<&str>) -> Result<PathBuf, ExecFailure> {
    let dir = match cwd {
        None | Some("") => PathBuf::from("/"),
        Some(c) if has_nul(c) => return Err(ExecFailure::new(1, "working directory contains NUL")),
        Some(c) => Path::new("/").join(c),
    };
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(ExecFailure::new(
            1,
            format!("working directory {}: not a directory", dir.display()),
        )),
        Err(e) => Err(ExecFailure::new(
            1,
            format!("working directory {}: {e}", dir.display()),
        )),
    }
}

fn is_executable(m: &std::fs::Metadata) -> bool {
    m.is_file() && m.permissions().mode() & 0o111 != 0
}

/// Finds the program to run like a shell does: a name with `/` is taken as a path (relative to
/// `cwd`), any other name is searched in `path_var` (an empty entry means `cwd`).
///
/// Not found is 127; found but a directory or without execute permission is 126.
pub(crate) fn lookup(program: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, ExecFailure> {
    if program.is_empty() {
        return Err(ExecFailure::new(
            127,
            "empty command name: command not found",
        ));
    }
    if has_nul(program) {
        return Err(ExecFailure::new(127, "command name contains NUL"));
    }
    if program.contains('/') {
        let cand = cwd.join(program);
        return match std::fs::metadata(&cand) {
            Ok(m) if m.is_dir() => Err(ExecFailure::new(126, format!("{program}: is a directory"))),
            Ok(m) if is_executable(&m) => Ok(cand),
            Ok(_) => Err(ExecFailure::new(
                126,
                format!("{program}: permission denied"),
            )),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Err(
                ExecFailure::new(127, format!("{program}: no such file or directory")),
            ),
            Err(e) => Err(ExecFailure::new(126, format!("{program}: {e}"))),
        };
    }
    let mut not_executable: Option<PathBuf> = None;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(dir)
        };
        let cand = dir.join(program);
        if let Ok(m) = std::fs::metadata(&cand) {
            if is_executable(&m) {
                return Ok(cand);
            }
            if m.is_file() && not_executable.is_none() {
                not_executable = Some(cand);
            }
        }
    }
    match not_executable {
        Some(p) => Err(ExecFailure::new(
            126,
            format!("{}: permission denied", p.display()),
        )),
        None => Err(ExecFailure::new(
            127,
            format!("{program}: command not found"),
        )),
    }
}

/// Maps an error of `spawn` (fork/exec in the child) to an exec failure.
pub(crate) fn classify_spawn_error(program: &Path, e: &io::Error) -> ExecFailure {
    let p = program.display();
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EISDIR) | Some(libc::ENOEXEC)
        | Some(libc::ETXTBSY) | Some(libc::ELOOP) => ExecFailure::new(126, format!("{p}: {e}")),
        Some(libc::ENOENT) if program.exists() => {
            ExecFailure::new(126, format!("{p}: bad interpreter or program loader: {e}"))
        }
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => ExecFailure::new(127, format!("{p}: {e}")),
        _ => ExecFailure::new(1, format!("cannot start {p}: {e}")),
    }
}

/// Opens a pseudo-terminal pair (both close-on-exec, the slave without becoming our controlling
/// terminal) with the given size.
pub(crate) fn open_pty(rows: u16, cols: u16) -> io::Result<(File, OwnedFd)> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer we pass, which lives across the call.
    if unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&master),
            libc::TIOCSPTLCK,
            &unlock,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd for the slave.
    let slave = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&master),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `slave` is a fresh fd returned by the kernel that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    set_winsize(&master, rows, cols)?;
    Ok((master, slave))
}

/// Sets a terminal's size (`TIOCSWINSZ`); zero rows or columns mean [`DEFAULT_WINSIZE`].
pub(crate) fn set_winsize(tty: &impl std::os::fd::AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let (rows, cols) = if rows == 0 || cols == 0 {
        DEFAULT_WINSIZE
    } else {
        (rows, cols)
    };
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts the process of an exec request through the reaper.
pub(crate) fn spawn(req: &ExecRequest, reaper: &Reaper) -> Result<Process, ExecFailure> {
    let (mut cmd, program) = build_command(req)?;
    let master = attach_stdio(&mut cmd, req)?;
    start_new_session(&mut cmd, req.tty);
    let spawned = reaper
        .spawn(&mut cmd)
        .map_err(|e| classify_spawn_error(&program, &e))?;
    // Closes our copies of the pty slave, so the master sees EIO once the session is gone.
    drop(cmd);
    process_streams(master, spawned)
}

/// The command of a request: checked argv, environment and working directory, and the program
/// found on the request's `PATH`.
fn build_command(req: &ExecRequest) -> Result<(Command, PathBuf), ExecFailure> {
    let Some(argv0) = req.argv.first() else {
        return Err(ExecFailure::new(1, "empty argv"));
    };
    if req.argv.iter().any(|a| has_nul(a)) {
        return Err(ExecFailure::new(1, "argument contains NUL"));
    }
    let env = build_env(req)?;
    let cwd = resolve_cwd(req.cwd.as_deref())?;
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let program = lookup(argv0, path_var, &cwd)?;

    let mut cmd = Command::new(&program);
    cmd.arg0(argv0)
        .args(&req.argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(&cwd);
    Ok((cmd, program))
}

/// Gives the command a new pty (returning its master) in terminal mode, else pipes (stdin only
/// when the request asks for it).
fn attach_stdio(cmd: &mut Command, req: &ExecRequest) -> Result<Option<File>, ExecFailure> {
    if !req.tty {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        return Ok(None);
    }
    let (m, slave) = open_pty(req.rows, req.cols)
        .map_err(|e| ExecFailure::new(1, format!("cannot allocate a terminal: {e}")))?;
    let dup = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| ExecFailure::new(1, format!("cannot allocate a terminal: {e}")))
    };
    cmd.stdin(Stdio::from(dup(&slave)?))
        .stdout(Stdio::from(dup(&slave)?))
        .stderr(Stdio::from(slave));
    Ok(Some(m))
}

/// Makes the child a session leader, with its pty (stdin) as controlling terminal when `tty`.
fn start_new_session(cmd: &mut Command, tty: bool) {
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (setsid, ioctl) without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The started process with the streams to forward: the pty master (output and input) in
/// terminal mode, else its pipes.
fn process_streams(master: Option<File>, spawned: Spawned) -> Result<Process, ExecFailure> {
    let mut outputs = Vec::new();
    let stdin;
    let mut tty_file = None;
    match master {
        Some(m) => {
            let out = m
                .try_clone()
                .map_err(|e| ExecFailure::new(1, format!("dup pty: {e}")))?;
            let inp = m
                .try_clone()
                .map_err(|e| ExecFailure::new(1, format!("dup pty: {e}")))?;
            outputs.push((gatevm_abi::Fd::Stdout, OwnedFd::from(out)));
            stdin = Some(inp);
            tty_file = Some(m);
        }
        None => {
            if let Some(o) = spawned.stdout {
                outputs.push((gatevm_abi::Fd::Stdout, OwnedFd::from(o)));
            }
            if let Some(e) = spawned.stderr {
                outputs.push((gatevm_abi::Fd::Stderr, OwnedFd::from(e)));
            }
            stdin = spawned.stdin.map(|s| File::from(OwnedFd::from(s)));
        }
    }
    Ok(Process {
        pid: spawned.pid,
        tty: tty_file,
        stdin,
        outputs,
        exit: spawned.exit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn env_defaults_and_overrides() {
        let mut r = req(&["x"]);
        let env = build_env(&r).unwrap();
        assert_eq!(
            env,
            vec![
                ("PATH".into(), DEFAULT_PATH.into()),
                ("HOME".into(), "/root".into())
            ]
        );
        r.tty = true;
        r.env = vec![
            ("HOME".into(), "/tmp".into()),
            ("FOO".into(), "bar=baz".into()),
        ];
        let env = build_env(&r).unwrap();
        assert!(env.contains(&("HOME".into(), "/tmp".into())));
        assert!(env.contains(&("TERM".into(), DEFAULT_TERM.into())));
        assert!(env.contains(&("FOO".into(), "bar=baz".into())));
        assert_eq!(env.iter().filter(|(k, _)| k == "HOME").count(), 1);
        r.env = vec![("A=B".into(), "c".into())];
        assert_eq!(build_env(&r).unwrap_err().code, 1);
        r.env = vec![("".into(), "c".into())];
        assert_eq!(build_env(&r).unwrap_err().code, 1);
    }

    #[test]
    fn cwd_checks() {
        assert_eq!(resolve_cwd(None).unwrap(), PathBuf::from("/"));
        assert_eq!(resolve_cwd(Some("tmp")).unwrap(), PathBuf::from("/tmp"));
        assert_eq!(
            resolve_cwd(Some("/nonexistent-gatevm")).unwrap_err().code,
            1
        );
        assert_eq!(resolve_cwd(Some("/bin/sh")).unwrap_err().code, 1);
    }

    #[test]
    fn lookup_127_126() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        let other = d.path().join("other");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&other).unwrap();
        let exe = bin.join("tool");
        fs::write(&exe, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        let noexec = other.join("data");
        fs::write(&noexec, "x").unwrap();
        fs::set_permissions(&noexec, fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir_all(bin.join("adir")).unwrap();
        let path = format!("{}:{}", other.display(), bin.display());

        assert_eq!(lookup("tool", &path, Path::new("/")).unwrap(), exe);
        assert_eq!(lookup("nope", &path, Path::new("/")).unwrap_err().code, 127);
        assert_eq!(lookup("", &path, Path::new("/")).unwrap_err().code, 127);
        // A non-executable match is remembered: 126 when nothing better is found.
        assert_eq!(lookup("data", &path, Path::new("/")).unwrap_err().code, 126);
        // Directories in PATH are skipped like a shell does.
        assert_eq!(lookup("adir", &path, Path::new("/")).unwrap_err().code, 127);
        // Paths with a slash.
        assert_eq!(
            lookup(exe.to_str().unwrap(), "", Path::new("/")).unwrap(),
            exe
        );
        assert_eq!(lookup("bin/tool", "", d.path()).unwrap(), exe);
        assert_eq!(lookup("./bin/adir", "", d.path()).unwrap_err().code, 126);
        assert_eq!(lookup("other/data", "", d.path()).unwrap_err().code, 126);
        assert_eq!(lookup("bin/missing", "", d.path()).unwrap_err().code, 127);
        assert_eq!(lookup("other/data/x", "", d.path()).unwrap_err().code, 127);
        // Empty PATH entry means the working directory.
        assert_eq!(lookup("tool", ":", &bin).unwrap(), exe);
    }

    #[test]
    fn spawn_errors_classified() {
        let e = io::Error::from_raw_os_error(libc::ENOEXEC);
        assert_eq!(classify_spawn_error(Path::new("/bin/sh"), &e).code, 126);
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(classify_spawn_error(Path::new("/bin/sh"), &e).code, 126);
        assert_eq!(
            classify_spawn_error(Path::new("/nonexistent-x"), &e).code,
            127
        );
        let e = io::Error::from_raw_os_error(libc::ENOMEM);
        assert_eq!(classify_spawn_error(Path::new("/bin/sh"), &e).code, 1);
    }

    #[test]
    fn bad_interpreter_is_126() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("script");
        fs::write(&s, "#!/nonexistent/interpreter\n").unwrap();
        fs::set_permissions(&s, fs::Permissions::from_mode(0o755)).unwrap();
        let r = req(&[s.to_str().unwrap()]);
        let e = spawn(&r, Reaper::global()).unwrap_err();
        assert_eq!(e.code, 126, "{e:?}");
    }
}
