//! Exec round trip: `gatevm exec -- true` beside ssh into the same VM (the baseline).
//!
//! The ssh VM is `gatevm vm-run` on a test rootfs (gatevm's own recipe plus openssh-server,
//! built once with gatevm's builder and cached) running `sshd -D -e`, with its port 22 forwarded
//! to the host. In that one VM the case alternates `gatevm exec vmrun-… -- true`, a full `ssh
//! root@127.0.0.1 true` (new connection, key exchange and authentication each time, as a user
//! types it), and the same over a ControlMaster connection (warm). Beside them: `gatevm exec bench
//! -- true` on the benchmark instance and a host-side floor (spawning `true` on the host).

use super::{summary, Bench};
use crate::markdown::{num, times, Align, Section, Table, Target, Verdict};
use crate::netproto::free_port;
use crate::runner::{self, ms, Background};
use crate::stats::{ratio, Summary};
use crate::trees;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const HOST_TIMEOUT: Duration = Duration::from_secs(10);
/// Round trips before the measured ones (connections, caches).
const WARMUP: usize = 2;
/// Target: exec round trip within this fraction of ssh's.
pub const SSH_TARGET: f64 = 0.25;
/// Boot of the ssh VM under emulation and sshd's start.
const SSH_READY_TIMEOUT: Duration = Duration::from_secs(300);
const SSH_TIMEOUT: Duration = Duration::from_secs(60);
/// vm-run stops its VM and removes the instance after SIGTERM.
const VMRUN_GRACE: Duration = Duration::from_secs(60);
/// The guest command of the ssh VM.
pub const SSHD_COMMAND: &str = "mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e";

/// `ssh` with the options every round trip uses: no configuration files, this key only, no host
/// key checks, no prompts.
pub fn ssh_command(port: u16, key: &Path) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-F", "/dev/null", "-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=20",
        ]);
    c
}

/// The ssh client's side: the forwarded port, the key and the ControlMaster socket.
struct SshClient {
    port: u16,
    key: PathBuf,
    control: PathBuf,
}

/// The ssh VM: vm-run's process, its instance name and how to ssh in.
struct SshVm {
    vmrun: Background,
    name: String,
    ssh: SshClient,
}

impl SshClient {
    fn plain(&self) -> Command {
        let mut c = ssh_command(self.port, &self.key);
        c.args([
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "root@127.0.0.1",
            "true",
        ]);
        c
    }

    fn master(&self) -> Command {
        let mut c = ssh_command(self.port, &self.key);
        c.args(["-M", "-S"]).arg(&self.control).args([
            "-o",
            "ControlPersist=no",
            "-N",
            "root@127.0.0.1",
        ]);
        c
    }

    fn muxed(&self, op: Option<&str>) -> Command {
        let mut c = ssh_command(self.port, &self.key);
        c.arg("-S").arg(&self.control);
        match op {
            Some(op) => c.args(["-O", op, "root@127.0.0.1"]),
            None => c.args(["-o", "ControlMaster=no", "root@127.0.0.1", "true"]),
        };
        c
    }
}

fn row(t: &mut Table, what: &str, s: &Summary, ssh: &Summary) {
    t.row(&[
        what.to_string(),
        s.n.to_string(),
        num(s.min),
        num(s.median),
        num(s.p50),
        num(s.p95),
        num(s.max),
        times(ratio(s.p50, ssh.p50)),
        times(ratio(s.p95, ssh.p95)),
    ]);
}

impl Bench<'_> {
    /// Boots the ssh VM and waits until ssh gets in.
    fn boot_ssh_vm(&mut self) -> anyhow::Result<SshVm> {
        let kernel = trees::runtime_kernel()?;
        let cache = trees::cache_dir(|k| std::env::var_os(k))?;
        let log = cache.join("rootfs-build.log");
        let (tree, built) = trees::ensure_ssh_rootfs(&cache, &kernel, &log)?;
        if let Some(d) = built {
            self.ssh_rootfs_build = Some(d);
        }
        let key = self.scratch.path().join("ssh-key");
        let mut kg = Command::new("ssh-keygen");
        kg.args(["-q", "-t", "ed25519", "-N", "", "-C", "gatevm-bench", "-f"])
            .arg(&key);
        runner::run(&mut kg, HOST_TIMEOUT, self.scratch)?.ok()?;
        let public = std::fs::read_to_string(key.with_extension("pub"))
            .context("cannot read the generated ssh public key")?;
        trees::prepare_ssh_tree(&tree, &public, self.scratch)?;

        let port = free_port()?;
        let mut c = Command::new(self.gv.bin());
        c.args(["vm-run", "--rootfs"]).arg(&tree).args([
            "-p",
            &format!("127.0.0.1:{port}:22"),
            "--",
            "sh",
            "-c",
            SSHD_COMMAND,
        ]);
        let label = format!("gatevm vm-run --rootfs {} ... sshd", tree.display());
        eprintln!(
            "exec: booting the ssh VM (gatevm vm-run on {})",
            tree.display()
        );
        let mut vmrun = Background::spawn(&mut c, &label, self.scratch)?.with_grace(VMRUN_GRACE);
        let ssh = SshClient {
            port,
            key,
            control: self.scratch.path().join("ssh-control"),
        };
        runner::wait_until(
            "ssh into the vm-run VM",
            SSH_READY_TIMEOUT,
            Duration::from_millis(500),
            || {
                vmrun.check_running()?;
                let f = runner::run(&mut ssh.plain(), SSH_TIMEOUT, self.scratch)?;
                Ok(f.status.success().then_some(()))
            },
        )?;
        let prefix = format!("vmrun-{}-", vmrun.pid());
        let name = self
            .gv
            .list_names()?
            .into_iter()
            .find(|n| n.starts_with(&prefix))
            .with_context(|| format!("`gatevm list` shows no {prefix}… instance for the ssh VM"))?;
        Ok(SshVm { vmrun, name, ssh })
    }

    /// Stops the ssh VM as a user would (SIGTERM to vm-run, which ends sshd, stops the VM and
    /// removes the instance) and checks that no instance is left behind.
    fn stop_ssh_vm(&self, mut vm: SshVm) -> anyhow::Result<()> {
        let pid = vm.vmrun.pid();
        vm.vmrun.stop(libc::SIGTERM, VMRUN_GRACE)?;
        let prefix = format!("vmrun-{pid}-");
        let left: Vec<String> = self
            .gv
            .list_names()?
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        if !left.is_empty() {
            bail!(
                "`gatevm vm-run` left instance {} behind after SIGTERM (remove it with `gatevm delete {} --force`)",
                left.join(", "),
                left[0]
            );
        }
        Ok(())
    }

    /// Runs the exec case.
    pub fn exec(&mut self) -> anyhow::Result<Section> {
        let st = self.gv.ensure_running()?;
        if st.backend.is_some() {
            self.backend = st.backend;
        }
        for _ in 0..WARMUP {
            self.gv.exec_true()?;
        }
        let mut bench = Vec::with_capacity(self.exec_runs);
        for _ in 0..self.exec_runs {
            bench.push(ms(self.gv.exec_true()?));
        }
        let mut host = Vec::with_capacity(self.exec_runs);
        for _ in 0..self.exec_runs {
            let f = runner::run(&mut Command::new("true"), HOST_TIMEOUT, self.scratch)?.ok()?;
            host.push(ms(f.elapsed));
        }
        // One VM at a time: the benchmark instance would compete with the ssh VM for the CPUs.
        self.gv.stop_if_running()?;

        let vm = self.boot_ssh_vm()?;
        let guest = self.gv.on(&vm.name);
        let client = &vm.ssh;
        let measured = (|| -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
            for _ in 0..WARMUP {
                guest.exec_true()?;
                runner::run(&mut client.plain(), SSH_TIMEOUT, self.scratch)?.ok()?;
            }
            let _master =
                Background::spawn(&mut client.master(), "ssh -M (ControlMaster)", self.scratch)?;
            runner::wait_until(
                "the ssh ControlMaster connection",
                SSH_TIMEOUT,
                Duration::from_millis(200),
                || {
                    Ok(
                        runner::run(&mut client.muxed(Some("check")), SSH_TIMEOUT, self.scratch)?
                            .status
                            .success()
                            .then_some(()),
                    )
                },
            )?;
            runner::run(&mut client.muxed(None), SSH_TIMEOUT, self.scratch)?.ok()?;
            let (mut exec, mut ssh, mut mux) = (Vec::new(), Vec::new(), Vec::new());
            // Interleaved, so that a change in the machine's load hits all three alike.
            for _ in 0..self.exec_runs {
                exec.push(ms(guest.exec_true()?));
                ssh.push(ms(runner::run(
                    &mut client.plain(),
                    SSH_TIMEOUT,
                    self.scratch,
                )?
                .ok()?
                .elapsed));
                mux.push(ms(runner::run(
                    &mut client.muxed(None),
                    SSH_TIMEOUT,
                    self.scratch,
                )?
                .ok()?
                .elapsed));
            }
            let _ = runner::run(&mut client.muxed(Some("exit")), SSH_TIMEOUT, self.scratch);
            Ok((exec, ssh, mux))
        })();
        let name = vm.name.clone();
        let stopped = self.stop_ssh_vm(vm);
        let (exec, ssh, mux) = measured?;
        stopped?;

        let (b, h) = (summary(&bench), summary(&host));
        let (e, s, m) = (summary(&exec), summary(&ssh), summary(&mux));
        eprintln!(
            "exec: {} round trips in the ssh VM: exec p50 {} ms, p95 {} ms; ssh p50 {} ms, p95 {} ms; ssh (ControlMaster) p50 {} ms",
            e.n,
            num(e.p50),
            num(e.p95),
            num(s.p50),
            num(s.p95),
            num(m.p50)
        );
        let mut t = Table::new(&[
            ("measurement", Align::Left),
            ("n", Align::Right),
            ("min (ms)", Align::Right),
            ("median (ms)", Align::Right),
            ("p50 (ms)", Align::Right),
            ("p95 (ms)", Align::Right),
            ("max (ms)", Align::Right),
            ("p50 / ssh", Align::Right),
            ("p95 / ssh", Align::Right),
        ]);
        row(&mut t, "`gatevm exec vmrun-… -- true` (the ssh VM)", &e, &s);
        row(
            &mut t,
            "baseline: `ssh root@127.0.0.1 true` into the same VM, a new connection each time",
            &s,
            &s,
        );
        row(
            &mut t,
            "`ssh root@127.0.0.1 true` over a ControlMaster connection (warm; not the target's baseline)",
            &m,
            &s,
        );
        row(
            &mut t,
            "`gatevm exec bench -- true` (the benchmark instance)",
            &b,
            &s,
        );
        row(
            &mut t,
            "host-side floor: spawn `true` on the host (fork/exec + wait)",
            &h,
            &s,
        );
        let target = |what: &str, exec: f64, ssh: f64| {
            let r = ratio(exec, ssh);
            Target {
                what: format!("exec round trip {what} <= {SSH_TARGET}x ssh (new connection)"),
                measured: format!("{} ({} / {} ms)", times(r), num(exec), num(ssh)),
                verdict: match r {
                    Some(r) => Verdict::of(r <= SSH_TARGET),
                    None => Verdict::NotMeasured("no ssh time".into()),
                },
            }
        };
        let mut notes = vec![
            format!(
                "The ssh VM: `gatevm vm-run --rootfs ROOTFS -p 127.0.0.1:PORT:22 -- sh -c '{SSHD_COMMAND}'` (vm-run's defaults: 2 CPUs, 1024 MiB; it ran as `{name}`). ROOTFS is gatevm's own rootfs recipe plus `{}`, built with gatevm's builder and cached in the benchmark's cache directory{}. The benchmark instance is stopped meanwhile, so that one VM runs at a time.",
                trees::SSH_PACKAGE,
                match self.ssh_rootfs_build {
                    Some(d) => format!(" (built in this run in {} s)", num(d.as_secs_f64())),
                    None => " (reused from an earlier run)".into(),
                }
            ),
            format!(
                "In the ssh VM the three are interleaved, {} rounds after {WARMUP} unmeasured ones: `gatevm exec {name} -- true`, then `ssh -F /dev/null -p PORT -i KEY -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes root@127.0.0.1 true` (a new TCP connection, key exchange and public-key authentication each time, as a user runs it), then the same through an open ControlMaster connection (`-S SOCKET`; only a new session on an authenticated connection). The target is judged against the new-connection ssh.",
                self.exec_runs
            ),
            format!(
                "`gatevm exec bench -- true`: {} round trips on the benchmark instance (after {WARMUP} unmeasured ones), before the ssh VM boots. The host-side floor is the cost of starting a process on the host: no exec into a VM can beat it.",
                self.exec_runs
            ),
            "Times are the wall time of each command from spawn to exit, so both sides include starting the client (`gatevm`, `ssh`).".into(),
        ];
        if self.exec_runs < 20 {
            notes.push(format!(
                "Only {} round trips: p95 is the largest or near it.",
                self.exec_runs
            ));
        }
        Ok(Section {
            title: "Exec round trip".into(),
            intro: vec![format!(
                "`gatevm exec -- true` beside ssh into the same VM: {} round trips each.",
                self.exec_runs
            )],
            tables: vec![t],
            targets: vec![target("p50", e.p50, s.p50), target("p95", e.p95, s.p95)],
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_commands() {
        let vm = SshClient {
            port: 2222,
            key: "/k".into(),
            control: "/c".into(),
        };
        let l = |c: Command| runner::label(&c);
        let common = "ssh -F /dev/null -p 2222 -i /k -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=20";
        assert_eq!(
            l(vm.plain()),
            format!("{common} -o ControlMaster=no -o ControlPath=none root@127.0.0.1 true")
        );
        assert_eq!(
            l(vm.master()),
            format!("{common} -M -S /c -o ControlPersist=no -N root@127.0.0.1")
        );
        assert_eq!(
            l(vm.muxed(None)),
            format!("{common} -S /c -o ControlMaster=no root@127.0.0.1 true")
        );
        assert_eq!(
            l(vm.muxed(Some("exit"))),
            format!("{common} -S /c -O exit root@127.0.0.1")
        );
    }
}
