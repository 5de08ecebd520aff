//! Runs `gatevm_image::setup` and prints its progress and report (a development aid; the real
//! front end is `gatevm setup`).
//!
//! Usage: `cargo run -p gatevm-image --example setup -- [--skip-rootfs] [--refresh] [GUEST_BIN]`

use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let mut opts = gatevm_image::SetupOptions::default();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--skip-rootfs" => opts.skip_rootfs = true,
            "--refresh" => opts.refresh = true,
            other => opts.guest_bin = Some(PathBuf::from(other)),
        }
    }
    let t0 = Instant::now();
    let progress = |m: &str| eprintln!("[{:6.1}s] {m}", t0.elapsed().as_secs_f64());
    match gatevm_image::setup(&opts, &progress) {
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
            println!("total {} ms; log {}", report.elapsed_ms, report.log.display());
            for old in &report.old_rootfs {
                println!("old rootfs left in place: {}", old.display());
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
