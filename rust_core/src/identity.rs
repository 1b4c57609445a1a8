//! An event's identity and content, as fixed-size hashes: the idempotency key
//! of (customer_id, transaction_id) and the fingerprint that tells a retry
//! (same content) from a conflict (same key, different content).
//!
//! The key is 128 bits of XXH3 over `customer_id ":" transaction_id` (ids
//! never contain ':'): with 10^9 keys remembered at once, the odds that two
//! distinct pairs share one are about 10^18 / 2^129, under 10^-20.
//!
//! The fingerprint is 96 bits, one part per field so a conflict can name what
//! differs: 24 bits of the event type, 24 of the timestamp and 48 of the
//! properties (order-independent: the same properties in another key order
//! are the same content). A fingerprint only decides how an event that is not
//! stored anyway is reported (duplicate or conflict); a part that collides
//! (odds 2^-24 for a type or timestamp change) reports a conflict as a duplicate.

use xxhash_rust::xxh3::{xxh3_128, xxh3_64, xxh3_64_with_seed};

/// Which fields of two fingerprints differ: bits of these, or 0.
pub const EVENT_TYPE: u8 = 1;
pub const TIMESTAMP: u8 = 2;
pub const PROPERTIES: u8 = 4;

const ET_BITS: u32 = 24;
const TS_BITS: u32 = 24;
const PROPS_BITS: u32 = 48;
/// Fingerprints use the low 96 bits of a u128.
pub const FINGERPRINT_BITS: u32 = ET_BITS + TS_BITS + PROPS_BITS;

/// The text length of a key and of a fingerprint (6 bits a character).
pub const KEY_CHARS: usize = 22;
pub const FINGERPRINT_CHARS: usize = 16;

/// The idempotency key of (customer_id, transaction_id).
pub fn pair_key(customer_id: &str, transaction_id: &str) -> u128 {
    let mut buf = [0u8; 512];
    let n = customer_id.len() + 1 + transaction_id.len();
    if n <= buf.len() {
        buf[..customer_id.len()].copy_from_slice(customer_id.as_bytes());
        buf[customer_id.len()] = b':';
        buf[customer_id.len() + 1..n].copy_from_slice(transaction_id.as_bytes());
        xxh3_128(&buf[..n])
    } else {
        xxh3_128(format!("{customer_id}:{transaction_id}").as_bytes())
    }
}

fn mask(bits: u32) -> u128 {
    (1u128 << bits) - 1
}

/// The fingerprint of an event's content. `pairs` are the properties'
/// `"key":value` spans of the canonical JSON, in any order.
pub fn fingerprint<'a>(
    event_type: &str,
    timestamp_ms: i64,
    pairs: impl Iterator<Item = &'a [u8]>,
) -> u128 {
    let et = u128::from(xxh3_64(event_type.as_bytes())) & mask(ET_BITS);
    let ts = u128::from(xxh3_64(&timestamp_ms.to_le_bytes())) & mask(TS_BITS);
    // A sum of per-pair hashes does not depend on the order; keys are unique,
    // so no two equal terms can meet.
    let (mut sum, mut count) = (0u64, 0u64);
    for p in pairs {
        sum = sum.wrapping_add(xxh3_64_with_seed(p, 0x6d66));
        count += 1;
    }
    let mut both = [0u8; 16];
    both[..8].copy_from_slice(&sum.to_le_bytes());
    both[8..].copy_from_slice(&count.to_le_bytes());
    let props = u128::from(xxh3_64(&both)) & mask(PROPS_BITS);
    (et << (TS_BITS + PROPS_BITS)) | (ts << PROPS_BITS) | props
}

/// The fields in which two fingerprints differ (`EVENT_TYPE | ...`), 0 if none.
pub fn differing(a: u128, b: u128) -> u8 {
    let mut out = 0;
    if (a >> (TS_BITS + PROPS_BITS)) & mask(ET_BITS)
        != (b >> (TS_BITS + PROPS_BITS)) & mask(ET_BITS)
    {
        out |= EVENT_TYPE;
    }
    if (a >> PROPS_BITS) & mask(TS_BITS) != (b >> PROPS_BITS) & mask(TS_BITS) {
        out |= TIMESTAMP;
    }
    if a & mask(PROPS_BITS) != b & mask(PROPS_BITS) {
        out |= PROPERTIES;
    }
    out
}

/// The names of the fields in `mask`, comma-separated, for messages.
pub fn field_names(mask: u8) -> String {
    [
        (EVENT_TYPE, "event_type"),
        (TIMESTAMP, "timestamp"),
        (PROPERTIES, "properties"),
    ]
    .iter()
    .filter(|(bit, _)| mask & bit != 0)
    .map(|(_, name)| *name)
    .collect::<Vec<_>>()
    .join(", ")
}

// The id alphabet, so a key reads like an id in `redis-cli`; most significant bits first.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The low `6 * N` bits of `v` as `N` characters.
pub fn text<const N: usize>(v: u128) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, c) in out.iter_mut().enumerate() {
        let shift = 6 * (N - 1 - i) as u32;
        *c = ALPHABET[((v >> shift) & 63) as usize];
    }
    out
}

/// The inverse of `text`, or None for a character outside the alphabet.
pub fn parse(s: &[u8]) -> Option<u128> {
    if s.len() * 6 > 132 {
        return None;
    }
    let mut v = 0u128;
    for &c in s {
        let d = ALPHABET.iter().position(|&a| a == c)? as u128;
        v = (v << 6) | d;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(et: &str, ts: i64, pairs: &[&str]) -> u128 {
        fingerprint(et, ts, pairs.iter().map(|p| p.as_bytes()))
    }

    #[test]
    fn key_is_per_customer_and_stable() {
        assert_ne!(pair_key("cust_a", "inv_1"), pair_key("cust_b", "inv_1"));
        assert_ne!(pair_key("a", "b_c"), pair_key("a_b", "c"));
        assert_eq!(pair_key("cust_a", "inv_1"), pair_key("cust_a", "inv_1"));
        let long = "x".repeat(255);
        assert_ne!(pair_key(&long, &long), pair_key(&long, "x"));
        assert_eq!(
            pair_key(&long, &long),
            xxh3_128(format!("{long}:{long}").as_bytes())
        );
    }

    #[test]
    fn fingerprint_names_what_differs() {
        let a = fp("api", 1, &[r#""a":1"#, r#""b":"x""#]);
        assert!(a < 1u128 << FINGERPRINT_BITS);
        assert_eq!(differing(a, fp("api", 1, &[r#""b":"x""#, r#""a":1"#])), 0);
        assert_eq!(
            differing(a, fp("api2", 1, &[r#""a":1"#, r#""b":"x""#])),
            EVENT_TYPE
        );
        assert_eq!(
            differing(a, fp("api", 2, &[r#""a":1"#, r#""b":"x""#])),
            TIMESTAMP
        );
        assert_eq!(
            differing(a, fp("api", 1, &[r#""a":2"#, r#""b":"x""#])),
            PROPERTIES
        );
        assert_eq!(differing(a, fp("api", 1, &[r#""a":1"#])), PROPERTIES);
        assert_eq!(differing(a, fp("api", 9, &[])), TIMESTAMP | PROPERTIES);
        assert_eq!(field_names(TIMESTAMP | PROPERTIES), "timestamp, properties");
        assert_eq!(field_names(0), "");
    }

    #[test]
    fn text_round_trips() {
        let k = pair_key("c", "t");
        let t = text::<KEY_CHARS>(k);
        assert_eq!(parse(&t), Some(k));
        let f = fp("e", 5, &[]);
        assert_eq!(parse(&text::<FINGERPRINT_CHARS>(f)), Some(f));
        assert_eq!(parse(b"a|b"), None);
        assert_eq!(parse(&[b'A'; 23]), None);
    }
}
