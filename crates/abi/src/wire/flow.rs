//! Credit-window accounting of one direction of one stream (see the crate's module header): the
//! sender's [`SendWindow`] and the receiver's [`RecvWindow`]. Pure bookkeeping, shared by the host
//! and the guest so both count the same way.

use crate::{CREDIT_DISCARD, GRANT_STEP, INITIAL_WINDOW, MAX_WINDOW};

/// The peer sent more data than its window allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer sent {sent} bytes with only {allowed} bytes of credit left")]
pub struct WindowExceeded {
    /// Bytes in the offending frame.
    pub sent: usize,
    /// Credit the peer had left.
    pub allowed: u64,
}

/// The sender's side: how many bytes it may still send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWindow {
    credit: u64,
    discard: bool,
}

impl Default for SendWindow {
    fn default() -> Self {
        SendWindow::new()
    }
}

impl SendWindow {
    /// A new stream's window: [`INITIAL_WINDOW`] bytes of credit.
    pub fn new() -> SendWindow {
        SendWindow {
            credit: u64::from(INITIAL_WINDOW),
            discard: false,
        }
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> u64 {
        self.credit
    }

    /// Takes up to `want` bytes of credit; returns how many may be sent now (0 when none).
    pub fn take(&mut self, want: usize) -> usize {
        let n = (want as u64).min(self.credit);
        self.credit -= n;
        n as usize
    }

    /// Adds a grant from the receiver; the credit never grows beyond [`MAX_WINDOW`]. A grant of
    /// [`CREDIT_DISCARD`] marks the reader as gone instead.
    pub fn grant(&mut self, bytes: u32) {
        if bytes == CREDIT_DISCARD {
            self.discard = true;
        } else {
            self.credit = self.credit.saturating_add(u64::from(bytes)).min(MAX_WINDOW);
        }
    }

    /// Whether the receiver said it is gone ([`CREDIT_DISCARD`]).
    pub fn discarding(&self) -> bool {
        self.discard
    }
}

/// The receiver's side: how much the peer may still send, how much of it is queued here, and how
/// much was consumed but not granted back yet. `allowed + queued + pending` is always
/// [`INITIAL_WINDOW`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvWindow {
    allowed: u64,
    queued: u64,
    pending: u64,
}

impl Default for RecvWindow {
    fn default() -> Self {
        RecvWindow::new()
    }
}

impl RecvWindow {
    /// A new stream's window: the peer may send [`INITIAL_WINDOW`] bytes.
    pub fn new() -> RecvWindow {
        RecvWindow {
            allowed: u64::from(INITIAL_WINDOW),
            queued: 0,
            pending: 0,
        }
    }

    /// The peer sent `n` bytes. Beyond its credit this is an error and nothing is counted (the
    /// caller drops the bytes or ends the stream).
    pub fn receive(&mut self, n: usize) -> Result<(), WindowExceeded> {
        if n as u64 > self.allowed {
            return Err(WindowExceeded {
                sent: n,
                allowed: self.allowed,
            });
        }
        self.allowed -= n as u64;
        self.queued += n as u64;
        Ok(())
    }

    /// `n` received bytes were handed on (written to the process, or to the client). Returns the
    /// grant to send the peer when one is due (at least [`GRANT_STEP`] bytes consumed since the
    /// last one).
    pub fn consume(&mut self, n: usize) -> Option<u32> {
        let n = (n as u64).min(self.queued);
        self.queued -= n;
        self.pending += n;
        if self.pending >= u64::from(GRANT_STEP) {
            let g = self.pending;
            self.allowed += g;
            self.pending = 0;
            // `pending` never exceeds INITIAL_WINDOW, which fits a u32.
            Some(u32::try_from(g).unwrap_or(INITIAL_WINDOW))
        } else {
            None
        }
    }

    /// Bytes received and not yet consumed.
    pub fn queued(&self) -> u64 {
        self.queued
    }

    /// Bytes the peer may still send.
    pub fn allowed(&self) -> u64 {
        self.allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn starts_with_the_initial_window_and_grants_in_steps() {
        let mut s = SendWindow::new();
        let mut r = RecvWindow::new();
        assert_eq!(s.available(), u64::from(INITIAL_WINDOW));
        assert_eq!(s.take(usize::MAX), INITIAL_WINDOW as usize);
        assert_eq!(s.take(1), 0);
        r.receive(INITIAL_WINDOW as usize).unwrap();
        assert!(r.receive(1).is_err());
        assert_eq!(r.consume(GRANT_STEP as usize - 1), None);
        assert_eq!(r.consume(1), Some(GRANT_STEP));
        s.grant(GRANT_STEP);
        assert_eq!(s.available(), u64::from(GRANT_STEP));
        r.receive(GRANT_STEP as usize).unwrap();
        assert!(r.receive(1).is_err(), "only what was granted");
    }

    #[test]
    fn grants_are_capped_and_discard_is_no_credit() {
        let mut s = SendWindow::new();
        for _ in 0..1000 {
            s.grant(u32::MAX - 1);
        }
        assert_eq!(s.available(), MAX_WINDOW);
        assert!(!s.discarding());
        s.grant(CREDIT_DISCARD);
        assert!(s.discarding());
        assert_eq!(s.available(), MAX_WINDOW);
    }

    #[test]
    fn a_refused_frame_changes_nothing() {
        let mut r = RecvWindow::new();
        r.receive(1000).unwrap();
        let before = r.clone();
        let e = r.receive(INITIAL_WINDOW as usize).unwrap_err();
        assert_eq!(e.allowed, u64::from(INITIAL_WINDOW) - 1000);
        assert_eq!(r, before);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// The sender sends up to this many bytes (within its credit).
        Send(usize),
        /// A hostile sender sends this many bytes regardless of credit.
        Force(usize),
        /// The receiver hands on up to this many queued bytes.
        Consume(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1usize..200_000).prop_map(Step::Send),
            (1usize..400_000).prop_map(Step::Force),
            (0usize..200_000).prop_map(Step::Consume),
        ]
    }

    proptest! {
        // Whatever the interleaving of sends, grants and consumption: the bytes queued at the
        // receiver never exceed the initial window, an honest sender is never refused, a sender
        // that ignores its credit is refused exactly when it exceeds it, and the three counts
        // always add up to the window.
        #[test]
        fn queued_bytes_never_exceed_the_window(steps in proptest::collection::vec(step(), 0..200)) {
            let mut s = SendWindow::new();
            let mut r = RecvWindow::new();
            let mut in_flight: Vec<usize> = Vec::new();
            for st in steps {
                match st {
                    Step::Send(want) => {
                        let n = s.take(want);
                        if n > 0 {
                            prop_assert!(r.receive(n).is_ok(), "an honest sender was refused");
                            in_flight.push(n);
                        }
                    }
                    Step::Force(n) => {
                        let allowed = r.allowed();
                        let res = r.receive(n);
                        prop_assert_eq!(res.is_err(), n as u64 > allowed);
                        if res.is_ok() {
                            // The honest sender's view follows what really arrived.
                            let _ = s.take(n);
                        }
                    }
                    Step::Consume(n) => {
                        if let Some(g) = r.consume(n) {
                            prop_assert!(g >= GRANT_STEP);
                            s.grant(g);
                        }
                    }
                }
                prop_assert!(r.queued() <= u64::from(INITIAL_WINDOW));
                prop_assert!(r.allowed() + r.queued() <= u64::from(INITIAL_WINDOW));
                prop_assert!(s.available() <= r.allowed());
            }
        }
    }
}
