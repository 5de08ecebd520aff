//! Boots the installed guest kernel (the extracted `vmlinux`) under QEMU TCG with an initramfs
//! built by `build_initramfs`, whose `/init` is a tiny static C program that loads the modules
//! listed in `/modules/load.list` and powers off. Checks that the kernel boots through its PVH
//! entry, the initramfs layout is what the guest expects and every module loads in the given
//! order.
//!
//! Runs the runtime's QEMU (`Runtime::qemu_binary`, with `-L` for its firmware directories).
//!
//! Needs the runtime bundle (`gatevm setup`) and a C compiler that can link
//! statically; when one is missing the test says so and returns without checking anything.

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INIT_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/reboot.h>
#include <sys/mount.h>
#include <sys/stat.h>
int main(void) {
    struct stat st;
    printf("TESTINIT: marker %s\n", stat("/gatevm-initramfs", &st) == 0 ? "present" : "missing");
    printf("TESTINIT: console %s\n",
           stat("/dev/console", &st) == 0 && S_ISCHR(st.st_mode) ? "chardev" : "bad");
    FILE *f = fopen("/modules/load.list", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char path[300];
        snprintf(path, sizeof path, "/modules/%s", line);
        int fd = open(path, O_RDONLY);
        long r = syscall(SYS_finit_module, fd, "", 4 /* MODULE_INIT_COMPRESSED_FILE */);
        printf("TESTINIT: load %s -> %ld\n", line, r);
        close(fd);
    }
    printf("TESTINIT: done\n");
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
"#;

/// Records that the boot test did not run here (counted as skipped by `scripts/test.sh`).
fn skip(why: &str) {
    gatevm_testkit::skip("boots_vmlinux_with_generated_initramfs", why);
}

#[test]
fn boots_vmlinux_with_generated_initramfs() {
    let rt = match gatevm_runtime::Runtime::load() {
        Ok(rt) => rt,
        Err(e) => return skip(&format!("no runtime bundle ({e})")),
    };
    let qemu = rt.qemu_binary();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("init.c");
    std::fs::write(&src, INIT_C).unwrap();
    let init = tmp.path().join("init");
    let cc = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&init)
        .arg(&src)
        .status();
    if !matches!(cc, Ok(s) if s.success()) {
        return skip("cannot build a static test init with cc -static (gcc and libc6-dev)");
    }

    // Build into a temporary directory, not the runtime's initramfs cache.
    let out_dir = tmp.path().join("initramfs");
    let t = Instant::now();
    let initrd = gatevm_runtime::build_initramfs(&init, rt.kernel(), &out_dir).unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    assert_eq!(
        gatevm_runtime::build_initramfs(&init, rt.kernel(), &out_dir).unwrap(),
        initrd
    );
    let cached = t.elapsed();
    eprintln!(
        "initramfs {} built in {first:?}, cached lookup {cached:?}",
        initrd.display()
    );

    // As gatevm's own TCG guests get it: without the host's TSC frequency the guest calibrates
    // the TSC against the emulated PIT, which on a loaded host fails and stalls the boot for
    // minutes.
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    if let Some(khz) = gatevm_vmm::probe::host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let mut child = Command::new(&qemu)
        .args(
            rt.qemu_data_dirs()
                .iter()
                .flat_map(|d| [OsStr::new("-L"), d.as_os_str()]),
        )
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=on",
            "-accel",
            "tcg",
            "-m",
            "512",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
            "-append",
        ])
        .arg(&append)
        .arg("-kernel")
        .arg(rt.kernel_path())
        .arg("-initrd")
        .arg(&initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The console is read as it comes, so a guest that never powers off shows how far it got.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buf.clone();
        let handle = std::thread::spawn(move || {
            let mut pipe = pipe.unwrap();
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        (buf, handle)
    };
    let (out_buf, out_thread) = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let (err_buf, err_thread) = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let text =
        |b: &std::sync::Mutex<Vec<u8>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "guest did not power off within 90 s; console so far:\n{}\n{}",
                text(&out_buf),
                text(&err_buf)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    out_thread.join().unwrap();
    err_thread.join().unwrap();
    let (out, err) = (text(&out_buf), text(&err_buf));
    eprintln!(
        "guest ran {:?}, exit {status}\n{out}\n{err}",
        started.elapsed()
    );
    assert!(out.contains("TESTINIT: marker present"), "{out}");
    assert!(out.contains("TESTINIT: console chardev"), "{out}");
    let modules = gatevm_runtime::initramfs::initramfs_modules(rt.kernel()).unwrap();
    assert!(!modules.is_empty());
    for m in &modules {
        let name = Path::new(m).file_name().unwrap().to_string_lossy();
        assert!(
            out.contains(&format!("TESTINIT: load {name} -> 0")),
            "module {name} did not load:\n{out}"
        );
    }
    assert!(out.contains("TESTINIT: done"), "{out}");
}
