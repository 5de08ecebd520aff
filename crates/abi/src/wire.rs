//! The gatevm agent protocol: one byte stream between the host and the guest agent (a virtio-serial
//! port under QEMU, a vsock port under libkrun), carrying many logical streams.
//!
//! Wire format of one frame (all integers big-endian):
//!
//! ```text
//! +----------------+----------------+--------+-----------------------+
//! | len: u32       | stream: u32    | kind:u8| payload (len-5 bytes) |
//! +----------------+----------------+--------+-----------------------+
//! ```
//!
//! `len` counts the stream id, the kind byte and the payload, and is bounded by
//! [`MAX_FRAME_LEN`]: a peer announcing more is a protocol error, so a hostile guest cannot make the
//! host allocate without bound. Kinds: [`KIND_MSG`] carries a JSON message, `KIND_DATA | fd` raw
//! bytes of stdin (0), stdout (1) or stderr (2) of the stream's process, `KIND_EOF | fd` the end of
//! that byte stream, [`KIND_CREDIT`] a flow-control grant (a 4-byte big-endian byte count).
//!
//! Flow control (version 2): every exec or read-file stream has two credit windows, as SSH
//! channels and HTTP/2 streams do. Each side may send data bytes on a stream only within the
//! credit its peer granted: [`INITIAL_WINDOW`] bytes when the stream opens, plus every
//! [`Frame::Credit`] the peer sent on that stream since. The guest's stdout and stderr share the
//! output window, granted by the host once it handed the bytes on to its client (so a reader that
//! stalls stops only its own stream, never the channel); the host's stdin data uses the input
//! window, granted by the guest once the process took the bytes. A receiver grants in steps of at
//! least [`GRANT_STEP`] bytes ([`flow::RecvWindow`] does the accounting, [`flow::SendWindow`]
//! the sender's). A peer that sends beyond its window breaks the protocol on that stream only:
//! the host ends that stream with an error for its client, the guest drops the excess. A grant
//! of [`CREDIT_DISCARD`] means the reader is gone: the guest reads and discards the rest of the
//! output and sends only the stream's end. Data frames carry at least one byte; empty ones are
//! dropped.
//!
//! The same framing, with other message types, is used between the CLI and the supervisor's control
//! socket: [`Frame`] is generic over the message type.
//!
//! Conversation: the host speaks first with [`GuestMsg::Hello`] (and again whenever it
//! reconnects); the guest answers each host hello with its own. The guest never sends anything
//! unsolicited: a virtio-serial write blocks while no host is connected, so the host polls with
//! `StatusRequest`. Stream 0 carries connection-level messages (hello, status, shutdown); the host
//! opens one stream per exec (or [`GuestMsg::ReadFile`]) with an id it picks (non-zero, unique
//! while the stream runs). A read-file stream is answered like an exec: `ExecStarted { pid: 0 }`
//! or `ExecFailed`, then the file's bytes as stdout data (within the window), `Eof`, and `Exit`
//! with code 0; a failure after the start is an `Error` in place of the `Exit`.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{self, Read, Write};

pub mod flow;

/// Protocol version; both sides refuse a peer whose hello carries another one.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest value of the length field: 5 header bytes plus a 256 KiB payload.
pub const MAX_FRAME_LEN: usize = 5 + MAX_PAYLOAD;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Size in which writers cut process output into data frames.
pub const DATA_CHUNK: usize = 32 * 1024;
/// Credit each direction of a stream starts with, known to both sides (see the module header).
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// A receiver grants credit back once at least this many bytes were consumed since its last grant.
pub const GRANT_STEP: u32 = INITIAL_WINDOW / 4;
/// Most credit a sender keeps; grants beyond it are capped (a grant can never make a window larger
/// than this).
pub const MAX_WINDOW: u64 = 16 * 1024 * 1024;
/// The grant that says "the reader is gone: discard the rest of the output".
pub const CREDIT_DISCARD: u32 = u32::MAX;
/// Name of the virtio-serial port carrying the agent channel.
pub const AGENT_PORT_NAME: &str = "gatevm.agent";
/// vsock port of the agent channel (libkrun backend).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Frame kind: a JSON message.
pub const KIND_MSG: u8 = 0x01;
/// Frame kind base: bytes of a standard stream; the low bits are the fd (0, 1, 2).
pub const KIND_DATA: u8 = 0x10;
/// Frame kind base: end of a standard stream; the low bits are the fd.
pub const KIND_EOF: u8 = 0x20;
/// Frame kind: a credit grant; the payload is the granted byte count, 4 bytes big-endian.
pub const KIND_CREDIT: u8 = 0x30;

/// Connection-level stream id.
pub const STREAM_CONTROL: u32 = 0;

/// Errors of framing and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// I/O on the underlying stream failed.
    #[error("agent channel i/o")]
    Io(#[from] io::Error),
    /// The peer announced a frame larger than the limit.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// The peer announced a frame too short to hold its header.
    #[error("frame of {0} bytes is shorter than its 5-byte header")]
    TooShort(usize),
    /// The stream ended inside a frame.
    #[error("channel closed in the middle of a frame")]
    Truncated,
    /// Unknown frame kind or fd.
    #[error("unknown frame kind 0x{0:02x}")]
    BadKind(u8),
    /// A message frame whose JSON does not decode.
    #[error("undecodable message: {0}")]
    BadMessage(String),
    /// A message too large to encode in one frame.
    #[error("message of {0} bytes is too large for one frame")]
    MessageTooLarge(usize),
}

/// One of the three standard streams of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Fd {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
}

impl Fd {
    fn from_bits(b: u8) -> Option<Fd> {
        match b {
            0 => Some(Fd::Stdin),
            1 => Some(Fd::Stdout),
            2 => Some(Fd::Stderr),
            _ => None,
        }
    }
}

/// One frame, generic over the message type carried by [`KIND_MSG`] frames.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<M> {
    /// A message on a stream.
    Msg { stream: u32, msg: M },
    /// Bytes of one standard stream of the stream's process.
    Data { stream: u32, fd: Fd, bytes: Vec<u8> },
    /// End of one standard stream.
    Eof { stream: u32, fd: Fd },
    /// The sender may send `bytes` more data bytes on the stream ([`CREDIT_DISCARD`]: the reader
    /// is gone).
    Credit { stream: u32, bytes: u32 },
}

impl<M> Frame<M> {
    /// The stream id this frame belongs to.
    pub fn stream(&self) -> u32 {
        match self {
            Frame::Msg { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Eof { stream, .. }
            | Frame::Credit { stream, .. } => *stream,
        }
    }
}

impl<M: Serialize> Frame<M> {
    /// Encodes the frame into its wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let (stream, kind, payload): (u32, u8, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Msg { stream, msg } => {
                let json =
                    serde_json::to_vec(msg).map_err(|e| ProtoError::BadMessage(e.to_string()))?;
                (*stream, KIND_MSG, json.into())
            }
            Frame::Data { stream, fd, bytes } => {
                (*stream, KIND_DATA | *fd as u8, bytes.as_slice().into())
            }
            Frame::Eof { stream, fd } => (*stream, KIND_EOF | *fd as u8, (&[][..]).into()),
            Frame::Credit { stream, bytes } => {
                (*stream, KIND_CREDIT, bytes.to_be_bytes().to_vec().into())
            }
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(ProtoError::MessageTooLarge(payload.len()));
        }
        let mut out = Vec::with_capacity(9 + payload.len());
        out.extend_from_slice(&((5 + payload.len()) as u32).to_be_bytes());
        out.extend_from_slice(&stream.to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&payload);
        Ok(out)
    }
}

/// Checks a frame length field; returns the body length to read.
pub fn check_len(len: u32) -> Result<usize, ProtoError> {
    let len = len as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge(len));
    }
    if len < 5 {
        return Err(ProtoError::TooShort(len));
    }
    Ok(len)
}

/// Decodes a frame body (everything after the length field).
pub fn decode_body<M: DeserializeOwned>(body: &[u8]) -> Result<Frame<M>, ProtoError> {
    if body.len() < 5 {
        return Err(ProtoError::TooShort(body.len()));
    }
    let stream = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let kind = body[4];
    let payload = &body[5..];
    match kind & 0xf0 {
        0x00 if kind == KIND_MSG => {
            let msg = serde_json::from_slice(payload)
                .map_err(|e| ProtoError::BadMessage(e.to_string()))?;
            Ok(Frame::Msg { stream, msg })
        }
        KIND_DATA => {
            let fd = Fd::from_bits(kind & 0x0f).ok_or(ProtoError::BadKind(kind))?;
            Ok(Frame::Data {
                stream,
                fd,
                bytes: payload.to_vec(),
            })
        }
        KIND_EOF => {
            let fd = Fd::from_bits(kind & 0x0f).ok_or(ProtoError::BadKind(kind))?;
            if !payload.is_empty() {
                return Err(ProtoError::BadKind(kind));
            }
            Ok(Frame::Eof { stream, fd })
        }
        KIND_CREDIT if kind == KIND_CREDIT => {
            let bytes: [u8; 4] = payload.try_into().map_err(|_| ProtoError::BadKind(kind))?;
            Ok(Frame::Credit {
                stream,
                bytes: u32::from_be_bytes(bytes),
            })
        }
        _ => Err(ProtoError::BadKind(kind)),
    }
}

/// Reads one frame. `Ok(None)` on a clean end of stream at a frame boundary.
pub fn read_frame<M: DeserializeOwned, R: Read>(r: &mut R) -> Result<Option<Frame<M>>, ProtoError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let len = check_len(u32::from_be_bytes(len))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Truncated
        } else {
            ProtoError::Io(e)
        }
    })?;
    decode_body(&body).map(Some)
}

/// Writes one frame with a single `write_all` (callers sharing a writer hold a lock around it).
pub fn write_frame<M: Serialize, W: Write>(w: &mut W, frame: &Frame<M>) -> Result<(), ProtoError> {
    let bytes = frame.encode()?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Async reading for tokio users.
#[cfg(feature = "tokio")]
pub mod asyncio {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads one frame. `Ok(None)` on a clean end of stream at a frame boundary.
    ///
    /// Not cancel-safe: when the future is dropped part-way (a losing `tokio::select!` branch),
    /// the bytes it consumed are lost and the stream is out of step. Loops that select on reading
    /// use a [`FrameReader`].
    pub async fn read_frame<M: DeserializeOwned, R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<Option<Frame<M>>, ProtoError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = r.read(&mut len[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(ProtoError::Truncated)
                };
            }
            got += n;
        }
        let len = check_len(u32::from_be_bytes(len))?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtoError::Truncated
            } else {
                ProtoError::Io(e)
            }
        })?;
        decode_body(&body).map(Some)
    }

    /// A frame reader whose [`FrameReader::read_frame`] is cancel-safe: the bytes of a partly read
    /// frame stay in the reader, so a `tokio::select!` loop can race it against other branches.
    /// It holds at most one frame (4 + [`MAX_FRAME_LEN`] bytes), allocated only after the length
    /// field was checked.
    #[derive(Debug)]
    pub struct FrameReader<R> {
        inner: R,
        buf: Vec<u8>,
        filled: usize,
    }

    impl<R: AsyncRead + Unpin> FrameReader<R> {
        /// Wraps a byte stream.
        pub fn new(inner: R) -> FrameReader<R> {
            FrameReader {
                inner,
                buf: vec![0; 4],
                filled: 0,
            }
        }

        /// The underlying stream.
        pub fn get_mut(&mut self) -> &mut R {
            &mut self.inner
        }

        /// Reads one frame. `Ok(None)` on a clean end of stream at a frame boundary. A framing
        /// error leaves the stream unusable (every later call fails the same way); an undecodable
        /// frame of valid length is consumed, so the next call reads the frame after it.
        pub async fn read_frame<M: DeserializeOwned>(
            &mut self,
        ) -> Result<Option<Frame<M>>, ProtoError> {
            loop {
                let need = if self.filled < 4 {
                    4
                } else {
                    let len =
                        u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                    4 + check_len(len)?
                };
                if self.filled == need && need > 4 {
                    self.filled = 0;
                    return decode_body(&self.buf[4..need]).map(Some);
                }
                if self.buf.len() < need {
                    self.buf.resize(need, 0);
                }
                // The only await: `read` is cancel-safe, and `filled` moves only after it returned.
                let n = self.inner.read(&mut self.buf[self.filled..need]).await?;
                if n == 0 {
                    return if self.filled == 0 {
                        Ok(None)
                    } else {
                        Err(ProtoError::Truncated)
                    };
                }
                self.filled += n;
            }
        }
    }

    /// Writes one frame.
    pub async fn write_frame<M: Serialize, W: AsyncWrite + Unpin>(
        w: &mut W,
        frame: &Frame<M>,
    ) -> Result<(), ProtoError> {
        let bytes = frame.encode()?;
        w.write_all(&bytes).await?;
        w.flush().await?;
        Ok(())
    }
}

/// What to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Extra environment (added to the agent's default `PATH`, `HOME`, `TERM`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Allocate a pseudo-terminal; stdout carries the terminal's output, stderr is unused.
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size when `tty`.
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
    /// Keep stdin open for `Data{Stdin}` frames; when false the process gets an empty stdin.
    #[serde(default)]
    pub stdin: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + signal.
    pub fn as_exit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// Lifecycle state of the guest's payload (containerd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadState {
    /// Not started yet.
    Pending,
    /// Started, not answering yet.
    Starting,
    /// Running and answering.
    Ready,
    /// Exited; waiting for the backoff before the next start.
    Restarting,
    /// Being stopped for shutdown.
    Stopping,
    /// Not running and not restarted.
    Failed,
}

/// Status of one supervised payload service in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadStatus {
    pub name: String,
    pub state: PayloadState,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// Last exit, as text, when it exited before.
    pub last_exit: Option<String>,
}

/// Messages between the host and the guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMsg {
    /// The host's first message, and the guest's answer to it, which adds what it knows about
    /// its boot.
    Hello {
        version: u32,
        /// Agent or host software version.
        software: String,
        /// Guest uptime in milliseconds when the agent started listening.
        #[serde(default)]
        uptime_ms: Option<u64>,
        /// Guest kernel release.
        #[serde(default)]
        kernel: Option<String>,
    },
    /// Host asks for the guest's status (answered with `Status` on stream 0).
    StatusRequest,
    /// Guest status, the answer to `StatusRequest`.
    Status {
        uptime_ms: u64,
        payloads: Vec<PayloadStatus>,
    },
    /// Host asks to run a process on a new stream.
    Exec(ExecRequest),
    /// Host asks for the contents of a file on a new stream: the guest agent opens it itself (no
    /// program runs), refuses anything but a regular file at an absolute path, and refuses a file
    /// larger than `max_bytes` (answered as described in the module header).
    ReadFile { path: String, max_bytes: u64 },
    /// The process runs.
    ExecStarted { pid: u32 },
    /// The process could not start: `code` is 127 (not found), 126 (not executable) or 1.
    ExecFailed { code: i32, message: String },
    /// The process ended; no more frames follow on the stream.
    Exit(ExitStatus),
    /// New terminal size.
    Resize { rows: u16, cols: u16 },
    /// Send a signal to the process (number as in Linux x86_64).
    Signal { signal: i32 },
    /// Stop the payload, sync, unmount and power off.
    Shutdown,
    /// The guest accepted a shutdown and is going down.
    ShutdownAck,
    /// A request on this stream failed.
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: &Frame<GuestMsg>) -> Frame<GuestMsg> {
        let bytes = f.encode().unwrap();
        read_frame(&mut &bytes[..]).unwrap().unwrap()
    }

    #[test]
    fn roundtrips() {
        let frames = vec![
            Frame::Msg {
                stream: 0,
                msg: GuestMsg::Hello {
                    version: 1,
                    software: "x".into(),
                    uptime_ms: Some(5),
                    kernel: None,
                },
            },
            Frame::Msg {
                stream: 7,
                msg: GuestMsg::Exec(ExecRequest {
                    argv: vec!["ls".into()],
                    ..Default::default()
                }),
            },
            Frame::Data {
                stream: 7,
                fd: Fd::Stdout,
                bytes: b"hello".to_vec(),
            },
            Frame::Eof {
                stream: 7,
                fd: Fd::Stdin,
            },
            Frame::Credit {
                stream: 7,
                bytes: GRANT_STEP,
            },
            Frame::Credit {
                stream: 8,
                bytes: CREDIT_DISCARD,
            },
            Frame::Msg {
                stream: 9,
                msg: GuestMsg::ReadFile {
                    path: "/etc/hostname".into(),
                    max_bytes: 4096,
                },
            },
            Frame::Msg {
                stream: 7,
                msg: GuestMsg::Exit(ExitStatus {
                    code: None,
                    signal: Some(9),
                }),
            },
        ];
        for f in &frames {
            assert_eq!(&roundtrip(f), f);
        }
    }

    #[test]
    fn clean_eof_and_truncation() {
        assert!(read_frame::<GuestMsg, _>(&mut &b""[..]).unwrap().is_none());
        assert!(matches!(
            read_frame::<GuestMsg, _>(&mut &b"\0\0"[..]),
            Err(ProtoError::Truncated)
        ));
        let bytes = Frame::<GuestMsg>::Data {
            stream: 1,
            fd: Fd::Stdout,
            bytes: vec![1; 10],
        }
        .encode()
        .unwrap();
        assert!(matches!(
            read_frame::<GuestMsg, _>(&mut &bytes[..bytes.len() - 1]),
            Err(ProtoError::Truncated)
        ));
    }

    #[test]
    fn oversize_and_bad_kinds_refused() {
        let mut big = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_frame::<GuestMsg, _>(&mut &big[..]),
            Err(ProtoError::TooLarge(_))
        ));
        let short = [0, 0, 0, 2, 0, 0];
        assert!(matches!(
            read_frame::<GuestMsg, _>(&mut &short[..]),
            Err(ProtoError::TooShort(2))
        ));
        for kind in [0x00u8, 0x02, 0x13, 0x2f, 0x30, 0xff] {
            let mut f = vec![0, 0, 0, 5, 0, 0, 0, 1, kind];
            assert!(
                read_frame::<GuestMsg, _>(&mut &f[..]).is_err(),
                "kind {kind:#x}"
            );
            f.clear();
        }
        let eof_with_payload = [0, 0, 0, 6, 0, 0, 0, 1, 0x21, 9];
        assert!(read_frame::<GuestMsg, _>(&mut &eof_with_payload[..]).is_err());
        let bad_json = [0, 0, 0, 7, 0, 0, 0, 1, 0x01, b'{', b'x'];
        assert!(matches!(
            read_frame::<GuestMsg, _>(&mut &bad_json[..]),
            Err(ProtoError::BadMessage(_))
        ));
    }

    #[test]
    fn credit_frames_are_exactly_four_bytes() {
        let ok = [0, 0, 0, 9, 0, 0, 0, 3, KIND_CREDIT, 0, 1, 0, 0];
        assert_eq!(
            read_frame::<GuestMsg, _>(&mut &ok[..]).unwrap(),
            Some(Frame::Credit {
                stream: 3,
                bytes: 65536
            })
        );
        for payload in [&[][..], &[1, 2, 3], &[1, 2, 3, 4, 5]] {
            let mut f = ((5 + payload.len()) as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&[0, 0, 0, 3, KIND_CREDIT]);
            f.extend_from_slice(payload);
            assert!(matches!(
                read_frame::<GuestMsg, _>(&mut &f[..]),
                Err(ProtoError::BadKind(KIND_CREDIT))
            ));
        }
        // The other kinds of the 0x30 row stay unknown.
        for kind in [0x31u8, 0x33, 0x3f] {
            let f = [0, 0, 0, 9, 0, 0, 0, 3, kind, 0, 0, 0, 1];
            assert!(read_frame::<GuestMsg, _>(&mut &f[..]).is_err(), "{kind:#x}");
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(
            ExitStatus {
                code: Some(3),
                signal: None
            }
            .as_exit_code(),
            3
        );
        assert_eq!(
            ExitStatus {
                code: None,
                signal: Some(15)
            }
            .as_exit_code(),
            143
        );
    }

    proptest! {
        // Any byte string: the first read agrees with a model of the framing (nothing, a cut
        // length field, a length out of bounds, a cut body, or the body's own decoding), and a
        // frame read consumes exactly its length field and body, nothing more.
        #[test]
        fn decoder_matches_a_framing_model(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            small_len in proptest::option::of(0u32..64),
        ) {
            let mut bytes = bytes;
            if let (Some(l), true) = (small_len, bytes.len() >= 4) {
                // Often a plausible length, so bodies get decoded too.
                bytes[..4].copy_from_slice(&l.to_be_bytes());
            }
            let mut r = &bytes[..];
            let got = read_frame::<GuestMsg, _>(&mut r);
            let consumed = bytes.len() - r.len();
            if bytes.is_empty() {
                prop_assert!(matches!(got, Ok(None)));
            } else if bytes.len() < 4 {
                prop_assert!(matches!(got, Err(ProtoError::Truncated)), "{:?}", got);
            } else {
                let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                if len > MAX_FRAME_LEN {
                    prop_assert!(matches!(got, Err(ProtoError::TooLarge(n)) if n == len), "{:?}", got);
                    prop_assert_eq!(consumed, 4);
                } else if len < 5 {
                    prop_assert!(matches!(got, Err(ProtoError::TooShort(n)) if n == len), "{:?}", got);
                    prop_assert_eq!(consumed, 4);
                } else if bytes.len() < 4 + len {
                    prop_assert!(matches!(got, Err(ProtoError::Truncated)), "{:?}", got);
                } else {
                    let want = decode_body::<GuestMsg>(&bytes[4..4 + len]);
                    prop_assert_eq!(format!("{:?}", got.map(|f| f.unwrap())), format!("{:?}", want));
                    prop_assert_eq!(consumed, 4 + len);
                }
            }
        }

        #[test]
        fn data_roundtrip(stream in any::<u32>(), fd in 0u8..3, bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let f = Frame::<GuestMsg>::Data { stream, fd: Fd::from_bits(fd).unwrap(), bytes };
            prop_assert_eq!(roundtrip(&f), f);
        }

        #[test]
        fn frame_roundtrip(f in frame()) {
            prop_assert_eq!(roundtrip(&f), f);
        }

        // A frame body of any content decodes or fails cleanly, and what decodes encodes back to
        // a frame that decodes to the same thing.
        #[test]
        fn body_decoder_never_panics(stream in any::<u32>(), kind in prop_oneof![Just(KIND_MSG), any::<u8>()], payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut body = stream.to_be_bytes().to_vec();
            body.push(kind);
            body.extend_from_slice(&payload);
            if let Ok(f) = decode_body::<GuestMsg>(&body) {
                prop_assert_eq!(roundtrip(&f), f);
            }
        }

        // Valid length fields with arbitrary bodies, several frames in a row, cut anywhere:
        // each whole frame is read on its own (an undecodable body costs that frame only, the
        // next one is read in step), the cut gives `Truncated`, a cut at a boundary the end.
        #[test]
        fn framed_garbage_is_read_frame_by_frame(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 5..64), 0..8), cut in any::<usize>()) {
            let mut bytes = Vec::new();
            for b in &bodies {
                bytes.extend_from_slice(&(b.len() as u32).to_be_bytes());
                bytes.extend_from_slice(b);
            }
            let cut = if bytes.is_empty() { 0 } else { cut % (bytes.len() + 1) };
            let mut r = &bytes[..cut];
            let mut offset = 0;
            for b in &bodies {
                let got = read_frame::<GuestMsg, _>(&mut r);
                if offset == cut {
                    prop_assert!(matches!(got, Ok(None)), "{:?}", got);
                    return Ok(());
                }
                if offset + 4 + b.len() > cut {
                    prop_assert!(matches!(got, Err(ProtoError::Truncated)), "{:?}", got);
                    return Ok(());
                }
                let want = decode_body::<GuestMsg>(b);
                prop_assert_eq!(format!("{:?}", got.map(|f| f.unwrap())), format!("{:?}", want));
                offset += 4 + b.len();
                prop_assert_eq!(r.len(), cut - offset);
            }
            prop_assert!(matches!(read_frame::<GuestMsg, _>(&mut r), Ok(None)));
        }
    }

    fn text() -> impl Strategy<Value = String> {
        ".{0,12}"
    }

    fn msg() -> impl Strategy<Value = GuestMsg> {
        let payload = (
            text(),
            0u8..6,
            any::<Option<u32>>(),
            any::<u32>(),
            proptest::option::of(text()),
        )
            .prop_map(|(name, s, pid, restarts, last_exit)| PayloadStatus {
                name,
                state: [
                    PayloadState::Pending,
                    PayloadState::Starting,
                    PayloadState::Ready,
                    PayloadState::Restarting,
                    PayloadState::Stopping,
                    PayloadState::Failed,
                ][s as usize],
                pid,
                restarts,
                last_exit,
            });
        let exec = (
            proptest::collection::vec(text(), 0..4),
            proptest::collection::vec((text(), text()), 0..3),
            proptest::option::of(text()),
            any::<(bool, u16, u16, bool)>(),
        )
            .prop_map(|(argv, env, cwd, (tty, rows, cols, stdin))| ExecRequest {
                argv,
                env,
                cwd,
                tty,
                rows,
                cols,
                stdin,
            });
        prop_oneof![
            (
                any::<u32>(),
                text(),
                any::<Option<u64>>(),
                proptest::option::of(text())
            )
                .prop_map(|(version, software, uptime_ms, kernel)| GuestMsg::Hello {
                    version,
                    software,
                    uptime_ms,
                    kernel
                }),
            Just(GuestMsg::StatusRequest),
            (any::<u64>(), proptest::collection::vec(payload, 0..4)).prop_map(
                |(uptime_ms, payloads)| GuestMsg::Status {
                    uptime_ms,
                    payloads
                }
            ),
            exec.prop_map(GuestMsg::Exec),
            any::<u32>().prop_map(|pid| GuestMsg::ExecStarted { pid }),
            (any::<i32>(), text())
                .prop_map(|(code, message)| GuestMsg::ExecFailed { code, message }),
            any::<(Option<i32>, Option<i32>)>()
                .prop_map(|(code, signal)| GuestMsg::Exit(ExitStatus { code, signal })),
            any::<(u16, u16)>().prop_map(|(rows, cols)| GuestMsg::Resize { rows, cols }),
            any::<i32>().prop_map(|signal| GuestMsg::Signal { signal }),
            (text(), any::<u64>())
                .prop_map(|(path, max_bytes)| GuestMsg::ReadFile { path, max_bytes }),
            Just(GuestMsg::Shutdown),
            Just(GuestMsg::ShutdownAck),
            text().prop_map(|message| GuestMsg::Error { message }),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame<GuestMsg>> {
        let fd = (0u8..3).prop_map(|b| Fd::from_bits(b).unwrap_or(Fd::Stdout));
        prop_oneof![
            (any::<u32>(), msg()).prop_map(|(stream, msg)| Frame::Msg { stream, msg }),
            (
                any::<u32>(),
                fd.clone(),
                proptest::collection::vec(any::<u8>(), 0..256)
            )
                .prop_map(|(stream, fd, bytes)| Frame::Data { stream, fd, bytes }),
            (any::<u32>(), fd).prop_map(|(stream, fd)| Frame::Eof { stream, fd }),
            any::<(u32, u32)>().prop_map(|(stream, bytes)| Frame::Credit { stream, bytes }),
        ]
    }

    #[cfg(feature = "tokio")]
    mod asyncio_tests {
        use super::*;
        use std::pin::Pin;
        use std::task::{Context, Poll};
        use tokio::io::{AsyncRead, ReadBuf};

        /// Hands out at most `step` bytes per read and is not ready every other poll, so reads
        /// stop in the middle of frames.
        struct Trickle {
            data: Vec<u8>,
            pos: usize,
            step: usize,
            ready: bool,
        }

        impl AsyncRead for Trickle {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let this = &mut *self;
                if !this.ready {
                    this.ready = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                this.ready = false;
                let n = (this.data.len() - this.pos)
                    .min(buf.remaining())
                    .min(this.step);
                buf.put_slice(&this.data[this.pos..this.pos + n]);
                this.pos += n;
                Poll::Ready(Ok(()))
            }
        }

        fn rt() -> tokio::runtime::Runtime {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
        }

        /// Every result of the sync reader over `bytes`, as text (errors compare by message).
        fn sync_results(bytes: &[u8]) -> Vec<String> {
            let mut r = bytes;
            let mut out = Vec::new();
            loop {
                match read_frame::<GuestMsg, _>(&mut r) {
                    Ok(Some(f)) => out.push(format!("{f:?}")),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(e.to_string());
                        if !matches!(e, ProtoError::BadMessage(_) | ProtoError::BadKind(_)) {
                            break;
                        }
                    }
                }
            }
            out
        }

        async fn reader_results<R: AsyncRead + Unpin>(
            r: &mut asyncio::FrameReader<R>,
        ) -> Vec<String> {
            let mut out = Vec::new();
            loop {
                match r.read_frame::<GuestMsg>().await {
                    Ok(Some(f)) => out.push(format!("{f:?}")),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(e.to_string());
                        if !matches!(e, ProtoError::BadMessage(_) | ProtoError::BadKind(_)) {
                            break;
                        }
                    }
                }
            }
            out
        }

        #[test]
        fn frame_reader_survives_cancellation() {
            let frames = vec![
                Frame::Msg {
                    stream: 1,
                    msg: GuestMsg::ExecStarted { pid: 7 },
                },
                Frame::Data {
                    stream: 1,
                    fd: Fd::Stdout,
                    bytes: (0..100_000u32).map(|i| i as u8).collect(),
                },
                Frame::Eof {
                    stream: 1,
                    fd: Fd::Stdout,
                },
                Frame::Msg {
                    stream: 1,
                    msg: GuestMsg::Exit(ExitStatus {
                        code: Some(0),
                        signal: None,
                    }),
                },
            ];
            let mut data = Vec::new();
            for f in &frames {
                data.extend_from_slice(&f.encode().unwrap());
            }
            let mut r = asyncio::FrameReader::new(Trickle {
                data,
                pos: 0,
                step: 4096,
                ready: false,
            });
            let (got, interrupted) = rt().block_on(async {
                let mut got = Vec::new();
                let mut interrupted = 0;
                loop {
                    tokio::select! {
                        biased;
                        f = r.read_frame::<GuestMsg>() => match f.unwrap() {
                            Some(f) => got.push(f),
                            None => break,
                        },
                        _ = tokio::task::yield_now() => interrupted += 1,
                    }
                }
                (got, interrupted)
            });
            assert!(
                interrupted > 10,
                "the reads were not interrupted ({interrupted})"
            );
            assert_eq!(got, frames);
        }

        #[test]
        fn frame_reader_errors() {
            rt().block_on(async {
                let mut huge = asyncio::FrameReader::new(&[0xff, 0xff, 0xff, 0xff, 0, 0][..]);
                assert!(matches!(
                    huge.read_frame::<GuestMsg>().await,
                    Err(ProtoError::TooLarge(_))
                ));
                // A broken stream stays broken.
                assert!(huge.read_frame::<GuestMsg>().await.is_err());
                let mut cut = asyncio::FrameReader::new(&[0, 0, 0, 50, 0, 0, 0, 1, 0x11, 1][..]);
                assert!(matches!(
                    cut.read_frame::<GuestMsg>().await,
                    Err(ProtoError::Truncated)
                ));
                let mut empty = asyncio::FrameReader::new(&[][..]);
                assert!(empty.read_frame::<GuestMsg>().await.unwrap().is_none());
            });
        }

        proptest! {
            // The cancel-safe reader, the plain async reader and the sync reader agree on any input.
            #[test]
            fn readers_agree(bytes in proptest::collection::vec(any::<u8>(), 0..1024), framed in proptest::collection::vec(frame(), 0..4), step in 1usize..64) {
                let mut data = Vec::new();
                for f in &framed {
                    data.extend_from_slice(&f.encode().unwrap());
                }
                data.extend_from_slice(&bytes);
                let want = sync_results(&data);
                let rt = rt();
                let mut r = asyncio::FrameReader::new(Trickle { data: data.clone(), pos: 0, step, ready: false });
                let got = rt.block_on(reader_results(&mut r));
                prop_assert_eq!(&got, &want);
                let plain = rt.block_on(async {
                    let mut r = &data[..];
                    let mut out = Vec::new();
                    loop {
                        match asyncio::read_frame::<GuestMsg, _>(&mut r).await {
                            Ok(Some(f)) => out.push(format!("{f:?}")),
                            Ok(None) => break,
                            Err(e) => {
                                out.push(e.to_string());
                                if !matches!(e, ProtoError::BadMessage(_) | ProtoError::BadKind(_)) {
                                    break;
                                }
                            }
                        }
                    }
                    out
                });
                prop_assert_eq!(&plain, &want);
            }
        }
    }
}
