//! A seccomp filter for the shares' file servers (virtiofsd): no set-user-ID or set-group-ID
//! file can come out of a share. virtiofsd carries out the guest's `chmod` and file creation with
//! the modes the guest asks for, so without this a guest could leave a set-user-ID program on the
//! host (owned by the share's owner, whose rights it would grant to whoever runs it).
//!
//! The filter refuses (`EPERM`) every mode-setting system call whose mode has `S_ISUID`, and
//! `S_ISGID` too except when a directory is made (where it only makes new files inherit the
//! group):
//! `chmod`, `fchmod`, `fchmodat`, `fchmodat2`, `open`, `openat`, `creat`, `mknod`, `mknodat`, and
//! `mkdir`/`mkdirat` for `S_ISUID`. `openat2` carries its mode in a structure a filter cannot
//! read, so it fails with `ENOSYS`, as on a kernel without it: virtiofsd then uses `openat`
//! (its namespace sandbox, with the share as its root, still confines every path). virtiofsd's
//! own filter stacks on top of this one.

/// `S_ISUID`.
const SUID: u32 = 0o4000;
/// `S_ISGID`.
const SGID: u32 = 0o2000;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// `fchmodat2` (Linux 6.6): the same number on every architecture's unified table.
const SYS_FCHMODAT2: i64 = 452;

/// (system call, index of its mode argument, refused bits).
fn rules() -> Vec<(i64, u32, u32)> {
    let mut r = vec![
        (libc::SYS_fchmod, 1, SUID | SGID),
        (libc::SYS_fchmodat, 2, SUID | SGID),
        (SYS_FCHMODAT2, 2, SUID | SGID),
        (libc::SYS_openat, 3, SUID | SGID),
        (libc::SYS_mknodat, 2, SUID | SGID),
        (libc::SYS_mkdirat, 2, SUID),
    ];
    #[cfg(target_arch = "x86_64")]
    r.extend([
        (libc::SYS_chmod, 1, SUID | SGID),
        (libc::SYS_open, 2, SUID | SGID),
        (libc::SYS_creat, 1, SUID | SGID),
        (libc::SYS_mknod, 1, SUID | SGID),
        (libc::SYS_mkdir, 1, SUID),
    ]);
    r
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter program.
pub(crate) fn no_setid_program() -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
    const LD: u16 = (BPF_LD | BPF_W | BPF_ABS) as u16;
    const JEQ: u16 = (BPF_JMP | BPF_JEQ | BPF_K) as u16;
    const JSET: u16 = (BPF_JMP | BPF_JSET | BPF_K) as u16;
    const RET: u16 = (BPF_RET | BPF_K) as u16;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let rules = rules();
    // Layout: arch check (2), openat2 (2), 4 per rule, then ALLOW, EPERM, ENOSYS.
    let total = 2 + 2 + 4 * rules.len() + 3;
    let (allow, eperm, enosys) = (total - 3, total - 2, total - 1);
    let rel = |from: usize, to: usize| -> u8 { (to - from - 1) as u8 };
    let mut p = Vec::with_capacity(total);
    // seccomp_data: nr at 0, arch at 4, args at 16 + 8 * i (the low 32 bits first).
    p.push(stmt(LD, 4));
    p.push(jump(JEQ, AUDIT_ARCH, 0, rel(1, allow)));
    p.push(stmt(LD, 0));
    p.push(jump(JEQ, libc::SYS_openat2 as u32, rel(3, enosys), 0));
    for (nr, arg, bits) in rules {
        let i = p.len();
        p.push(stmt(LD, 0));
        p.push(jump(JEQ, nr as u32, 0, 2));
        p.push(stmt(LD, 16 + 8 * arg));
        p.push(jump(JSET, bits, rel(i + 3, eperm), rel(i + 3, allow)));
    }
    p.push(stmt(RET, SECCOMP_RET_ALLOW));
    p.push(stmt(RET, SECCOMP_RET_ERRNO | libc::EPERM as u32));
    p.push(stmt(RET, SECCOMP_RET_ERRNO | libc::ENOSYS as u32));
    debug_assert_eq!(p.len(), total);
    p
}

/// Installs `prog` on the calling thread (with no_new_privs). Async-signal-safe: for a child
/// between fork and exec.
pub(crate) fn install(prog: &[libc::sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with these arguments reads only `fprog` and the program it points to, which
    // outlive the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::fs::PermissionsExt;

    /// Runs `f` in a forked child with the filter installed; its exit code.
    fn in_filtered_child(f: impl FnOnce() -> i32) -> i32 {
        let prog = no_setid_program();
        // SAFETY: the child only makes system calls and exits; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let code = match install(&prog) {
                    Ok(()) => f(),
                    Err(_) => 99,
                };
                libc::_exit(code);
            }
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            libc::WEXITSTATUS(st)
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn set_id_modes_are_refused_and_others_pass() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let cfile = CString::new(file.to_str().unwrap()).unwrap();
        let dir = CString::new(d.path().to_str().unwrap()).unwrap();
        let new = CString::new("new").unwrap();
        let sub = CString::new("sub").unwrap();
        let sub2 = CString::new("sub2").unwrap();
        let code = in_filtered_child(|| {
            // SAFETY: plain system calls on paths and descriptors this closure owns.
            unsafe {
                if libc::chmod(cfile.as_ptr(), 0o755) != 0 {
                    return 1;
                }
                if libc::chmod(cfile.as_ptr(), 0o4755) == 0 || errno() != libc::EPERM {
                    return 2;
                }
                let fd = libc::open(cfile.as_ptr(), libc::O_RDONLY);
                if fd < 0 {
                    return 3;
                }
                if libc::fchmod(fd, 0o2755) == 0 || errno() != libc::EPERM {
                    return 4;
                }
                let dfd = libc::open(dir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                if libc::fchmodat(dfd, cfile.as_ptr(), 0o6755, 0) == 0 {
                    return 5;
                }
                if libc::openat(dfd, new.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o4755) >= 0 {
                    return 6;
                }
                if libc::openat(dfd, new.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644) < 0 {
                    return 7;
                }
                // A set-group-ID directory is allowed (group inheritance), set-user-ID is not.
                if libc::mkdirat(dfd, sub.as_ptr(), 0o2755) != 0 {
                    return 8;
                }
                if libc::mkdirat(dfd, sub2.as_ptr(), 0o4755) == 0 {
                    return 9;
                }
                let how: libc::open_how = std::mem::zeroed();
                let r = libc::syscall(
                    libc::SYS_openat2,
                    dfd,
                    new.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                );
                if r >= 0 || errno() != libc::ENOSYS {
                    return 10;
                }
            }
            0
        });
        assert_eq!(code, 0, "step {code} of the filtered child failed");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "the file kept no set-ID bit");
        assert!(!d.path().join("sub2").exists());
        // Outside the child nothing is filtered.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4755)).unwrap();
    }
}
