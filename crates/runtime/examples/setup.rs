//! Runs `gatevm_runtime::setup` and prints its progress and report (a development aid; the real
//! front end is `gatevm setup`).
//!
//! Usage: `cargo run -p gatevm-runtime --example setup -- [--skip-rootfs] [--refresh] [--verify]
//! [GUEST_BIN]`

use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let mut opts = gatevm_runtime::SetupOptions::default();
    let mut verify = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--verify" => verify = true,
            "--skip-rootfs" => opts.skip_rootfs = true,
            "--refresh" => opts.refresh = true,
            other => opts.guest_bin = Some(PathBuf::from(other)),
        }
    }
    let t0 = Instant::now();
    let progress = |m: &str| eprintln!("[{:6.1}s] {m}", t0.elapsed().as_secs_f64());
    match gatevm_runtime::setup(&opts, &progress) {
        Ok(report) => {
            for s in &report.steps {
                println!(
                    "{:<14} {:<15} {:>8} ms  {}",
                    s.component,
                    format!("{:?}", s.action),
                    s.elapsed_ms,
                    s.detail
                );
            }
            println!(
                "total {} ms; log {}",
                report.elapsed_ms,
                report.log.display()
            );
            for old in &report.old_rootfs {
                println!("old rootfs left in place: {}", old.display());
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
    let t = Instant::now();
    let rt = match gatevm_runtime::Runtime::load() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "Runtime::load {} us: kernel {} ({}), modules {}, gvproxy {}, virtiofsd {}, libkrunfw {}",
        t.elapsed().as_micros(),
        rt.kernel_path().display(),
        rt.kernel_release(),
        rt.modules_dir().display(),
        rt.gvproxy().display(),
        rt.virtiofsd().display(),
        rt.libkrunfw().display()
    );
    match rt.rootfs() {
        Ok(p) => println!("rootfs {}", p.display()),
        Err(e) => println!("rootfs: {e}"),
    }
    if let Some(g) = &opts.guest_bin {
        let t = Instant::now();
        match rt.initramfs(g) {
            Ok(p) => println!("initramfs {} ({} us)", p.display(), t.elapsed().as_micros()),
            Err(e) => println!("initramfs: {e}"),
        }
    }
    if verify {
        let t = Instant::now();
        let r = rt.verify();
        println!(
            "verify: {} files, {} problems ({} ms)",
            r.checked,
            r.problems.len(),
            t.elapsed().as_millis()
        );
        for p in &r.problems {
            println!(
                "  {} {}: expected {} got {:?}",
                p.component, p.path, p.expected, p.actual
            );
        }
    }
}
