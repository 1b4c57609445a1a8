//! The Redis side of dedup, as bytes: one pipelined
//! `SET <prefix><key> <flush_id>|<fingerprint> NX EX ttl GET` per event encoded
//! in a single buffer, and the replies parsed in one call.

use crate::decode::Decoded;
use crate::identity::{self, FINGERPRINT_CHARS, KEY_CHARS};

fn push_bulk(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(s.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

/// RESP for one `SET <prefix><key> <flush_id>|<fingerprint> NX EX <ttl> GET`
/// per valid event, where `key` is the text of its (customer, id) key.
pub fn reserve_commands(d: &Decoded, prefix: &str, flush_id: &str, ttl_seconds: u64) -> Vec<u8> {
    // Keys and values have one length per batch: only the hashes change.
    let mut head = Vec::with_capacity(32 + prefix.len());
    head.extend_from_slice(b"*7\r\n$3\r\nSET\r\n$");
    head.extend_from_slice((prefix.len() + KEY_CHARS).to_string().as_bytes());
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(prefix.as_bytes());
    let mut mid = Vec::with_capacity(16 + flush_id.len());
    mid.extend_from_slice(b"\r\n$");
    mid.extend_from_slice(
        (flush_id.len() + 1 + FINGERPRINT_CHARS)
            .to_string()
            .as_bytes(),
    );
    mid.extend_from_slice(b"\r\n");
    mid.extend_from_slice(flush_id.as_bytes());
    mid.push(b'|');
    let mut tail = Vec::with_capacity(48);
    tail.extend_from_slice(b"\r\n$2\r\nNX\r\n$2\r\nEX\r\n");
    push_bulk(&mut tail, ttl_seconds.to_string().as_bytes());
    tail.extend_from_slice(b"$3\r\nGET\r\n");
    let each = head.len() + KEY_CHARS + mid.len() + FINGERPRINT_CHARS + tail.len();
    let mut out = Vec::with_capacity(d.len() * each);
    for (&key, &fp) in d.keys.iter().zip(&d.fingerprints) {
        out.extend_from_slice(&head);
        out.extend_from_slice(&identity::text::<KEY_CHARS>(key));
        out.extend_from_slice(&mid);
        out.extend_from_slice(&identity::text::<FINGERPRINT_CHARS>(fp));
        out.extend_from_slice(&tail);
    }
    out
}

/// A value held by a reserved key: the flush that holds it, and the
/// fingerprint of its event (None in a value written before fingerprints).
pub fn split_value(v: &[u8]) -> (&[u8], Option<u128>) {
    if v.len() > FINGERPRINT_CHARS && v[v.len() - FINGERPRINT_CHARS - 1] == b'|' {
        let (holder, fp) = v.split_at(v.len() - FINGERPRINT_CHARS);
        if let Some(fp) = identity::parse(fp) {
            return (&holder[..holder.len() - 1], Some(fp));
        }
    }
    (v, None)
}

/// A reply to `SET ... NX GET`: `None` when the key was free (now reserved),
/// else the value it already held.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyError {
    Server(String),
    Protocol(&'static str),
}

fn line(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = &buf[pos..];
    let end = memchr::memmem::find(rest, b"\r\n")?;
    Some((&rest[..end], pos + end + 2))
}

/// (event index, the flush id that already held it) per taken id.
pub type Taken = Vec<(usize, Vec<u8>)>;

/// Parses `count` replies of `SET ... NX GET`. Returns `Ok(None)` when the
/// buffer does not hold them all yet, else the (event index, old value) of
/// every key that was already taken.
pub fn parse_set_get_replies(buf: &[u8], count: usize) -> Result<Option<Taken>, ReplyError> {
    let mut taken = Vec::new();
    let mut pos = 0;
    for i in 0..count {
        let Some((head, next)) = (if pos < buf.len() {
            line(buf, pos)
        } else {
            None
        }) else {
            return Ok(None);
        };
        match head.first() {
            Some(b'$') => {
                let n: i64 = std::str::from_utf8(&head[1..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(ReplyError::Protocol("bad bulk length"))?;
                if n < 0 {
                    pos = next;
                    continue;
                }
                let end = next + n as usize;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                taken.push((i, buf[next..end].to_vec()));
                pos = end + 2;
            }
            Some(b'_') => pos = next,
            Some(b'-') => {
                return Err(ReplyError::Server(
                    String::from_utf8_lossy(&head[1..]).into_owned(),
                ))
            }
            _ => return Err(ReplyError::Protocol("unexpected reply type to SET NX GET")),
        }
    }
    if pos != buf.len() {
        return Err(ReplyError::Protocol("more replies than commands"));
    }
    Ok(Some(taken))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode, Limits};

    #[test]
    fn encodes_one_set_per_event() {
        let body = br#"{"events":[{"transaction_id":"a","customer_id":"c","event_type":"e","timestamp":1700000000000},{"transaction_id":"bb","customer_id":"c","event_type":"e","timestamp":1700000000000}]}"#;
        let d = decode(body, 1_700_000_000_000, &Limits::default()).unwrap();
        let out = reserve_commands(&d, "dedup:", "f1", 60);
        let one = |i: usize| {
            let key = String::from_utf8(identity::text::<KEY_CHARS>(d.keys[i]).to_vec()).unwrap();
            let fp =
                String::from_utf8(identity::text::<FINGERPRINT_CHARS>(d.fingerprints[i]).to_vec())
                    .unwrap();
            format!("*7\r\n$3\r\nSET\r\n$28\r\ndedup:{key}\r\n$19\r\nf1|{fp}\r\n$2\r\nNX\r\n$2\r\nEX\r\n$2\r\n60\r\n$3\r\nGET\r\n")
        };
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{}{}", one(0), one(1))
        );
        assert_eq!(d.keys[0], identity::pair_key("c", "a"));
    }

    #[test]
    fn splits_held_values() {
        let fp = identity::text::<FINGERPRINT_CHARS>(12345);
        let v = [b"f1|".as_slice(), &fp].concat();
        assert_eq!(split_value(&v), (b"f1".as_slice(), Some(12345)));
        assert_eq!(split_value(b"f1"), (b"f1".as_slice(), None));
        assert_eq!(split_value(b"f1|x"), (b"f1|x".as_slice(), None));
        assert_eq!(split_value(b""), (b"".as_slice(), None));
    }

    #[test]
    fn parses_nil_and_taken_replies() {
        let r = parse_set_get_replies(b"$-1\r\n$2\r\nf0\r\n$-1\r\n", 3)
            .unwrap()
            .unwrap();
        assert_eq!(r, vec![(1, b"f0".to_vec())]);
        assert_eq!(parse_set_get_replies(b"$-1\r\n$2\r\nf", 2).unwrap(), None);
        assert_eq!(parse_set_get_replies(b"$-1\r", 1).unwrap(), None);
        assert!(matches!(
            parse_set_get_replies(b"-ERR x\r\n", 1),
            Err(ReplyError::Server(_))
        ));
        assert!(parse_set_get_replies(b"$-1\r\n$-1\r\n", 1).is_err());
    }
}
