//! The I/O side of one exec session: forwarding stdout/stderr (or the pty) as data frames within
//! the output credit the host granted, feeding stdin within the input window (granting it back as
//! the process takes the bytes), and sending the final `Exit` after all output.
//!
//! Nothing here blocks the agent loop: output waits for credit in the session's own thread (so a
//! host-side reader that stalls stops only its own process, through its full pipe), and stdin
//! beyond the window the guest granted is dropped with a log line.

use crate::sys;
use gatevm_abi::flow::{RecvWindow, SendWindow};
use gatevm_abi::{write_frame, ExitStatus, Fd, Frame, GuestMsg, DATA_CHUNK};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The writing half of the agent channel, shared by all sessions; each frame is written whole
/// under the lock.
pub(crate) type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// How long output may still be forwarded after the process exited, when a background process
/// keeps its stdout open.
pub(crate) const EXIT_GRACE: Duration = Duration::from_millis(200);

/// How long the output pump waits for credit before it looks at the process's exit again.
const CREDIT_POLL: Duration = Duration::from_millis(100);

/// Wraps any writer into a [`SharedWriter`].
pub(crate) fn shared_writer(w: impl Write + Send + 'static) -> SharedWriter {
    Arc::new(Mutex::new(Box::new(w)))
}

/// Writes one frame on a shared writer; false when it failed.
pub(crate) fn send(w: &SharedWriter, frame: &Frame<GuestMsg>) -> bool {
    let mut g = sys::lock(w);
    write_frame(&mut *g, frame).is_ok()
}

/// A session's view of the channel: the shared writer plus a mute switch (set when the host that
/// started the session is gone), checked under the writer lock.
#[derive(Clone)]
pub(crate) struct Link {
    /// The channel's writer.
    pub writer: SharedWriter,
    /// When set, the session writes nothing more.
    pub muted: Arc<AtomicBool>,
}

impl Link {
    /// Writes a frame unless muted; a failed write mutes the link.
    pub(crate) fn send(&self, frame: &Frame<GuestMsg>) -> bool {
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

/// Stdin frames dropped because the host sent beyond the window, for the log's rate limit.
static STDIN_DROPPED: AtomicU64 = AtomicU64::new(0);

/// The stdin side of a session: a queue drained by a writer thread, bounded by the input window
/// (the host may send [`gatevm_abi::INITIAL_WINDOW`] bytes plus what was granted back), so a
/// process that does not read its stdin never blocks the agent loop. The writer thread grants the
/// credit back once it wrote the bytes to the process.
#[derive(Clone)]
pub(crate) struct StdinQueue {
    stream: u32,
    tx: Sender<StdinMsg>,
    window: Arc<Mutex<RecvWindow>>,
}

impl StdinQueue {
    /// Starts the writer thread for `file` on `stream`; grants go out on `link`. In terminal mode
    /// `Close` leaves the terminal open (a pty has no end-of-file to pass on).
    pub(crate) fn start(file: File, tty: bool, stream: u32, link: Link) -> io::Result<StdinQueue> {
        let (tx, rx) = channel::<StdinMsg>();
        let window = Arc::new(Mutex::new(RecvWindow::new()));
        let w = window.clone();
        std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || {
                let mut file = Some(file);
                for msg in rx {
                    match msg {
                        StdinMsg::Data(bytes) => {
                            if let Some(f) = file.as_mut() {
                                if f.write_all(&bytes).is_err() {
                                    file = None;
                                }
                            }
                            // Taken (or dropped with a closed stdin): the host may send more.
                            let grant = sys::lock(&w).consume(bytes.len());
                            if let Some(g) = grant {
                                link.send(&Frame::Credit { stream, bytes: g });
                            }
                        }
                        StdinMsg::Close => {
                            if !tty {
                                file = None;
                            }
                        }
                    }
                }
            })?;
        Ok(StdinQueue { stream, tx, window })
    }

    /// Queues bytes for the process without waiting; bytes beyond the host's window are dropped
    /// with a log line (a host that ignores the window).
    pub(crate) fn push(&self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let n = bytes.len();
        if let Err(e) = sys::lock(&self.window).receive(n) {
            let dropped = STDIN_DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                crate::glog!(
                    "exec: stdin on stream {} beyond the window, dropping {n} bytes ({e}; {dropped} frames so far)",
                    self.stream
                );
            }
            return;
        }
        if self.tx.send(StdinMsg::Data(bytes)).is_err() {
            sys::lock(&self.window).consume(n);
        }
    }

    /// Closes the process's stdin (after the queued bytes).
    pub(crate) fn close(&self) {
        let _ = self.tx.send(StdinMsg::Close);
    }

    /// Bytes received and not yet written to the process.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> u64 {
        sys::lock(&self.window).queued()
    }
}

/// What [`OutputCredit::wait`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credit {
    /// This many bytes may be sent now (more than zero).
    Bytes(usize),
    /// The reader is gone: read and discard the rest.
    Discard,
    /// No credit came within the wait.
    None,
}

/// The output window of one session: the host's grants, waited for by the session's thread.
#[derive(Debug, Default)]
pub(crate) struct OutputCredit {
    window: Mutex<SendWindow>,
    cv: Condvar,
}

impl OutputCredit {
    /// A new session's window.
    pub(crate) fn new() -> Arc<OutputCredit> {
        Arc::new(OutputCredit::default())
    }

    /// Adds a grant from the host ([`gatevm_abi::CREDIT_DISCARD`]: the reader is gone) and wakes the waiter.
    pub(crate) fn grant(&self, bytes: u32) {
        sys::lock(&self.window).grant(bytes);
        self.cv.notify_all();
    }

    /// Waits up to `timeout` until some credit is there; does not take it.
    pub(crate) fn wait(&self, timeout: Duration) -> Credit {
        let deadline = Instant::now() + timeout;
        let mut w = sys::lock(&self.window);
        loop {
            if w.discarding() {
                return Credit::Discard;
            }
            let avail = w.available();
            if avail > 0 {
                return Credit::Bytes(usize::try_from(avail).unwrap_or(usize::MAX));
            }
            let now = Instant::now();
            if now >= deadline {
                return Credit::None;
            }
            w = match self.cv.wait_timeout(w, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Uses `n` bytes of credit (after sending them).
    pub(crate) fn take(&self, n: usize) {
        sys::lock(&self.window).take(n);
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

/// Forwards the process's output on `stream` within the host's credit until both outputs ended
/// and the exit status arrived (or [`EXIT_GRACE`] after the exit, when something else still holds
/// the output open; time spent waiting for credit does not count), sending `Eof` for each output.
/// Without credit the outputs are not read, so a process whose output nobody reads blocks on its
/// own full pipe. Returns the exit status; the caller sends `Exit`.
pub(crate) fn pump(
    stream: u32,
    outputs: Vec<(Fd, OwnedFd)>,
    exit: &Receiver<ExitStatus>,
    link: &Link,
    credit: &OutputCredit,
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
        let Some((allowed, discard)) = next_credit(credit, &mut deadline) else {
            continue;
        };
        let Some(timeout) = time_left(deadline) else {
            for (fd, _) in open.drain(..) {
                link.send(&Frame::Eof { stream, fd });
            }
            return status.unwrap_or(unknown);
        };
        let files: Vec<&File> = open.iter().map(|(_, f)| f).collect();
        let ready = poll_readable(&files, timeout);
        let out = Output {
            stream,
            link,
            credit,
            discard,
        };
        out.read_ready(&mut open, &ready, &mut buf, allowed);
    }
}

/// How many bytes [`pump`] may read now and whether they are discarded; `None` after waiting
/// [`CREDIT_POLL`] for credit that did not come (that time extends the grace `deadline`).
fn next_credit(credit: &OutputCredit, deadline: &mut Option<Instant>) -> Option<(usize, bool)> {
    match credit.wait(Duration::ZERO) {
        Credit::Bytes(n) => Some((n.min(DATA_CHUNK), false)),
        Credit::Discard => Some((DATA_CHUNK, true)),
        Credit::None => {
            let t = Instant::now();
            credit.wait(CREDIT_POLL);
            // The grace after the exit counts only time in which output could flow.
            if let Some(d) = deadline.as_mut() {
                *d += t.elapsed();
            }
            None
        }
    }
}

/// How long [`pump`] polls: until the grace `deadline`, or [`CREDIT_POLL`] before the exit;
/// `None` once the grace is over.
fn time_left(deadline: Option<Instant>) -> Option<Duration> {
    match deadline {
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                return None;
            }
            Some(d - now)
        }
        None => Some(CREDIT_POLL),
    }
}

/// Where [`pump`] sends what it reads.
struct Output<'a> {
    stream: u32,
    link: &'a Link,
    credit: &'a OutputCredit,
    /// Read and drop (the host stopped reading).
    discard: bool,
}

impl Output<'_> {
    /// Reads the outputs that `ready` marks, at most `allowed` bytes in all, sending `Data` (and
    /// using credit) or `Eof` for an output that ended, which is removed from `open`.
    fn read_ready(
        &self,
        open: &mut Vec<(Fd, File)>,
        ready: &[bool],
        buf: &mut [u8],
        allowed: usize,
    ) {
        let stream = self.stream;
        let mut left = allowed;
        let mut i = 0;
        let mut idx = 0;
        while i < open.len() {
            if !ready.get(idx).copied().unwrap_or(false) || left == 0 {
                i += 1;
                idx += 1;
                continue;
            }
            idx += 1;
            let fd = open[i].0;
            match open[i].1.read(&mut buf[..left]) {
                Ok(0) => {
                    self.link.send(&Frame::Eof { stream, fd });
                    open.remove(i);
                }
                Ok(n) => {
                    if !self.discard {
                        self.credit.take(n);
                        left -= n;
                        self.link.send(&Frame::Data {
                            stream,
                            fd,
                            bytes: buf[..n].to_vec(),
                        });
                    }
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
                    self.link.send(&Frame::Eof { stream, fd });
                    open.remove(i);
                }
            }
        }
    }
}

/// Serves a [`GuestMsg::ReadFile`] whose file is open: sends its bytes on `stream` as stdout
/// data within the host's credit, then `Eof`. Returns the stream's last message for the caller to
/// send: `Exit` with code 0, or an `Error` when reading failed or the file grew beyond `max_bytes`
/// meanwhile; `None` when the host discards the stream or the link is muted.
pub(crate) fn send_file(
    stream: u32,
    mut file: File,
    max_bytes: u64,
    link: &Link,
    credit: &OutputCredit,
) -> Option<GuestMsg> {
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut total: u64 = 0;
    loop {
        if link.muted.load(Ordering::SeqCst) {
            return None;
        }
        let allowed = match credit.wait(CREDIT_POLL) {
            Credit::Bytes(n) => n.min(DATA_CHUNK),
            Credit::Discard => return None,
            Credit::None => continue,
        };
        let n = match file.read(&mut buf[..allowed]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Some(GuestMsg::Error {
                    message: format!("reading the file failed: {e}"),
                })
            }
        };
        total += n as u64;
        if total > max_bytes {
            return Some(GuestMsg::Error {
                message: format!("the file grew beyond the limit of {max_bytes} bytes"),
            });
        }
        credit.take(n);
        link.send(&Frame::Data {
            stream,
            fd: Fd::Stdout,
            bytes: buf[..n].to_vec(),
        });
    }
    link.send(&Frame::Eof {
        stream,
        fd: Fd::Stdout,
    });
    Some(GuestMsg::Exit(ExitStatus {
        code: Some(0),
        signal: None,
    }))
}
