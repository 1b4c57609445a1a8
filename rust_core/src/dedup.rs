//! The in-process dedup index of the embedded mode: transaction id to the
//! flush that reserved it, or committed. One process owns the data path, so
//! this index is authoritative once warmed from storage.

use std::collections::HashMap;

use crate::decode::Decoded;

pub const NEW: u8 = 0;
pub const DUPLICATE: u8 = 1;
pub const IN_FLIGHT: u8 = 2;

#[derive(Debug, Clone, Copy)]
enum Slot {
    InFlight,
    /// Committed at this time (epoch seconds), for expiry.
    Committed(u32),
}

#[derive(Debug, Default)]
pub struct Index {
    slots: HashMap<String, Slot>,
    flushes: HashMap<u64, Vec<String>>,
}

impl Index {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Reserves every free id of the batch for `flush`; returns one code per
    /// valid event: NEW (reserved now), DUPLICATE or IN_FLIGHT.
    pub fn reserve(&mut self, d: &Decoded, flush: u64) -> Vec<u8> {
        let mut codes = Vec::with_capacity(d.len());
        let mut mine = Vec::new();
        for i in 0..d.len() {
            let id = d.id(i);
            match self.slots.get(id) {
                Some(Slot::Committed(_)) => codes.push(DUPLICATE),
                Some(Slot::InFlight) => codes.push(IN_FLIGHT),
                None => {
                    self.slots.insert(id.to_owned(), Slot::InFlight);
                    mine.push(id.to_owned());
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
        for id in self.flushes.remove(&flush).unwrap_or_default() {
            self.slots.insert(id, Slot::Committed(now_s));
        }
    }

    pub fn release(&mut self, flush: u64) {
        for id in self.flushes.remove(&flush).unwrap_or_default() {
            self.slots.remove(&id);
        }
    }

    /// Marks ids as committed (warming from storage at start).
    pub fn load<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>, now_s: u32) {
        for id in ids {
            self.slots.insert(id.to_owned(), Slot::Committed(now_s));
        }
    }

    /// Forgets committed ids older than `before_s`; returns how many.
    pub fn expire(&mut self, before_s: u32) -> usize {
        let n = self.slots.len();
        self.slots
            .retain(|_, s| !matches!(s, Slot::Committed(t) if *t < before_s));
        n - self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode, Limits};

    fn batch(ids: &[&str]) -> Decoded {
        let evs: Vec<String> = ids
            .iter()
            .map(|i| format!(r#"{{"transaction_id":"{i}","customer_id":"c","event_type":"e","timestamp":1700000000000}}"#))
            .collect();
        decode(
            format!("{{\"events\":[{}]}}", evs.join(",")).as_bytes(),
            1_700_000_000_000,
            &Limits::default(),
        )
        .unwrap()
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
}
