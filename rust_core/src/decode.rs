//! Decodes a whole `{"events": [...]}` batch: parse, validate every rule,
//! encode the valid events for storage (ClickHouse RowBinary) and for the
//! archive (NDJSON), in one pass over the bytes.

use std::borrow::Cow;

use crate::decimal::decimal9;
use crate::identity;
use crate::json::{write_scanned_string, Kind, Scanner, SyntaxError, Value};

/// Limits of the event contract (DESIGN §4); all configurable.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_events: usize,
    pub max_future_ms: i64,
    pub max_age_ms: i64,
    pub max_id_len: usize,
    pub max_event_type_len: usize,
    pub max_property_value_len: usize,
    pub max_property_key_len: usize,
    pub max_properties: usize,
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_events: 1000,
            max_future_ms: 5 * 60 * 1000,
            max_age_ms: 30 * 24 * 3600 * 1000,
            max_id_len: 255,
            max_event_type_len: 100,
            max_property_value_len: 1000,
            max_property_key_len: 255,
            max_properties: 100,
            max_depth: 64,
        }
    }
}

/// Errors that reject the whole request. Each has a stable machine code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    InvalidUtf8 { offset: usize },
    InvalidJson(SyntaxError),
    NotAnObject(Kind),
    EventsMissing,
    EventsNotArray(Kind),
    DuplicateEvents,
    TooManyEvents { limit: usize },
    EmptyBatch,
}

impl EnvelopeError {
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::InvalidUtf8 { .. } => "invalid_utf8",
            EnvelopeError::InvalidJson(_) => "invalid_json",
            EnvelopeError::NotAnObject(_) => "body_not_object",
            EnvelopeError::EventsMissing => "events_missing",
            EnvelopeError::EventsNotArray(_) => "events_not_array",
            EnvelopeError::DuplicateEvents => "duplicate_field",
            EnvelopeError::TooManyEvents { .. } => "too_many_events",
            EnvelopeError::EmptyBatch => "empty_batch",
        }
    }

    pub fn message(&self) -> String {
        match self {
            EnvelopeError::InvalidUtf8 { offset } => {
                format!("The body is not valid UTF-8 (byte {offset}).")
            }
            EnvelopeError::InvalidJson(e) => {
                format!(
                    "The body is not valid JSON: {} at byte {}.",
                    e.what, e.offset
                )
            }
            EnvelopeError::NotAnObject(k) => {
                format!(
                    "The body must be a JSON object with an `events` array, not {}.",
                    k.name()
                )
            }
            EnvelopeError::EventsMissing => "The body has no `events` array.".to_string(),
            EnvelopeError::EventsNotArray(k) => {
                format!("`events` must be an array, not {}.", k.name())
            }
            EnvelopeError::DuplicateEvents => "The body has `events` twice.".to_string(),
            EnvelopeError::TooManyEvents { limit } => {
                format!("`events` holds more than {limit} events; the limit is {limit} per batch.")
            }
            EnvelopeError::EmptyBatch => "`events` is empty; send 1 or more events.".to_string(),
        }
    }
}

/// One invalid event: its index in the request, its transaction id when it
/// had a readable one, a stable reason code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub index: usize,
    pub transaction_id: Option<String>,
    pub reason: String,
    pub message: String,
}

/// The valid events of a batch, encoded; `*_offsets` have one more entry
/// than there are events, so event `i` spans `offsets[i]..offsets[i + 1]`.
#[derive(Debug, Default)]
pub struct Decoded {
    pub request_index: Vec<u32>,
    pub ids: String,
    pub id_offsets: Vec<u32>,
    pub rows: Vec<u8>,
    pub row_offsets: Vec<u32>,
    pub archive: Vec<u8>,
    pub archive_offsets: Vec<u32>,
    /// Per event: the idempotency key of (customer_id, transaction_id) and
    /// the fingerprint of its content (see `identity`).
    pub keys: Vec<u128>,
    pub fingerprints: Vec<u128>,
    pub failed: Vec<Failure>,
    pub in_batch_duplicates: usize,
    pub received: usize,
}

impl Decoded {
    pub fn len(&self) -> usize {
        self.request_index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.request_index.is_empty()
    }

    pub fn id(&self, i: usize) -> &str {
        &self.ids[self.id_offsets[i] as usize..self.id_offsets[i + 1] as usize]
    }
}

/// The (customer, transaction id) keys seen so far in a batch, for in-batch
/// repeats: an open-addressing table of indexes into `Decoded::keys`.
struct IdSet {
    slots: Vec<u32>,
}

impl IdSet {
    fn new() -> Self {
        IdSet {
            slots: vec![0; 2048],
        }
    }

    /// Inserts valid event `n` (its key already pushed to `d.keys`) unless an
    /// equal key is present; returns the event that holds it, if any.
    fn insert(&mut self, d: &Decoded, n: usize) -> Option<usize> {
        if (n + 1) * 2 > self.slots.len() {
            let grown = vec![0; self.slots.len() * 2];
            let old = std::mem::replace(&mut self.slots, grown);
            for j in old.into_iter().filter(|&j| j != 0) {
                let slot = self.find(d, (j - 1) as usize);
                self.slots[slot] = j;
            }
        }
        let slot = self.find(d, n);
        if self.slots[slot] != 0 {
            return Some((self.slots[slot] - 1) as usize);
        }
        self.slots[slot] = n as u32 + 1;
        None
    }

    /// The slot holding a key equal to event `n`'s, or the empty slot for it.
    fn find(&self, d: &Decoded, n: usize) -> usize {
        let key = d.keys[n];
        let mask = self.slots.len() - 1;
        // The key is a hash already: its low bits spread well.
        let mut slot = key as usize & mask;
        loop {
            let j = self.slots[slot];
            if j == 0 || d.keys[(j - 1) as usize] == key {
                return slot;
            }
            slot = (slot + 1) & mask;
        }
    }
}

const FIELDS: [&str; 5] = [
    "transaction_id",
    "customer_id",
    "event_type",
    "timestamp",
    "properties",
];

fn is_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Length in characters (code points), cheap when the byte length decides.
fn char_len_over(s: &str, max: usize) -> bool {
    s.len() > max && s.chars().count() > max
}

fn push_string_rb(out: &mut Vec<u8>, s: &[u8]) {
    push_varint(out, s.len() as u64);
    out.extend_from_slice(s);
}

fn push_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
}

/// Appends `s` to `text` and returns its span.
fn push_span(text: &mut String, s: &str) -> (u32, u32) {
    let a = text.len() as u32;
    text.push_str(s);
    (a, text.len() as u32)
}

fn fmt_duration(ms: i64) -> String {
    let s = ms / 1000;
    if s % 86400 == 0 && s >= 86400 {
        format!("{} days", s / 86400)
    } else if s % 3600 == 0 && s >= 3600 {
        format!("{} hours", s / 3600)
    } else if s % 60 == 0 && s >= 60 {
        format!("{} minutes", s / 60)
    } else {
        format!("{s} seconds")
    }
}

/// Per-event parse state: the fields as found, and the first problem.
struct EventFields<'a> {
    transaction_id: Option<Value<'a>>,
    customer_id: Option<Value<'a>>,
    event_type: Option<Value<'a>>,
    timestamp: Option<Value<'a>>,
    properties_seen: bool,
    problem: Option<(String, String)>,
}

impl<'a> EventFields<'a> {
    fn new() -> Self {
        EventFields {
            transaction_id: None,
            customer_id: None,
            event_type: None,
            timestamp: None,
            properties_seen: false,
            problem: None,
        }
    }

    fn fail(&mut self, reason: String, message: String) {
        if self.problem.is_none() {
            self.problem = Some((reason, message));
        }
    }
}

struct Decoder<'l> {
    limits: &'l Limits,
    allowed_customer: Option<&'l str>,
    now_ms: i64,
    props: Vec<u8>,
    /// Spans in `props` of the current event's property keys (for duplicates).
    keys: Vec<(u32, u32)>,
    /// The current event's properties as typed columns: every value as text
    /// (`str_*`), numbers also as exact Decimal128(9) (`num_*`).
    text: String,
    strs: Vec<((u32, u32), (u32, u32))>,
    nums: Vec<((u32, u32), i128)>,
    out: Decoded,
}

/// Decodes one batch. `now_ms` is the server's clock for the timestamp window.
pub fn decode(body: &[u8], now_ms: i64, limits: &Limits) -> Result<Decoded, EnvelopeError> {
    decode_for(body, now_ms, limits, None)
}

/// Decodes one batch for a key bound to one customer: events of any other
/// customer fail with `customer_not_allowed`.
pub fn decode_for(
    body: &[u8],
    now_ms: i64,
    limits: &Limits,
    allowed_customer: Option<&str>,
) -> Result<Decoded, EnvelopeError> {
    let text = std::str::from_utf8(body).map_err(|e| EnvelopeError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let mut sc = Scanner::new(text, limits.max_depth);
    let mut out = Decoded::default();
    // Outputs are about the size of the input; reserve once, not per event.
    let guess = body.len() / 150 + 1;
    out.rows.reserve(body.len());
    out.archive.reserve(body.len() + body.len() / 8);
    out.ids.reserve(guess * 24);
    for v in [
        &mut out.id_offsets,
        &mut out.row_offsets,
        &mut out.archive_offsets,
        &mut out.request_index,
    ] {
        v.reserve(guess + 1);
    }
    out.keys.reserve(guess);
    out.fingerprints.reserve(guess);
    let mut dec = Decoder {
        limits,
        allowed_customer,
        now_ms,
        props: Vec::with_capacity(256),
        keys: Vec::with_capacity(16),
        text: String::with_capacity(256),
        strs: Vec::with_capacity(16),
        nums: Vec::with_capacity(16),
        out,
    };
    let syntax = EnvelopeError::InvalidJson;
    match sc.peek() {
        Some(b'{') => {}
        None => {
            return Err(syntax(SyntaxError {
                offset: 0,
                what: "empty body",
            }))
        }
        Some(_) => {
            let v = sc.value().map_err(syntax)?;
            return Err(EnvelopeError::NotAnObject(v.kind()));
        }
    }
    sc.pos += 1;
    sc.enter().map_err(syntax)?;
    let mut seen_events = false;
    if !sc.empty_container(b'}') {
        loop {
            let k = sc.key().map_err(syntax)?;
            if k == "events" {
                if seen_events {
                    return Err(EnvelopeError::DuplicateEvents);
                }
                seen_events = true;
                if sc.peek() != Some(b'[') {
                    let v = sc.value().map_err(syntax)?;
                    return Err(EnvelopeError::EventsNotArray(v.kind()));
                }
                dec.events(&mut sc)?;
            } else {
                // Unknown top-level members are ignored, as JSON APIs do for envelopes.
                sc.value().map_err(syntax)?;
            }
            if !sc.next_member(b'}').map_err(syntax)? {
                break;
            }
        }
    }
    if !sc.at_end() {
        return Err(syntax(SyntaxError {
            offset: sc.pos,
            what: "trailing characters",
        }));
    }
    if !seen_events {
        return Err(EnvelopeError::EventsMissing);
    }
    if dec.out.received == 0 {
        return Err(EnvelopeError::EmptyBatch);
    }
    Ok(dec.out)
}

impl<'l> Decoder<'l> {
    fn events<'a>(&mut self, sc: &mut Scanner<'a>) -> Result<(), EnvelopeError> {
        let syntax = EnvelopeError::InvalidJson;
        sc.pos += 1;
        sc.enter().map_err(syntax)?;
        let o = &mut self.out;
        o.id_offsets.push(0);
        o.row_offsets.push(0);
        o.archive_offsets.push(0);
        if sc.empty_container(b']') {
            return Ok(());
        }
        let mut seen = IdSet::new();
        let mut index = 0usize;
        loop {
            if index >= self.limits.max_events {
                return Err(EnvelopeError::TooManyEvents {
                    limit: self.limits.max_events,
                });
            }
            self.event(sc, index, &mut seen)?;
            index += 1;
            self.out.received = index;
            if !sc.next_member(b']').map_err(syntax)? {
                return Ok(());
            }
        }
    }

    fn event<'a>(
        &mut self,
        sc: &mut Scanner<'a>,
        index: usize,
        seen: &mut IdSet,
    ) -> Result<(), EnvelopeError> {
        let syntax = EnvelopeError::InvalidJson;
        if sc.peek() != Some(b'{') {
            let v = sc.value().map_err(syntax)?;
            self.out.failed.push(Failure {
                index,
                transaction_id: None,
                reason: "wrong_type:event".into(),
                message: format!(
                    "events[{index}] is {}; each event must be an object.",
                    v.kind().name()
                ),
            });
            return Ok(());
        }
        sc.pos += 1;
        sc.enter().map_err(syntax)?;
        let mut f = EventFields::new();
        self.props.clear();
        self.keys.clear();
        self.text.clear();
        self.strs.clear();
        self.nums.clear();
        if !sc.empty_container(b'}') {
            loop {
                let k = sc.key().map_err(syntax)?;
                let slot = match k.as_ref() {
                    "transaction_id" => Some(&mut f.transaction_id),
                    "customer_id" => Some(&mut f.customer_id),
                    "event_type" => Some(&mut f.event_type),
                    "timestamp" => Some(&mut f.timestamp),
                    _ => None,
                };
                if let Some(slot) = slot {
                    let v = sc.value().map_err(syntax)?;
                    if slot.is_some() {
                        f.fail(
                            format!("duplicate_field:{k}"),
                            format!("events[{index}] has `{k}` twice."),
                        );
                    } else {
                        *slot = Some(v);
                    }
                } else if k == "properties" {
                    if f.properties_seen {
                        f.fail(
                            "duplicate_field:properties".into(),
                            format!("events[{index}] has `properties` twice."),
                        );
                        sc.value().map_err(syntax)?;
                    } else {
                        f.properties_seen = true;
                        self.properties(sc, index, &mut f)?;
                    }
                } else {
                    sc.value().map_err(syntax)?;
                    let shown: String = k.chars().take(64).collect();
                    f.fail(
                        format!("unknown_field:{shown}"),
                        format!(
                            "events[{index}] has an unknown field `{shown}`; the fields are {}.",
                            FIELDS.join(", ")
                        ),
                    );
                }
                if !sc.next_member(b'}').map_err(syntax)? {
                    break;
                }
            }
        }
        self.finish_event(index, f, seen);
        Ok(())
    }

    /// Parses `properties`, writing it as canonical compact JSON into
    /// `self.props`; numbers keep their exact text.
    fn properties<'a>(
        &mut self,
        sc: &mut Scanner<'a>,
        index: usize,
        f: &mut EventFields<'a>,
    ) -> Result<(), EnvelopeError> {
        let syntax = EnvelopeError::InvalidJson;
        if sc.peek() != Some(b'{') {
            let v = sc.value().map_err(syntax)?;
            f.fail(
                "wrong_type:properties".into(),
                format!(
                    "events[{index}].properties is {}; it must be an object.",
                    v.kind().name()
                ),
            );
            return Ok(());
        }
        sc.pos += 1;
        sc.enter().map_err(syntax)?;
        self.props.push(b'{');
        if sc.empty_container(b'}') {
            self.props.push(b'}');
            return Ok(());
        }
        self.keys.clear();
        loop {
            let k = sc.key().map_err(syntax)?;
            let v = sc.value().map_err(syntax)?;
            if f.problem.is_none() {
                self.property(index, &k, &v, f);
            }
            if !sc.next_member(b'}').map_err(syntax)? {
                break;
            }
        }
        self.props.push(b'}');
        Ok(())
    }

    /// Checks one property and appends it to `self.props`.
    // The Cow's variant matters: a borrowed key needs no escaping.
    #[allow(clippy::ptr_arg)]
    fn property(&mut self, index: usize, k: &Cow<'_, str>, v: &Value<'_>, f: &mut EventFields<'_>) {
        let lim = self.limits;
        let shown = || k.chars().take(64).collect::<String>();
        if k.is_empty() || char_len_over(k, lim.max_property_key_len) {
            return f.fail(
                "invalid_property_key".into(),
                format!(
                    "events[{index}].properties has a key of {} characters; keys must be 1 to {} characters.",
                    k.chars().count(),
                    lim.max_property_key_len
                ),
            );
        }
        if self.keys.len() >= lim.max_properties {
            return f.fail(
                "too_many_properties".into(),
                format!(
                    "events[{index}].properties has more than {} entries; the limit is {}.",
                    lim.max_properties, lim.max_properties
                ),
            );
        }
        let mark = self.props.len();
        if !self.keys.is_empty() {
            self.props.push(b',');
        }
        let k0 = self.props.len();
        write_scanned_string(&mut self.props, k);
        let key = &self.props[k0..];
        if self
            .keys
            .iter()
            .any(|&(a, b)| &self.props[a as usize..b as usize] == key)
        {
            self.props.truncate(mark);
            let name = shown();
            return f.fail(
                format!("duplicate_field:properties.{name}"),
                format!("events[{index}].properties has `{name}` twice."),
            );
        }
        self.keys.push((k0 as u32, self.props.len() as u32));
        self.props.push(b':');
        let key = push_span(&mut self.text, k);
        match v {
            Value::Str(s) => {
                let val = push_span(&mut self.text, s);
                self.strs.push((key, val));
                if char_len_over(s, lim.max_property_value_len) {
                    f.fail(
                        "property_value_too_long".into(),
                        format!(
                            "events[{index}].properties.{} is {} characters long; the limit is {}.",
                            shown(),
                            s.chars().count(),
                            lim.max_property_value_len
                        ),
                    );
                }
                write_scanned_string(&mut self.props, s);
            }
            Value::Num(t, _) => {
                self.props.extend_from_slice(t.as_bytes());
                let val = push_span(&mut self.text, t);
                self.strs.push((key, val));
                match decimal9(t) {
                    Some(d) => self.nums.push((key, d)),
                    None => {
                        let name = shown();
                        f.fail(
                            "property_out_of_range".into(),
                            format!(
                                "events[{index}].properties.{name} is {t}; numbers must be smaller than 1e24 in magnitude once rounded to 9 decimals."
                            ),
                        )
                    }
                }
            }
            Value::Bool(b) => {
                let word = if *b { "true" } else { "false" };
                self.props.extend_from_slice(word.as_bytes());
                let val = push_span(&mut self.text, word);
                self.strs.push((key, val));
            }
            Value::Null | Value::Container(_) => {
                let name = shown();
                f.fail(
                    format!("wrong_type:properties.{name}"),
                    format!(
                        "events[{index}].properties.{name} is {}; property values must be strings, numbers or booleans.",
                        v.kind().name()
                    ),
                )
            }
        }
    }

    fn finish_event(&mut self, index: usize, mut f: EventFields<'_>, seen: &mut IdSet) {
        let ts_text = match &f.timestamp {
            Some(Value::Num(t, true)) => *t,
            _ => "",
        };
        let lim = self.limits;
        let check_id = |f: &mut EventFields<'_>, name: &str, v: &Option<Value<'_>>, max: usize| {
            match v {
                None => f.fail(
                    format!("missing_field:{name}"),
                    format!("events[{index}] has no `{name}`."),
                ),
                Some(Value::Str(s)) => {
                    if !is_id(s, max) {
                        f.fail(
                            format!("invalid_{name}"),
                            format!(
                                "events[{index}].{name} must be 1 to {max} characters of A-Z, a-z, 0-9, '_' or '-'."
                            ),
                        );
                    }
                }
                Some(v) => f.fail(
                    format!("wrong_type:{name}"),
                    format!(
                        "events[{index}].{name} is {}; it must be a string.",
                        v.kind().name()
                    ),
                ),
            }
        };
        let tv = f.transaction_id.take();
        check_id(&mut f, "transaction_id", &tv, lim.max_id_len);
        f.transaction_id = tv;
        let cv = f.customer_id.take();
        check_id(&mut f, "customer_id", &cv, lim.max_id_len);
        f.customer_id = cv;
        if let (Some(allowed), Some(Value::Str(c))) = (self.allowed_customer, &f.customer_id) {
            if c != allowed && is_id(c, lim.max_id_len) {
                f.fail(
                    "customer_not_allowed".into(),
                    format!(
                        "events[{index}].customer_id is not the customer this API key is bound to."
                    ),
                );
            }
        }
        match &f.event_type {
            None => f.fail(
                "missing_field:event_type".into(),
                format!("events[{index}] has no `event_type`."),
            ),
            Some(Value::Str(s)) => {
                if s.is_empty() || char_len_over(s, lim.max_event_type_len) {
                    f.fail(
                        "invalid_event_type".into(),
                        format!(
                            "events[{index}].event_type must be 1 to {} characters.",
                            lim.max_event_type_len
                        ),
                    );
                }
            }
            Some(v) => {
                let m = format!(
                    "events[{index}].event_type is {}; it must be a string.",
                    v.kind().name()
                );
                f.fail("wrong_type:event_type".into(), m);
            }
        }
        let mut ts = 0i64;
        match &f.timestamp {
            None => f.fail(
                "missing_field:timestamp".into(),
                format!("events[{index}] has no `timestamp`."),
            ),
            Some(Value::Num(t, true)) => match t.parse::<i64>() {
                Ok(v) => {
                    ts = v;
                    if v > self.now_ms.saturating_add(lim.max_future_ms) {
                        f.fail(
                            "timestamp_in_future".into(),
                            format!(
                                "events[{index}].timestamp is {} in the future; the limit is {}.",
                                fmt_duration(v.saturating_sub(self.now_ms)),
                                fmt_duration(lim.max_future_ms)
                            ),
                        );
                    } else if v < self.now_ms.saturating_sub(lim.max_age_ms) || v < 0 {
                        f.fail(
                            "timestamp_too_old".into(),
                            format!(
                                "events[{index}].timestamp is {} old; the limit is {}.",
                                fmt_duration(self.now_ms.saturating_sub(v)),
                                fmt_duration(lim.max_age_ms)
                            ),
                        );
                    }
                }
                Err(_) => f.fail(
                    "invalid_timestamp".into(),
                    format!("events[{index}].timestamp is out of range for epoch milliseconds."),
                ),
            },
            Some(v) => {
                f.fail(
                    "wrong_type:timestamp".into(),
                    format!(
                    "events[{index}].timestamp is {}; it must be an integer of epoch milliseconds.",
                    if matches!(v, Value::Num(..)) { "not an integer" } else { v.kind().name() }
                ),
                )
            }
        }
        if let Some((reason, message)) = f.problem.take() {
            // The id is reported with a failure whenever it is a readable string.
            let transaction_id = match &f.transaction_id {
                Some(Value::Str(s)) => Some(s.chars().take(lim.max_id_len).collect()),
                _ => None,
            };
            self.out.failed.push(Failure {
                index,
                transaction_id,
                reason,
                message,
            });
            return;
        }
        let (Some(Value::Str(tid)), Some(Value::Str(cid)), Some(Value::Str(et))) =
            (&f.transaction_id, &f.customer_id, &f.event_type)
        else {
            unreachable!("validated above");
        };
        if !f.properties_seen {
            self.props.extend_from_slice(b"{}");
        }
        let fingerprint = {
            let props = &self.props;
            let ends = self.keys.iter().skip(1).map(|&(k0, _)| k0 as usize - 1);
            let ends = ends.chain(std::iter::once(props.len() - 1));
            let pairs = self
                .keys
                .iter()
                .zip(ends)
                .map(|(&(k0, _), end)| &props[k0 as usize..end]);
            identity::fingerprint(et, ts, pairs)
        };
        let o = &mut self.out;
        o.keys.push(identity::pair_key(cid, tid));
        if let Some(j) = seen.insert(o, o.request_index.len()) {
            o.keys.pop();
            let differs = identity::differing(o.fingerprints[j], fingerprint);
            if differs == 0 {
                o.in_batch_duplicates += 1;
            } else {
                o.failed.push(Failure {
                    index,
                    transaction_id: Some(tid.to_string()),
                    reason: "idempotency_conflict".into(),
                    message: format!(
                        "events[{index}] has the customer_id and transaction_id of events[{}] but differs from it in: {}.",
                        o.request_index[j],
                        identity::field_names(differs)
                    ),
                });
            }
            return;
        }
        o.fingerprints.push(fingerprint);
        o.ids.push_str(tid);
        o.id_offsets.push(o.ids.len() as u32);
        o.request_index.push(index as u32);
        // Storage row: transaction_id, customer_id, event_type, timestamp_ms Int64,
        // ts DateTime (seconds), properties String (canonical JSON).
        push_string_rb(&mut o.rows, tid.as_bytes());
        push_string_rb(&mut o.rows, cid.as_bytes());
        push_string_rb(&mut o.rows, et.as_bytes());
        o.rows.extend_from_slice(&ts.to_le_bytes());
        o.rows.extend_from_slice(
            &((ts.div_euclid(1000)).clamp(0, u32::MAX as i64) as u32).to_le_bytes(),
        );
        push_string_rb(&mut o.rows, &self.props);
        // num_keys Array(String), num_values Array(Decimal128(9)),
        // str_keys Array(String), str_values Array(String).
        let text = self.text.as_bytes();
        let span = |(a, b): (u32, u32)| &text[a as usize..b as usize];
        push_varint(&mut o.rows, self.nums.len() as u64);
        for &(k, _) in &self.nums {
            push_string_rb(&mut o.rows, span(k));
        }
        push_varint(&mut o.rows, self.nums.len() as u64);
        for &(_, d) in &self.nums {
            o.rows.extend_from_slice(&d.to_le_bytes());
        }
        push_varint(&mut o.rows, self.strs.len() as u64);
        for &(k, _) in &self.strs {
            push_string_rb(&mut o.rows, span(k));
        }
        push_varint(&mut o.rows, self.strs.len() as u64);
        for &(_, v) in &self.strs {
            push_string_rb(&mut o.rows, span(v));
        }
        o.row_offsets.push(o.rows.len() as u32);
        // Archive line: the event as accepted, canonical JSON.
        o.archive.extend_from_slice(b"{\"transaction_id\":\"");
        o.archive.extend_from_slice(tid.as_bytes());
        o.archive.extend_from_slice(b"\",\"customer_id\":\"");
        o.archive.extend_from_slice(cid.as_bytes());
        o.archive.extend_from_slice(b"\",\"event_type\":");
        write_scanned_string(&mut o.archive, et);
        o.archive.extend_from_slice(b",\"timestamp\":");
        // The integer's text as sent: the grammar allows no leading zeros or '+'.
        o.archive.extend_from_slice(ts_text.as_bytes());
        o.archive.extend_from_slice(b",\"properties\":");
        o.archive.extend_from_slice(&self.props);
        o.archive.extend_from_slice(b"}\n");
        o.archive_offsets.push(o.archive.len() as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn ev(fields: &str) -> String {
        format!("{{\"events\":[{fields}]}}")
    }

    fn good(id: &str) -> String {
        format!(
            r#"{{"transaction_id":"{id}","customer_id":"cust_123","event_type":"api_request","timestamp":{NOW},"properties":{{"bytes":2048,"endpoint":"/v1/x","ok":true}}}}"#
        )
    }

    fn one_failure(body: &str) -> String {
        let d = decode(body.as_bytes(), NOW, &Limits::default()).unwrap();
        assert_eq!(d.len(), 0, "expected a failure for {body}");
        assert_eq!(d.failed.len(), 1);
        d.failed[0].reason.clone()
    }

    #[test]
    fn valid_event_is_encoded_for_storage_and_archive() {
        let d = decode(ev(&good("tx_1")).as_bytes(), NOW, &Limits::default()).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d.id(0), "tx_1");
        let line = std::str::from_utf8(&d.archive).unwrap();
        assert_eq!(
            line,
            format!("{{\"transaction_id\":\"tx_1\",\"customer_id\":\"cust_123\",\"event_type\":\"api_request\",\"timestamp\":{NOW},\"properties\":{{\"bytes\":2048,\"endpoint\":\"/v1/x\",\"ok\":true}}}}\n")
        );
        // RowBinary: 3 strings, Int64, UInt32, string.
        assert_eq!(d.rows[0], 4);
        assert_eq!(&d.rows[1..5], b"tx_1");
    }

    #[test]
    fn each_rule_is_enforced() {
        let cases = [
            (
                r#"{"customer_id":"c","event_type":"e","timestamp":1700000000000}"#,
                "missing_field:transaction_id",
            ),
            (
                r#"{"transaction_id":"a b","customer_id":"c","event_type":"e","timestamp":1700000000000}"#,
                "invalid_transaction_id",
            ),
            (
                r#"{"transaction_id":5,"customer_id":"c","event_type":"e","timestamp":1700000000000}"#,
                "wrong_type:transaction_id",
            ),
            (
                r#"{"transaction_id":"t","event_type":"e","timestamp":1700000000000}"#,
                "missing_field:customer_id",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"","event_type":"e","timestamp":1700000000000}"#,
                "invalid_customer_id",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"","timestamp":1700000000000}"#,
                "invalid_event_type",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","timestamp":1700000000000}"#,
                "missing_field:event_type",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e"}"#,
                "missing_field:timestamp",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":"1700000000000"}"#,
                "wrong_type:timestamp",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":1700000000000.0}"#,
                "wrong_type:timestamp",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":99999999999999999999}"#,
                "invalid_timestamp",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":1700000301000}"#,
                "timestamp_in_future",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":1697400000000}"#,
                "timestamp_too_old",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":1700000000000,"properties":[]}"#,
                "wrong_type:properties",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":1700000000000,"properties":{"a":null}}"#,
                "wrong_type:properties.a",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":1700000000000,"properties":{"a":{"b":1}}}"#,
                "wrong_type:properties.a",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":1700000000000,"properties":{"a":1,"a":2}}"#,
                "duplicate_field:properties.a",
            ),
            (
                r#"{"transaction_id":"t","transaction_id":"u","customer_id":"c","event_type":"e","timestamp":1700000000000}"#,
                "duplicate_field:transaction_id",
            ),
            (
                r#"{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":1700000000000,"extra":1}"#,
                "unknown_field:extra",
            ),
            (r#""not an object""#, "wrong_type:event"),
        ];
        for (event, reason) in cases {
            assert_eq!(one_failure(&ev(event)), reason, "{event}");
        }
        let long = "x".repeat(1001);
        let body = ev(&format!(
            r#"{{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":{NOW},"properties":{{"s":"{long}"}}}}"#
        ));
        assert_eq!(one_failure(&body), "property_value_too_long");
        // 1000 characters of 2 bytes each is within the limit.
        let wide = "é".repeat(1000);
        let body = ev(&format!(
            r#"{{"transaction_id":"t","customer_id":"c","event_type":"e","timestamp":{NOW},"properties":{{"s":"{wide}"}}}}"#
        ));
        assert_eq!(
            decode(body.as_bytes(), NOW, &Limits::default())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn failure_keeps_index_and_transaction_id() {
        let body = ev(&format!(
            r#"{},{{"transaction_id":"bad_ts","customer_id":"c","event_type":"e","timestamp":"x"}}"#,
            good("ok")
        ));
        let d = decode(body.as_bytes(), NOW, &Limits::default()).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d.failed[0].index, 1);
        assert_eq!(d.failed[0].transaction_id.as_deref(), Some("bad_ts"));
        assert!(d.failed[0].message.contains("events[1].timestamp"));
    }

    /// Near-valid batches through the whole decoder in a debug build
    /// (overflow checks on): numbers around every limit and byte-level
    /// mutations of a valid batch. Every input is answered, never a panic,
    /// and every event is accounted for.
    #[test]
    fn near_valid_batches_never_panic() {
        use crate::decimal::tests::{near_valid_number, Rng};
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let limits = Limits::default();
        let base = ev(&[good("a"), good("b")].join(","));
        for round in 0..20_000 {
            let n = near_valid_number(&mut rng);
            let body = if round % 2 == 0 {
                ev(&good("a").replace("2048", &n))
            } else {
                let mut b = base.clone().into_bytes();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len() as u64) as usize;
                    match rng.below(3) {
                        0 => {
                            let alphabet = b"0123456789eE.-+\"{}[],:";
                            b[at] = alphabet[rng.below(alphabet.len() as u64) as usize];
                        }
                        1 => drop(b.remove(at)),
                        _ => b.splice(at..at, n.bytes()).for_each(drop),
                    }
                }
                String::from_utf8_lossy(&b).into_owned()
            };
            let Ok(d) = decode(body.as_bytes(), NOW, &limits) else {
                continue;
            };
            assert_eq!(
                d.len() + d.failed.len() + d.in_batch_duplicates,
                d.received,
                "{body}"
            );
            if round % 2 == 0 {
                let ok = decimal9(&n).is_some();
                assert_eq!(d.len() == 1, ok, "{n}");
                if !ok {
                    assert_eq!(d.failed[0].reason, "property_out_of_range", "{n}");
                }
            }
        }
    }

    #[test]
    fn bound_customer_rejects_other_customers() {
        let other = good("b").replace("cust_123", "cust_999");
        let body = ev(&[good("a"), other].join(","));
        let d = decode_for(body.as_bytes(), NOW, &Limits::default(), Some("cust_123")).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d.failed[0].reason, "customer_not_allowed");
        assert_eq!(d.failed[0].index, 1);
    }

    #[test]
    fn repeated_id_in_batch_is_a_duplicate() {
        let body = ev(&[good("a"), good("b"), good("a")].join(","));
        let d = decode(body.as_bytes(), NOW, &Limits::default()).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.in_batch_duplicates, 1);
        assert!(d.failed.is_empty());
    }

    #[test]
    fn same_id_for_two_customers_is_two_events() {
        let other = good("a").replace("cust_123", "cust_456");
        let d = decode(
            ev(&[good("a"), other].join(",")).as_bytes(),
            NOW,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!((d.len(), d.in_batch_duplicates), (2, 0));
        assert_ne!(d.keys[0], d.keys[1]);
        assert_eq!(d.fingerprints[0], d.fingerprints[1]);
    }

    #[test]
    fn repeated_key_with_other_content_is_a_conflict() {
        let moved = good("a").replace(&NOW.to_string(), &(NOW - 1).to_string());
        let reordered = good("a").replace(
            r#"{"bytes":2048,"endpoint":"/v1/x","ok":true}"#,
            r#"{"ok":true,"bytes":2048,"endpoint":"/v1/x"}"#,
        );
        let retyped = good("a")
            .replace("api_request", "api_call")
            .replace("2048", "2049");
        let body = ev(&[good("a"), moved, reordered, retyped].join(","));
        let d = decode(body.as_bytes(), NOW, &Limits::default()).unwrap();
        // The same properties in another order are the same content.
        assert_eq!((d.len(), d.in_batch_duplicates), (1, 1));
        let got: Vec<_> = d
            .failed
            .iter()
            .map(|f| (f.index, f.reason.as_str(), f.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "idempotency_conflict", "events[1] has the customer_id and transaction_id of events[0] but differs from it in: timestamp."),
                (3, "idempotency_conflict", "events[3] has the customer_id and transaction_id of events[0] but differs from it in: event_type, properties."),
            ]
        );
        assert_eq!(d.failed[0].transaction_id.as_deref(), Some("a"));
    }

    #[test]
    fn envelope_errors() {
        let l = Limits::default();
        let code = |b: &[u8]| decode(b, NOW, &l).unwrap_err().code();
        assert_eq!(code(b"not json"), "invalid_json");
        assert_eq!(code(b"\xff\xfe"), "invalid_utf8");
        assert_eq!(code(b"[]"), "body_not_object");
        assert_eq!(code(b"{}"), "events_missing");
        assert_eq!(code(br#"{"events":{}}"#), "events_not_array");
        assert_eq!(code(br#"{"events":[]}"#), "empty_batch");
        assert_eq!(code(br#"{"events":[],"events":[]}"#), "duplicate_field");
        assert_eq!(code(b""), "invalid_json");
        assert_eq!(code(br#"{"events":[1]} x"#), "invalid_json");
        let many = ev(&vec![good("a"); 1001].join(","));
        assert_eq!(code(many.as_bytes()), "too_many_events");
        let small = Limits {
            max_events: 2,
            ..Limits::default()
        };
        let three = ev(&[good("a"), good("b"), good("c")].join(","));
        assert_eq!(
            decode(three.as_bytes(), NOW, &small).unwrap_err().code(),
            "too_many_events"
        );
    }

    #[test]
    fn escaped_values_are_canonicalised() {
        let body = ev(&format!(
            r#"{{"transaction_id":"t\u0031","customer_id":"c","event_type":"e\"q","timestamp":{NOW},"properties":{{"k\u00e9":"a\/b","n":-1.5e3}}}}"#
        ));
        let d = decode(body.as_bytes(), NOW, &Limits::default()).unwrap();
        assert_eq!(d.id(0), "t1");
        let s = String::from_utf8(d.archive.clone()).unwrap();
        assert!(s.contains(r#""event_type":"e\"q""#), "{s}");
        assert!(s.contains(r#""properties":{"ké":"a/b","n":-1.5e3}"#), "{s}");
    }
}
