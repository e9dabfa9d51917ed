//! What text a peer may send: no NUL and no control characters, where they could break a
//! line on a teacher's screen, a log line, an export or a database row (PostgreSQL cannot store
//! a NUL in text at all).

use core::fmt;

/// Which rules a text follows ([`check_text`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextKind {
    /// One line: display names, room names, parts, ids. No control character at all (tabs and
    /// newlines included), and no Unicode line or paragraph separator.
    Line,
    /// Free text: reflection prompts and reflections. Newlines and tabs are fine; every other
    /// control character (NUL, carriage return, escape, DEL, the C1 controls) is refused.
    Prose,
}

/// A text held a character its [`TextKind`] does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub struct BadText {
    /// The character.
    pub char: char,
    /// Its byte offset in the text.
    pub at: usize,
    /// What the text was checked as.
    pub kind: TextKind,
}

impl fmt::Display for BadText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            TextKind::Line => "one line of text may not hold control characters or line breaks",
            TextKind::Prose => "text may not hold control characters other than newlines and tabs",
        };
        write!(f, "{what} (U+{:04X} at byte {})", u32::from(self.char), self.at)
    }
}

/// Checks `text` against the rules of `kind`: the first character it does not allow is the
/// error. Every place text enters the server (hello, control requests, reflections, HTTP,
/// tokens) checks it before anything is stored, shown or forwarded.
pub fn check_text(text: &str, kind: TextKind) -> Result<(), BadText> {
    let allowed = |c: char| match kind {
        TextKind::Line => !c.is_control() && c != '\u{2028}' && c != '\u{2029}',
        TextKind::Prose => !c.is_control() || c == '\n' || c == '\t',
    };
    match text.char_indices().find(|&(_, c)| !allowed(c)) {
        Some((at, char)) => Err(BadText { char, at, kind }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use alloc::string::ToString as _;

    use super::*;

    #[test]
    fn lines_refuse_every_control_character_and_line_break() {
        for good in ["", "Ana", "Ms. Rivera", "Zoë ✨", "drums & bass", "名前"] {
            assert_eq!(check_text(good, TextKind::Line), Ok(()), "{good:?}");
        }
        for (bad, char, at) in [
            ("a\0b", '\0', 1),
            ("tab\there", '\t', 3),
            ("two\nlines", '\n', 3),
            ("cr\r", '\r', 2),
            ("\u{1b}[31m", '\u{1b}', 0),
            ("del\u{7f}", '\u{7f}', 3),
            ("c1\u{85}", '\u{85}', 2),
            ("é\u{2028}", '\u{2028}', 2),
            ("para\u{2029}", '\u{2029}', 4),
        ] {
            assert_eq!(check_text(bad, TextKind::Line), Err(BadText { char, at, kind: TextKind::Line }), "{bad:?}");
        }
    }

    #[test]
    fn prose_keeps_newlines_and_tabs_only() {
        for good in ["I helped Ben.\nThen we played.", "a\tb", "line\u{2028}break", ""] {
            assert_eq!(check_text(good, TextKind::Prose), Ok(()), "{good:?}");
        }
        for bad in ["nul\0", "cr\r\n", "bell\u{7}", "esc\u{1b}", "del\u{7f}", "c1\u{9b}"] {
            assert!(check_text(bad, TextKind::Prose).is_err(), "{bad:?}");
        }
        let err = check_text("ok\0", TextKind::Prose).unwrap_err();
        assert_eq!(
            err.to_string(),
            "text may not hold control characters other than newlines and tabs (U+0000 at byte 2)"
        );
    }
}
