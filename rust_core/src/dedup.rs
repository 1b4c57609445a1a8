//! The in-process dedup index of the embedded mode: the idempotency key of
//! (customer_id, transaction_id) to the fingerprint of the event that holds
//! it and the state of its flush (reserved, or committed). One process owns
//! the data path, so this index is authoritative once warmed from storage.
//!
//! Keys and fingerprints are fixed-size hashes (`identity`), never the id
//! strings: an entry is 32 bytes, whatever the length of the ids. The table
//! is split in shards by the key's top byte, so growing it rehashes one small
//! shard at a time: a request never waits for a table of millions of entries
//! to double.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::decode::Decoded;
use crate::identity;

pub const NEW: u8 = 0;
pub const DUPLICATE: u8 = 1;
pub const IN_FLIGHT: u8 = 2;
/// A conflict is `CONFLICT | the identity field bits that differ`.
pub const CONFLICT: u8 = 0x10;

/// The keys are uniform hashes already: their low 64 bits index the table.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// An entry: the fingerprint in the high 96 bits, then the commit time in
/// epoch seconds (0 while its flush is in flight).
type Entry = u128;

fn entry(fingerprint: u128, committed_s: u32) -> Entry {
    (fingerprint << 32) | Entry::from(committed_s)
}

fn committed_at(e: Entry) -> u32 {
    e as u32
}

type Shard = HashMap<u128, Entry, BuildHasherDefault<KeyHasher>>;

const SHARDS: usize = 256;

pub struct Index {
    shards: Vec<Shard>,
    flushes: HashMap<u64, Vec<u128>>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            flushes: HashMap::new(),
        }
    }
}

fn shard_of(key: u128) -> usize {
    (key >> 120) as usize % SHARDS
}

impl Index {
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    fn slots(&mut self, key: u128) -> &mut Shard {
        &mut self.shards[shard_of(key)]
    }

    /// Reserves every free key of the batch for `flush`; returns one code per
    /// valid event: NEW (reserved now), DUPLICATE (same content committed),
    /// CONFLICT | fields (other content committed) or IN_FLIGHT.
    pub fn reserve(&mut self, d: &Decoded, flush: u64) -> Vec<u8> {
        let mut codes = Vec::with_capacity(d.len());
        let mut mine = Vec::new();
        for (&key, &fp) in d.keys.iter().zip(&d.fingerprints) {
            match self.slots(key).get(&key) {
                Some(&e) if committed_at(e) == 0 => codes.push(IN_FLIGHT),
                Some(&e) => match identity::differing(e >> 32, fp) {
                    0 => codes.push(DUPLICATE),
                    fields => codes.push(CONFLICT | fields),
                },
                None => {
                    self.slots(key).insert(key, entry(fp, 0));
                    mine.push(key);
                    codes.push(NEW);
                }
            }
        }
        if !mine.is_empty() {
            self.flushes.entry(flush).or_default().extend(mine);
        }
        codes
    }

    pub fn commit(&mut self, flush: u64, now_s: u32) {
        for key in self.flushes.remove(&flush).unwrap_or_default() {
            if let Some(e) = self.slots(key).get_mut(&key) {
                *e = entry(*e >> 32, now_s.max(1));
            }
        }
    }

    pub fn release(&mut self, flush: u64) {
        for key in self.flushes.remove(&flush).unwrap_or_default() {
            self.slots(key).remove(&key);
        }
    }

    /// Marks the batch's events as committed (warming from storage at start).
    pub fn load(&mut self, d: &Decoded, now_s: u32) {
        for (&key, &fp) in d.keys.iter().zip(&d.fingerprints) {
            self.slots(key).insert(key, entry(fp, now_s.max(1)));
        }
    }

    /// Forgets committed keys older than `before_s`; returns how many.
    pub fn expire(&mut self, before_s: u32) -> usize {
        let n = self.len();
        for shard in &mut self.shards {
            shard.retain(|_, e| {
                let t = committed_at(*e);
                t == 0 || t >= before_s
            });
        }
        n - self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode, Limits};

    fn batch_of(evs: &[(&str, &str, i64)]) -> Decoded {
        let evs: Vec<String> = evs
            .iter()
            .map(|(c, i, t)| format!(r#"{{"transaction_id":"{i}","customer_id":"{c}","event_type":"e","timestamp":{t}}}"#))
            .collect();
        decode(
            format!("{{\"events\":[{}]}}", evs.join(",")).as_bytes(),
            1_700_000_000_000,
            &Limits::default(),
        )
        .unwrap()
    }

    fn batch(ids: &[&str]) -> Decoded {
        batch_of(
            &ids.iter()
                .map(|i| ("c", *i, 1_700_000_000_000))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn reserve_commit_release() {
        let mut ix = Index::default();
        assert_eq!(ix.reserve(&batch(&["a", "b"]), 1), vec![NEW, NEW]);
        assert_eq!(ix.reserve(&batch(&["b", "c"]), 2), vec![IN_FLIGHT, NEW]);
        ix.commit(1, 100);
        ix.release(2);
        assert_eq!(
            ix.reserve(&batch(&["a", "b", "c"]), 3),
            vec![DUPLICATE, DUPLICATE, NEW]
        );
        assert_eq!(ix.expire(101), 2);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn keys_are_per_customer_and_content_is_compared() {
        let t = 1_700_000_000_000;
        let mut ix = Index::default();
        assert_eq!(ix.reserve(&batch_of(&[("a", "inv_1", t)]), 1), vec![NEW]);
        ix.commit(1, 100);
        let codes = ix.reserve(
            &batch_of(&[("b", "inv_1", t), ("a", "inv_1", t), ("a", "inv_1", t - 1)][..2]),
            2,
        );
        assert_eq!(codes, vec![NEW, DUPLICATE]);
        let codes = ix.reserve(&batch_of(&[("a", "inv_1", t - 1)]), 3);
        assert_eq!(codes, vec![CONFLICT | identity::TIMESTAMP]);
    }

    #[test]
    fn load_marks_committed_with_fingerprints() {
        let t = 1_700_000_000_000;
        let mut ix = Index::default();
        ix.load(&batch_of(&[("a", "x", t), ("b", "x", t)]), 5);
        assert_eq!(ix.len(), 2);
        let codes = ix.reserve(
            &batch_of(&[("a", "x", t), ("b", "x", t + 1), ("c", "x", t)]),
            1,
        );
        assert_eq!(codes, vec![DUPLICATE, CONFLICT | identity::TIMESTAMP, NEW]);
    }

    #[test]
    fn many_keys_across_shards() {
        let ids: Vec<String> = (0..3000).map(|i| format!("id{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut ix = Index::default();
        for chunk in refs.chunks(1000) {
            assert!(ix.reserve(&batch(chunk), 7).iter().all(|&c| c == NEW));
        }
        assert_eq!(ix.len(), 3000);
        ix.commit(7, 50);
        for chunk in refs.chunks(1000) {
            assert!(ix.reserve(&batch(chunk), 8).iter().all(|&c| c == DUPLICATE));
        }
        assert!(ix.shards.iter().all(|s| !s.is_empty()));
        assert_eq!(ix.expire(51), 3000);
        assert!(ix.is_empty());
    }

    #[test]
    fn an_entry_is_32_bytes() {
        assert_eq!(std::mem::size_of::<(u128, Entry)>(), 32);
    }
}
