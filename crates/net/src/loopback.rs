//! Keeping the guest away from the host's loopback.
//!
//! gvproxy NATs 192.168.127.254 to the host's 127.0.0.1 and cannot be told otherwise, so a guest
//! could reach every service the host keeps on loopback. We close that door around gvproxy: it runs
//! in a cgroup of its own (cgroup v2) with BPF programs on the cgroup's `connect4` and `connect6`
//! hooks that refuse (EPERM) any destination in 127.0.0.0/8, `::1` or `::ffff:127.0.0.0/104`.
//! gvproxy reaches NATed destinations only through `net.Dial` (TCP and UDP alike), which connects.
//! The `sendmsg` hooks are deliberately left alone: gvproxy answers host clients of a UDP port
//! forward with `sendto` to their 127.0.0.1 address, and that must keep working. Everything else
//! gvproxy does (outbound connections for the guest, listeners for port forwards) is untouched.
//! This is how systemd's socket-address filters work, and it needs root (CAP_BPF and
//! CAP_SYS_ADMIN) and a cgroup v2 hierarchy.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

// bpf(2) commands, program and attach types (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

/// One eBPF instruction.
#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8, // dst in the low nibble, src in the high nibble
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes used below.
const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
const AND_K: u8 = 0x57; // r_dst &= imm (64-bit)
const MOV_K: u8 = 0xb7; // r_dst = imm (64-bit)
const JEQ32_K: u8 = 0x16; // if (u32)r_dst == imm goto +off
const JNE32_K: u8 = 0x56; // if (u32)r_dst != imm goto +off
const JA: u8 = 0x05; // goto +off
const EXIT: u8 = 0x95;

// Offsets in struct bpf_sock_addr.
const USER_IP4: i16 = 4;
const USER_IP6: i16 = 8;

/// IPv4: refuse 127.0.0.0/8 (the first address byte is the low byte of the loaded word).
fn prog_v4() -> Vec<Insn> {
    vec![
        insn(LDX_W, 2, 1, USER_IP4, 0),
        insn(AND_K, 2, 0, 0, 0xff),
        insn(JEQ32_K, 2, 0, 2, 127),
        insn(MOV_K, 0, 0, 0, 1), // allow
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV_K, 0, 0, 0, 0), // deny
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// IPv6: refuse ::1 and IPv4-mapped 127.0.0.0/8.
fn prog_v6() -> Vec<Insn> {
    vec![
        /* 0 */ insn(LDX_W, 2, 1, USER_IP6, 0),
        /* 1 */ insn(JNE32_K, 2, 0, 10, 0), // -> 12 allow
        /* 2 */ insn(LDX_W, 2, 1, USER_IP6 + 4, 0),
        /* 3 */ insn(JNE32_K, 2, 0, 8, 0), // -> 12 allow
        /* 4 */ insn(LDX_W, 2, 1, USER_IP6 + 8, 0),
        /* 5 */ insn(LDX_W, 3, 1, USER_IP6 + 12, 0),
        /* 6 */ insn(JNE32_K, 2, 0, 2, 0), // -> 9 mapped?
        /* 7 */ insn(JEQ32_K, 3, 0, 6, 0x0100_0000), // ::1 -> 14 deny
        /* 8 */ insn(JA, 0, 0, 3, 0), // -> 12 allow
        /* 9 */
        insn(JNE32_K, 2, 0, 2, 0xffff_0000u32 as i32), // not ::ffff:0:0/96 -> 12 allow
        /* 10 */ insn(AND_K, 3, 0, 0, 0xff),
        /* 11 */ insn(JEQ32_K, 3, 0, 2, 127), // -> 14 deny
        /* 12 allow */ insn(MOV_K, 0, 0, 0, 1),
        /* 13 */ insn(EXIT, 0, 0, 0, 0),
        /* 14 deny */ insn(MOV_K, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<i32> {
    // SAFETY: attr is a zero-initialised 128-byte buffer laid out as `union bpf_attr` for `cmd`;
    // pointers inside it reference memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}

fn load(prog: &[Insn], attach_type: u32) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 4096];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(prog.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&1u32.to_ne_bytes()); // log_level
    attr[28..32].copy_from_slice(&(log.len() as u32).to_ne_bytes());
    attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    attr[48..64].copy_from_slice(b"gatevm_loopback\0");
    attr[68..72].copy_from_slice(&attach_type.to_ne_bytes());
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new fd we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let verifier = String::from_utf8_lossy(&log[..end]);
            Err(io::Error::new(
                e.kind(),
                format!("loading the loopback filter: {e} {}", verifier.trim()),
            ))
        }
    }
}

fn attach(cgroup: &std::fs::File, prog: &OwnedFd, attach_type: u32) -> io::Result<()> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// The cgroup v2 mount point.
fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 hierarchy is mounted"))
}

/// Our own cgroup v2 path, relative to the hierarchy root.
fn own_cgroup() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    Ok(PathBuf::from(rel.trim_start_matches('/')))
}

/// A cgroup whose processes cannot connect to loopback addresses.
#[derive(Debug, Clone)]
pub struct LoopbackGuard {
    dir: PathBuf,
    procs: CString,
}

/// Why the guard could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot keep the guest away from the host's loopback ({0}); gvproxy needs root and cgroup v2 for this: use --net passt, or --allow-host-loopback to accept the exposure")]
pub struct GuardError(String);

impl LoopbackGuard {
    /// The cgroup directory for a name (below the caller's own cgroup).
    pub fn path_for(name: &str) -> Result<PathBuf, GuardError> {
        let root = cgroup2_root().map_err(|e| GuardError(e.to_string()))?;
        let own = own_cgroup().map_err(|e| GuardError(e.to_string()))?;
        Ok(root.join(own).join(format!("gatevm-{name}-net")))
    }

    /// Creates the cgroup `gatevm-<name>-net` and attaches the filters.
    pub fn create(name: &str) -> Result<LoopbackGuard, GuardError> {
        Self::create_at(Self::path_for(name)?)
    }

    /// Whether this process can set up the guard: does what [`LoopbackGuard::create`] does on a
    /// cgroup of its own (`gatevm-probe.PID`, a name no instance can have) and removes it again.
    /// An ordinary user fails here (creating the cgroup, loading or attaching the filters).
    pub fn probe() -> Result<(), GuardError> {
        let root = cgroup2_root().map_err(|e| GuardError(e.to_string()))?;
        let own = own_cgroup().map_err(|e| GuardError(e.to_string()))?;
        let dir = root
            .join(own)
            .join(format!("gatevm-probe.{}", std::process::id()));
        let created = Self::create_at(dir.clone());
        remove_dir(&dir);
        created.map(drop)
    }

    /// Creates the cgroup `dir` (or takes the one there) and attaches the filters.
    fn create_at(dir: PathBuf) -> Result<LoopbackGuard, GuardError> {
        let e = |what: &str, err: io::Error| GuardError(format!("{what}: {err}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(e(&format!("creating cgroup {}", dir.display()), err)),
        }
        let cg = std::fs::File::open(&dir).map_err(|err| e("opening the cgroup", err))?;
        let v4 = prog_v4();
        let v6 = prog_v6();
        for (prog, at) in [
            (&v4, BPF_CGROUP_INET4_CONNECT),
            (&v6, BPF_CGROUP_INET6_CONNECT),
        ] {
            let fd = load(prog, at).map_err(|err| e("loading a BPF filter", err))?;
            attach(&cg, &fd, at).map_err(|err| e("attaching a BPF filter", err))?;
        }
        let procs = CString::new(
            dir.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(|_| GuardError("cgroup path contains NUL".into()))?;
        Ok(LoopbackGuard { dir, procs })
    }

    /// Moves the calling process into the cgroup. Async-signal-safe: meant for `pre_exec`.
    pub fn enter_self(&self) -> io::Result<()> {
        // SAFETY: open/write/close on a NUL-terminated path we own; no allocation happens here.
        unsafe {
            let fd = libc::open(self.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if rc != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the cgroup (its processes must have exited).
    pub fn remove(self) {
        remove_dir(&self.dir);
    }
}

/// Removes a leftover guard cgroup of a previous run (no-op if absent or still busy).
pub fn remove_stale(name: &str) {
    if let Ok(dir) = LoopbackGuard::path_for(name) {
        remove_dir(&dir);
    }
}

fn remove_dir(dir: &Path) {
    // The processes of a cgroup linger briefly after being reaped.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    tracing::warn!("could not remove cgroup {}", dir.display());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn try_connect(guard: Option<&LoopbackGuard>, addr: &str) -> bool {
        run_guarded(guard, "bash", &format!("exec 3<>/dev/tcp/{addr}"))
    }

    /// Runs `prog -c script`, in the guard's cgroup when given; true when it succeeded.
    fn run_guarded(guard: Option<&LoopbackGuard>, prog: &str, script: &str) -> bool {
        let mut cmd = std::process::Command::new(prog);
        cmd.args(["-c", script]).stderr(std::process::Stdio::null());
        if let Some(g) = guard {
            let procs = g.procs.clone();
            let g2 = LoopbackGuard {
                dir: g.dir.clone(),
                procs,
            };
            // SAFETY: enter_self is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || g2.enter_self());
            }
        }
        cmd.status().map(|s| s.success()).unwrap_or(false)
    }

    #[test]
    fn programs_have_valid_jumps() {
        for p in [prog_v4(), prog_v6()] {
            for (i, ins) in p.iter().enumerate() {
                if ins.code & 0x07 == 0x05 || ins.code & 0x07 == 0x06 {
                    if ins.code == EXIT {
                        continue;
                    }
                    let target = i as i64 + 1 + i64::from(ins.off);
                    assert!(
                        target >= 0 && (target as usize) < p.len(),
                        "jump out of range at {i}"
                    );
                }
            }
            assert_eq!(p.last().unwrap().code, EXIT);
        }
    }

    #[test]
    fn the_probe_answers_as_setting_up_the_guard_does_and_leaves_nothing() {
        let probe_dir = cgroup2_root()
            .unwrap()
            .join(own_cgroup().unwrap())
            .join(format!("gatevm-probe.{}", std::process::id()));
        let probed = LoopbackGuard::probe();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Root attaches the guard (guarded_processes_cannot_reach_loopback needs it too).
            assert!(probed.is_ok(), "{probed:?}");
        } else {
            let e = probed.unwrap_err().to_string();
            assert!(
                e.starts_with("cannot keep the guest away from the host's loopback (")
                    && e.ends_with("); gvproxy needs root and cgroup v2 for this: use --net passt, or --allow-host-loopback to accept the exposure"),
                "{e}"
            );
        }
        assert!(!probe_dir.exists(), "{} was left", probe_dir.display());
    }

    #[test]
    fn guarded_processes_cannot_reach_loopback() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            gatevm_testkit::skip(
                "loopback::tests::guarded_processes_cannot_reach_loopback",
                "needs root",
            );
            return;
        }
        let guard = match LoopbackGuard::create(&format!("test-{}", std::process::id())) {
            Ok(g) => g,
            Err(e) => panic!("the loopback guard cannot be set up here: {e}"),
        };
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a4 = l4.local_addr().unwrap().to_string();
        assert!(
            try_connect(None, &a4.replace(':', "/")),
            "unguarded connect failed"
        );
        assert!(
            !try_connect(Some(&guard), &a4.replace(':', "/")),
            "guarded process reached 127.0.0.1"
        );
        let other = a4.replace("127.0.0.1", "127.1.2.3").replace(':', "/");
        assert!(
            !try_connect(Some(&guard), &other),
            "guarded process reached 127.1.2.3"
        );
        if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
            let p = l6.local_addr().unwrap().port();
            assert!(try_connect(None, &format!("::1/{p}")));
            assert!(
                !try_connect(Some(&guard), &format!("::1/{p}")),
                "guarded process reached ::1"
            );
        }
        // UDP: a connected socket (how gvproxy dials NATed destinations) is refused; an answer
        // sent with sendto (how gvproxy replies to host clients of a UDP forward) goes through.
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let up = u.local_addr().unwrap().port();
        assert!(
            !run_guarded(
                Some(&guard),
                "bash",
                &format!("exec 3<>/dev/udp/127.0.0.1/{up}")
            ),
            "guarded process connected a UDP socket to 127.0.0.1"
        );
        let send = format!(
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'answer', ('127.0.0.1', {up}))"
        );
        assert!(
            run_guarded(Some(&guard), "python3", &send),
            "guarded sendto to loopback failed"
        );
        u.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = u
            .recv_from(&mut buf)
            .expect("the guarded sendto did not arrive");
        assert_eq!(&buf[..n], b"answer");
        guard.remove();
    }
}
