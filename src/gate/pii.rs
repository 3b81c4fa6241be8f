//! PII detectors. Each kind is a regex for candidates plus, where the format has one, a check
//! that rejects look-alikes (Luhn for cards, mod-97 for IBANs, area/group/serial rules for SSNs,
//! a real address parse for IPs). Every detector runs only when a cheap prefilter says the text
//! could hold its kind, so text without digits never pays for the digit patterns.
//!
//! Overlaps are resolved by priority (the order of [`PII_KINDS`]): a card number is not also a
//! phone number, a JWT is not also three tokens of something else.
//!
//! The patterns are ASCII-only (`(?-u)`): `\d` is `[0-9]` and `\b` an ASCII word boundary.
//! Unicode digits would never pass the checks (Luhn, mod-97, address parsing all read ASCII
//! digits), so `\d` loses nothing; the ASCII `\b` also sees a boundary between a digit and a
//! non-ASCII letter ("é4111 …"), which only finds more. The reason is speed: the regex crate's
//! lazy DFA cannot evaluate a Unicode word boundary on non-ASCII input and falls back to a
//! slower engine for the whole text, so one em dash or accented letter made a 1 KiB text cost
//! ~400 us instead of ~3 (`benches/gate.rs`, "one non-ASCII char" rows: 5.9k -> 160k env/s).

use regex::{Regex, RegexSet};

/// Stable kind names: keys of the envelope's `pii` map and values of the `kind` metric label.
pub const PII_KINDS: &[&str] = &[
    "private_key",
    "jwt",
    "aws_access_key",
    "email",
    "iban",
    "card",
    "us_ssn",
    "ipv6",
    "ipv4",
    "phone",
];

/// One match: byte range in the text and index into [`PII_KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    pub start: usize,
    pub end: usize,
    pub kind: usize,
}

pub struct Detector {
    /// Literal prefilters, searched with the memchr crate's SIMD routines; std's
    /// `str::contains` showed as about a quarter of `find` in gate profiles.
    begin: memchr::memmem::Finder<'static>,
    jwt: memchr::memmem::Finder<'static>,
    akia: memchr::memmem::Finder<'static>,
    asia: memchr::memmem::Finder<'static>,
    patterns: Vec<Regex>,
    /// The same patterns as one set: a single pass says which kinds occur at all, so a text
    /// pays one scan plus one per kind it actually contains, not one per kind.
    set: RegexSet,
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

fn iban_ok(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rearranged = compact[4..].iter().chain(&compact[..4]);
    let mut rem = 0u32;
    for &b in rearranged {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn ssn_ok(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let [area, group, serial] = parts[..] else {
        return false;
    };
    let area: u32 = area.parse().unwrap_or(0);
    area != 0 && area != 666 && area < 900 && group != "00" && serial != "0000"
}

/// Whether `bytes` holds an ASCII digit. Checked in 64-byte blocks without an early exit inside
/// a block, which the compiler vectorises; `Iterator::any` compiled to a byte-at-a-time loop
/// that was the largest part of the scan for texts without PII.
fn has_ascii_digit(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(false, |acc, b| acc | b.is_ascii_digit()) {
            return true;
        }
    }
    blocks.remainder().iter().any(u8::is_ascii_digit)
}

impl Detector {
    pub fn new() -> Detector {
        let src = [
            r"(?-u)-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----",
            r"(?-u)\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
            r"(?-u)\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
            r"(?-u)\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            r"(?-u)\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
            r"(?-u)\b\d(?:[ -]?\d){12,18}\b",
            r"(?-u)\b\d{3}-\d{2}-\d{4}\b",
            r"(?-u)(?i)\b(?:[0-9a-f]{1,4}:){2,7}(?::|[0-9a-f]{1,4})(?::[0-9a-f]{1,4})*\b|(?i)::(?:[0-9a-f]{1,4}:){0,6}[0-9a-f]{1,4}\b",
            r"(?-u)\b(?:\d{1,3}\.){3}\d{1,3}\b",
            r"(?-u)(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\b\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b|\+\d{8,15}\b",
        ];
        Detector {
            begin: memchr::memmem::Finder::new("-----BEGIN"),
            jwt: memchr::memmem::Finder::new("eyJ"),
            akia: memchr::memmem::Finder::new("AKIA"),
            asia: memchr::memmem::Finder::new("ASIA"),
            patterns: src
                .iter()
                .map(|p| Regex::new(p).expect("PII patterns are valid"))
                .collect(),
            set: RegexSet::new(src).expect("PII patterns are valid"),
        }
    }

    fn plausible(&self, kind: usize, text: &[u8], has_digit: bool) -> bool {
        match PII_KINDS[kind] {
            "private_key" => self.begin.find(text).is_some(),
            "jwt" => self.jwt.find(text).is_some(),
            "aws_access_key" => self.akia.find(text).is_some() || self.asia.find(text).is_some(),
            "email" => memchr::memchr(b'@', text).is_some(),
            "ipv6" => memchr::memchr(b':', text).is_some(),
            _ => has_digit,
        }
    }

    fn valid(kind: usize, text: &str, start: usize, end: usize) -> bool {
        let m = &text[start..end];
        match PII_KINDS[kind] {
            "card" => {
                let digits: Vec<u8> = m
                    .bytes()
                    .filter(u8::is_ascii_digit)
                    .map(|b| b - b'0')
                    .collect();
                (13..=19).contains(&digits.len()) && luhn(&digits)
            }
            "iban" => iban_ok(m),
            "us_ssn" => ssn_ok(m),
            "ipv4" => m.parse::<std::net::Ipv4Addr>().is_ok(),
            "ipv6" => m.parse::<std::net::Ipv6Addr>().is_ok(),
            "phone" => {
                // Not a piece of a longer number (a card that failed Luhn, an id).
                let b = text.as_bytes();
                let digit_at = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
                let sep_at = |i: usize| b.get(i).is_some_and(|c| matches!(c, b' ' | b'-' | b'.'));
                let continues = digit_at(end) || (sep_at(end) && digit_at(end + 1));
                let preceded = start > 0
                    && (digit_at(start - 1)
                        || (start > 1 && sep_at(start - 1) && digit_at(start - 2)));
                let n = m.bytes().filter(u8::is_ascii_digit).count();
                (7..=15).contains(&n) && !continues && !preceded
            }
            _ => true,
        }
    }

    /// Every non-overlapping PII match in `text`, in text order.
    pub fn find(&self, text: &str) -> Vec<Match> {
        let has_digit = has_ascii_digit(text.as_bytes());
        let mut taken: Vec<Match> = Vec::new();
        let plausible: Vec<bool> = (0..self.patterns.len())
            .map(|kind| self.plausible(kind, text.as_bytes(), has_digit))
            .collect();
        if !plausible.iter().any(|p| *p) {
            return taken;
        }
        let present = self.set.matches(text);
        for (kind, re) in self.patterns.iter().enumerate() {
            if !plausible[kind] || !present.matched(kind) {
                continue;
            }
            for m in re.find_iter(text) {
                if !Self::valid(kind, text, m.start(), m.end()) {
                    continue;
                }
                let overlaps = taken.iter().any(|t| m.start() < t.end && t.start < m.end());
                if !overlaps {
                    taken.push(Match {
                        start: m.start(),
                        end: m.end(),
                        kind,
                    });
                }
            }
        }
        taken.sort_by_key(|m| m.start);
        taken
    }
}

impl Default for Detector {
    fn default() -> Self {
        Detector::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<&'static str> {
        Detector::new()
            .find(text)
            .iter()
            .map(|m| PII_KINDS[m.kind])
            .collect()
    }

    #[test]
    fn each_kind_is_found_and_its_look_alikes_are_not() {
        let table: &[(&str, &[&str])] = &[
            ("mail jane.doe+x@example.co.uk now", &["email"]),
            ("not an email: user@localhost", &[]),
            ("card 4111 1111 1111 1111 thanks", &["card"]),
            ("card 4111-1111-1111-1112 fails Luhn", &[]),
            ("iban GB82 WEST 1234 5698 7654 32 ok", &["iban"]),
            ("iban GB82 WEST 1234 5698 7654 33 bad", &[]),
            ("ssn 123-45-6789", &["us_ssn"]),
            ("ssn 666-45-6789 and 123-00-6789 are invalid", &[]),
            ("from 192.168.10.254 today", &["ipv4"]),
            ("version 999.1.1.1 is not an address", &[]),
            ("v6 2001:db8::8a2e:370:7334 here", &["ipv6"]),
            ("key AKIAIOSFODNN7EXAMPLE leaked", &["aws_access_key"]),
            ("-----BEGIN RSA PRIVATE KEY-----\nMIIE", &["private_key"]),
            (
                "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                &["jwt"],
            ),
            ("call +44 20 7946 0958 or (555) 123-4567", &["phone", "phone"]),
            ("order 12345 shipped", &[]),
        ];
        for (text, expected) in table {
            assert_eq!(kinds(text), *expected, "{text}");
        }
    }

    #[test]
    fn a_card_number_is_not_counted_as_a_phone_too() {
        assert_eq!(kinds("4111 1111 1111 1111"), vec!["card"]);
    }

    #[test]
    fn digits_are_found_in_every_position_of_a_block() {
        for len in [1usize, 63, 64, 65, 200] {
            for at in 0..len {
                let mut text = vec![b'x'; len];
                assert!(!has_ascii_digit(&text));
                text[at] = b'7';
                assert!(has_ascii_digit(&text), "len {len} at {at}");
            }
        }
    }

    #[test]
    fn text_with_non_ascii_characters_is_scanned_like_any_other() {
        assert_eq!(
            kinds("Café — écrivez à jane.doe@example.com, carte 4111 1111 1111 1111 ✓"),
            vec!["email", "card"]
        );
        // An ASCII word boundary: a card right after a non-ASCII letter is still a card.
        assert_eq!(kinds("Référenceé4111 1111 1111 1111"), vec!["card"]);
        // Unicode digits are not ASCII digits, so they are never a card number.
        assert!(kinds("٤١١١١١١١١١١١١١١١").is_empty());
    }

    #[test]
    fn luhn_and_mod97_checks() {
        assert!(luhn(&[4, 5, 3, 9, 1, 4, 8, 8, 0, 3, 4, 3, 6, 4, 6, 7]));
        assert!(!luhn(&[4, 5, 3, 9, 1, 4, 8, 8, 0, 3, 4, 3, 6, 4, 6, 8]));
        assert!(iban_ok("DE89370400440532013000"));
        assert!(!iban_ok("DE89370400440532013001"));
    }
}
