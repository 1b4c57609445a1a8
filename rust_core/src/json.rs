//! A zero-copy JSON scanner: just enough of RFC 8259 to walk a batch once.
//!
//! The decoder drives it token by token, so a batch is parsed, validated and
//! encoded in one pass without building a tree. Strings borrow from the input
//! unless they hold escapes. The input must already be valid UTF-8.

use std::borrow::Cow;

/// A syntax error: what was wrong and the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub offset: usize,
    pub what: &'static str,
}

pub type Result<T> = std::result::Result<T, SyntaxError>;

/// The kind of a JSON value, for type errors that name what was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    Number,
    Bool,
    Null,
    Object,
    Array,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::String => "a string",
            Kind::Number => "a number",
            Kind::Bool => "a boolean",
            Kind::Null => "null",
            Kind::Object => "an object",
            Kind::Array => "an array",
        }
    }
}

/// A scalar value as found in the input; containers are skipped and only
/// their kind is kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Str(Cow<'a, str>),
    /// The number's text exactly as written, and whether it is an integer
    /// (no fraction, no exponent).
    Num(&'a str, bool),
    Bool(bool),
    Null,
    Container(Kind),
}

impl Value<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Value::Str(_) => Kind::String,
            Value::Num(..) => Kind::Number,
            Value::Bool(_) => Kind::Bool,
            Value::Null => Kind::Null,
            Value::Container(k) => *k,
        }
    }
}

/// Index of the first byte at or after `i` that ends a plain run of string
/// bytes (`"`, `\\` or a control character), or `b.len()`. Checks 8 bytes per
/// step (SWAR): short strings are the common case, where memchr's setup costs
/// more than the scan.
#[inline]
fn find_special(b: &[u8], mut i: usize) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    while i + 8 <= b.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        let w = u64::from_le_bytes(w);
        let q = w ^ (LO * u64::from(b'"'));
        let s = w ^ (LO * u64::from(b'\\'));
        // The lowest flagged byte is always a true match (borrows run upwards).
        let m =
            (q.wrapping_sub(LO) & !q | s.wrapping_sub(LO) & !s | w.wrapping_sub(LO * 0x20) & !w)
                & HI;
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\\' || c < 0x20 {
            return i;
        }
        i += 1;
    }
    b.len()
}

pub struct Scanner<'a> {
    buf: &'a [u8],
    text: &'a str,
    pub pos: usize,
    depth: usize,
    max_depth: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str, max_depth: usize) -> Self {
        Scanner {
            buf: text.as_bytes(),
            text,
            pos: 0,
            depth: 0,
            max_depth,
        }
    }

    #[inline]
    fn err<T>(&self, what: &'static str) -> Result<T> {
        Err(SyntaxError {
            offset: self.pos,
            what,
        })
    }

    #[inline]
    pub fn skip_ws(&mut self) {
        while let Some(&b) = self.buf.get(self.pos) {
            if b == b' ' || b == b'\n' || b == b'\r' || b == b'\t' {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// The next non-whitespace byte, not consumed.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.buf.get(self.pos).copied()
    }

    pub fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    #[inline]
    pub fn expect(&mut self, b: u8, what: &'static str) -> Result<()> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            self.err(what)
        }
    }

    /// Enters an object or array (the opening byte already consumed).
    #[inline]
    pub fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return self.err("nesting is deeper than the limit");
        }
        Ok(())
    }

    #[inline]
    pub fn leave(&mut self) {
        self.depth -= 1;
    }

    /// After an element of an object or array: true if another follows,
    /// false if the container closed (its closing byte consumed).
    #[inline]
    pub fn next_member(&mut self, close: u8) -> Result<bool> {
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok(true)
            }
            Some(b) if b == close => {
                self.pos += 1;
                self.leave();
                Ok(false)
            }
            _ => self.err(if close == b'}' {
                "expected ',' or '}'"
            } else {
                "expected ',' or ']'"
            }),
        }
    }

    /// Right after '{' or '[': true if the container is empty (and closed).
    #[inline]
    pub fn empty_container(&mut self, close: u8) -> bool {
        if self.peek() == Some(close) {
            self.pos += 1;
            self.leave();
            true
        } else {
            false
        }
    }

    /// Reads an object key and the ':' after it.
    #[inline]
    pub fn key(&mut self) -> Result<Cow<'a, str>> {
        if self.peek() != Some(b'"') {
            return self.err("expected a string key");
        }
        let k = self.string()?;
        self.expect(b':', "expected ':'")?;
        Ok(k)
    }

    /// Reads a string; the scanner is at its opening quote.
    pub fn string(&mut self) -> Result<Cow<'a, str>> {
        debug_assert_eq!(self.buf[self.pos], b'"');
        let start = self.pos + 1;
        let end = find_special(self.buf, start);
        match self.buf.get(end) {
            None => {
                self.pos = end;
                return self.err("unterminated string");
            }
            Some(b'"') => {
                self.pos = end + 1;
                return Ok(Cow::Borrowed(&self.text[start..end]));
            }
            Some(b'\\') => {}
            Some(_) => {
                self.pos = end;
                return self.err("control character in string");
            }
        }
        // Slow path: the string holds escapes.
        let mut out = String::with_capacity(end - start + 16);
        out.push_str(&self.text[start..end]);
        self.pos = end;
        loop {
            let b = match self.buf.get(self.pos) {
                Some(&b) => b,
                None => return self.err("unterminated string"),
            };
            match b {
                b'"' => {
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                b'\\' => {
                    self.pos += 1;
                    let e = match self.buf.get(self.pos) {
                        Some(&e) => e,
                        None => return self.err("unterminated string"),
                    };
                    self.pos += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let c = self.unicode_escape()?;
                            out.push(c);
                        }
                        _ => {
                            self.pos -= 1;
                            return self.err("invalid escape in string");
                        }
                    }
                }
                0..=0x1f => return self.err("control character in string"),
                _ => {
                    let n = find_special(self.buf, self.pos);
                    out.push_str(&self.text[self.pos..n]);
                    self.pos = n;
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32> {
        let Some(h) = self.buf.get(self.pos..self.pos + 4) else {
            return self.err("truncated \\u escape");
        };
        let mut v = 0u32;
        for &c in h {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return self.err("invalid \\u escape"),
            };
            v = v * 16 + u32::from(d);
        }
        self.pos += 4;
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char> {
        let hi = self.hex4()?;
        if (0xDC00..0xE000).contains(&hi) {
            return self.err("lone surrogate in \\u escape");
        }
        if (0xD800..0xDC00).contains(&hi) {
            if self.buf.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return self.err("lone surrogate in \\u escape");
            }
            self.pos += 2;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return self.err("lone surrogate in \\u escape");
            }
            let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
            return char::from_u32(c).map_or_else(|| self.err("invalid \\u escape"), Ok);
        }
        char::from_u32(hi).map_or_else(|| self.err("invalid \\u escape"), Ok)
    }

    /// Reads a number; returns its text and whether it is an integer.
    pub fn number(&mut self) -> Result<(&'a str, bool)> {
        let start = self.pos;
        let b = self.buf;
        let mut p = self.pos;
        if b.get(p) == Some(&b'-') {
            p += 1;
        }
        match b.get(p) {
            Some(b'0') => p += 1,
            Some(b'1'..=b'9') => {
                while matches!(b.get(p), Some(b'0'..=b'9')) {
                    p += 1;
                }
            }
            _ => {
                self.pos = p;
                return self.err("invalid number");
            }
        }
        let mut integer = true;
        if b.get(p) == Some(&b'.') {
            integer = false;
            p += 1;
            if !matches!(b.get(p), Some(b'0'..=b'9')) {
                self.pos = p;
                return self.err("invalid number");
            }
            while matches!(b.get(p), Some(b'0'..=b'9')) {
                p += 1;
            }
        }
        if matches!(b.get(p), Some(b'e' | b'E')) {
            integer = false;
            p += 1;
            if matches!(b.get(p), Some(b'+' | b'-')) {
                p += 1;
            }
            if !matches!(b.get(p), Some(b'0'..=b'9')) {
                self.pos = p;
                return self.err("invalid number");
            }
            while matches!(b.get(p), Some(b'0'..=b'9')) {
                p += 1;
            }
        }
        self.pos = p;
        Ok((&self.text[start..p], integer))
    }

    fn literal(&mut self, word: &'static [u8], v: Value<'a>) -> Result<Value<'a>> {
        if self.buf.get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(v)
        } else {
            self.err("invalid literal")
        }
    }

    /// Reads any value; objects and arrays are checked and skipped.
    pub fn value(&mut self) -> Result<Value<'a>> {
        match self.peek() {
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b'-' | b'0'..=b'9') => {
                let (t, i) = self.number()?;
                Ok(Value::Num(t, i))
            }
            Some(b't') => self.literal(b"true", Value::Bool(true)),
            Some(b'f') => self.literal(b"false", Value::Bool(false)),
            Some(b'n') => self.literal(b"null", Value::Null),
            Some(b'{') => {
                self.skip_container()?;
                Ok(Value::Container(Kind::Object))
            }
            Some(b'[') => {
                self.skip_container()?;
                Ok(Value::Container(Kind::Array))
            }
            Some(_) => self.err("expected a value"),
            None => self.err("unexpected end of input"),
        }
    }

    /// Skips an object or array, checking its syntax.
    fn skip_container(&mut self) -> Result<()> {
        let open = self.buf[self.pos];
        let close = if open == b'{' { b'}' } else { b']' };
        self.pos += 1;
        self.enter()?;
        if self.empty_container(close) {
            return Ok(());
        }
        loop {
            if open == b'{' {
                self.key()?;
            }
            self.value()?;
            if !self.next_member(close)? {
                return Ok(());
            }
        }
    }
}

/// Appends a string the scanner returned as a JSON literal. A borrowed
/// string came from the input without escapes, so it holds nothing that
/// needs one and is copied as it is.
#[inline]
#[allow(clippy::ptr_arg)] // the variant is the information: Borrowed means no escapes
pub fn write_scanned_string(out: &mut Vec<u8>, s: &Cow<'_, str>) {
    match s {
        Cow::Borrowed(b) => {
            out.reserve(b.len() + 2);
            out.push(b'"');
            out.extend_from_slice(b.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(o) => write_json_string(out, o),
    }
}

/// Appends `s` as a JSON string literal (quotes included), escaping only
/// what JSON requires.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(s: &str) -> Result<Value<'_>> {
        let mut sc = Scanner::new(s, 64);
        let v = sc.value()?;
        if !sc.at_end() {
            return Err(SyntaxError {
                offset: sc.pos,
                what: "trailing",
            });
        }
        Ok(v)
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        assert!(matches!(
            val("\"abc\"").unwrap(),
            Value::Str(Cow::Borrowed("abc"))
        ));
        assert_eq!(
            val(r#""a\nb\u00e9\"""#).unwrap(),
            Value::Str(Cow::Owned("a\nbé\"".into()))
        );
        assert_eq!(
            val(r#""\ud83d\ude00""#).unwrap(),
            Value::Str(Cow::Owned("😀".into()))
        );
    }

    #[test]
    fn lone_surrogates_and_bad_escapes_are_errors() {
        assert!(val(r#""\ud800""#).is_err());
        assert!(val(r#""\udc00x""#).is_err());
        assert!(val(r#""\ud800\u0041""#).is_err());
        assert!(val(r#""\x""#).is_err());
        assert!(val("\"a\u{1}b\"").is_err());
        assert!(val("\"abc").is_err());
    }

    #[test]
    fn find_special_finds_the_first_special_byte() {
        for (s, want) in [
            ("abcdefghijklmnop\"", 16),
            ("abc\"defghijklmnop\\", 3),
            ("abcdefgh\\ij", 8),
            ("abcdefg\u{1f}hij", 7),
            ("ééééé\"", 10),
            ("\u{1}\"", 0),
            ("plain", 5),
        ] {
            assert_eq!(find_special(s.as_bytes(), 0), want, "{s:?}");
        }
    }

    #[test]
    fn numbers_follow_the_grammar() {
        assert_eq!(val("-12").unwrap(), Value::Num("-12", true));
        assert_eq!(val("1.5e3").unwrap(), Value::Num("1.5e3", false));
        for bad in ["01", "1.", "-", ".5", "1e", "NaN", "Infinity", "+1"] {
            assert!(val(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn containers_are_skipped_with_depth_limit() {
        assert_eq!(
            val(r#"{"a":[1,{"b":null}],"c":{}}"#).unwrap(),
            Value::Container(Kind::Object)
        );
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(val(&deep).is_err());
        assert!(val("[1,]").is_err());
        assert!(val("{\"a\" 1}").is_err());
    }

    #[test]
    fn write_json_string_escapes_what_json_requires() {
        let mut out = Vec::new();
        write_json_string(&mut out, "a\"b\\c\n\u{1}é");
        assert_eq!(String::from_utf8(out).unwrap(), r#""a\"b\\c\n\u0001é""#);
    }
}
