//! The few bits of DER and PEM this crate writes or walks by hand.
//!
//! Everything heavier (whole certificates) goes through `x509-parser`; this module only
//! wraps legacy private keys into PKCS#8 and writes PEM text, which no listed dependency
//! does for us.

/// DER tag of an INTEGER.
const TAG_INTEGER: u8 = 0x02;
/// DER tag of an OCTET STRING.
const TAG_OCTET_STRING: u8 = 0x04;
/// DER tag of a NULL.
const TAG_NULL: u8 = 0x05;
/// DER tag of an OBJECT IDENTIFIER.
pub(crate) const TAG_OID: u8 = 0x06;
/// DER tag of a SEQUENCE (constructed).
const TAG_SEQUENCE: u8 = 0x30;
/// DER tag of the `[0]` explicit context field that carries a SEC1 key's curve.
const TAG_CONTEXT_0: u8 = 0xa0;

/// Content octets of the OID rsaEncryption (1.2.840.113549.1.1.1).
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// Content octets of the OID id-ecPublicKey (1.2.840.10045.2.1).
pub(crate) const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// Encodes one tag-length-value element with a definite length.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if let Some(short) = u8::try_from(len).ok().filter(|short| *short < 0x80) {
        // Short form: the length fits in the low seven bits.
        out.push(short);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let significant = &bytes[skip..];
        // Long form: 0x80 | number of length octets, then the length big-endian.
        // `significant` holds at most size_of::<usize>() bytes, so the cast cannot truncate.
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(content);
    out
}

/// Splits one DER element off the front of `input`: `(tag, content, rest)`.
///
/// Returns `None` on anything malformed (indefinite lengths, high tag numbers, lengths past
/// the end of the input), since every caller treats that as "not the structure I expected".
pub(crate) fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(count);
        let len = len_bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (content, rest) = rest.split_at(len);
    Some((tag, content, rest))
}

/// Wraps a PKCS#1 `RSAPrivateKey` into a PKCS#8 `PrivateKeyInfo`.
pub(crate) fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    let algorithm = [tlv(TAG_OID, OID_RSA_ENCRYPTION), tlv(TAG_NULL, &[])].concat();
    private_key_info(&algorithm, pkcs1)
}

/// Wraps a SEC1 `ECPrivateKey` into a PKCS#8 `PrivateKeyInfo`.
///
/// The curve is taken from the key's own optional `[0]` parameters, else from
/// `fallback_curve_oid` (the complete OID element, usually taken from the certificate).
/// Returns `None` when neither names a curve or the key is not a SEC1 structure.
pub(crate) fn sec1_to_pkcs8(sec1: &[u8], fallback_curve_oid: Option<&[u8]>) -> Option<Vec<u8>> {
    let curve = match sec1_curve(sec1)? {
        Sec1Curve::Named(oid) => oid,
        Sec1Curve::Unnamed => fallback_curve_oid?,
    };
    let algorithm = [tlv(TAG_OID, OID_EC_PUBLIC_KEY), curve.to_vec()].concat();
    Some(private_key_info(&algorithm, sec1))
}

/// `PrivateKeyInfo ::= SEQUENCE { version 0, AlgorithmIdentifier, OCTET STRING key }`.
fn private_key_info(algorithm_content: &[u8], key: &[u8]) -> Vec<u8> {
    let body = [tlv(TAG_INTEGER, &[0]), tlv(TAG_SEQUENCE, algorithm_content), tlv(TAG_OCTET_STRING, key)].concat();
    tlv(TAG_SEQUENCE, &body)
}

/// What a SEC1 key says about its curve.
enum Sec1Curve<'a> {
    /// The complete OID element from the `[0]` parameters.
    Named(&'a [u8]),
    /// No parameters: the curve must come from elsewhere.
    Unnamed,
}

/// Finds the curve OID element inside a SEC1 `ECPrivateKey`:
/// `SEQUENCE { INTEGER 1, OCTET STRING key, [0] OID OPTIONAL, [1] BIT STRING OPTIONAL }`.
/// `None` when the input is not such a structure.
fn sec1_curve(sec1: &[u8]) -> Option<Sec1Curve<'_>> {
    let (tag, body, _) = read_tlv(sec1)?;
    if tag != TAG_SEQUENCE {
        return None;
    }
    let (tag, version, body) = read_tlv(body)?;
    if tag != TAG_INTEGER || version != [1] {
        return None;
    }
    let (tag, _key, body) = read_tlv(body)?;
    if tag != TAG_OCTET_STRING {
        return None;
    }
    let Some((TAG_CONTEXT_0, params, _)) = read_tlv(body) else {
        return Some(Sec1Curve::Unnamed);
    };
    // The explicit [0] wrapper holds exactly one complete OID element.
    match read_tlv(params) {
        Some((TAG_OID, _, [])) => Some(Sec1Curve::Named(params)),
        _ => None,
    }
}

/// Encodes DER as a PEM block with the given label, 64 base64 characters per line.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let encoded = base64(der);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in encoded.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Standard base64 (RFC 4648, with padding).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b0 = group[0];
        let b1 = group.get(1).copied().unwrap_or(0);
        let b2 = group.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if group.len() > 1 { sextet(6) } else { '=' });
        out.push(if group.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let check = |input: &str, expected: &str| assert_eq!(base64(input.as_bytes()), expected);
        check("", "");
        check("f", "Zg==");
        check("fo", "Zm8=");
        check("foo", "Zm9v");
        check("foob", "Zm9vYg==");
        check("fooba", "Zm9vYmE=");
        check("foobar", "Zm9vYmFy");
    }

    #[test]
    fn tlv_round_trips_short_and_long_lengths() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let content = vec![0xab; len];
            let encoded = tlv(TAG_OCTET_STRING, &content);
            let (tag, decoded, rest) = read_tlv(&encoded).expect("own encoding parses");
            assert_eq!(tag, TAG_OCTET_STRING);
            assert_eq!(decoded, &content[..]);
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn read_tlv_rejects_truncated_input() {
        assert!(read_tlv(&[]).is_none());
        assert!(read_tlv(&[0x04]).is_none());
        assert!(read_tlv(&[0x04, 0x05, 1, 2]).is_none());
        assert!(read_tlv(&[0x04, 0x82, 0x01]).is_none());
        assert!(read_tlv(&[0x04, 0x80]).is_none());
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let pem = pem_encode("TEST", &[7u8; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN TEST-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last().copied(), Some("-----END TEST-----"));
    }
}
