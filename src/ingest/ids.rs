//! Envelope ids spoolgate generates, and telling them apart from ids clients chose.
//!
//! An envelope sent without an `id` gets a time-ordered UUID v7. The dedup index only holds
//! ids clients chose (a generated id can never be retried: the retry gets a new one), but at
//! start-up it is rebuilt from the envelope records in the spool, which do not say whose id
//! they carry. Indexing every one of them cost about 310 bytes of memory per envelope of the
//! backlog (up to `ingest.dedup_entries_max`, 310 MB by default) exactly when a restart has a
//! large backlog to replay. So a generated id carries a check value: its last four bytes are
//! a CRC-32 of its first twelve (timestamp, version, counter and the rest of the random bits),
//! and start-up skips the ids whose check holds.
//!
//! The check guards against accident, not against a client: a client UUID passes it with a
//! chance of 2^-32, and such an id is then not deduplicated. Nor is an id spoolgate generated
//! that a client sends back: ingest skips every id that passes the check, so that the answer
//! is the same before and after a restart. Spools written before generated ids had
//! the check are indexed as before. The id format is spoolgate's own, not part of the spool
//! format: readers of segments see ordinary UUID strings.

use uuid::fmt::Hyphenated;
use uuid::Uuid;

/// Mixed into the check so that an id with four bytes of a bare CRC-32 at its end is not taken
/// for a generated one.
const CHECK_SALT: &[u8] = b"spoolgate generated id v1";

fn check(head: &[u8]) -> [u8; 4] {
    let mut crc = crc32fast::Hasher::new();
    crc.update(CHECK_SALT);
    crc.update(head);
    crc.finalize().to_be_bytes()
}

/// A new time-ordered id (UUID v7, lowercase hyphenated) with the check in its last bytes.
/// `Uuid::now_v7` puts the millisecond timestamp and a 42-bit counter in the first twelve
/// bytes (that is what orders ids within a process) and random bits in the last four, which
/// the check replaces.
pub fn generate() -> String {
    let mut bytes = Uuid::now_v7().into_bytes();
    let tag = check(&bytes[..12]);
    bytes[12..].copy_from_slice(&tag);
    // Rendered into a stack buffer: `to_string` goes through the formatting machinery.
    let mut buf = [0u8; Hyphenated::LENGTH];
    Uuid::from_bytes(bytes)
        .hyphenated()
        .encode_lower(&mut buf)
        .to_string()
}

/// Whether `id` is one [`generate`] made: a lowercase hyphenated UUID whose check holds.
pub fn is_generated(id: &str) -> bool {
    if id.len() != Hyphenated::LENGTH || id.bytes().any(|b| b.is_ascii_uppercase()) {
        return false;
    }
    let Ok(uuid) = Uuid::try_parse(id) else {
        return false;
    };
    let bytes = uuid.as_bytes();
    uuid.get_version_num() == 7 && bytes[12..] == check(&bytes[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_time_ordered_v7_uuids_that_pass_the_check() {
        let ids: Vec<String> = (0..1000).map(|_| generate()).collect();
        for id in &ids {
            let uuid = Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 7);
            assert_eq!(id, &uuid.hyphenated().to_string());
            assert!(is_generated(id), "{id}");
        }
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "distinct and in generation order");
    }

    #[test]
    fn the_check_is_the_one_spool_format_md_specifies() {
        // spool-format.md §5, `id`: the example there, computed with Python's zlib.crc32.
        assert!(is_generated("01a22fb4-7705-730e-9e62-76d86452c7fb"));
        assert_eq!(
            check(&[0x01, 0xa2, 0x2f, 0xb4, 0x77, 0x05, 0x73, 0x0e, 0x9e, 0x62, 0x76, 0xd8]),
            [0x64, 0x52, 0xc7, 0xfb]
        );
    }

    #[test]
    fn ids_a_client_could_choose_do_not_pass_the_check() {
        let plain_v7: Vec<String> = (0..1000).map(|_| Uuid::now_v7().to_string()).collect();
        assert!(plain_v7.iter().all(|id| !is_generated(id)));
        let v4 = uuid::Builder::from_random_bytes([0x5a; 16])
            .into_uuid()
            .to_string();
        assert!(!is_generated(&v4));
        let generated = generate();
        assert!(!is_generated(&generated.to_uppercase()));
        assert!(!is_generated(&generated.replace('-', "")));
        assert!(!is_generated("order-12345"));
        assert!(!is_generated(""));
        // One changed character of a generated id breaks the check.
        let mut changed = generated.clone().into_bytes();
        changed[0] = if changed[0] == b'0' { b'1' } else { b'0' };
        assert!(!is_generated(std::str::from_utf8(&changed).expect("ascii")));
    }
}
