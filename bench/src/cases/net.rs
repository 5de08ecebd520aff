//! Network: host->guest throughput and latency through a forwarded port, for gatevm's network
//! helpers (`--net gvproxy`, `--net passt`) beside QEMU's built-in user networking.
//!
//! The same static test server ([`crate::netproto`]) runs in every guest. Baseline: a bare QEMU
//! microVM of the same kernel with `-netdev user,hostfwd=...` and a virtio-net device, whose
//! /init is the server (it loads the virtio-net modules from gatevm's initramfs layout and
//! configures eth0 itself). gatevm: the instance `benchnet` started with the helper and a
//! forward, the server copied in with `gatevm exec -i` and run by a long-running `gatevm exec`.

use super::{summary, Bench};
use crate::gatevm::{help_has_option, need, DeleteOnDrop};
use crate::host::{self, Accel, Qemu};
use crate::markdown::{num, times, Align, Section, Table, Target, Verdict};
use crate::netproto::{self, connect, connect_ready, echo_rtts, free_port, local, send_bulk};
use crate::procs::{snapshot, RealProc, Role, Rss};
use crate::runner::{self, Background};
use crate::stats::ratio;
use crate::trees;
use anyhow::{bail, Context};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The instance the network case creates, uses and deletes.
pub const NET_INSTANCE: &str = "benchnet";
/// Target: gvproxy's throughput at least this many times QEMU user networking's.
pub const GVPROXY_TARGET: f64 = 1.0;
/// Target: passt's throughput at least this many times QEMU user networking's.
pub const PASST_TARGET: f64 = 2.0;
/// The guest address QEMU's user networking expects (its default 10.0.2.0/24 network).
pub const SLIRP_GUEST_IP: &str = "10.0.2.15";
/// Where the server goes in the gatevm guest.
const GUEST_SERVER: &str = "/tmp/gatevm-bench-srv";
const READY_TIMEOUT: Duration = Duration::from_secs(300);
const QUIT_GRACE: Duration = Duration::from_secs(30);
const WARMUP_BYTES: u64 = 8 << 20;
const WARMUP_PINGS: usize = 20;
const SAMPLE_GAP: Duration = Duration::from_millis(50);
const IDLE_SAMPLES: usize = 5;

/// The bare VM's QEMU arguments: the boot case's bare boot plus user networking with the
/// forward and a virtio-net device.
pub fn user_net_args(
    qemu: &Qemu,
    accel: Accel,
    kernel: &Path,
    initrd: &Path,
    console: &Path,
    host_port: u16,
) -> Vec<OsString> {
    let mut a = host::bare_boot_args(qemu, accel, kernel, initrd, console);
    for s in [
        "-netdev".to_string(),
        format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{host_port}-:{}",
            netproto::GUEST_PORT
        ),
        "-device".to_string(),
        "virtio-net-device,netdev=n0".to_string(),
    ] {
        a.push(s.into());
    }
    a
}

/// The network helper's memory on one path: the largest seen idle and during the transfers.
#[derive(Debug, Clone, Default)]
struct HelperMem {
    idle: Rss,
    load: Rss,
    found: bool,
}

/// One path's measurements.
#[derive(Debug, Default)]
struct PathRun {
    /// MiB/s per run.
    mibps: Vec<f64>,
    /// Round trips, ms, all runs together.
    rtts: Vec<f64>,
    /// The network helper's memory (gatevm paths).
    helper: Option<HelperMem>,
    /// Why it was not measured.
    skipped: Option<String>,
}

impl PathRun {
    fn not_measured(why: String) -> PathRun {
        PathRun {
            skipped: Some(why),
            ..Default::default()
        }
    }
}

/// Samples the instance's processes: the network helper's resident memory.
struct Sampler {
    supervisor: u32,
    vm: u32,
    role: Role,
}

impl Sampler {
    fn sample(&self) -> Option<Rss> {
        snapshot(&RealProc, self.supervisor, Some(self.vm))
            .get(&self.role)
            .map(|u| u.rss)
    }
}

impl Bench<'_> {
    /// Throughput and latency through `addr`, `--runs` times, after a warm-up on `first`;
    /// samples the helper while sending when a sampler is given.
    fn measure_path(
        &self,
        what: &str,
        addr: SocketAddr,
        first: std::net::TcpStream,
        sampler: Option<&Sampler>,
    ) -> anyhow::Result<PathRun> {
        let bytes = self.net_mib << 20;
        let send_timeout = Duration::from_secs(120 + self.net_mib * 4);
        let ping_timeout = Duration::from_secs(60 + self.net_pings as u64);
        send_bulk(first, WARMUP_BYTES.min(bytes), send_timeout)?;
        echo_rtts(connect(addr)?, WARMUP_PINGS, ping_timeout)?;
        let mut run = PathRun::default();
        let mut mem = sampler.map(|s| {
            let mut m = HelperMem::default();
            for _ in 0..IDLE_SAMPLES {
                if let Some(r) = s.sample() {
                    m.idle = m.idle.max(r);
                    m.found = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            m
        });
        for i in 1..=self.runs {
            let conn = connect(addr)?;
            let took = match (sampler, mem.as_mut()) {
                (Some(s), Some(m)) => std::thread::scope(|sc| {
                    let worker = sc.spawn(|| send_bulk(conn, bytes, send_timeout));
                    while !worker.is_finished() {
                        if let Some(r) = s.sample() {
                            m.load = m.load.max(r);
                            m.found = true;
                        }
                        std::thread::sleep(SAMPLE_GAP);
                    }
                    worker
                        .join()
                        .map_err(|_| anyhow::anyhow!("the sending thread panicked"))?
                })?,
                _ => send_bulk(conn, bytes, send_timeout)?,
            };
            run.mibps.push(self.net_mib as f64 / took.as_secs_f64());
            let rtts = echo_rtts(connect(addr)?, self.net_pings, ping_timeout)?;
            let p50 = summary(&rtts).p50;
            run.rtts.extend(rtts);
            eprintln!(
                "net {what} {i}/{}: {} MiB/s; round trip p50 {} ms",
                self.runs,
                num(run.mibps[i - 1]),
                num(p50)
            );
        }
        run.helper = mem;
        Ok(run)
    }

    /// The baseline: a bare QEMU VM with user networking whose /init is the server.
    fn qemu_user_path(&mut self, server: &Path) -> anyhow::Result<PathRun> {
        let qemu = self.qemu.clone().map_err(anyhow::Error::msg)?;
        let kernel = trees::runtime_kernel()?;
        let initrd = gatevm_runtime::build_initramfs(
            server,
            &kernel,
            &self.scratch.path().join("net-initramfs"),
        )
        .context("building the bare VM's initramfs")?;
        let console = self.scratch.path().join("net-console.log");
        let port = free_port()?;
        let mut c = Command::new(&qemu.bin);
        c.args(user_net_args(
            &qemu,
            self.machine.accel.accel,
            &kernel.vmlinux,
            &initrd,
            &console,
            port,
        ));
        eprintln!("net: booting the bare QEMU VM with user networking");
        let label = format!(
            "{} (bare VM, user networking)",
            runner::label(&Command::new(&qemu.bin))
        );
        let mut vm = Background::spawn(&mut c, &label, self.scratch)?;
        let addr = local(port);
        let console_tail = || {
            let text =
                String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
            runner::last_line(&text).unwrap_or("(nothing)").to_string()
        };
        let first = connect_ready(addr, READY_TIMEOUT, || match vm.exited() {
            None => Ok(()),
            Some(st) => bail!(
                "the bare QEMU VM exited ({st}) before its test server answered; its console ends with {:?}",
                console_tail()
            ),
        })
        .with_context(|| format!("the bare VM's console ends with {:?}", console_tail()))?;
        let run = self.measure_path("QEMU user networking", addr, first, None)?;
        netproto::quit(connect(addr)?)?;
        if vm.wait_exit(QUIT_GRACE).is_none() {
            vm.stop(libc::SIGTERM, QUIT_GRACE)?;
        }
        Ok(run)
    }

    /// A gatevm path: instance `benchnet` with network helper `net` (`--net` only when this
    /// gatevm has it: without it gvproxy is the only helper).
    fn gatevm_path(&mut self, net: &str, net_flag: bool, server: &Path) -> anyhow::Result<PathRun> {
        let gv = self.gv.on(NET_INSTANCE);
        gv.delete()?;
        let _cleanup = DeleteOnDrop(self.gv.on(NET_INSTANCE));
        let port = free_port()?;
        let publish = format!("127.0.0.1:{port}:{}", netproto::GUEST_PORT);
        let mut args = Vec::new();
        if net_flag {
            args.extend(["--net", net]);
        }
        args.extend(["-p", publish.as_str()]);
        eprintln!("net: starting instance {NET_INSTANCE:?} (network helper {net})");
        gv.start_with(&args)?;
        let st = gv.status()?;
        if st.backend.is_some() && self.backend.is_none() {
            self.backend = st.backend.clone();
        }
        let sampler = Sampler {
            supervisor: need(st.supervisor_pid, "supervisor_pid", NET_INSTANCE)?,
            vm: need(st.vm_pid, "vm_pid", NET_INSTANCE)?,
            role: if net == "passt" {
                Role::Passt
            } else {
                Role::Gvproxy
            },
        };
        let bin = std::fs::File::open(server)
            .with_context(|| format!("cannot open {}", server.display()))?;
        gv.exec_with_stdin(
            &[
                "sh",
                "-c",
                &format!("cat > {GUEST_SERVER} && chmod +x {GUEST_SERVER}"),
            ],
            bin,
        )?;
        let mut c = Command::new(gv.bin());
        c.args(["exec", NET_INSTANCE, "--", GUEST_SERVER]);
        let label = format!("gatevm exec {NET_INSTANCE} -- {GUEST_SERVER}");
        let mut srv = Background::spawn(&mut c, &label, self.scratch)?;
        let addr = local(port);
        let first = connect_ready(addr, READY_TIMEOUT, || srv.check_running())?;
        let run = self.measure_path(&format!("gatevm --net {net}"), addr, first, Some(&sampler))?;
        netproto::quit(connect(addr)?)?;
        if srv.wait_exit(QUIT_GRACE).is_none() {
            srv.stop(libc::SIGTERM, QUIT_GRACE)?;
        }
        Ok(run)
    }

    /// Runs the network case.
    pub fn net(&mut self) -> anyhow::Result<Section> {
        // One VM at a time: the benchmark instance would compete for the CPUs.
        self.gv.stop_if_running()?;
        let server = netproto::build_server(self.scratch)?;
        let help = self.gv.help("start")?;
        let net_flag = help_has_option(&help, "net");

        let base = self.qemu_user_path(&server)?;
        let gvproxy = self.gatevm_path("gvproxy", net_flag, &server)?;
        let passt = if net_flag {
            self.gatevm_path("passt", true, &server)?
        } else {
            PathRun::not_measured(
                "this gatevm has no --net passt (`gatevm start --help` shows no --net)".into(),
            )
        };

        let paths: [(&str, &PathRun); 3] = [
            (
                "baseline: QEMU user networking (`-netdev user,hostfwd=...`), bare VM",
                &base,
            ),
            (
                if net_flag {
                    "gatevm `--net gvproxy`"
                } else {
                    "gatevm, gvproxy (its only helper: no --net option)"
                },
                &gvproxy,
            ),
            ("gatevm `--net passt`", &passt),
        ];
        let base_tp = summary(&base.mibps);
        let base_rtt = summary(&base.rtts);
        let mut tp = Table::new(&[
            ("path (host -> guest)", Align::Left),
            ("n", Align::Right),
            ("min (MiB/s)", Align::Right),
            ("median (MiB/s)", Align::Right),
            ("max (MiB/s)", Align::Right),
            ("median / QEMU user", Align::Right),
        ]);
        let mut lat = Table::new(&[
            ("path (host -> guest)", Align::Left),
            ("round trips", Align::Right),
            ("min (ms)", Align::Right),
            ("p50 (ms)", Align::Right),
            ("p95 (ms)", Align::Right),
            ("max (ms)", Align::Right),
            ("p50 / QEMU user", Align::Right),
        ]);
        let mut mem = Table::new(&[
            ("network helper", Align::Left),
            ("idle VmRSS (MiB)", Align::Right),
            ("idle own (anon+file, MiB)", Align::Right),
            ("max VmRSS while sending (MiB)", Align::Right),
            ("max own while sending (MiB)", Align::Right),
        ]);
        for (what, p) in &paths {
            if let Some(why) = &p.skipped {
                let label = format!("{what}: not measured ({why})");
                tp.row(&[label.as_str(), "0", "-", "-", "-", "-"]);
                lat.row(&[label.as_str(), "0", "-", "-", "-", "-", "-"]);
                continue;
            }
            let s = summary(&p.mibps);
            tp.row(&[
                what.to_string(),
                s.n.to_string(),
                num(s.min),
                num(s.median),
                num(s.max),
                times(ratio(s.median, base_tp.median)),
            ]);
            let r = summary(&p.rtts);
            lat.row(&[
                what.to_string(),
                r.n.to_string(),
                num(r.min),
                num(r.p50),
                num(r.p95),
                num(r.max),
                times(ratio(r.p50, base_rtt.p50)),
            ]);
        }
        let m = |k: u64| num(k as f64 / 1024.0);
        for (name, p) in [("gvproxy", &gvproxy), ("passt", &passt)] {
            match (&p.skipped, &p.helper) {
                (Some(why), _) => {
                    let label = format!("{name}: not measured ({why})");
                    mem.row(&[label.as_str(), "-", "-", "-", "-"]);
                }
                (None, Some(h)) if h.found => {
                    mem.row(&[
                        name.to_string(),
                        m(h.idle.vm),
                        m(h.idle.own()),
                        m(h.load.vm),
                        m(h.load.own()),
                    ]);
                }
                _ => {
                    let label = format!(
                        "{name}: not measured (no {name} process among the supervisor's children)"
                    );
                    mem.row(&[label.as_str(), "-", "-", "-", "-"]);
                }
            }
        }

        let target = |what: &str, p: &PathRun, limit: f64| {
            let s = summary(&p.mibps);
            let r = ratio(s.median, base_tp.median);
            Target {
                what: format!("{what} throughput >= {limit}x QEMU user networking"),
                measured: match (&p.skipped, r) {
                    (Some(_), _) | (None, None) => "-".into(),
                    (None, Some(r)) => format!(
                        "{} ({} / {} MiB/s, medians)",
                        times(Some(r)),
                        num(s.median),
                        num(base_tp.median)
                    ),
                },
                verdict: match (&p.skipped, r) {
                    (Some(why), _) => Verdict::NotMeasured(why.clone()),
                    (None, None) => Verdict::NotMeasured("no baseline throughput".into()),
                    (None, Some(r)) => Verdict::of(r >= limit),
                },
            }
        };
        if let Some(why) = &passt.skipped {
            self.not_measured
                .push(format!("Network through passt: {why}."));
        }
        Ok(Section {
            title: "Network: port forward host -> guest".into(),
            intro: vec![format!(
                "Runs: {}. Throughput: {} MiB sent from the host through the forwarded port into a sink in the guest, which acknowledges the total at the end. Latency: {} one-byte request/response round trips over one connection per run, all runs together.",
                self.runs, self.net_mib, self.net_pings
            )],
            tables: vec![tp, lat, mem],
            targets: vec![
                target("gvproxy", &gvproxy, GVPROXY_TARGET),
                target("passt", &passt, PASST_TARGET),
            ],
            notes: vec![
                "The same static test server (bench/src/netsrv.c, `cc -static -O2`) runs in every guest: one TCP connection at a time, TCP_NODELAY; the host side is the benchmark's client (256 KiB writes; one byte written, one read, per round trip). Throughput is the bytes sent over the wall time from the first byte to the sink's acknowledgement; each measurement opens its own connection (outside the timed part), after an unmeasured warm-up of 8 MiB and 20 round trips.".into(),
                format!(
                    "Baseline: a bare QEMU microVM of the same kernel (the boot case's bare boot: 2 vCPUs, 2048 MiB, acceleration `{}`) with `-netdev user,id=n0,hostfwd=tcp:127.0.0.1:PORT-:{gp} -device virtio-net-device,netdev=n0`; its initramfs is gatevm's own layout (`gatevm_runtime::build_initramfs`, which adds the virtio-net modules) with the server as /init, which loads the modules, gives eth0 {SLIRP_GUEST_IP}/24 and serves. It runs nothing else.",
                    self.machine.accel.accel.name(),
                    gp = netproto::GUEST_PORT
                ),
                format!(
                    "gatevm: `gatevm start {NET_INSTANCE} --net HELPER -p 127.0.0.1:PORT:{gp}` (default 2 CPUs, 2048 MiB), the server copied in with `gatevm exec -i` and run by a long-running `gatevm exec {NET_INSTANCE} -- {GUEST_SERVER}`; the guest also runs gatevm's agent and containerd. gvproxy speaks QEMU's stream protocol on a unix socket (`-netdev stream`); passt is the device's vhost-user back end (`-netdev vhost-user`) and moves frames in and out of guest memory itself. All three VMs have modern (virtio 1.x) virtio-mmio devices. The instance is deleted after each helper, and the benchmark instance is stopped meanwhile, so one VM runs at a time.",
                    gp = netproto::GUEST_PORT
                ),
                "Helper memory: the network helper's processes among the supervisor's children, sampled 5 times idle and every 50 ms while sending (VmRSS, and own memory = RssAnon + RssFile; passt under vhost-user maps the guest's memory, whose pages it touches count as its shmem, not its own). QEMU's user networking runs inside the QEMU process: there is no helper to measure.".into(),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_net_args_add_the_forward_and_the_nic() {
        let q = Qemu {
            bin: "/q".into(),
            data_dirs: vec![],
        };
        let a = user_net_args(
            &q,
            Accel::Tcg,
            Path::new("/k"),
            Path::new("/i"),
            Path::new("/c"),
            40123,
        );
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let j = a.join(" ");
        assert!(
            j.starts_with("-M microvm,x-option-roms=off,rtc=on -global virtio-mmio.force-legacy=false -accel tcg"),
            "{j}"
        );
        assert!(j.ends_with(
            "-netdev user,id=n0,hostfwd=tcp:127.0.0.1:40123-:5001 -device virtio-net-device,netdev=n0"
        ), "{j}");
        assert!(j.contains("-nodefaults"));
        // The address the server gives eth0 is the one QEMU's user networking forwards to.
        assert!(netproto::SERVER_C.contains(&format!("\"{SLIRP_GUEST_IP}\"")));
        assert!(netproto::SERVER_C.contains("\"255.255.255.0\""));
    }
}
