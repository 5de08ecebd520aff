//! Set-up's progress lines. Each message starts a phase (what is being done and why, with the
//! time it usually takes where that is long); a phase that ran for [`LONG_PHASE`] or more gets a
//! second line with its time when it ends: at the next message, or when its step is reported.
//! So a step that runs for minutes (mmdebstrap, building virtiofsd, fetching and booting QEMU)
//! shows a line when it starts and one when it ends.

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// The shortest phase that gets a line when it ends.
pub(crate) const LONG_PHASE: Duration = Duration::from_secs(2);

/// The phases of one set-up run, written to the caller's progress function.
pub(crate) struct Phases<'a> {
    out: &'a dyn Fn(&str),
    current: RefCell<Option<(String, Instant)>>,
}

impl<'a> Phases<'a> {
    pub(crate) fn new(out: &'a dyn Fn(&str)) -> Phases<'a> {
        Phases {
            out,
            current: RefCell::new(None),
        }
    }

    /// Ends the current phase and starts `what`: writes its line.
    pub(crate) fn start(&self, what: &str) {
        self.end();
        (self.out)(what);
        *self.current.borrow_mut() = Some((what.to_string(), Instant::now()));
    }

    /// Ends the current phase, if any: writes its time when it was long.
    pub(crate) fn end(&self) {
        let ended = self.current.borrow_mut().take();
        if let Some(line) = ended.and_then(|(what, t)| done_line(&what, t.elapsed())) {
            (self.out)(&line);
        }
    }
}

/// The line that ends phase `what` after `took`, for a phase of [`LONG_PHASE`] or more: the
/// phase without its closing remark in parentheses (an estimate, a reason), and its time.
pub(crate) fn done_line(what: &str, took: Duration) -> Option<String> {
    (took >= LONG_PHASE).then(|| format!("{}: done in {}", without_remark(what), human(took)))
}

/// `what` without a parenthesised remark at its end.
fn without_remark(what: &str) -> &str {
    if !what.ends_with(')') {
        return what;
    }
    let mut depth = 0usize;
    for (i, c) in what.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    let head = what[..i].trim_end();
                    return if head.is_empty() { what } else { head };
                }
            }
            _ => {}
        }
    }
    what
}

/// A duration for people: tenths of seconds under a minute, else minutes and whole seconds.
fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 59.95 {
        format!("{s:.1} s")
    } else {
        let whole = d.as_secs() + u64::from(d.subsec_millis() >= 500);
        format!("{} min {} s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn done_line_names_the_phase_and_its_time() {
        assert_eq!(
            done_line(
                "building the base rootfs with mmdebstrap (Debian trixie minbase, about a minute)",
                Duration::from_millis(72_400)
            )
            .as_deref(),
            Some("building the base rootfs with mmdebstrap: done in 1 min 12 s")
        );
        assert_eq!(
            done_line(
                "building virtiofsd 1.13.2 from crates-io (a few minutes)",
                Duration::from_millis(185_600)
            )
            .as_deref(),
            Some("building virtiofsd 1.13.2 from crates-io: done in 3 min 6 s")
        );
        assert_eq!(
            done_line("running depmod for 6.12.1", Duration::from_millis(2_049)).as_deref(),
            Some("running depmod for 6.12.1: done in 2.0 s")
        );
        assert_eq!(
            done_line("(all in parentheses)", Duration::from_secs(3)).as_deref(),
            Some("(all in parentheses): done in 3.0 s")
        );
        assert_eq!(
            done_line("a (b (c)) and (d (e))", Duration::from_secs(60)).as_deref(),
            Some("a (b (c)) and: done in 1 min 0 s")
        );
        assert_eq!(
            done_line("checking gvproxy", Duration::from_millis(1_999)),
            None
        );
    }

    #[test]
    fn a_long_phase_ends_with_its_time_a_short_one_quietly() {
        let lines = RefCell::new(Vec::<String>::new());
        let out = |l: &str| lines.borrow_mut().push(l.to_string());
        let p = Phases::new(&out);
        p.start("checking QEMU");
        p.start("booting the guest kernel with QEMU 10.0.2 (TCG) to check it (about 5 s)");
        // Back-date the phase instead of sleeping.
        if let Some((_, t)) = p.current.borrow_mut().as_mut() {
            *t -= Duration::from_millis(6_300);
        }
        p.end();
        p.end();
        assert_eq!(
            *lines.borrow(),
            [
                "checking QEMU",
                "booting the guest kernel with QEMU 10.0.2 (TCG) to check it (about 5 s)",
                "booting the guest kernel with QEMU 10.0.2 (TCG) to check it: done in 6.3 s",
            ]
        );
    }
}
