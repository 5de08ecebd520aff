//! The boot test of a QEMU binary: the guest kernel booted the way gatevm boots it, without a
//! root file system, must start and power off.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatevm_vmm::qemu::Qemu;
use gatevm_vmm::Accel;

use super::QemuError;
use crate::cmd;

/// Boots `kernel` with `binary` the way gatevm boots its TCG guests ([`boot_command`]; the
/// firmware in `data_dirs` first) and no root file system: the kernel starts, panics
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
    // The TSC frequency is measured here, as the supervisor measures it for each VM.
    let qemu = Qemu::for_host(binary.to_path_buf(), data_dirs.to_vec());
    let mut c = boot_command(&qemu, kernel, serial_log);
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

/// The boot check's guest: TCG (the accelerator whose QEMU versions differ), the guests' default
/// CPU count, and memory enough for a kernel without a root file system.
const CHECK_ACCEL: Accel = Accel::Tcg;
const CHECK_CPUS: u32 = 2;
const CHECK_MEMORY_MIB: u32 = 256;
/// The check's own part of the kernel command line: no `quiet`, since the console must show
/// "Linux version", and a panic (no root) powers off.
const CHECK_CMDLINE: &str = "console=ttyS0 panic=-1";

/// The QEMU command line of [`boot_test`]: the machine, accelerator, CPUs and memory, and the
/// kernel command line's clock settings (the TSC frequency under TCG: without it the guest
/// calibrates against the emulated PIT, which fails on a loaded host with "Unable to calibrate
/// against PIT" and stalls the boot) come from the same functions as gatevm's own VMs'.
fn boot_command(qemu: &Qemu, kernel: &Path, serial_log: &Path) -> Command {
    let mut c = Command::new(&qemu.binary);
    for d in &qemu.data_dirs {
        c.arg("-L").arg(d);
    }
    c.args(Qemu::machine_args(
        CHECK_ACCEL,
        CHECK_CPUS,
        CHECK_MEMORY_MIB,
    ))
    .arg("-append")
    .arg(qemu.kernel_append(CHECK_ACCEL, CHECK_CMDLINE))
    .arg("-serial")
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

#[cfg(test)]
mod tests {
    use super::*;
    use gatevm_vmm::VmConfig;

    /// The value after each `flag` in an argument list, in order.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    /// An instance's VM as the supervisor configures it, with the check's accelerator, CPUs
    /// and memory.
    fn instance_vm(cmdline: &str) -> VmConfig {
        VmConfig {
            name: "vm".into(),
            cpus: CHECK_CPUS,
            memory_mib: CHECK_MEMORY_MIB,
            accel: CHECK_ACCEL,
            kernel: "/k".into(),
            initramfs: Some("/i".into()),
            cmdline: cmdline.into(),
            disks: vec![gatevm_vmm::Disk::rw("gatevm-state", "/d")],
            boot_dir: "/b".into(),
            shares: vec![],
            cluster_nic: None,
            agent_socket: "/a".into(),
            net: None,
            mac: "5a:94:ef:e4:0c:ee".into(),
            console_log: "/c".into(),
        }
    }

    /// The check's QEMU command line has what an instance's has for the kernel's clock (the TSC
    /// frequency the backend adds under TCG) and the same machine, accelerator, CPU model, CPUs,
    /// memory and sandbox, built from the same backend settings.
    #[test]
    fn check_boots_as_the_instances_do() {
        let qemu = Qemu {
            binary: "/q/qemu-system-x86_64".into(),
            data_dirs: vec!["/fw1".into(), "/fw2".into()],
            tsc_khz: Some(2_600_000),
            run_as: None,
        };
        let base = "console=ttyS0 quiet panic=-1 gatevm.hostname=vm";
        let instance = qemu.args(&instance_vm(base)).unwrap();
        let cmd = boot_command(&qemu, Path::new("/k"), Path::new("/log"));
        assert_eq!(cmd.get_program(), "/q/qemu-system-x86_64");
        let check: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();

        let instance_append = values(&instance, "-append");
        assert_eq!(instance_append.len(), 1, "{instance:?}");
        let clock: Vec<&str> = instance_append[0]
            .split_whitespace()
            .filter(|w| !base.split_whitespace().any(|b| b == *w))
            .collect();
        assert_eq!(clock, ["tsc_early_khz=2600000"]);
        let check_append = values(&check, "-append");
        assert_eq!(
            check_append,
            ["console=ttyS0 panic=-1 tsc_early_khz=2600000"],
            "{check:?}"
        );
        for flag in ["-M", "-accel", "-cpu", "-smp", "-m", "-sandbox", "-L"] {
            assert_eq!(values(&check, flag), values(&instance, flag), "{flag}");
        }
        assert_eq!(values(&check, "-accel"), ["tcg"]);
        assert_eq!(values(&check, "-smp"), ["2"]);
        for flag in ["-object", "-global"] {
            let theirs = values(&instance, flag);
            for v in values(&check, flag) {
                assert!(theirs.contains(&v), "{flag} {v} not in {instance:?}");
            }
        }
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(check.iter().any(|a| a == flag), "{flag} in {check:?}");
        }
        // Without a TSC frequency (a host without a constant TSC) neither gets one.
        let plain = Qemu {
            tsc_khz: None,
            ..qemu
        };
        let check = boot_command(&plain, Path::new("/k"), Path::new("/log"));
        let append: Vec<String> = check
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(values(&append, "-append"), ["console=ttyS0 panic=-1"]);
    }

    /// The installed QEMU boots the installed kernel in the check ([`boot_test`]), within the
    /// limit set-up gives it. Boots a VM, so it runs only with `GATEVM_E2E=1`.
    #[test]
    fn installed_qemu_passes_the_boot_check() {
        const TEST: &str =
            "component::qemu::boot_test::tests::installed_qemu_passes_the_boot_check";
        if std::env::var("GATEVM_E2E").as_deref() != Ok("1") {
            return gatevm_testkit::skip(TEST, "boots a VM; set GATEVM_E2E=1");
        }
        let rt = match crate::Runtime::load() {
            Ok(rt) => rt,
            Err(e) => return gatevm_testkit::skip(TEST, format!("no runtime bundle ({e})")),
        };
        let tmp = tempfile::tempdir().unwrap();
        let serial = tmp.path().join("console.log");
        let took = boot_test(
            &rt.qemu_binary(),
            &rt.qemu_data_dirs(),
            rt.kernel_path(),
            &serial,
            Duration::from_secs(180),
        )
        .unwrap();
        let console = std::fs::read_to_string(&serial).unwrap();
        assert!(
            !console.contains("Unable to calibrate against PIT"),
            "{console}"
        );
        eprintln!("boot check passed in {:.1} s", took.as_secs_f64());
    }
}
