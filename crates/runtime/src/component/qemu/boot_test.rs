//! The boot test of a QEMU binary: the guest kernel booted the way gatevm boots it, without a
//! root file system, must start and power off.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::QemuError;
use crate::cmd;

/// Boots `kernel` with `binary` the way gatevm does (machine `microvm` without option ROMs,
/// TCG, the firmware in `data_dirs` first) and no root file system: the kernel starts, panics
/// for want of a root, and QEMU exits (`panic=-1`, `-no-reboot`). Proves the firmware loads the
/// kernel. The console goes to `serial_log`. Takes a few seconds; gives up after `timeout`.
pub(crate) fn boot_test(
    binary: &Path,
    data_dirs: &[PathBuf],
    kernel: &Path,
    serial_log: &Path,
    timeout: Duration,
) -> Result<Duration, QemuError> {
    let fail = |problem: String| QemuError::Boot {
        binary: binary.to_path_buf(),
        problem,
    };
    let started = Instant::now();
    let mut c = boot_command(binary, data_dirs, kernel, serial_log);
    let mut child = c.spawn().map_err(|e| fail(format!("cannot run it: {e}")))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "no power-off within {} s; console: {}",
                    timeout.as_secs(),
                    console_tail(serial_log)
                )));
            }
            Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
        }
    };
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("cannot collect its output: {e}")))?;
    let console = std::fs::read(serial_log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if !status.success() {
        return Err(fail(format!(
            "{status}: {}",
            cmd::tail_lines(&String::from_utf8_lossy(&out.stderr), 4)
        )));
    }
    if !console.contains("Linux version") {
        return Err(fail(format!(
            "the kernel did not start; console: {}",
            console_tail(serial_log)
        )));
    }
    Ok(started.elapsed())
}

/// The QEMU command line of [`boot_test`].
fn boot_command(binary: &Path, data_dirs: &[PathBuf], kernel: &Path, serial_log: &Path) -> Command {
    // Without the TSC frequency a TCG guest calibrates against the emulated PIT, which stalls on
    // a loaded host ("Unable to calibrate against PIT"): give it what gatevm's own VMs get.
    let mut append = "console=ttyS0 panic=-1".to_string();
    if let Some(khz) = gatevm_vmm::probe::host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let mut c = Command::new(binary);
    for d in data_dirs {
        c.arg("-L").arg(d);
    }
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=on",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-append",
        &append,
        "-serial",
    ])
    .arg(format!("file:{}", serial_log.display()))
    .arg("-kernel")
    .arg(kernel)
    .env("LC_ALL", "C")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn console_tail(serial_log: &Path) -> String {
    let text = std::fs::read(serial_log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let t = cmd::tail_lines(&text, 3);
    if t.is_empty() {
        "(empty)".into()
    } else {
        t
    }
}
