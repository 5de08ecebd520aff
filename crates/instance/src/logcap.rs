//! Per-instance log files with a size cap.
//!
//! Every log of an instance (the guest console, the supervisor, each helper and the VMM process)
//! is written by the supervisor through a [`CappedLog`]: when the file reaches its cap it is
//! renamed to `NAME.log.1` (replacing the older generation) and writing goes on in a new
//! `NAME.log`. So an instance never holds more than two caps' worth of each log, whatever the
//! guest prints, and the newest bytes are always kept. Processes that would write a log file
//! themselves get a pipe instead, which a thread of the supervisor drains ([`drain_into`]) all the
//! time, so a writer never blocks for want of a reader.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Cap of the guest console log (`console.log`), per generation.
pub const CONSOLE_LOG_CAP: u64 = 4 * 1024 * 1024;
/// Cap of each host-side log (supervisor, gvproxy, passt, vmm), per generation.
pub const HELPER_LOG_CAP: u64 = 2 * 1024 * 1024;
/// Generations kept besides the current file (`NAME.log.1`).
pub const KEPT_GENERATIONS: u32 = 1;

/// The cap of the log called `which` (`console`, `supervisor`, `gvproxy`, ...).
pub fn cap_for(which: &str) -> u64 {
    if which == "console" {
        CONSOLE_LOG_CAP
    } else {
        HELPER_LOG_CAP
    }
}

/// The previous generation of a log file: `NAME.log` -> `NAME.log.1`.
pub fn previous_generation(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// A log file that is rotated when it reaches its cap.
#[derive(Debug)]
pub struct CappedLog {
    path: PathBuf,
    cap: u64,
    file: File,
    len: u64,
    /// Descriptors (1 and 2 of the supervisor) that follow the current file across rotations.
    follow_fds: Vec<i32>,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
}

impl CappedLog {
    /// Opens (appends to) the log at `path`; a file already at its cap is rotated first.
    pub fn open(path: &Path, cap: u64) -> io::Result<CappedLog> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        let mut log = CappedLog {
            path: path.to_path_buf(),
            cap: cap.max(1),
            file,
            len,
            follow_fds: Vec::new(),
        };
        if log.len >= log.cap {
            log.rotate()?;
        }
        Ok(log)
    }

    /// Makes descriptor `fd` of this process point at the current file now and after each
    /// rotation (the supervisor's stdout and stderr, where a panic message would go).
    pub fn follow_with_fd(&mut self, fd: i32) -> io::Result<()> {
        self.point_fd(fd)?;
        self.follow_fds.push(fd);
        Ok(())
    }

    fn point_fd(&self, fd: i32) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 only replaces descriptor `fd` of this process with a copy of ours.
        if unsafe { libc::dup2(self.file.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Moves the current file to `NAME.1` (replacing the older one) and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        gatevm_fsutil::rename_durable(&self.path, &previous_generation(&self.path))?;
        self.file = open_append(&self.path)?;
        self.len = self.file.metadata()?.len();
        for fd in &self.follow_fds {
            self.point_fd(*fd)?;
        }
        Ok(())
    }

    /// Appends `buf`, rotating as often as needed: no generation grows beyond the cap.
    pub fn append(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.len >= self.cap {
                self.rotate()?;
            }
            let room = (self.cap - self.len).min(buf.len() as u64) as usize;
            self.file.write_all(&buf[..room])?;
            self.len += room as u64;
            buf = &buf[room..];
        }
        Ok(())
    }
}

/// A [`CappedLog`] shared between writers (the supervisor's tracing output).
#[derive(Debug, Clone)]
pub struct SharedLog(Arc<Mutex<CappedLog>>);

impl SharedLog {
    /// Shares `log`.
    pub fn new(log: CappedLog) -> SharedLog {
        SharedLog(Arc::new(Mutex::new(log)))
    }
}

impl Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        log.append(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Tells when a drained pipe has reached its end (every writer gone, everything written).
#[derive(Debug, Clone, Default)]
pub struct Drained(Arc<AtomicBool>, Arc<std::sync::atomic::AtomicU64>);

impl Drained {
    /// Whether the pipe's end was reached.
    pub fn done(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// How many bytes were read from the pipe so far.
    pub fn bytes(&self) -> u64 {
        self.1.load(Ordering::Acquire)
    }

    /// Waits until the pipe's end was reached, at most `max`.
    pub async fn wait(&self, max: Duration) {
        let start = std::time::Instant::now();
        while !self.done() && start.elapsed() < max {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// How long a drain waits after a short read, so that a trickle of small writes is copied in
/// batches rather than one wake-up per write.
const DRAIN_PAUSE: Duration = Duration::from_millis(5);
/// Capacity asked for the pipes and FIFOs that are drained (best effort; the default is 64 KiB).
const PIPE_BYTES: i32 = 1 << 20;

/// Asks for a larger pipe buffer on `fd` (best effort).
fn enlarge_pipe(fd: std::os::fd::RawFd) {
    // SAFETY: F_SETPIPE_SZ on a descriptor we own changes only the pipe's capacity.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_BYTES);
    }
}

/// Creates a pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    enlarge_pipe(fds[0]);
    // SAFETY: both descriptors were just created by pipe2 and belong to nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Copies everything readable from `from` into a capped log at `path`, on a thread of its own,
/// until every writer has closed its end. Read errors end the thread; write errors drop the
/// bytes (the writer must never block because the log cannot be written).
pub fn drain_into(from: OwnedFd, path: &Path, cap: u64) -> io::Result<Drained> {
    let mut log = CappedLog::open(path, cap)?;
    let drained = Drained::default();
    let done = drained.clone();
    let name = format!(
        "log-{}",
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    std::thread::Builder::new()
        .name(name)
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut from = File::from(from);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        done.1.fetch_add(n as u64, Ordering::AcqRel);
                        if let Err(e) = log.append(&buf[..n]) {
                            tracing::debug!("writing {}: {e}", log.path.display());
                        }
                        // A writer of single bytes (QEMU's serial port) would wake us once per
                        // byte: let a short read be followed by a pause, so the pipe gathers
                        // (it holds PIPE_BYTES, far more than a pause's worth of a flood).
                        if n < buf.len() {
                            std::thread::sleep(DRAIN_PAUSE);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            done.0.store(true, Ordering::Release);
        })?;
    Ok(drained)
}

/// A named pipe standing in for a log file that another process opens by path (QEMU's console
/// chardev, libkrun's console output). The supervisor holds a write end itself, so the drain
/// never sees an end of file between the VMM's opening and closing it; dropping the guard
/// closes that end.
#[derive(Debug)]
pub struct LogFifo {
    path: PathBuf,
    _writer: File,
    /// Whether the drain has finished.
    pub drained: Drained,
}

impl LogFifo {
    /// Creates the FIFO at `fifo` (replacing a leftover) and drains it into a capped log at
    /// `log`.
    pub fn create(fifo: &Path, log: &Path, cap: u64) -> io::Result<LogFifo> {
        use std::os::unix::ffi::OsStrExt;
        let _ = std::fs::remove_file(fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Non-blocking so the open does not wait for a writer; then blocking again for the
        // drain thread.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(fifo)?;
        let writer = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(fifo)?;
        {
            use std::os::fd::AsRawFd;
            let fd = reader.as_raw_fd();
            enlarge_pipe(fd);
            // SAFETY: fcntl on a descriptor we own, changing only its status flags.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        let drained = drain_into(reader.into(), log, cap)?;
        Ok(LogFifo {
            path: fifo.to_path_buf(),
            _writer: writer,
            drained,
        })
    }
}

impl Drop for LogFifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads a log with its previous generation first (`NAME.log.1`, then `NAME.log`).
pub fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    let mut out = match std::fs::read(previous_generation(path)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    out.extend(std::fs::read(path)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the writes: no generation exceeds the cap, the two generations in order are
        /// exactly the newest bytes written, and they hold at least the last `cap` bytes.
        #[test]
        fn capped_log_keeps_the_newest_bytes(
            cap in 1u64..200,
            pre in 0usize..300,
            writes in proptest::collection::vec(0usize..500, 0..20),
        ) {
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("console.log");
            // An existing log, maybe already over the cap (from an older gatevm).
            let mut all: Vec<u8> = (0..pre).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, &all).unwrap();
            let mut log = CappedLog::open(&path, cap).unwrap();
            let mut counter = 7u8;
            let mut written = 0u64;
            for w in writes {
                written += w as u64;
                let chunk: Vec<u8> = (0..w).map(|_| { counter = counter.wrapping_add(13); counter }).collect();
                log.append(&chunk).unwrap();
                all.extend_from_slice(&chunk);
                // The cap holds after every write.
                prop_assert!(size(&path) <= cap.max(pre as u64));
                prop_assert!(size(&previous_generation(&path)) <= cap.max(pre as u64));
            }
            let kept = read_all(&path).unwrap();
            prop_assert!(all.ends_with(&kept), "the kept bytes are not the newest ones in order");
            let want = (all.len() as u64).min(cap) as usize;
            prop_assert!(kept.len() >= want, "kept {} bytes, fewer than the last {want}", kept.len());
            if written > cap {
                // Rotation happened: only the two generations exist and both fit the cap.
                prop_assert!(size(&path) <= cap && size(&previous_generation(&path)) <= cap);
            }
            let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
            prop_assert!(names.len() <= 2);
        }
    }

    #[test]
    fn drained_pipe_is_capped_and_the_writer_never_waits() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("vmm.log");
        let (r, w) = pipe().unwrap();
        let drained = drain_into(r, &path, 1000).unwrap();
        let mut w = File::from(w);
        // Far more than a pipe buffer (64 KiB) and than the cap: it only completes because the
        // drain reads all the time.
        let line = [b'x'; 999];
        for _ in 0..300 {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
        }
        w.write_all(b"THE END\n").unwrap();
        drop(w);
        let start = std::time::Instant::now();
        while !drained.done() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(drained.done());
        assert!(size(&path) <= 1000 && size(&previous_generation(&path)) <= 1000);
        let all = read_all(&path).unwrap();
        assert!(
            all.ends_with(b"x\nTHE END\n"),
            "{:?}",
            String::from_utf8_lossy(&all)
        );
    }

    #[test]
    fn fifo_is_drained_into_the_log() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("console.fifo");
        let path = d.path().join("console.log");
        let f = LogFifo::create(&fifo, &path, 64).unwrap();
        // A writer that opens the path, as QEMU's file chardev does.
        let mut w = OpenOptions::new().append(true).open(&fifo).unwrap();
        for i in 0..100 {
            writeln!(w, "line {i}").unwrap();
        }
        drop(w);
        let drained = f.drained.clone();
        drop(f);
        assert!(!fifo.exists());
        let start = std::time::Instant::now();
        while !drained.done() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(drained.done());
        assert!(size(&path) <= 64);
        assert!(read_all(&path).unwrap().ends_with(b"line 98\nline 99\n"));
    }

    #[test]
    fn stderr_follows_the_rotation() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("supervisor.log");
        let mut log = CappedLog::open(&path, 10).unwrap();
        // A spare descriptor stands in for stderr.
        let spare = File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(spare);
        log.follow_with_fd(fd).unwrap();
        log.append(b"0123456789abc").unwrap();
        // SAFETY: fd is ours (made above) and is consumed here.
        let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.write_all(b"!").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc!");
        assert_eq!(
            std::fs::read(previous_generation(&path)).unwrap(),
            b"0123456789"
        );
    }
}
