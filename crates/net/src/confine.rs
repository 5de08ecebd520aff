//! Confining a network helper (gvproxy) on the host: an unprivileged uid, no capabilities beyond
//! binding low ports when a forward needs it, and a Landlock domain in which it can create,
//! remove or write files only in its own directory and bind only the TCP ports of the user's
//! forwards.
//!
//! Why each piece:
//! - **Landlock** is what keeps a gvproxy that the guest tricked (or took over) from touching the
//!   host: its API can be told to put a unix socket at any path (removing the file there first) or
//!   to listen on any address. Even if a frame got past [`crate::filter`], the kernel refuses
//!   every file creation, removal or write outside the helper's directory, every TCP `bind` to a
//!   port the user did not forward, connections to abstract unix sockets and signals to processes
//!   outside the domain (each where the running kernel's Landlock ABI has it: 1 for files, 4 for
//!   ports, 6 for the scopes).
//! - **The uid** (`nobody` when gatevm runs as root): a helper bug is not a root compromise. The
//!   helper's own directory is given to that uid; since the instance's runtime directory stays
//!   0700 root, the helper reaches its directory and its binary through descriptors the
//!   supervisor opened (`/proc/self/fd/N/...`), which bypass the walk through root's directories.
//! - **Capabilities**: none, or only `CAP_NET_BIND_SERVICE` as an ambient capability when a
//!   forward's host port is below `net.ipv4.ip_unprivileged_port_start`.
//!
//! The ruleset is built in the parent ([`HelperConfine::new`]); [`HelperConfine::apply_in_child`]
//! only makes system calls (no allocation) so it can run between `fork` and `exec`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

// Landlock system calls and constants (linux/landlock.h).
const SYS_CREATE_RULESET: libc::c_long = 444;
const SYS_ADD_RULE: libc::c_long = 445;
const SYS_RESTRICT_SELF: libc::c_long = 446;
const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;
const RULE_NET_PORT: u32 = 2;

const FS_WRITE_FILE: u64 = 1 << 1;
const FS_REMOVE_DIR: u64 = 1 << 4;
const FS_REMOVE_FILE: u64 = 1 << 5;
const FS_MAKE_CHAR: u64 = 1 << 6;
const FS_MAKE_DIR: u64 = 1 << 7;
const FS_MAKE_REG: u64 = 1 << 8;
const FS_MAKE_SOCK: u64 = 1 << 9;
const FS_MAKE_FIFO: u64 = 1 << 10;
const FS_MAKE_BLOCK: u64 = 1 << 11;
const FS_MAKE_SYM: u64 = 1 << 12;
const FS_REFER: u64 = 1 << 13; // ABI 2
const FS_TRUNCATE: u64 = 1 << 14; // ABI 3
const NET_BIND_TCP: u64 = 1 << 0; // ABI 4
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0; // ABI 6
const SCOPE_SIGNAL: u64 = 1 << 1; // ABI 6

const CAP_NET_BIND_SERVICE: u32 = 10;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

#[repr(C)]
struct NetPortAttr {
    allowed_access: u64,
    port: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The Landlock ABI version of the running kernel; 0 when it has none (or it is disabled).
pub fn landlock_abi() -> u32 {
    // SAFETY: with a null attribute, size 0 and the version flag the call only returns a number.
    let v = unsafe {
        libc::syscall(
            SYS_CREATE_RULESET,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        0
    } else {
        v as u32
    }
}

/// Who to run the helper as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// The `nobody` user (65534 where the user database does not say).
pub fn nobody() -> Identity {
    let name = CString::new("nobody").unwrap_or_default();
    // SAFETY: getpwnam reads the user database and returns a pointer to static storage or null;
    // it is read at once, before any other call that could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Identity {
            uid: 65534,
            gid: 65534,
        };
    }
    // SAFETY: `pw` is non-null and points to a valid passwd entry (above).
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Identity { uid, gid }
}

/// The lowest port an unprivileged process may bind.
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// How one helper process is confined; built before the fork, applied in the child.
#[derive(Debug)]
pub struct HelperConfine {
    ruleset: Option<OwnedFd>,
    /// The Landlock ABI the ruleset was built for (0: none).
    pub landlock_abi: u32,
    /// The identity the helper switches to (None: it keeps the caller's, who is not root).
    pub identity: Option<Identity>,
    /// Whether the helper keeps `CAP_NET_BIND_SERVICE` (a forward below the unprivileged ports).
    pub bind_low_ports: bool,
    /// The TCP ports it may bind.
    pub ports: Vec<u16>,
    /// Descriptors the helper inherits (its directory, its binary).
    inherit: Vec<OwnedFd>,
}

fn open_path(p: &Path, dir: bool) -> io::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", p.display()),
        )
    })?;
    let flags = libc::O_PATH | libc::O_CLOEXEC | if dir { libc::O_DIRECTORY } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated string; the returned descriptor is checked.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::new(
            io::Error::last_os_error().kind(),
            format!("opening {}: {}", p.display(), io::Error::last_os_error()),
        ));
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl HelperConfine {
    /// Confinement for a helper whose only writable place is `dir` and which may bind the TCP
    /// `ports`. When the caller is root, `dir` is given to `nobody` and the helper runs as
    /// `nobody`. Landlock is used as far as the running kernel has it ([`landlock_abi`]).
    pub fn new(dir: &Path, ports: &[u16]) -> io::Result<HelperConfine> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let identity = root.then(nobody);
        let low = unprivileged_port_start();
        let bind_low_ports = root && ports.iter().any(|p| *p < low);
        let dir_fd = open_path(dir, true)?;
        if let Some(id) = identity {
            // SAFETY: `dir_fd` is a valid descriptor of the helper's directory.
            if unsafe {
                libc::fchownat(
                    dir_fd.as_raw_fd(),
                    c"".as_ptr(),
                    id.uid,
                    id.gid,
                    libc::AT_EMPTY_PATH,
                )
            } != 0
            {
                return Err(io::Error::new(
                    io::Error::last_os_error().kind(),
                    format!(
                        "giving {} to uid {}: {}",
                        dir.display(),
                        id.uid,
                        io::Error::last_os_error()
                    ),
                ));
            }
        }
        let abi = landlock_abi();
        let ruleset = if abi == 0 {
            None
        } else {
            Some(build_ruleset(abi, &dir_fd, ports)?)
        };
        Ok(HelperConfine {
            ruleset,
            landlock_abi: abi,
            identity,
            bind_low_ports,
            ports: ports.to_vec(),
            inherit: vec![dir_fd],
        })
    }

    /// Also hands the helper a descriptor of its binary, so that a helper running as `nobody`
    /// can be executed from a directory it cannot walk into: run it as [`Self::program`].
    pub fn with_program(mut self, bin: &Path) -> io::Result<HelperConfine> {
        self.inherit.push(open_path(bin, false)?);
        Ok(self)
    }

    /// The path under which the helper reaches its directory (`/proc/self/fd/N`).
    pub fn dir_path(&self) -> String {
        format!("/proc/self/fd/{}", self.inherit[0].as_raw_fd())
    }

    /// The program to execute: the binary through its descriptor when [`Self::with_program`]
    /// gave one.
    pub fn program(&self) -> Option<String> {
        self.inherit
            .get(1)
            .map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// A short description for status: uid, capabilities, Landlock.
    pub fn describe(&self) -> String {
        let who = match self.identity {
            Some(id) => format!("uid {}", id.uid),
            None => "the caller's uid".to_string(),
        };
        let caps = if self.bind_low_ports {
            "CAP_NET_BIND_SERVICE only"
        } else {
            "no capabilities"
        };
        let ll = match self.landlock_abi {
            0 => "no Landlock (the kernel has none)".to_string(),
            abi => {
                let mut rules = vec!["creates, removes and writes files only in its directory"];
                let ports = format!("binds TCP only on {:?}", self.ports);
                if abi >= 4 {
                    rules.push(&ports);
                }
                if abi >= 6 {
                    rules.push("no abstract sockets or signals outside its domain");
                }
                format!("Landlock ABI {abi}: {}", rules.join("; "))
            }
        };
        format!("{who}, {caps}, no_new_privs, {ll}")
    }

    /// Applies the confinement to the calling process: meant for the child between `fork` and
    /// `exec`, after anything that needs the parent's privileges (entering a cgroup). Only system
    /// calls, no allocation. `parent` is the pid the child must still have as its parent (the
    /// parent-death signal is cleared by the uid change and set again here).
    pub fn apply_in_child(&self, parent: libc::pid_t) -> io::Result<()> {
        let err = || Err(io::Error::last_os_error());
        // SAFETY: (the whole block) plain system calls on valid arguments: descriptors owned by
        // `self`, and structures that live on the stack across each call.
        unsafe {
            for fd in &self.inherit {
                if libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) != 0 {
                    return err();
                }
            }
            if let Some(id) = self.identity {
                if self.bind_low_ports && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
                    return err();
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(id.gid, id.gid, id.gid) != 0
                    || libc::setresuid(id.uid, id.uid, id.uid) != 0
                {
                    return err();
                }
                if self.bind_low_ports {
                    let mut hdr = CapHeader {
                        version: LINUX_CAPABILITY_VERSION_3,
                        pid: 0,
                    };
                    let bit = 1u32 << CAP_NET_BIND_SERVICE;
                    let data = [
                        CapData {
                            effective: bit,
                            permitted: bit,
                            inheritable: bit,
                        },
                        CapData {
                            effective: 0,
                            permitted: 0,
                            inheritable: 0,
                        },
                    ];
                    if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
                        return err();
                    }
                    if libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        CAP_NET_BIND_SERVICE as libc::c_ulong,
                        0,
                        0,
                    ) != 0
                    {
                        return err();
                    }
                }
                // A change of credentials clears the parent-death signal.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return err();
                }
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return err();
            }
            if let Some(rs) = &self.ruleset {
                if libc::syscall(SYS_RESTRICT_SELF, rs.as_raw_fd(), 0u32) != 0 {
                    return err();
                }
            }
        }
        Ok(())
    }
}

fn build_ruleset(abi: u32, dir: &OwnedFd, ports: &[u16]) -> io::Result<OwnedFd> {
    let mut fs = FS_WRITE_FILE
        | FS_REMOVE_DIR
        | FS_REMOVE_FILE
        | FS_MAKE_CHAR
        | FS_MAKE_DIR
        | FS_MAKE_REG
        | FS_MAKE_SOCK
        | FS_MAKE_FIFO
        | FS_MAKE_BLOCK
        | FS_MAKE_SYM;
    if abi >= 2 {
        fs |= FS_REFER;
    }
    if abi >= 3 {
        fs |= FS_TRUNCATE;
    }
    let net = if abi >= 4 { NET_BIND_TCP } else { 0 };
    let scoped = if abi >= 6 {
        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    } else {
        0
    };
    let attr = RulesetAttr {
        handled_access_fs: fs,
        handled_access_net: net,
        scoped,
    };
    // Older kernels take the prefix of the structure they know.
    let size = if abi >= 6 {
        std::mem::size_of::<RulesetAttr>()
    } else if abi >= 4 {
        16
    } else {
        8
    };
    // SAFETY: `attr` is a valid landlock_ruleset_attr of at least `size` bytes.
    let fd = unsafe { libc::syscall(SYS_CREATE_RULESET, &attr, size, 0u32) };
    if fd < 0 {
        return Err(io::Error::new(
            io::Error::last_os_error().kind(),
            format!(
                "creating a Landlock ruleset: {}",
                io::Error::last_os_error()
            ),
        ));
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let rs = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let beneath = PathBeneathAttr {
        allowed_access: fs,
        parent_fd: dir.as_raw_fd(),
    };
    add_rule(
        &rs,
        RULE_PATH_BENEATH,
        &beneath as *const _ as *const libc::c_void,
    )?;
    if net != 0 {
        for p in ports {
            let rule = NetPortAttr {
                allowed_access: NET_BIND_TCP,
                port: u64::from(*p),
            };
            add_rule(&rs, RULE_NET_PORT, &rule as *const _ as *const libc::c_void)?;
        }
    }
    Ok(rs)
}

fn add_rule(rs: &OwnedFd, kind: u32, attr: *const libc::c_void) -> io::Result<()> {
    // SAFETY: `attr` points to a live rule structure of the kind named by `kind`.
    if unsafe { libc::syscall(SYS_ADD_RULE, rs.as_raw_fd(), kind, attr, 0u32) } != 0 {
        return Err(io::Error::new(
            io::Error::last_os_error().kind(),
            format!("adding a Landlock rule: {}", io::Error::last_os_error()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// Runs `script` under `sh` confined to `dir` with the TCP `ports`; returns (status, output).
    fn confined(dir: &Path, ports: &[u16], script: &str) -> (bool, String) {
        let c = HelperConfine::new(dir, ports).unwrap();
        let sh = c.dir_path();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]).env("D", &sh);
        // SAFETY: apply_in_child only makes system calls.
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || c.apply_in_child(parent));
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    #[test]
    fn the_helper_writes_only_in_its_directory() {
        if landlock_abi() == 0 {
            gatevm_testkit::skip(
                "confine::tests::the_helper_writes_only_in_its_directory",
                "this kernel has no Landlock",
            );
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let own = t.path().join("own");
        std::fs::create_dir(&own).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        // Open to everyone, so only Landlock (not the uid) can keep the helper out.
        use std::os::unix::fs::PermissionsExt;
        for (p, m) in [(t.path(), 0o777), (victim.as_path(), 0o666)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        // What the guest asked gvproxy to do: remove a host file and put a socket there.
        let (ok, out) = confined(
            &own,
            &[],
            &format!(
                "rm -f {v}; echo x > {o}; echo y > $D/inside && cat $D/inside",
                v = victim.display(),
                o = t.path().join("other").display()
            ),
        );
        assert!(!ok || out.contains("y"), "{out}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep", "{out}");
        assert!(!t.path().join("other").exists(), "{out}");
        assert_eq!(std::fs::read_to_string(own.join("inside")).unwrap(), "y\n");
    }

    #[test]
    fn the_helper_drops_root_and_capabilities() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            gatevm_testkit::skip(
                "confine::tests::the_helper_drops_root_and_capabilities",
                "needs root to switch uid",
            );
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (ok, out) = confined(
            t.path(),
            &[],
            "grep -E '^(Uid|CapEff|CapAmb|NoNewPrivs)' /proc/self/status",
        );
        assert!(ok, "{out}");
        let id = nobody();
        assert!(
            out.contains(&format!("Uid:\t{}\t{}", id.uid, id.uid)),
            "{out}"
        );
        assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        // A forward below the unprivileged ports keeps exactly the right to bind them.
        let low = unprivileged_port_start();
        if low > 1 {
            let (ok, out) = confined(
                t.path(),
                &[low - 1],
                "grep -E '^(CapEff|CapAmb)' /proc/self/status",
            );
            assert!(ok, "{out}");
            assert!(out.contains("CapEff:\t0000000000000400"), "{out}");
            assert!(out.contains("CapAmb:\t0000000000000400"), "{out}");
        }
    }

    #[test]
    fn the_helper_binds_only_forwarded_ports() {
        if landlock_abi() < 4 {
            gatevm_testkit::skip(
                "confine::tests::the_helper_binds_only_forwarded_ports",
                "this kernel's Landlock cannot restrict ports",
            );
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let free = |_: ()| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (allowed, other) = (free(()), free(()));
        let python = Path::new("/usr/bin/python3");
        if !python.exists() {
            gatevm_testkit::skip(
                "confine::tests::the_helper_binds_only_forwarded_ports",
                "no python3 to bind from",
            );
            return;
        }
        let script = |port: u16| {
            format!("/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", {port})); print(\"bound\")'")
        };
        let (ok, out) = confined(t.path(), &[allowed], &script(allowed));
        assert!(ok && out.contains("bound"), "{out}");
        let (ok, out) = confined(t.path(), &[allowed], &script(other));
        assert!(!ok && out.contains("Permission denied"), "{out}");
    }
}
