//! Thin wrappers around the few syscalls without a safe wrapper in `nix`/`std`, plus small helpers
//! shared by the other modules.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// `finit_module` flag: the file is compressed and the kernel decompresses it itself.
pub(crate) const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Adds "what failed" context to an I/O error, keeping its kind.
pub(crate) trait Context<T> {
    /// Prefixes the error message with `what`.
    fn ctx(self, what: impl FnOnce() -> String) -> io::Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> io::Result<T> {
        self.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> io::Result<T> {
        self.map_err(|e| {
            let e = io::Error::from(e);
            io::Error::new(e.kind(), format!("{}: {e}", what()))
        })
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: PID 1 must keep going.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads a kernel module from an open file (`finit_module(2)` with empty parameters).
pub(crate) fn finit_module(file: &File, flags: libc::c_uint) -> io::Result<()> {
    let params = c"";
    // SAFETY: the fd is valid for the duration of the call (borrowed from `file`), the parameter
    // string is a valid NUL-terminated C string, and the flags are plain integers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether a module file name is compressed (and so needs [`MODULE_INIT_COMPRESSED_FILE`]).
pub(crate) fn module_flags(path: &Path) -> libc::c_uint {
    let name = path.to_string_lossy();
    if name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz") {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    }
}

/// Sends a signal by raw number (`kill(2)`), so real-time signals work too.
pub(crate) fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers and has no memory effects.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes sure fds 0, 1 and 2 are open (the kernel leaves them closed when the initramfs lacks
/// `/dev/console`), so files opened later never land on them. Uses `/dev/console` when it exists,
/// else `/dev/null`.
pub(crate) fn fix_stdio() {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
    let closed = |fd: i32| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0;
    if !(0..3).any(closed) {
        return;
    }
    for path in [c"/dev/console", c"/dev/null"] {
        // SAFETY: a valid NUL-terminated path; the returned fd is checked before use.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if fd < 0 {
            continue;
        }
        for target in 0..3 {
            if closed(target) && fd != target {
                // SAFETY: both fds are valid integers; dup2 onto a closed slot only fills it.
                unsafe { libc::dup2(fd, target) };
            }
        }
        if fd > 2 {
            // SAFETY: fd is ours and no longer needed after the dups.
            unsafe { libc::close(fd) };
        }
        return;
    }
}

/// Blocks the signals PID 1 handles synchronously (in a `sigwait` thread) in the calling thread;
/// call before starting any thread so every thread inherits the mask. Children get a clean mask
/// from `std::process::Command`.
pub(crate) fn block_shutdown_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGPWR] {
        set.add(s);
    }
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    set
}

static END_BY_REBOOT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`power_off`] reboot first: libkrun ends the VM on a guest reset, while its kernel has
/// no power-off device (a power-off would only halt the CPUs and leave the VM running).
pub(crate) fn end_by_reboot() {
    END_BY_REBOOT.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Syncs and powers the machine off; never returns. Falls back to a reboot (QEMU runs with
/// `-no-reboot`, so that ends the VM too) and finally sleeps forever: PID 1 must not exit.
pub(crate) fn power_off() -> ! {
    use nix::sys::reboot::{reboot, RebootMode};
    nix::unistd::sync();
    if END_BY_REBOOT.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = reboot(RebootMode::RB_AUTOBOOT);
    }
    let _ = reboot(RebootMode::RB_POWER_OFF);
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Creates a character device node (`mknod(2)`), mode 0600.
pub(crate) fn mknod_char(path: &Path, major: u64, minor: u64) -> io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(major, minor),
    )
    .ctx(|| format!("mknod {}", path.display()))
}

/// The running kernel's release (`uname -r`).
pub(crate) fn kernel_release() -> Option<String> {
    nix::sys::utsname::uname()
        .ok()
        .map(|u| u.release().to_string_lossy().into_owned())
}
