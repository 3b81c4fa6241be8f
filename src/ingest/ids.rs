//! Envelope ids spoolgate generates, and telling them apart from ids clients chose.
//!
//! An envelope sent without an `id` gets a time-ordered UUID v7. The dedup index only holds
//! ids clients chose (a generated id can never be retried: the retry gets a new one), but at
//! start-up it is rebuilt from the envelope records in the spool, which do not say whose id
//! they carry. Indexing every one of them cost about 310 bytes of memory per envelope of the
//! backlog (up to `ingest.dedup_entries_max`, 310 MB by default) exactly when a restart has a
//! large backlog to replay. So a generated id carries a check value: its last four bytes are
//! a CRC-32 of its first twelve (timestamp, version, variant and the counter),
//! and start-up skips the ids whose check holds.
//!
//! The check guards against accident, not against a client: a client UUID passes it with a
//! chance of 2^-32, and such an id is then not deduplicated. Nor is an id spoolgate generated
//! that a client sends back: ingest skips every id that passes the check, so that the answer
//! is the same before and after a restart. Spools written before generated ids had
//! the check are indexed as before. The id format is spoolgate's own, not part of the spool
//! format: readers of segments see ordinary UUID strings.

use std::sync::Mutex;

use uuid::fmt::Hyphenated;
use uuid::Uuid;

/// Mixed into the check so that an id with four bytes of a bare CRC-32 at its end is not taken
/// for a generated one.
const CHECK_SALT: &[u8] = b"spoolgate generated id v1";

/// Bits of the counter that orders ids within a millisecond (as in the uuid crate's v7
/// context): the 12 bits of `rand_a` and the first 30 of `rand_b`.
const COUNTER_BITS: u32 = 42;

/// The CRC-32 of the salt, which the check of every id starts from.
static SALT_CRC: std::sync::LazyLock<u32> = std::sync::LazyLock::new(|| {
    let mut crc = crc32fast::Hasher::new();
    crc.update(CHECK_SALT);
    crc.finalize()
});

fn check(head: &[u8]) -> [u8; 4] {
    // Resumed from the salt's CRC: the CRC of the salt followed by `head`.
    let mut crc = crc32fast::Hasher::new_with_initial(*SALT_CRC);
    crc.update(head);
    crc.finalize().to_be_bytes()
}

/// The millisecond of the last id generated and its counter. Each new millisecond starts the
/// counter at a random value below half its range, drawn from the operating system's
/// generator, so that ids of two processes in the same millisecond are unlikely to collide
/// (even processes cloned from one snapshot, whose user-space generators would draw alike) and
/// the counter has room to count up.
struct Clock {
    ms: u64,
    counter: u64,
    /// Whether the counter was ever drawn: a first id stamped 0 (a system clock before 1970
    /// reads as 0) is not later than the initial `ms`, and would otherwise take counter 1, the
    /// same in every process and after every restart.
    seeded: bool,
}

static CLOCK: Mutex<Clock> = Mutex::new(Clock {
    ms: 0,
    counter: 0,
    seeded: false,
});

/// The next (millisecond, counter) pair, after every pair handed out before: `now_ms` when it
/// is later than the last id's millisecond, else the last millisecond with the counter one up
/// (a clock that steps back, or a request that read the clock before another, does not
/// reorder ids); a counter that runs out (2^41 ids in a millisecond) moves on to the next
/// millisecond with the counter at 0.
fn next(now_ms: u64) -> (u64, u64) {
    let mut clock = CLOCK.lock().unwrap_or_else(|p| p.into_inner());
    // One getrandom call per millisecond that has ids, at most a thousand a second. Should
    // the system's generator fail, the thread's own still separates ids within this process;
    // only the cross-process guard is weaker for that millisecond.
    advance(&mut clock, now_ms, || {
        getrandom::u64().unwrap_or_else(|_| fastrand::u64(..))
    })
}

/// [`next`] on a given clock, with the random draw passed in (tests give their own).
fn advance(clock: &mut Clock, now_ms: u64, draw: impl FnOnce() -> u64) -> (u64, u64) {
    if now_ms > clock.ms || !clock.seeded {
        clock.ms = clock.ms.max(now_ms);
        clock.counter = draw() & ((1 << (COUNTER_BITS - 1)) - 1);
        clock.seeded = true;
    } else {
        clock.counter += 1;
        if clock.counter >> COUNTER_BITS != 0 {
            clock.ms += 1;
            clock.counter = 0;
        }
    }
    (clock.ms, clock.counter)
}

/// A new time-ordered id (UUID v7, lowercase hyphenated) with the check in its last bytes,
/// stamped with `now_ms`, the Unix milliseconds the request was read at, or with the last id's
/// millisecond when `now_ms` is not later (see `next`). Ingest reads the clock once per
/// request: `Uuid::now_v7` read it and divided a 128-bit duration per id, which with the
/// formatting was about 3% of the CPU of batch ingest. Layout (RFC 9562 §5.7, counter
/// method): the 48-bit millisecond, version 7, the counter's top 12 bits (`rand_a`), variant
/// 0b10, its other 30 bits, then the check in place of `rand_b`'s last 32 random bits.
pub fn generate(now_ms: u64) -> String {
    let (ms, counter) = next(now_ms);
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6] = 0x70 | ((counter >> 38) & 0x0f) as u8;
    bytes[7] = (counter >> 30) as u8;
    bytes[8] = 0x80 | ((counter >> 24) & 0x3f) as u8;
    bytes[9] = (counter >> 16) as u8;
    bytes[10] = (counter >> 8) as u8;
    bytes[11] = counter as u8;
    let tag = check(&bytes[..12]);
    bytes[12..].copy_from_slice(&tag);
    // Rendered into a stack buffer and copied into a string of exactly its length: the
    // `Display` of a `Uuid`, and `to_string` on the `&mut str` that `encode_lower` returns
    // (which no specialisation catches), go through the formatting machinery and grow the
    // string from empty (about half of id generation's CPU in a profile of batch ingest).
    let mut buf = [0u8; Hyphenated::LENGTH];
    String::from(&*Uuid::from_bytes(bytes).hyphenated().encode_lower(&mut buf))
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
        let now_ms = crate::ingest::now_ms();
        // Three requests of the same millisecond and one that read the clock a millisecond
        // earlier, then one later: ids stay in generation order.
        let stamps = [now_ms, now_ms, now_ms, now_ms - 1, now_ms + 1];
        let ids: Vec<String> = stamps
            .iter()
            .flat_map(|&ms| (0..200).map(move |_| generate(ms)))
            .collect();
        for id in &ids {
            let uuid = Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 7);
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = uuid.get_timestamp().expect("v7 has one").to_unix();
            let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
            // Not more: other tests generate ids at the same time, with later clocks.
            assert!(ms >= now_ms, "{id}: {ms} vs {now_ms}");
            assert_eq!(id, &uuid.hyphenated().to_string());
            assert!(is_generated(id), "{id}");
        }
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "distinct and in generation order");
    }

    #[test]
    fn the_first_id_draws_its_counter_even_when_the_clock_reads_zero() {
        let mut clock = Clock {
            ms: 0,
            counter: 0,
            seeded: false,
        };
        assert_eq!(
            advance(&mut clock, 0, || 0x12_3456_789a),
            (0, 0x12_3456_789a)
        );
        // Then the same millisecond counts up from the draw, without drawing again.
        assert_eq!(
            advance(&mut clock, 0, || unreachable!()),
            (0, 0x12_3456_789b)
        );
        assert_eq!(advance(&mut clock, 5, || 7), (5, 7));
    }

    #[test]
    fn the_check_resumed_from_the_salt_is_the_crc_of_salt_and_head() {
        let head = b"twelve bytes";
        let mut whole = crc32fast::Hasher::new();
        whole.update(CHECK_SALT);
        whole.update(head);
        assert_eq!(check(head), whole.finalize().to_be_bytes());
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
        let generated = generate(crate::ingest::now_ms());
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
