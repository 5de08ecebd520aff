//! Standard base64 (RFC 4648, with padding): encoding for Kubernetes Secret data, decoding for the
//! `*-data` fields of k3s's kubeconfig (PEM bodies are decoded by `crate::cert`). Small enough
//! that a dependency is not worth it.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes `data` as one line of padded standard base64.
pub(crate) fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn value(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Why a text is not base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Base64Error {
    /// The length (whitespace left out) is not a multiple of 4.
    #[error("base64 text has {0} characters, not a multiple of 4")]
    Length(usize),
    /// '=' anywhere but at the end, or more than two.
    #[error("misplaced '=' padding in base64 text")]
    Padding,
    /// A character outside the base64 alphabet.
    #[error("{0:?} is not a base64 character")]
    Character(char),
}

/// Decodes padded standard base64, ignoring ASCII whitespace (PEM bodies are wrapped at 64
/// columns). Returns why the text is not base64.
pub(crate) fn decode(text: &str) -> Result<Vec<u8>, Base64Error> {
    let clean: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let chunks = clean.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return Err(Base64Error::Length(clean.len()));
    }
    let quads = chunks.len();
    let mut out = Vec::with_capacity(quads * 3);
    for (index, quad) in chunks.enumerate() {
        let last = index + 1 == quads;
        let padding = quad.iter().rev().take_while(|&&b| b == b'=').count();
        if padding > 2 || (padding > 0 && !last) {
            return Err(Base64Error::Padding);
        }
        let mut n = 0u32;
        for &c in &quad[..4 - padding] {
            let v = value(c).ok_or(Base64Error::Character(char::from(c)))?;
            n = (n << 6) | v;
        }
        n <<= 6 * padding as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - padding]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(encode(plain.as_bytes()), encoded);
            assert_eq!(decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(encode(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn decode_skips_whitespace_and_rejects_garbage() {
        assert_eq!(decode("Zm9v\nYmFy\r\n").unwrap(), b"foobar");
        assert!(decode("Zm9").is_err());
        assert!(decode("Zm=v").is_err());
        assert!(decode("Zg==Zg==").is_err());
        assert!(decode("Z===").is_err());
        assert!(decode("Zm9*").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let text = encode(&data);
            prop_assert_eq!(text.len() % 4, 0);
            prop_assert_eq!(decode(&text).unwrap(), data);
        }

        /// The decoder agrees with a bit-by-bit reference on any text, and the error says
        /// what is wrong: the count of characters, or a character that is in the text and
        /// outside the alphabet.
        #[test]
        fn decode_matches_a_reference(text in "[A-Za-z0-9+/= \n*]{0,64}") {
            let got = decode(&text);
            prop_assert_eq!(got.clone().ok(), reference_decode(&text), "{:?}", text);
            let clean = text.bytes().filter(|b| !b.is_ascii_whitespace()).count();
            match got {
                Err(Base64Error::Length(n)) => prop_assert!(n == clean && n % 4 != 0),
                Err(Base64Error::Character(c)) => {
                    prop_assert!(text.contains(c) && value(c as u8).is_none());
                }
                Err(Base64Error::Padding) | Ok(_) => prop_assert_eq!(clean % 4, 0),
            }
        }

        /// Any encoding, wrapped with whitespace anywhere, decodes to the same bytes; the
        /// encoder agrees with the reference.
        #[test]
        fn wrapped_text_decodes(data in proptest::collection::vec(any::<u8>(), 0..120), breaks in proptest::collection::vec((any::<proptest::sample::Index>(), "[ \t\r\n]"), 0..8)) {
            let text = encode(&data);
            prop_assert_eq!(&text, &reference_encode(&data));
            let mut wrapped = text.clone();
            for (at, ws) in &breaks {
                let i = at.index(wrapped.len() + 1);
                wrapped.insert_str(i, ws);
            }
            prop_assert_eq!(decode(&wrapped).unwrap(), data);
        }
    }

    /// Base64 as a stream of 6-bit groups: each character gives 6 bits, each 8 bits a byte;
    /// '=' (at most two) only at the end, whitespace ignored, leftover bits dropped.
    fn reference_decode(text: &str) -> Option<Vec<u8>> {
        let clean: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if !clean.len().is_multiple_of(4) {
            return None;
        }
        let pad = clean.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 {
            return None;
        }
        let (mut acc, mut bits, mut out) = (0u32, 0, Vec::new());
        for &c in &clean[..clean.len() - pad] {
            let v = ALPHABET.iter().position(|&a| a == c)?;
            acc = (acc << 6) | v as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Some(out)
    }

    /// The 6-bit groups of the bytes (the last one filled with zero bits), padded with '='
    /// to a multiple of 4.
    fn reference_encode(data: &[u8]) -> String {
        let bits: Vec<u8> = data
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
            .collect();
        let mut out: String = bits
            .chunks(6)
            .map(|g| {
                let v = (0..6).fold(0usize, |v, i| {
                    (v << 1) | usize::from(*g.get(i).unwrap_or(&0))
                });
                char::from(ALPHABET[v])
            })
            .collect();
        while !out.len().is_multiple_of(4) {
            out.push('=');
        }
        out
    }
}
