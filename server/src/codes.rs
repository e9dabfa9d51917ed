//! Join codes: short, read aloud in class, typed by children.
//!
//! A code is [`CODE_LEN`] symbols from a 32-symbol alphabet without look-alikes (no `0`/`O`,
//! no `1`/`I`), shown as two groups of four (`K7QF-M3XP`). Each symbol carries 5 bits, so a
//! code carries 40 bits: with 1000 live rooms in one tenant and that tenant's failed-join
//! limit (2 per second by default), finding any live room by guessing takes
//! 2^40 / (1000 × 2) s ≈ 17 years on average. Input is forgiving: case, spaces and dashes are
//! ignored.

use std::fmt;

use rand::Rng;

/// The symbols: digits 2-9 and the letters without `I` and `O`.
pub(crate) const ALPHABET: &[u8; 32] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZ";
/// Symbols in a code.
pub(crate) const CODE_LEN: usize = 8;

/// A valid, normalised join code (upper case, no separators).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct JoinCode([u8; CODE_LEN]);

impl JoinCode {
    /// A uniformly random code.
    pub(crate) fn random(rng: &mut impl Rng) -> Self {
        Self(std::array::from_fn(|_| ALPHABET[rng.random_range(0..ALPHABET.len())]))
    }

    /// Parses what a person typed: case, spaces and dashes do not matter. `None` if it is not
    /// eight symbols of the alphabet.
    pub(crate) fn parse(input: &str) -> Option<Self> {
        if input.len() > 32 {
            return None;
        }
        let mut code = [0u8; CODE_LEN];
        let mut n = 0;
        for b in input.bytes() {
            if matches!(b, b'-' | b' ') {
                continue;
            }
            let b = b.to_ascii_uppercase();
            if !ALPHABET.contains(&b) || n == CODE_LEN {
                return None;
            }
            code[n] = b;
            n += 1;
        }
        (n == CODE_LEN).then_some(Self(code))
    }

    /// The normalised form, e.g. `K7QFM3XP`.
    pub(crate) fn as_str(&self) -> &str {
        // Only alphabet bytes (ASCII) are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The form to show and read aloud, e.g. `K7QF-M3XP`.
    pub(crate) fn display(&self) -> String {
        format!("{}-{}", &self.as_str()[..4], &self.as_str()[4..])
    }
}

impl fmt::Debug for JoinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for JoinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_has_no_look_alikes_and_32_distinct_symbols() {
        for bad in [b'0', b'O', b'1', b'I'] {
            assert!(!ALPHABET.contains(&bad));
        }
        let mut sorted = ALPHABET.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 32);
        assert_eq!(5 * CODE_LEN, 40, "40 bits, as the README says");
    }

    #[test]
    fn random_codes_parse_back_in_any_typed_form() {
        let mut rng = rand::rng();
        for _ in 0..200 {
            let code = JoinCode::random(&mut rng);
            assert_eq!(JoinCode::parse(code.as_str()), Some(code.clone()));
            assert_eq!(JoinCode::parse(&code.display()), Some(code.clone()));
            assert_eq!(JoinCode::parse(&format!(" {} ", code.display().to_lowercase())), Some(code.clone()));
        }
    }

    #[test]
    fn bad_input_is_refused() {
        for input in
            ["", "K7QF-M3X", "K7QF-M3XPQ", "K7QF-M3X0", "K7QF-M3XO", "K7QF-M3X1", "K7QF-M3XI", "K7QF_M3XP", "ÄÄÄÄÄÄÄÄ"]
        {
            assert_eq!(JoinCode::parse(input), None, "{input}");
        }
        assert_eq!(JoinCode::parse(&"-".repeat(33)), None);
        assert_eq!(JoinCode::parse("k7qf m3xp").unwrap().display(), "K7QF-M3XP");
    }

    #[test]
    fn symbols_are_uniform() {
        // 32,000 symbols: each of the 32 should appear about 1000 times.
        let mut rng = rand::rng();
        let mut counts = [0u32; 32];
        for _ in 0..4000 {
            for b in JoinCode::random(&mut rng).as_str().bytes() {
                counts[ALPHABET.iter().position(|a| *a == b).unwrap()] += 1;
            }
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
