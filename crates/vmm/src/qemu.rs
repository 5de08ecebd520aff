//! The QEMU backend: `qemu-system-x86_64 -M microvm` with virtio-mmio devices.

use crate::{Accel, VmConfig, Vmm, VmmError};
use std::path::{Path, PathBuf};
use std::process::Command;

/// QEMU `microvm` backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// Firmware directories (`-L`), searched in order; empty for QEMU's built-in paths.
    pub data_dirs: Vec<PathBuf>,
    /// The host's TSC frequency in kHz, handed to a TCG guest as `tsc_early_khz`.
    ///
    /// Under TCG the guest's TSC is the host's, but the guest kernel has to calibrate it against
    /// the emulated PIT; on a loaded host that calibration fails, the kernel marks the TSC
    /// unusable and boot stalls for minutes (seen with three VMs on two cores). Telling it the
    /// frequency skips the calibration.
    pub tsc_khz: Option<u64>,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            binary: PathBuf::from("qemu-system-x86_64"),
            data_dirs: vec![],
            tsc_khz: None,
        }
    }
}

impl Qemu {
    /// The backend for a QEMU binary and its firmware directories on this host (measures the
    /// TSC frequency once, ~5 ms).
    pub fn for_host(binary: PathBuf, data_dirs: Vec<PathBuf>) -> Qemu {
        Qemu {
            binary,
            data_dirs,
            tsc_khz: crate::probe::host_tsc_khz(),
        }
    }
}

/// Escapes a value for QEMU's comma-separated option syntax (a comma is doubled).
fn opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl Qemu {
    /// The argument list for a configuration.
    pub fn args(&self, cfg: &VmConfig) -> Result<Vec<String>, VmmError> {
        if cfg.cpus == 0 || cfg.memory_mib < 64 {
            return Err(VmmError::Invalid(format!(
                "{} CPUs and {} MiB",
                cfg.cpus, cfg.memory_mib
            )));
        }
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        let mem = format!("{}M", cfg.memory_mib);
        push(&[
            "-name",
            &format!("gatevm-{},process=gatevm-{}", cfg.name, cfg.name),
        ]);
        for d in &self.data_dirs {
            push(&["-L", &d.display().to_string()]);
        }
        push(&["-M", "microvm,x-option-roms=off,rtc=on,memory-backend=mem"]);
        // Modern (virtio 1.x) devices on virtio-mmio instead of QEMU's legacy default: vhost-user
        // back ends such as passt take only modern devices.
        push(&["-global", "virtio-mmio.force-legacy=false"]);
        match cfg.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            // TCG keeps QEMU's default CPU model. QEMU 7.2 crashed 6.12 guests under TCG with any
            // model; the runtime bundle brings QEMU 10 where the host's is older.
            Accel::Tcg => push(&["-accel", "tcg"]),
        }
        push(&["-smp", &cfg.cpus.to_string(), "-m", &mem]);
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        push(&[
            "-chardev",
            &format!("file,id=con,path={},append=on", opt(&cfg.console_log)),
        ]);
        push(&["-serial", "chardev:con"]);
        push(&["-kernel", &cfg.kernel.display().to_string()]);
        if let Some(initrd) = &cfg.initramfs {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        let mut cmdline = cfg.cmdline.clone();
        if let (Accel::Tcg, Some(khz)) = (cfg.accel, self.tsc_khz) {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        push(&["-append", &cmdline]);
        // Agent channel: a virtio-serial port the guest finds by name.
        push(&["-device", "virtio-serial-device"]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=ag,path={},server=on,wait=off",
                opt(&cfg.agent_socket)
            ),
        ]);
        push(&[
            "-device",
            &format!(
                "virtserialport,chardev=ag,name={}",
                gatevm_protocol::AGENT_PORT_NAME
            ),
        ]);
        // Root filesystem through virtiofsd.
        push(&[
            "-chardev",
            &format!("socket,id=vfs,path={}", opt(&cfg.virtiofs_socket)),
        ]);
        push(&["-device", "vhost-user-fs-device,chardev=vfs,tag=root"]);
        if let Some(disk) = &cfg.state_disk {
            // writeback: the host's page cache, with the guest's flushes passed on as fsync of
            // the file, so what the guest fsyncs survives a host crash too.
            push(&[
                "-drive",
                &format!(
                    "if=none,id=state,format=raw,file={},cache=writeback,discard=unmap",
                    opt(disk)
                ),
            ]);
            push(&["-device", "virtio-blk-device,drive=state"]);
        }
        if let Some(net) = &cfg.net {
            let stream = |addr: String| format!("stream,id=n0,server=off,{addr}");
            match net {
                crate::NetAttach::Socket(p) => push(&[
                    "-netdev",
                    &stream(format!("addr.type=unix,addr.path={}", opt(p))),
                ]),
                crate::NetAttach::Fd(fd) => {
                    push(&["-netdev", &stream(format!("addr.type=fd,addr.str={fd}"))])
                }
                crate::NetAttach::VhostUser(p) => {
                    // The guest RAM is a shared memfd already (for virtiofsd).
                    push(&["-chardev", &format!("socket,id=net,path={}", opt(p))]);
                    push(&["-netdev", "vhost-user,id=n0,chardev=net"]);
                }
            }
            push(&[
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={}", cfg.mac),
            ]);
        }
        Ok(a)
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn needs_virtiofsd(&self) -> bool {
        true
    }

    fn command(&self, cfg: &VmConfig) -> Result<Command, VmmError> {
        for (what, p) in [("guest kernel", &cfg.kernel)] {
            if !p.exists() {
                return Err(VmmError::Missing {
                    what,
                    path: p.clone(),
                });
            }
        }
        let mut c = Command::new(&self.binary);
        c.args(self.args(cfg)?);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "t".into(),
            cpus: 2,
            memory_mib: 512,
            accel: Accel::Tcg,
            kernel: "/k".into(),
            initramfs: Some("/i".into()),
            cmdline: "console=ttyS0".into(),
            root_dir: "/r".into(),
            virtiofs_socket: "/run/v,s".into(),
            state_disk: Some("/d".into()),
            agent_socket: "/a".into(),
            net: Some(crate::NetAttach::Socket("/n".into())),
            mac: "5a:94:ef:e4:0c:ee".into(),
            console_log: "/c".into(),
        }
    }

    #[test]
    fn args_cover_the_appliance() {
        let q = Qemu {
            tsc_khz: Some(2_600_000),
            data_dirs: vec!["/fw1".into(), "/fw2".into()],
            ..Qemu::default()
        };
        let a = q.args(&cfg()).unwrap().join(" ");
        assert!(a.contains("console=ttyS0 tsc_early_khz=2600000"), "{a}");
        assert!(a.contains("-L /fw1 -L /fw2"), "{a}");
        for want in [
            "-accel tcg",
            "-smp 2 -m 512M",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-global virtio-mmio.force-legacy=false",
            "path=/run/v,,s",
            "virtserialport,chardev=ag,name=gatevm.agent",
            "virtio-blk-device,drive=state",
            "cache=writeback",
            "virtio-net-device,netdev=n0,mac=5a:94:ef:e4:0c:ee",
            "-no-reboot",
        ] {
            assert!(a.contains(want), "missing {want} in {a}");
        }
        let mut k = cfg();
        k.accel = Accel::Kvm;
        k.net = Some(crate::NetAttach::Fd(7));
        let a = Qemu::default().args(&k).unwrap().join(" ");
        assert!(
            a.contains("-netdev stream,id=n0,server=off,addr.type=fd,addr.str=7"),
            "{a}"
        );
        k.net = Some(crate::NetAttach::VhostUser("/run/n,x".into()));
        let a = Qemu::default().args(&k).unwrap().join(" ");
        assert!(
            a.contains("-chardev socket,id=net,path=/run/n,,x -netdev vhost-user,id=n0,chardev=net -device virtio-net-device,netdev=n0"),
            "{a}"
        );
        k.net = None;
        k.state_disk = None;
        let a = Qemu {
            tsc_khz: Some(2_600_000),
            ..Qemu::default()
        }
        .args(&k)
        .unwrap()
        .join(" ");
        assert!(a.contains("-accel kvm -cpu host"));
        assert!(!a.contains("tsc_early_khz"), "KVM guests use kvmclock");
        assert!(!a.contains("netdev") && !a.contains("virtio-blk"));
    }

    #[test]
    fn bad_sizes_refused() {
        let mut c = cfg();
        c.cpus = 0;
        assert!(Qemu::default().args(&c).is_err());
    }

    #[test]
    fn missing_kernel_named() {
        let err = Qemu::default().command(&cfg()).unwrap_err().to_string();
        assert!(err.contains("guest kernel") && err.contains("/k"), "{err}");
    }
}
