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

use std::collections::BTreeMap;

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

/// The mod-97 check of an IBAN, spaces ignored.
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

/// The IBAN in the candidate `text[start..end]`: the candidate itself, or, when it fails the
/// check, the candidate without its trailing space-separated group(s) ("ES91 … 1332 EUR": the
/// optional last group of the pattern took " EUR"). Only upper case, as IBANs are printed: in
/// lower case, one 32-digit hex id (a trace id, an MD5) in about 97 that starts with two letters
/// and two digits passes the check, and would be masked.
fn iban_span(text: &str, start: usize, end: usize) -> Option<(usize, usize)> {
    let mut end = end;
    loop {
        let m = &text[start..end];
        if iban_ok(m) {
            return Some((start, end));
        }
        end = start + m.rfind(' ')?;
    }
}

/// Whether the digits of `bytes` (separators skipped) are 13 to 19 and pass Luhn.
fn card_digits_ok(bytes: &[u8]) -> bool {
    let mut digits = [0u8; 19];
    let mut n = 0;
    for b in bytes.iter().filter(|b| b.is_ascii_digit()) {
        if n == digits.len() {
            return false;
        }
        digits[n] = b - b'0';
        n += 1;
    }
    n >= 13 && luhn(&digits[..n])
}

/// The card number in the candidate `text[start..end]` (digit groups joined by single spaces or
/// dashes). The candidate itself when it passes; otherwise, since a short group before or after
/// a card ("Qty 2 4111 …", "… 1111 12/25") joins the candidate and breaks Luhn, the longest run
/// of whole groups with 13 to 19 digits that passes (the leftmost among equally long ones).
/// A span right after `+` is a phone number's, never a card's.
fn card_span(text: &str, start: usize, end: usize) -> Option<(usize, usize)> {
    let b = text.as_bytes();
    let ok = |s: usize, e: usize| (s == 0 || b[s - 1] != b'+') && card_digits_ok(&b[s..e]);
    if ok(start, end) {
        return Some((start, end));
    }
    // Digit groups as byte ranges; at most 19, as the candidate has at most 19 digits.
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut i = start;
    while i < end {
        if b[i].is_ascii_digit() {
            let g = i;
            while i < end && b[i].is_ascii_digit() {
                i += 1;
            }
            groups.push((g, i));
        } else {
            i += 1;
        }
    }
    // (digits, start, end) of every proper run of whole groups with 13 to 19 digits.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for first in 0..groups.len() {
        let mut n = 0;
        for last in first..groups.len() {
            n += groups[last].1 - groups[last].0;
            let whole = first == 0 && last == groups.len() - 1;
            if !whole && (13..=19).contains(&n) {
                runs.push((n, groups[first].0, groups[last].1));
            }
        }
    }
    runs.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
    runs.into_iter()
        .find(|&(_, s, e)| ok(s, e))
        .map(|(_, s, e)| (s, e))
}

/// Where the private key block whose BEGIN line starts at `begin` in `text` ends: after the END
/// line with the same label, or at the end of `text` when none follows (a truncated key is
/// covered whole). The gate calls it on the whole text for a key its scanned prefix cut.
pub fn private_key_end(text: &str, begin: usize) -> usize {
    let b = text.as_bytes();
    let head = &b[begin..];
    let Some(label_end) = head
        .get("-----BEGIN ".len()..)
        .and_then(|rest| memchr::memmem::find(rest, b"-----"))
        .map(|at| "-----BEGIN ".len() + at)
    else {
        return text.len();
    };
    let label = &head["-----BEGIN ".len()..label_end];
    let after = begin + label_end + "-----".len();
    let mut end_line = b"-----END ".to_vec();
    end_line.extend_from_slice(label);
    end_line.extend_from_slice(b"-----");
    memchr::memmem::find(&b[after..], &end_line)
        .map_or(text.len(), |at| after + at + end_line.len())
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
            // The BEGIN line only; `span` extends a match to its END line.
            r"(?-u)-----BEGIN (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----",
            r"(?-u)\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
            r"(?-u)\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
            r"(?-u)\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            r"(?-u)\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
            r"(?-u)\b\d(?:[ -]?\d){12,18}\b",
            r"(?-u)\b\d{3}-\d{2}-\d{4}\b",
            // Eight groups; or groups, `::`, groups, where the groups after `::` may end in a
            // dotted IPv4 address; or, last (so that a longer form wins where one matches),
            // groups ending in `::` (`fe80::`). A leading `::` has no `\b` before it, nor a
            // trailing one after it: `span` checks what precedes and follows them (not
            // `Vec::add`, `b2::foo`).
            r"(?-u)(?i)\b(?:[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){7}|[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){5}:\d{1,3}(?:\.\d{1,3}){3})\b|(?:\b[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){0,6})?::(?:(?:[0-9a-f]{1,4}:){0,5}\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){0,6})\b|\b[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){0,6}::",
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

    /// The match that the candidate `text[start..end]` of `kind` stands for, if any: the
    /// candidate itself, a part of it (cards, IBANs), or, for a private key, the candidate (its
    /// BEGIN line) extended to the END line with the same label, or to the end of `text` when
    /// none follows, so that a truncated key is covered whole.
    fn span(kind: usize, text: &str, start: usize, end: usize) -> Option<(usize, usize)> {
        let m = &text[start..end];
        let b = text.as_bytes();
        let digit_at = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
        let whole = Some((start, end));
        match PII_KINDS[kind] {
            "private_key" => Some((start, private_key_end(text, start))),
            "card" => card_span(text, start, end),
            "iban" => iban_span(text, start, end),
            "us_ssn" => whole.filter(|_| ssn_ok(m)),
            "ipv4" => {
                // Not a piece of a longer dotted number (`1.2.3.4.5`, an OID).
                let continues = b.get(end) == Some(&b'.') && digit_at(end + 1);
                let preceded = start > 1 && b[start - 1] == b'.' && digit_at(start - 2);
                let ok = !continues && !preceded && m.parse::<std::net::Ipv4Addr>().is_ok();
                whole.filter(|_| ok)
            }
            "ipv6" => {
                // A leading `::` right after a name or a colon is a path (`Vec::add`), and so is
                // a trailing `::` right before one (`b2::foo`); an address followed by `:` and a
                // hex digit is a piece of a longer colon run. Without a decimal digit it is a
                // path of hex-letter names (`Face::add`, `dead::beef`), not an address.
                let name_byte = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b':');
                let after_name = m.starts_with(':') && start > 0 && name_byte(&b[start - 1]);
                let before_name = m.ends_with("::") && b.get(end).is_some_and(name_byte);
                let continues =
                    b.get(end) == Some(&b':') && b.get(end + 1).is_some_and(u8::is_ascii_hexdigit);
                // A trailing `::` after one short group is a slice (`arr[1::]`), not `fe80::`.
                let lone_short_group = !m.starts_with(':')
                    && m.ends_with("::")
                    && !m[..m.len() - 2].contains(':')
                    && m.len() - 2 < 3;
                let ok = !after_name
                    && !before_name
                    && !continues
                    && !lone_short_group
                    && m.bytes().any(|c| c.is_ascii_digit())
                    && m.parse::<std::net::Ipv6Addr>().is_ok();
                whole.filter(|_| ok)
            }
            "phone" => {
                // Not a piece of a longer number (a card that failed Luhn, an id).
                let sep_at = |i: usize| b.get(i).is_some_and(|c| matches!(c, b' ' | b'-' | b'.'));
                let continues = digit_at(end) || (sep_at(end) && digit_at(end + 1));
                let preceded = start > 0
                    && (digit_at(start - 1)
                        || (start > 1 && sep_at(start - 1) && digit_at(start - 2)));
                let n = m.bytes().filter(u8::is_ascii_digit).count();
                whole.filter(|_| (7..=15).contains(&n) && !continues && !preceded)
            }
            _ => whole,
        }
    }

    /// Every non-overlapping PII match in `text`, in text order.
    pub fn find(&self, text: &str) -> Vec<Match> {
        let order: Vec<usize> = (0..self.patterns.len()).collect();
        self.find_in_order(text, &order)
    }

    /// Like [`Detector::find`], with overlaps resolved in favour of the kinds earlier in
    /// `order` (every index of [`PII_KINDS`] once) rather than in [`PII_KINDS`]'s order.
    pub fn find_in_order(&self, text: &str, order: &[usize]) -> Vec<Match> {
        debug_assert_eq!(order.len(), self.patterns.len());
        let has_digit = has_ascii_digit(text.as_bytes());
        let plausible: Vec<bool> = (0..self.patterns.len())
            .map(|kind| self.plausible(kind, text.as_bytes(), has_digit))
            .collect();
        if !plausible.iter().any(|p| *p) {
            return Vec::new();
        }
        // Matches taken so far, keyed by start. They never overlap, so ordered by start they
        // are ordered by end too, and the one that starts last before a candidate's end is the
        // only one that can overlap it: one lookup per candidate, not a scan of all matches.
        let mut taken: BTreeMap<usize, Match> = BTreeMap::new();
        let present = self.set.matches(text);
        for &kind in order {
            let re = &self.patterns[kind];
            if !plausible[kind] || !present.matched(kind) {
                continue;
            }
            // `find_at` from the end of the last candidate, as `find_iter` does (no pattern
            // matches the empty string), except that a private key resumes after its END line.
            let mut at = 0;
            while let Some(m) = re.find_at(text, at) {
                at = m.end();
                let Some((start, end)) = Self::span(kind, text, m.start(), m.end()) else {
                    continue;
                };
                at = at.max(end);
                let overlaps = taken
                    .range(..end)
                    .next_back()
                    .is_some_and(|(_, t)| start < t.end);
                if !overlaps {
                    taken.insert(start, Match { start, end, kind });
                }
            }
        }
        taken.into_values().collect()
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

    /// The number of matches and `text` with each replaced by `[KIND]`, as the gate's `mask`.
    fn masked(text: &str) -> (usize, String) {
        let found = Detector::new().find(text);
        let mut out = String::new();
        let mut at = 0;
        for m in &found {
            out.push_str(&text[at..m.start]);
            out.push_str(&format!("[{}]", PII_KINDS[m.kind].to_uppercase()));
            at = m.end;
        }
        out.push_str(&text[at..]);
        (found.len(), out)
    }

    fn check(table: &[(&str, usize, &str)]) {
        for (text, count, expected) in table {
            assert_eq!(masked(text), (*count, expected.to_string()), "{text:?}");
        }
    }

    #[test]
    fn a_private_key_is_matched_from_its_begin_line_to_its_end_line_or_the_end_of_the_text() {
        check(&[
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\nbye",
                1,
                "[PRIVATE_KEY]\nbye",
            ),
            // Truncated: no END line, so the rest of the text is the key.
            ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAKIAIOSFODNN7EXAMPLE", 1, "[PRIVATE_KEY]"),
            (
                "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF\n-----END PGP PRIVATE KEY BLOCK----- ok",
                1,
                "[PRIVATE_KEY] ok",
            ),
            (
                "a -----BEGIN EC PRIVATE KEY-----\nX\n-----END EC PRIVATE KEY----- b \
                 -----BEGIN OPENSSH PRIVATE KEY-----\nY\n-----END OPENSSH PRIVATE KEY----- c",
                2,
                "a [PRIVATE_KEY] b [PRIVATE_KEY] c",
            ),
            // An END line with another label does not close the key.
            (
                "-----BEGIN RSA PRIVATE KEY-----\nX\n-----END EC PRIVATE KEY-----\nY",
                1,
                "[PRIVATE_KEY]",
            ),
        ]);
    }

    #[test]
    fn a_compressed_ipv6_address_is_matched_whole_and_a_path_is_not_an_address() {
        check(&[
            ("v6 2001:db8::8a2e:370:7334 here", 1, "v6 [IPV6] here"),
            ("fe80::1", 1, "[IPV6]"),
            ("::ffff:192.0.2.1", 1, "[IPV6]"),
            ("[::1]:8080", 1, "[[IPV6]]:8080"),
            (
                "2001:db8:0:0:0:0:2:1 and 64:ff9b::192.0.2.33",
                2,
                "[IPV6] and [IPV6]",
            ),
            (
                "Vec::add(x) Color::A, Color::B",
                0,
                "Vec::add(x) Color::A, Color::B",
            ),
            ("a :: b, x:::1", 0, "a :: b, x:::1"),
            ("1:2:3:4:5:6:7:8:9", 0, "1:2:3:4:5:6:7:8:9"),
        ]);
    }

    #[test]
    fn an_address_ending_in_a_double_colon_is_matched_and_a_path_of_hex_names_is_not() {
        check(&[
            ("link fe80:: up", 1, "link [IPV6] up"),
            ("prefix 2001:db8::/32", 1, "prefix [IPV6]/32"),
            ("2001:db8::.", 1, "[IPV6]."),
            (
                "Face::add(x) dead::beef Bad::Cafe",
                0,
                "Face::add(x) dead::beef Bad::Cafe",
            ),
            ("b2::foo and c3::Bar", 0, "b2::foo and c3::Bar"),
            ("arr[1::] and a[12::]", 0, "arr[1::] and a[12::]"),
            (
                "dead:beef:cafe:babe:dead:beef:cafe:babe",
                0,
                "dead:beef:cafe:babe:dead:beef:cafe:babe",
            ),
            // The longer forms still win over a trailing `::`.
            ("fe80::1 and ::ffff:192.0.2.1", 2, "[IPV6] and [IPV6]"),
        ]);
    }

    #[test]
    fn sixteen_luhn_digits_after_a_country_code_are_a_card_as_no_phone_number_is_that_long() {
        // E.164 numbers have at most 15 digits, so "+1" and 16 more cannot all be a phone's:
        // the 16 that pass Luhn are masked as the card they look like.
        check(&[("call +1 4111 1111 1111 1111", 1, "call +1 [CARD]")]);
    }

    #[test]
    fn a_card_next_to_a_short_digit_group_is_still_found() {
        check(&[
            ("4111 1111 1111 1111 12/25", 1, "[CARD] 12/25"),
            ("4111 1111 1111 1111 123", 1, "[CARD] 123"),
            ("Qty 2 4111 1111 1111 1111", 1, "Qty 2 [CARD]"),
            ("4111-1111-1111-1112 12", 0, "4111-1111-1111-1112 12"),
        ]);
    }

    #[test]
    fn an_iban_followed_by_a_currency_or_a_short_number_is_found_and_a_hex_id_is_not() {
        check(&[
            ("ES91 2100 0418 4502 0005 1332 EUR", 1, "[IBAN] EUR"),
            ("ES91 2100 0418 4502 0005 1332 12", 1, "[IBAN] 12"),
            ("GB82 WEST 1234 5698 7654 32 EUR", 1, "[IBAN] EUR"),
            // Lower case is not an IBAN: hex ids (trace ids, digests) would be masked.
            (
                "es91 2100 0418 4502 0005 1332",
                0,
                "es91 2100 0418 4502 0005 1332",
            ),
        ]);
    }

    #[test]
    fn digits_after_a_plus_sign_are_a_phone_number_not_a_card() {
        check(&[
            ("+49 151 1234 5678", 1, "[PHONE]"),
            ("call +49 151 1234 5678 now", 1, "call [PHONE] now"),
        ]);
    }

    #[test]
    fn many_matches_are_all_kept_in_text_order_without_overlaps() {
        let text = "a@b.io 4111 1111 1111 1111 at 10.0.0.1 ".repeat(2000);
        let found = Detector::new().find(&text);
        assert_eq!(found.len(), 6000);
        assert!(found.windows(2).all(|w| w[0].end <= w[1].start));
        let kinds: Vec<&str> = found[..3].iter().map(|m| PII_KINDS[m.kind]).collect();
        assert_eq!(kinds, ["email", "card", "ipv4"]);
    }

    #[test]
    fn a_dotted_number_longer_than_four_parts_is_not_an_ipv4_address() {
        check(&[
            ("1.2.3.4.5", 0, "1.2.3.4.5"),
            ("oid 1.3.6.1.4.1.311.21.7", 0, "oid 1.3.6.1.4.1.311.21.7"),
            ("from 10.0.0.1. Then", 1, "from [IPV4]. Then"),
        ]);
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
