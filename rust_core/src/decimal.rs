//! Numbers of the event contract: a JSON number's text to an exact
//! Decimal128(9), rounded half to even, under 1e24 in magnitude.

/// Numeric properties must be smaller than 10^24 in magnitude once rounded
/// to nine decimals: at most 33 of Decimal128(9)'s 38 digits, so a value always
/// fits the column (sums are split in queries, see `metering/usage.py`).
const MAX_SCALED_DIGITS: i64 = 24 + 9;
/// 10^24 scaled by 10^9: the first scaled value out of range.
const SCALED_LIMIT: i128 = 10i128.pow(33);

/// A JSON number's exact value times 10^9 (Decimal128(9)), rounded half to
/// even past nine decimals; None when the rounded magnitude is 1e24 or more
/// (or the text is not a number). Zero with any exponent is zero; a huge
/// negative exponent rounds to zero. Never panics: all arithmetic is checked.
pub fn decimal9(text: &str) -> Option<i128> {
    decimal9_fast(text).or_else(|| decimal9_general(text))
}

/// The common shapes without allocating: `-?digits(.digits)?` with at most
/// 24 integer and 9 fraction digits, so the value is below 10^33 and no
/// product can overflow. None means "take the general path".
#[inline]
fn decimal9_fast(text: &str) -> Option<i128> {
    let b = text.as_bytes();
    let (neg, b) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    let mut v: i128 = 0;
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        if i == 24 {
            return None; // counted before multiplying
        }
        v = v * 10 + i128::from(b[i] - b'0');
        i += 1;
    }
    if i == 0 {
        return None;
    }
    let mut frac_digits = 0u32;
    if i < b.len() {
        if b[i] != b'.' {
            return None; // an exponent
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            if frac_digits == 9 {
                return None; // rounding needed
            }
            v = v * 10 + i128::from(b[i] - b'0');
            frac_digits += 1;
            i += 1;
        }
        if i < b.len() || frac_digits == 0 {
            return None;
        }
    }
    let v = v * 10i128.pow(9 - frac_digits);
    Some(if neg { -v } else { v })
}

/// An exponent's value, saturating at i64's range: any exponent that large
/// either zeroes the value or puts it out of range.
fn saturating_exponent(s: &str) -> Option<i64> {
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let v = digits.bytes().fold(0i64, |v, c| {
        v.saturating_mul(10).saturating_add(i64::from(c - b'0'))
    });
    Some(if neg { -v } else { v })
}

fn decimal9_general(text: &str) -> Option<i128> {
    let (neg, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], saturating_exponent(&body[i + 1..])?),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let all: Vec<u8> = int.bytes().chain(frac.bytes()).map(|c| c - b'0').collect();
    let Some(first) = all.iter().position(|&d| d != 0) else {
        return Some(0); // zero, whatever the exponent
    };
    let digits = &all[first..];
    // The scaled value is D * 10^p, D the significant digits.
    let frac_len = i64::try_from(frac.len()).ok()?;
    let n = i64::try_from(digits.len()).ok()?;
    let p = exp.saturating_sub(frac_len).saturating_add(9);
    let keep = n.saturating_add(p); // digits at or above 10^0 of the scaled value
    if keep > MAX_SCALED_DIGITS {
        return None; // at least 10^33 before rounding
    }
    let value_of = |ds: &[u8]| {
        ds.iter()
            .try_fold(0i128, |v, &d| v.checked_mul(10)?.checked_add(i128::from(d)))
    };
    let v = if p >= 0 {
        value_of(digits)?.checked_mul(10i128.checked_pow(u32::try_from(p).ok()?)?)?
    } else if keep < 0 {
        0 // below half of the last place: the first dropped digit is an implicit 0
    } else {
        let k = usize::try_from(keep).ok()?;
        let v = value_of(digits.get(..k)?)?;
        let (r, tail) = (*digits.get(k)?, digits.get(k + 1..)?);
        let above_half = r > 5 || (r == 5 && tail.iter().any(|&d| d != 0));
        if above_half || (r == 5 && v % 2 == 1) {
            v.checked_add(1)?
        } else {
            v
        }
    };
    // The limit applies to the rounded value: 999…9.9999999995 rounds to 1e24.
    if v >= SCALED_LIMIT {
        return None;
    }
    Some(if neg { -v } else { v })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn decimal9_is_exact_and_rounds_half_to_even() {
        let e9 = 1_000_000_000i128;
        assert_eq!(decimal9("2048"), Some(2048 * e9));
        assert_eq!(decimal9("-1.5"), Some(-1_500_000_000));
        assert_eq!(decimal9("0.1"), Some(100_000_000));
        assert_eq!(decimal9("1.5e3"), Some(1500 * e9));
        assert_eq!(decimal9("25E-1"), Some(2_500_000_000));
        assert_eq!(decimal9("0.0000000005"), Some(0));
        assert_eq!(decimal9("0.0000000015"), Some(2));
        assert_eq!(decimal9("0.00000000051"), Some(1));
        assert_eq!(decimal9("1e-400"), Some(0));
        assert_eq!(decimal9("0"), Some(0));
        assert_eq!(decimal9("0e999"), Some(0));
        assert_eq!(
            decimal9("999999999999999999999999"),
            Some(999_999_999_999_999_999_999_999 * e9)
        );
        assert_eq!(decimal9("1e24"), None);
        assert_eq!(decimal9("1e400"), None);
        assert_eq!(decimal9("0.30000000000000004"), Some(300_000_000));
    }

    #[test]
    fn the_limit_applies_after_rounding() {
        let top = SCALED_LIMIT - 1; // 999…9.999999999
        assert_eq!(decimal9("999999999999999999999999.999999999"), Some(top));
        assert_eq!(decimal9("-999999999999999999999999.9999999994"), Some(-top));
        assert_eq!(decimal9("999999999999999999999999.9999999995"), None);
        assert_eq!(decimal9("999999999999999999999999.9999999999"), None);
        assert_eq!(decimal9("-999999999999999999999999.99999999951"), None);
        assert_eq!(decimal9("9999999999999999999999999999999999e-10"), None);
        assert_eq!(
            decimal9("9999999999999999999999999999999994e-10"),
            Some(top)
        );
        assert_eq!(
            decimal9("99999999999999999999999.99999999999"),
            Some(SCALED_LIMIT / 10)
        );
    }

    #[test]
    fn zero_and_huge_exponents() {
        for zero in [
            "0e99999999999999999999",
            "-0E+99999999999999999999",
            "0.000e-99999999999999999999",
            "0e9223372036854775808",
            "00.0e1",
        ] {
            assert_eq!(decimal9(zero), Some(0), "{zero}");
        }
        assert_eq!(decimal9("1e99999999999999999999"), None);
        assert_eq!(decimal9("-1E+9223372036854775807"), None);
        assert_eq!(decimal9("1e-99999999999999999999"), Some(0));
        assert_eq!(decimal9("-5e-9223372036854775808"), Some(0));
        assert_eq!(decimal9("5e-10"), Some(0)); // a tie: to the even 0
        assert_eq!(decimal9("5.000000001e-10"), Some(1));
        assert_eq!(decimal9("15e-10"), Some(2));
        assert_eq!(decimal9("1e23"), Some(SCALED_LIMIT / 10));
    }

    #[test]
    fn huge_digit_counts_never_panic() {
        let nines = "9".repeat(100_000);
        assert_eq!(decimal9(&nines), None);
        assert_eq!(decimal9(&format!("0.{nines}")), Some(1_000_000_000));
        assert_eq!(decimal9(&format!("{nines}e-99990")), Some(10i128.pow(19)));
        assert_eq!(decimal9(&format!("{nines}e-99976")), None); // rounds to 1e24
        assert_eq!(decimal9(&format!("{nines}e-100000")), Some(1_000_000_000));
        assert_eq!(decimal9(&format!("1{}", "0".repeat(30))), None);
        assert_eq!(decimal9(&format!("0.{}1", "0".repeat(100_000))), Some(0));
        assert_eq!(decimal9(&format!("-{}", "1".repeat(25))), None);
        assert_eq!(decimal9(&format!("{}.5", "1".repeat(25))), None);
        for bad in [
            "", "-", ".", "e5", "1e", "1e+", "--1", "1.2.3", "x", "1e5e5", "１",
        ] {
            assert_eq!(decimal9(bad), None, "{bad:?}");
        }
    }

    /// The oracle: a second way to the same answer, on decimal strings. The
    /// point is moved by padding, rounding carries through the text, and the
    /// limit is a length comparison.
    fn oracle(text: &str) -> Option<i128> {
        let (neg, body) = text.strip_prefix('-').map_or((false, text), |r| (true, r));
        let (mantissa, exp) = match body.find(['e', 'E']) {
            Some(i) => {
                let e = body[i + 1..].trim_start_matches('+');
                let (eneg, digits) = e.strip_prefix('-').map_or((false, e), |r| (true, r));
                let digits = digits.trim_start_matches('0');
                // Exponents of more than 12 digits decide the answer on their own.
                let v: i64 = if digits.len() > 12 {
                    i64::MAX / 4
                } else {
                    digits.parse().unwrap_or(0)
                };
                (&body[..i], if eneg { -v } else { v })
            }
            None => (body, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits = format!("{int}{frac}");
        if digits.bytes().all(|c| c == b'0') {
            return Some(0);
        }
        // value = digits * 10^shift, scaled by 10^9
        let shift = exp - frac.len() as i64 + 9;
        let point = digits.len() as i64 + shift; // where the point falls in `digits`
        if point > 60 {
            return None;
        }
        if point < -2 {
            return Some(0);
        }
        let (whole, dropped) = if shift >= 0 {
            (
                format!("{digits}{}", "0".repeat(shift as usize)),
                String::new(),
            )
        } else {
            let drop = (-shift) as usize;
            let padded = format!(
                "{}{digits}",
                "0".repeat((drop + 1).saturating_sub(digits.len()))
            );
            let (w, d) = padded.split_at(padded.len() - drop);
            (w.to_string(), d.to_string())
        };
        let mut whole = whole.into_bytes();
        let first = dropped.as_bytes().first().copied().unwrap_or(b'0');
        let rest_nonzero = dropped.bytes().skip(1).any(|c| c != b'0');
        let odd = (whole[whole.len() - 1] - b'0') % 2 == 1;
        if first > b'5' || (first == b'5' && (rest_nonzero || odd)) {
            let mut i = whole.len();
            loop {
                if i == 0 {
                    whole.insert(0, b'1');
                    break;
                }
                i -= 1;
                if whole[i] == b'9' {
                    whole[i] = b'0';
                } else {
                    whole[i] += 1;
                    break;
                }
            }
        }
        let s = String::from_utf8(whole).unwrap();
        let s = s.trim_start_matches('0');
        if s.len() > 33 {
            return None;
        }
        let v: i128 = if s.is_empty() { 0 } else { s.parse().unwrap() };
        Some(if neg { -v } else { v })
    }

    /// xorshift64: a fixed seed keeps the loops reproducible.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        fn digit(&mut self, style: u64) -> char {
            let d = match style {
                0 => 9,
                1 => 0,
                2 => 5 * (self.below(2) as u8), // ties: runs of 0 and 5
                _ => self.below(10) as u8,
            };
            char::from(b'0' + d)
        }
    }

    /// A near-valid JSON number: sizes around every boundary, ties, runs of
    /// nines and zeros, exponents up to 25 digits.
    pub(crate) fn near_valid_number(rng: &mut Rng) -> String {
        const LENGTHS: [usize; 19] = [
            0, 1, 2, 8, 9, 10, 11, 18, 19, 23, 24, 25, 32, 33, 34, 38, 39, 40, 60,
        ];
        let style = rng.below(4);
        let mut t = String::new();
        if rng.below(2) == 0 {
            t.push('-');
        }
        let int_len = LENGTHS[rng.below(19) as usize].max(1);
        for k in 0..int_len {
            let c = rng.digit(style);
            // JSON allows no leading zeros: a longer integer starts at 1-9.
            t.push(if k == 0 && int_len > 1 && c == '0' {
                '1'
            } else {
                c
            });
        }
        let frac_len = LENGTHS[rng.below(19) as usize];
        if frac_len > 0 {
            t.push('.');
            for _ in 0..frac_len {
                let c = rng.digit(style);
                t.push(c);
            }
        }
        let k = rng.below(5);
        if k >= 2 {
            t.push(if k == 2 { 'e' } else { 'E' });
            match rng.below(3) {
                0 => t.push('-'),
                1 => t.push('+'),
                _ => {}
            }
            let e = match rng.below(4) {
                0 => rng.below(12).to_string(),
                1 => (20 + rng.below(30)).to_string(),
                2 => format!("{:0>3}", rng.below(60)),
                _ => "9".repeat(1 + rng.below(25) as usize),
            };
            t.push_str(&e);
        }
        t
    }

    /// A quick-check loop over near-valid numbers. `cargo test` is a debug
    /// build with overflow checks on, so an unchecked overflow panics here.
    #[test]
    fn near_valid_numbers_match_the_oracle() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200_000 {
            let t = near_valid_number(&mut rng);
            assert_eq!(decimal9(&t), oracle(&t), "{t}");
        }
    }
}
