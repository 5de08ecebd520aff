//! The agent protocol's frame decoders on arbitrary bytes, as a hostile guest (or a broken control
//! client) would send them: the whole-buffer decoder, the sync streaming reader and the async
//! cancel-safe reader fed in small pieces. None may panic or hang, the streaming readers must
//! agree, and every frame they return must encode back to itself. (Memory: libFuzzer's
//! `-rss_limit_mb` watches the process; the bound on single allocations is proven by
//! `crates/protocol/tests/alloc_bound.rs`, since without a sanitizer libFuzzer has no malloc hook.)

#![no_main]

use gatevm_abi::{
    asyncio::FrameReader, check_len, decode_body, read_frame, Frame, GuestMsg, ProtoError,
};
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out at most `step` bytes per read and is not ready every other poll, so the async reader
/// stops (and is resumed) in the middle of frames.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    ready: bool,
}

impl AsyncRead for Trickle<'_> {
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
        let n = this.data.len().min(buf.remaining()).min(this.step);
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Polls a future to completion; the reader above wakes itself, so no runtime is needed. A new
/// future per read, dropped after one poll when pending, also checks the reader's cancel safety.
fn read_all_async(data: &[u8], step: usize) -> Vec<String> {
    let mut r = FrameReader::new(Trickle {
        data,
        step,
        ready: false,
    });
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        let res = loop {
            let mut fut = std::pin::pin!(r.read_frame::<GuestMsg>());
            if let Poll::Ready(res) = fut.as_mut().poll(&mut cx) {
                break res;
            }
        };
        if !record(&mut out, res) {
            return out;
        }
    }
}

fn read_all_sync(data: &[u8]) -> Vec<String> {
    let mut r = data;
    let mut out = Vec::new();
    while record(&mut out, read_frame::<GuestMsg, _>(&mut r)) {}
    out
}

/// Notes one reader result; false when the stream is over (end or framing error).
fn record(out: &mut Vec<String>, res: Result<Option<Frame<GuestMsg>>, ProtoError>) -> bool {
    match res {
        Ok(Some(f)) => {
            roundtrip(&f);
            out.push(format!("{f:?}"));
            true
        }
        Ok(None) => false,
        Err(e) => {
            let go_on = matches!(e, ProtoError::BadMessage(_) | ProtoError::BadKind(_));
            out.push(e.to_string());
            go_on
        }
    }
}

fn roundtrip(f: &Frame<GuestMsg>) {
    // A decoded message may encode larger than it came (defaults written out): then it is refused.
    let Ok(bytes) = f.encode() else { return };
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    assert_eq!(check_len(len).ok(), Some(bytes.len() - 4));
    let back = decode_body::<GuestMsg>(&bytes[4..]).expect("an encoded frame decodes");
    assert_eq!(&back, f);
}

fuzz_target!(|data: &[u8]| {
    // Whole-buffer decoding: the input as a frame body, and as a frame with its length field.
    if let Ok(f) = decode_body::<GuestMsg>(data) {
        roundtrip(&f);
    }
    if data.len() >= 4 {
        if let Ok(len) = check_len(u32::from_be_bytes([data[0], data[1], data[2], data[3]])) {
            if let Some(body) = data.get(4..4 + len) {
                if let Ok(f) = decode_body::<GuestMsg>(body) {
                    roundtrip(&f);
                }
            }
        }
    }
    // Streaming: the sync reader over the whole input, the async one in pieces; they must agree.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let sync = read_all_sync(rest);
    let step = usize::from(step % 64) + 1;
    assert_eq!(read_all_async(rest, step), sync);
});
