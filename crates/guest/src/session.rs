//! The I/O side of one exec session: forwarding stdout/stderr (or the pty) as data frames,
//! feeding stdin, and sending the final `Exit` after all output.

use crate::sys;
use gatevm_protocol::{write_frame, ExitStatus, Fd, Frame, GuestMsg, DATA_CHUNK};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The writing half of the agent channel, shared by all sessions; each frame is written whole
/// under the lock.
pub type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// How long output may still be forwarded after the process exited, when a background process
/// keeps its stdout open.
pub const EXIT_GRACE: Duration = Duration::from_millis(200);

/// Bytes of stdin that may wait for a slow process before the agent loop waits too.
pub const MAX_STDIN_QUEUED: usize = 8 * 1024 * 1024;

/// How long the agent loop waits for a full stdin queue to drain before dropping the data.
pub const STDIN_STALL_LIMIT: Duration = Duration::from_secs(10);

/// Wraps any writer into a [`SharedWriter`].
pub fn shared_writer(w: impl Write + Send + 'static) -> SharedWriter {
    Arc::new(Mutex::new(Box::new(w)))
}

/// Writes one frame on a shared writer; false when it failed.
pub fn send(w: &SharedWriter, frame: &Frame<GuestMsg>) -> bool {
    let mut g = sys::lock(w);
    write_frame(&mut *g, frame).is_ok()
}

/// A session's view of the channel: the shared writer plus a mute switch (set when the host that
/// started the session is gone), checked under the writer lock.
#[derive(Clone)]
pub struct Link {
    /// The channel's writer.
    pub writer: SharedWriter,
    /// When set, the session writes nothing more.
    pub muted: Arc<AtomicBool>,
}

impl Link {
    /// Writes a frame unless muted; a failed write mutes the link.
    pub fn send(&self, frame: &Frame<GuestMsg>) -> bool {
        let mut g = sys::lock(&self.writer);
        if self.muted.load(Ordering::SeqCst) {
            return false;
        }
        let ok = write_frame(&mut *g, frame).is_ok();
        if !ok {
            self.muted.store(true, Ordering::SeqCst);
        }
        ok
    }
}

enum StdinMsg {
    Data(Vec<u8>),
    Close,
}

/// The stdin side of a session: a queue drained by a writer thread, so a process that does not
/// read its stdin cannot block the agent loop (up to [`MAX_STDIN_QUEUED`] bytes).
#[derive(Clone)]
pub struct StdinQueue {
    tx: Sender<StdinMsg>,
    queued: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
}

impl StdinQueue {
    /// Starts the writer thread for `file`. In terminal mode `Close` leaves the terminal open (a
    /// pty has no end-of-file to pass on).
    pub fn start(file: File, tty: bool) -> io::Result<StdinQueue> {
        let (tx, rx) = channel::<StdinMsg>();
        let queued = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let (q, a) = (queued.clone(), alive.clone());
        std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || {
                let mut file = Some(file);
                for msg in rx {
                    match msg {
                        StdinMsg::Data(bytes) => {
                            let n = bytes.len();
                            if let Some(f) = file.as_mut() {
                                if f.write_all(&bytes).is_err() {
                                    file = None;
                                }
                            }
                            q.fetch_sub(n, Ordering::SeqCst);
                        }
                        StdinMsg::Close => {
                            if !tty {
                                file = None;
                            }
                        }
                    }
                }
                a.store(false, Ordering::SeqCst);
            })?;
        Ok(StdinQueue { tx, queued, alive })
    }

    /// Queues bytes for the process (waits while too much is queued; drops them after
    /// [`STDIN_STALL_LIMIT`] or when the process's stdin is gone).
    pub fn push(&self, bytes: Vec<u8>) {
        let started = Instant::now();
        while self.queued.load(Ordering::SeqCst) > MAX_STDIN_QUEUED {
            if !self.alive.load(Ordering::SeqCst) || started.elapsed() > STDIN_STALL_LIMIT {
                crate::glog!("exec: stdin not drained, dropping {} bytes", bytes.len());
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let n = bytes.len();
        self.queued.fetch_add(n, Ordering::SeqCst);
        if self.tx.send(StdinMsg::Data(bytes)).is_err() {
            self.queued.fetch_sub(n, Ordering::SeqCst);
        }
    }

    /// Closes the process's stdin (after the queued bytes).
    pub fn close(&self) {
        let _ = self.tx.send(StdinMsg::Close);
    }
}

fn poll_readable(fds: &[&File], timeout: Duration) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(60_000) as libc::c_int;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs that outlives the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

/// Forwards the process's output on `stream` until both outputs ended and the exit status
/// arrived (or [`EXIT_GRACE`] after the exit, when something else still holds the output open),
/// sending `Eof` for each output. Returns the exit status; the caller sends `Exit`.
pub fn pump(
    stream: u32,
    outputs: Vec<(Fd, OwnedFd)>,
    exit: &Receiver<ExitStatus>,
    link: &Link,
    grace: Duration,
) -> ExitStatus {
    let unknown = ExitStatus {
        code: None,
        signal: None,
    };
    let mut open: Vec<(Fd, File)> = outputs
        .into_iter()
        .map(|(fd, o)| (fd, File::from(o)))
        .collect();
    let mut status: Option<ExitStatus> = None;
    let mut deadline: Option<Instant> = None;
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        if status.is_none() {
            if let Ok(s) = exit.try_recv() {
                status = Some(s);
                deadline = Some(Instant::now() + grace);
            }
        }
        if open.is_empty() {
            return match status {
                Some(s) => s,
                None => exit.recv().unwrap_or(unknown),
            };
        }
        let timeout = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    for (fd, _) in open.drain(..) {
                        link.send(&Frame::Eof { stream, fd });
                    }
                    return status.unwrap_or(unknown);
                }
                d - now
            }
            None => Duration::from_millis(100),
        };
        let files: Vec<&File> = open.iter().map(|(_, f)| f).collect();
        let ready = poll_readable(&files, timeout);
        let mut i = 0;
        let mut idx = 0;
        while i < open.len() {
            if !ready.get(idx).copied().unwrap_or(false) {
                i += 1;
                idx += 1;
                continue;
            }
            idx += 1;
            let fd = open[i].0;
            match open[i].1.read(&mut buf) {
                Ok(0) => {
                    link.send(&Frame::Eof { stream, fd });
                    open.remove(i);
                }
                Ok(n) => {
                    link.send(&Frame::Data {
                        stream,
                        fd,
                        bytes: buf[..n].to_vec(),
                    });
                    i += 1;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    i += 1
                }
                // EIO is how a pty master reports that the terminal side is gone.
                Err(_) => {
                    link.send(&Frame::Eof { stream, fd });
                    open.remove(i);
                }
            }
        }
    }
}
