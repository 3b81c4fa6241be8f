//! Parsing a request body stays within what the in-flight budget charged for it.
//!
//! Ingest takes a request's body bytes from `ingest.inflight_bytes_max` before reading it, and
//! `values::decoded_bytes` more before decoding it: its values and its envelopes. The frames
//! encoded from it add about the body again (README, Bounds). These tests measure what
//! parsing really allocates, with a counting allocator that counts each thread's allocations
//! apart, so that tests running side by side do not count each other's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use spoolgate::config::UnknownFields;
use spoolgate::ingest::parse::{parse_request, ContentType, ParseLimits};
use spoolgate::ingest::values::{decoded_bytes, decoded_values, DECODED_BYTES_PER_VALUE};

/// The system allocator, keeping per thread the bytes allocated now and the most since the
/// last reset.
struct Counting;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn grew(by: isize) {
    // `try_with`: an allocation while the thread's locals are being torn down is not counted.
    let _ = LIVE_BYTES.try_with(|live| {
        live.set(live.get() + by);
        let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        grew(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grew(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The default limits: 10,000 envelopes per batch.
fn limits() -> ParseLimits {
    ParseLimits {
        batch_items_max: 10_000,
        envelope_bytes_max: 1 << 20,
        unknown_fields: UnknownFields::Meta,
    }
}

/// What a parse of `body` answered, and the most bytes it held at once beyond those held
/// before it.
fn parse_measured(content_type: ContentType, body: &[u8]) -> (String, u64) {
    let before = LIVE_BYTES.with(Cell::get);
    PEAK_BYTES.with(|peak| peak.set(before));
    let result = parse_request(content_type, body, &limits(), None, 1_800_000_000_000);
    let peak = PEAK_BYTES.with(Cell::get) - before;
    let answer = match result {
        Ok(parsed) => format!("accepted {}", parsed.len()),
        Err(e) => e.code().to_string(),
    };
    (answer, peak.max(0) as u64)
}

/// What the handler takes for `body` beside the body itself, plus the body again for its
/// encoding: the bound on what parsing it may hold.
fn allowance(content_type: ContentType, body: &[u8]) -> u64 {
    decoded_bytes(content_type, body) + body.len() as u64
}

const OVER_LONG_ITEMS: usize = 200_000;

/// An over-long batch is given up by the fast roads at the first envelope past the limit, and
/// refused by the `Value` road, which builds no more than its values' share of the charge:
/// the fast roads used to decode every item first, 4-6 times that share.
#[test]
fn an_over_long_msgpack_batch_is_refused_having_built_no_more_than_its_values_share() {
    // An array 32 of empty maps: one byte per item.
    let mut body = vec![0xdd];
    body.extend((OVER_LONG_ITEMS as u32).to_be_bytes());
    body.extend(std::iter::repeat_n(0x80u8, OVER_LONG_ITEMS));
    let (answer, peak) = parse_measured(ContentType::Msgpack, &body);
    assert_eq!(answer, "too_many_envelopes");
    let share = decoded_values(ContentType::Msgpack, &body) * DECODED_BYTES_PER_VALUE;
    assert!(
        peak <= share,
        "parsing held {peak} bytes at its peak, over the {share} of its values"
    );
}

#[test]
fn an_over_long_json_batch_is_refused_having_built_no_more_than_its_values_share() {
    let body = format!("[{}{{}}]", "{},".repeat(OVER_LONG_ITEMS - 1));
    let (answer, peak) = parse_measured(ContentType::Json, body.as_bytes());
    assert_eq!(answer, "too_many_envelopes");
    let share = decoded_values(ContentType::Json, body.as_bytes()) * DECODED_BYTES_PER_VALUE;
    assert!(
        peak <= share,
        "parsing held {peak} bytes at its peak, over the {share} of its values"
    );
}

#[test]
fn a_full_batch_of_the_smallest_envelopes_is_parsed_within_its_charge() {
    let items = limits().batch_items_max;
    let json = format!(
        "[{}{{\"source\":\"s\"}}]",
        "{\"source\":\"s\"},".repeat(items - 1)
    );
    let (answer, peak) = parse_measured(ContentType::Json, json.as_bytes());
    assert_eq!(answer, format!("accepted {items}"));
    let charged = allowance(ContentType::Json, json.as_bytes());
    assert!(
        peak <= charged,
        "JSON: {peak} bytes at the peak, {charged} charged"
    );

    let mut msgpack = vec![0xdc];
    msgpack.extend((items as u16).to_be_bytes());
    for _ in 0..items {
        msgpack.extend([0x81, 0xa6]);
        msgpack.extend(b"source");
        msgpack.extend([0xa1, b's']);
    }
    let (answer, peak) = parse_measured(ContentType::Msgpack, &msgpack);
    assert_eq!(answer, format!("accepted {items}"));
    let charged = allowance(ContentType::Msgpack, &msgpack);
    assert!(
        peak <= charged,
        "msgpack: {peak} bytes at the peak, {charged} charged"
    );
}

#[test]
fn a_full_batch_of_items_that_are_refused_is_parsed_within_its_charge() {
    // Empty maps, each refused for its missing source: the fast road reads them all first.
    let items = limits().batch_items_max;
    let mut body = vec![0xdc];
    body.extend((items as u16).to_be_bytes());
    body.extend(std::iter::repeat_n(0x80u8, items));
    let (answer, peak) = parse_measured(ContentType::Msgpack, &body);
    assert_eq!(answer, "invalid_envelope");
    let charged = allowance(ContentType::Msgpack, &body);
    assert!(
        peak <= charged,
        "{peak} bytes at the peak, {charged} charged"
    );
}

#[test]
fn batches_of_ordinary_envelopes_are_parsed_within_their_charge() {
    for (envelopes, text_bytes) in [(1, 1_000_000), (100, 1024), (1000, 64)] {
        let text = "x".repeat(text_bytes);
        let one = format!("{{\"source\":\"s\",\"tenant\":\"t\",\"text\":\"{text}\"}}");
        let body = format!("[{}]", vec![one; envelopes].join(","));
        let (answer, peak) = parse_measured(ContentType::Json, body.as_bytes());
        assert_eq!(answer, format!("accepted {envelopes}"));
        let charged = allowance(ContentType::Json, body.as_bytes());
        assert!(
            peak <= charged,
            "{envelopes} envelopes of {text_bytes} bytes: {peak} bytes at the peak, {charged} charged"
        );
    }
}
