//! Running external commands with their output captured, and errors that say which command
//! failed, how, and the tail of what it printed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use thiserror::Error;

/// How many trailing lines of a failed command's stderr go into its error.
const TAIL_LINES: usize = 15;

/// A command that could not be run or exited unsuccessfully.
#[derive(Debug, Error)]
pub enum CommandError {
    /// The program could not be started (not installed, not executable).
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed ({status}){}{}", tail_suffix(stderr_tail), log_suffix(log.as_deref()))]
    Failed {
        /// The command line.
        command: String,
        /// Exit status, e.g. `exit code 100` or `killed by signal 9`.
        status: String,
        /// The last lines of its error output.
        stderr_tail: String,
        /// The log file holding its whole output, when there is one.
        log: Option<PathBuf>,
    },
    /// The log file for the command's output could not be created or read.
    #[error("cannot use log file {} for `{command}`", path.display())]
    Log {
        /// The command line.
        command: String,
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

fn log_suffix(log: Option<&Path>) -> String {
    match log {
        Some(p) => format!(" (full output in {})", p.display()),
        None => String::new(),
    }
}

/// Renders a command as a shell-like line for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push('\'');
            s.push_str(&a);
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

fn status_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The last `n` non-empty lines of `text`, joined with " | " so they fit in a one-line message.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join(" | ")
}

/// The last `n` lines of a log file that start with one of `prefixes` (all lines when none
/// match), joined like [`tail_lines`]; empty when the file cannot be read.
pub(crate) fn log_tail(path: &Path, prefixes: &[&str], n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let matching: Vec<&str> = text
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .collect();
    if matching.is_empty() {
        tail_lines(&text, n)
    } else {
        tail_lines(&matching.join("\n"), n)
    }
}

/// Runs `cmd` with stdin from /dev/null and both outputs captured; fails on a non-zero exit.
pub(crate) fn run_captured(cmd: &mut Command) -> Result<Output, CommandError> {
    let command = describe(cmd);
    tracing::debug!(%command, "running");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr_tail = if stderr.trim().is_empty() {
            tail_lines(&String::from_utf8_lossy(&out.stdout), TAIL_LINES)
        } else {
            tail_lines(&stderr, TAIL_LINES)
        };
        return Err(CommandError::Failed {
            command,
            status: status_text(out.status),
            stderr_tail,
            log: None,
        });
    }
    Ok(out)
}

/// Runs `cmd` with stdin from /dev/null and stdout+stderr appended to `log`; fails on a non-zero
/// exit with the tail of this run's part of the log. For long jobs whose output can be large.
pub(crate) fn run_logged(cmd: &mut Command, log: &Path) -> Result<(), CommandError> {
    let command = describe(cmd);
    tracing::debug!(%command, log = %log.display(), "running");
    let log_err = |source| CommandError::Log {
        command: command.clone(),
        path: log.to_path_buf(),
        source,
    };
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(log_err)?;
    }
    let mut file: File = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(log)
        .map_err(log_err)?;
    let start = file.seek(SeekFrom::End(0)).map_err(log_err)?;
    {
        use std::io::Write;
        writeln!(file, "$ {command}").map_err(log_err)?;
    }
    let err_file = file.try_clone().map_err(log_err)?;
    let out_file = file.try_clone().map_err(log_err)?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_file))
        .stderr(Stdio::from(err_file))
        .status()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    let mut reader = File::open(log).map_err(log_err)?;
    reader.seek(SeekFrom::Start(start)).map_err(log_err)?;
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(log_err)?;
    text.push_str(&String::from_utf8_lossy(&bytes));
    Err(CommandError::Failed {
        command,
        status: status_text(status),
        stderr_tail: tail_lines(&text, TAIL_LINES),
        log: Some(log.to_path_buf()),
    })
}

/// Finds an executable by name in `PATH` and the sbin directories (which a non-login root shell
/// may lack in its `PATH`).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_command_reports_code_and_tail() {
        let err =
            run_captured(Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]))
                .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exit code 3"), "{msg}");
        assert!(msg.contains("one | two"), "{msg}");
    }

    #[test]
    fn logged_command_tail_comes_from_this_run() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("x.log");
        run_logged(Command::new("sh").args(["-c", "echo earlier"]), &log).unwrap();
        let err = run_logged(
            Command::new("sh").args(["-c", "echo boom >&2; exit 1"]),
            &log,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("boom"), "{err}");
        assert!(!err.contains("earlier"), "{err}");
        assert!(err.contains("x.log"), "{err}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run_captured(&mut Command::new("/nonexistent/prog")).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail_lines("", 2), "");
    }
}
