//! Text from the guest made safe to show: terminal control sequences removed, other control and
//! bidirectional-formatting characters replaced, length bounded.
//!
//! Everything the guest reports (payload names and exit texts, the output of commands the host
//! runs in it, error messages quoting it) may be written by an attacker and ends up on the user's
//! terminal or in logs. A terminal obeys escape sequences: OSC 52 writes the clipboard, CSI 2J
//! clears the screen, others retitle the window, move the cursor over earlier output or, on some
//! terminals, answer back into the input. So before such text is shown:
//!
//! - whole sequences are removed: `ESC [` ... final byte (CSI), `ESC ]`/`ESC P`/`ESC X`/`ESC ^`/
//!   `ESC _` ... `BEL` or `ESC \` (OSC, DCS, SOS, PM, APC strings), other two-byte `ESC x`, and
//!   their 8-bit C1 forms (U+009B CSI, U+009D OSC, U+0090 DCS, ...);
//! - any other C0 control, DEL and C1 control becomes a space, except tab and newline where
//!   multi-line text is wanted ([`text`]); a carriage return before a newline is dropped;
//! - bidirectional formatting characters (U+202A..U+202E, U+2066..U+2069, U+200E, U+200F,
//!   U+061C), which reorder what the user reads ("Trojan Source"), become a space;
//! - the result holds at most `max` characters, the last being `…` when the text was cut.
//!   Work is linear in the input, and input past what is kept is not read.

/// `s` as one line: no control characters at all (newlines and tabs become spaces), at most
/// `max` characters.
pub fn line(s: &str, max: usize) -> String {
    clean(s, max, false)
}

/// `s` as multi-line text: newlines and tabs kept, everything else as [`line`] does, at most
/// `max` characters.
pub fn text(s: &str, max: usize) -> String {
    clean(s, max, true)
}

/// Characters that reorder text when displayed.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

/// What a character starts, when it starts an escape sequence.
enum Seq {
    /// CSI: parameters and intermediates, then one final byte 0x40..=0x7e.
    Csi,
    /// A string (OSC, DCS, SOS, PM, APC) ended by BEL, ST (U+009C) or `ESC \`.
    Str,
}

fn clean(s: &str, max: usize, multi_line: bool) -> String {
    let mut out = String::new();
    let mut count = 0usize;
    let mut chars = s.chars().peekable();
    while count < max {
        let Some(c) = chars.next() else { break };
        let seq = match c {
            '\u{1b}' => match chars.peek() {
                Some('[') => {
                    chars.next();
                    Some(Seq::Csi)
                }
                Some(']' | 'P' | 'X' | '^' | '_') => {
                    chars.next();
                    Some(Seq::Str)
                }
                // ESC followed by intermediates (0x20..=0x2f) and a final byte: drop them all.
                Some(_) => {
                    while chars
                        .peek()
                        .is_some_and(|n| ('\u{20}'..='\u{2f}').contains(n))
                    {
                        chars.next();
                    }
                    if chars
                        .peek()
                        .is_some_and(|n| ('\u{30}'..='\u{7e}').contains(n))
                    {
                        chars.next();
                    }
                    continue;
                }
                None => continue,
            },
            '\u{9b}' => Some(Seq::Csi),
            '\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => Some(Seq::Str),
            _ => None,
        };
        match seq {
            Some(Seq::Csi) => {
                // Parameter and intermediate bytes, then the final byte; anything else (a
                // control, text beyond ASCII) ends the sequence without being swallowed.
                while let Some(&n) = chars.peek() {
                    if ('\u{20}'..='\u{3f}').contains(&n) {
                        chars.next();
                    } else {
                        if ('\u{40}'..='\u{7e}').contains(&n) {
                            chars.next();
                        }
                        break;
                    }
                }
                continue;
            }
            Some(Seq::Str) => {
                while let Some(n) = chars.next() {
                    if n == '\u{7}' || n == '\u{9c}' {
                        break;
                    }
                    if n == '\u{1b}' {
                        if chars.peek() == Some(&'\\') {
                            chars.next();
                        }
                        break;
                    }
                }
                continue;
            }
            None => {}
        }
        let kept = match c {
            '\n' | '\t' if multi_line => c,
            '\r' if multi_line && chars.peek() == Some(&'\n') => continue,
            c if c.is_control() || is_bidi_control(c) => ' ',
            c => c,
        };
        out.push(kept);
        count += 1;
    }
    if chars.peek().is_some() && max > 0 {
        // Cut: the last character kept makes room for the mark.
        if count == max {
            out.pop();
        }
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terminal_safe(s: &str, multi_line: bool) -> bool {
        s.chars().all(|c| {
            !(c.is_control() && !(multi_line && (c == '\n' || c == '\t'))) && !is_bidi_control(c)
        })
    }

    #[test]
    fn escape_sequences_are_removed_whole() {
        let cases = [
            // OSC 52: write "hi" to the clipboard, BEL-terminated and ST-terminated.
            ("a\u{1b}]52;c;aGk=\u{7}b", "ab"),
            ("a\u{1b}]52;c;aGk=\u{1b}\\b", "ab"),
            // Window title.
            ("\u{1b}]0;pwned\u{7}x", "x"),
            // Clear screen, cursor home, colours.
            ("\u{1b}[2J\u{1b}[Hclean", "clean"),
            ("\u{1b}[1;31mred\u{1b}[0m", "red"),
            // 8-bit CSI and OSC.
            ("a\u{9b}2Jb", "ab"),
            ("a\u{9d}52;c;aGk=\u{9c}b", "ab"),
            // DCS with ST.
            ("a\u{1b}P1$r\u{1b}\\b", "ab"),
            // Two-byte escapes: reset, keypad mode, charset designation.
            ("a\u{1b}cb\u{1b}=c\u{1b}(Bd", "abcd"),
            // A lone ESC at the end.
            ("abc\u{1b}", "abc"),
        ];
        for (hostile, want) in cases {
            assert_eq!(line(hostile, 100), want, "{hostile:?}");
            assert_eq!(text(hostile, 100), want, "{hostile:?}");
        }
    }

    #[test]
    fn other_controls_become_spaces() {
        // BEL, backspaces over earlier text, NUL, DEL, a C1 NEL, carriage return.
        assert_eq!(line("ding\u{7}", 100), "ding ");
        assert_eq!(
            line("secret\u{8}\u{8}\u{8}\u{8}\u{8}\u{8}ok", 100),
            "secret      ok"
        );
        assert_eq!(line("a\0b\u{7f}c\u{85}d\re", 100), "a b c d e");
        assert_eq!(line("two\nlines\tand tab", 100), "two lines and tab");
        assert_eq!(
            text("two\r\nlines\tand tab\rx", 100),
            "two\nlines\tand tab x"
        );
    }

    #[test]
    fn bidi_overrides_become_spaces() {
        // "Trojan source": U+202E shows "txt.exe" as "exe.txt".
        assert_eq!(line("file\u{202e}txt.exe", 100), "file txt.exe");
        for c in [
            '\u{202a}', '\u{202d}', '\u{2066}', '\u{2069}', '\u{200f}', '\u{61c}',
        ] {
            assert_eq!(line(&format!("a{c}b"), 100), "a b", "{c:?}");
        }
        // Other text beyond ASCII is left alone.
        assert_eq!(line("größe 名前 ✓", 100), "größe 名前 ✓");
    }

    #[test]
    fn long_strings_are_cut_with_a_mark() {
        let long = "x".repeat(1_000_000);
        let cut = line(&long, 80);
        assert_eq!(cut.chars().count(), 80);
        assert!(cut.ends_with('…'));
        assert_eq!(line("exactly", 7), "exactly");
        assert_eq!(line("exactly!", 7), "exactl…");
        assert_eq!(line("abc", 2), "a…");
        assert_eq!(line("", 5), "");
        assert_eq!(line("abc", 0), "");
        // A flood of escape sequences costs nothing on output.
        let flood = "\u{1b}[2J".repeat(100_000);
        assert_eq!(line(&flood, 10), "");
    }

    #[test]
    fn results_never_hold_a_control() {
        let nasty: String = (0u32..0x300)
            .chain(0x2000..0x2070)
            .filter_map(char::from_u32)
            .collect();
        for max in [0, 1, 5, 100, 10_000] {
            assert!(terminal_safe(&line(&nasty, max), false));
            assert!(terminal_safe(&text(&nasty, max), true));
            assert!(line(&nasty, max).chars().count() <= max);
        }
    }
}
