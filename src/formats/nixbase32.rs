//! Nix's base-32 encoding ("nix32").
//!
//! Nix does not use RFC 4648 base32: its alphabet omits `e o u t` and the digits are
//! emitted starting from the *last* 5-bit group of the hash, so a naive encoder produces
//! strings that look right but never match a store path. Everything that names a store
//! path or a NarHash goes through here.

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Number of characters needed for `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// Number of bytes held by `len` characters, if `len` is a length Nix can produce.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] as u16 >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes a nix32 string. Rejects characters outside the alphabet and strings whose
/// high bits would not fit (which Nix itself rejects as "invalid base-32 hash").
pub fn decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    let len = decoded_len(s.len());
    if encoded_len(len) != s.len() {
        return None;
    }
    let mut out = vec![0u8; len];
    for (n, &c) in s.iter().rev().enumerate() {
        let d = digit(c)? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (d << j) as u8;
        let carry = d >> (8 - j);
        if i + 1 < len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// True if every byte is in the nix32 alphabet (cheap check for store path hashes).
pub fn is_valid_char(c: u8) -> bool {
    digit(c).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by `nix-hash --type sha256 --to-base32 <hex>` (Nix 2.8).
    const SHA256_CASES: &[(&str, &str)] = &[
        (
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        ),
        (
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        ),
    ];

    #[test]
    fn matches_nix_hash_to_base32() {
        for (hex, nix32) in SHA256_CASES {
            let bytes: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert_eq!(&encode(&bytes), nix32);
            assert_eq!(decode(nix32).unwrap(), bytes);
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(decoded_len(32), 20);
        assert_eq!(decoded_len(52), 32);
        assert_eq!(encode(&[]), "");
    }

    #[test]
    fn rejects_bad_input() {
        // letters Nix leaves out
        for bad in ["e", "o", "u", "t"] {
            let s = format!("{}{}", bad, "0".repeat(31));
            assert!(decode(&s).is_none(), "{s}");
        }
        // wrong length (33 chars cannot come from whole bytes)
        assert!(decode(&"0".repeat(33)).is_none());
        // high bits that overflow the last byte: "z" first in a 52-char sha256
        assert!(decode(&format!("z{}", "0".repeat(51))).is_none());
        assert!(decode("Ä").is_none());
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..64usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(decode(&encode(&bytes)).unwrap(), bytes);
        }
    }
}
