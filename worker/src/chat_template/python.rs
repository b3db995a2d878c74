//! Python behaviour that chat templates observe through Jinja2 and transformers: `str()` and
//! `repr()` of values, `json.dumps` as transformers' `tojson` filter calls it, Python's notion
//! of whitespace in `strip`/`split`/`splitlines`, and `datetime.strftime`.
//!
//! minijinja's own versions differ in ways that change prompts: its `tojson` HTML-escapes and
//! writes compact JSON, its floats never use exponents, containers print in Rust debug form,
//! and Rust's `trim` does not treat U+001C..U+001F as whitespace.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Rest, Value, ValueKind, ValueOrKwargs, from_args};
use minijinja::{Error, ErrorKind, State};

/// Python's `str.isspace()`: Unicode White_Space plus the four ASCII separators.
pub(super) fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip(chars)` / `lstrip` / `rstrip`.
fn strip<'s>(s: &'s str, chars: Option<&str>, left: bool, right: bool) -> &'s str {
    let matches = |c: char| match chars {
        Some(set) => set.contains(c),
        None => is_space(c),
    };
    let s = if left { s.trim_start_matches(matches) } else { s };
    if right { s.trim_end_matches(matches) } else { s }
}

/// Python's `str.splitlines()` boundaries.
fn is_line_break(c: char) -> bool {
    matches!(c, '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

fn splitlines(s: &str, keepends: bool) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !is_line_break(c) {
            continue;
        }
        let mut end = i + c.len_utf8();
        if c == '\r' && chars.peek().is_some_and(|&(_, next)| next == '\n') {
            chars.next();
            end += 1;
        }
        lines.push(Value::from(if keepends { &s[start..end] } else { &s[start..i] }));
        start = end;
    }
    if start < s.len() {
        lines.push(Value::from(&s[start..]));
    }
    lines
}

/// Python's `repr(float)` (== `str(float)`): the shortest round-trip digits, in positional
/// notation for exponents -4..16, else scientific with a signed, at least two-digit exponent.
pub(super) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits as Python's repr.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    let point = exp + 1; // digits are 0.DIGITS * 10^point
    let n = digits.len() as i32;
    let body = if -4 < point && point <= 16 {
        if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point < n {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        } else {
            format!("{digits}{}.0", "0".repeat((point - n) as usize))
        }
    } else {
        let frac = if n > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let e = point - 1;
        format!("{}{frac}e{}{:02}", &digits[..1], if e < 0 { '-' } else { '+' }, e.abs())
    };
    format!("{sign}{body}")
}

fn as_f64(value: &Value) -> f64 {
    f64::try_from(value.clone()).unwrap_or(f64::NAN)
}

/// Python's `str(value)`, which is what `{{ value }}` prints in Jinja2.
pub(super) fn str_of(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Number if !value.is_integer() => float_repr(as_f64(value)),
        ValueKind::Seq | ValueKind::Map => {
            let mut out = String::new();
            repr_into(value, &mut out);
            out
        }
        // None, bools and integers already print as Python does.
        _ => value.to_string(),
    }
}

/// Python's `repr(str)`: single quotes unless the text has a single quote and no double one.
fn repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if is_printable(c) => out.push(c),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push(quote);
}

/// An approximation of Python's `str.isprintable()`: control, format, separator (other than
/// the space) and private-use characters are not printable. Unassigned code points, which
/// Python also escapes, would need the Unicode tables.
fn is_printable(c: char) -> bool {
    let u = c as u32;
    !(u < 0x20
        || (0x7f..=0xa0).contains(&u)
        || u == 0xad
        || u == 0x61c
        || u == 0x1680
        || u == 0x180e
        || (0x2000..=0x200f).contains(&u)
        || (0x2028..=0x202f).contains(&u)
        || (0x205f..=0x206f).contains(&u)
        || u == 0x3000
        || (0xe000..=0xf8ff).contains(&u)
        || u == 0xfeff
        || (0xfff9..=0xfffb).contains(&u)
        || (0xe0000..=0xe007f).contains(&u)
        || u >= 0xf0000)
}

/// Python's `repr(value)` for the values a template can hold.
fn repr_into(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::String => repr_str(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let tuple = value.is_tuple();
            out.push(if tuple { '(' } else { '[' });
            let mut count = 0;
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_into(&item, out);
                count += 1;
            }
            if tuple && count == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_into(&key, out);
                out.push_str(": ");
                repr_into(&value.get_item(&key).unwrap_or_default(), out);
            }
            out.push('}');
        }
        ValueKind::Undefined => out.push_str("Undefined"),
        _ => out.push_str(&str_of(value)),
    }
}

/// `json.dumps` settings.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn not_serializable(value: &Value) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("Object of type {} is not JSON serializable", value.kind()))
}

fn push_json_str(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_json_float(x: f64, out: &mut String) {
    if x.is_nan() {
        out.push_str("NaN");
    } else if x.is_infinite() {
        out.push_str(if x < 0.0 { "-Infinity" } else { "Infinity" });
    } else {
        out.push_str(&float_repr(x));
    }
}

/// A dict key as `json.dumps` writes it: strings as they are, scalars converted.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Number if !key.is_integer() => {
            let mut s = String::new();
            push_json_float(as_f64(key), &mut s);
            s
        }
        ValueKind::Number => key.to_string(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
        ValueKind::None => "null".to_string(),
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("keys must be str, int, float, bool or None, not {}", key.kind()),
            ));
        }
    })
}

/// Python's `sorted(dict.items())`: keys of one kind compare, mixed kinds are an error.
fn sort_keys(keys: &mut [Value]) -> Result<(), Error> {
    let all = |kind| keys.iter().all(|k| k.kind() == kind);
    if all(ValueKind::String) {
        keys.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    } else if all(ValueKind::Number) || keys.iter().all(|k| matches!(k.kind(), ValueKind::Number | ValueKind::Bool)) {
        keys.sort_by(|a, b| as_f64(a).total_cmp(&as_f64(b)));
    } else if !keys.is_empty() {
        return Err(Error::new(ErrorKind::InvalidOperation, "'<' not supported between mixed key types"));
    }
    Ok(())
}

fn dump(value: &Value, style: &JsonStyle, level: usize, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => push_json_float(as_f64(value), out),
        ValueKind::String => push_json_str(value.as_str().unwrap_or_default(), style.ensure_ascii, out),
        // Tuples, and the iterables minijinja returns where Python returns lists, dump as lists.
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            dump_container(out, style, level, '[', ']', &items, |item, out| dump(item, style, level + 1, out))?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                sort_keys(&mut keys)?;
            }
            dump_container(out, style, level, '{', '}', &keys, |key, out| {
                push_json_str(&json_key(key)?, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                dump(&value.get_item(key)?, style, level + 1, out)
            })?;
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// Python's container layout: `[]` when empty; with an indent, one item per line.
fn dump_container<T>(
    out: &mut String,
    style: &JsonStyle,
    level: usize,
    open: char,
    close: char,
    items: &[T],
    mut item: impl FnMut(&T, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    };
    newline(out, level + 1);
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_sep);
            newline(out, level + 1);
        }
        item(x, out)?;
    }
    newline(out, level);
    out.push(close);
    Ok(())
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, i.e. `json.dumps` with those arguments.
pub(super) fn tojson(value: &Value, args: Rest<ValueOrKwargs>) -> Result<Value, Error> {
    let mut positional: Vec<Value> = args.0.into_iter().map(Value::from).collect();
    let kwargs = match positional.last() {
        Some(last) if last.is_kwargs() => Kwargs::try_from(positional.pop().unwrap_or_default())?,
        _ => Kwargs::from_iter(std::iter::empty::<(&str, Value)>()),
    };
    if positional.len() > 4 {
        return Err(Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments"));
    }
    let mut positional = positional.into_iter();
    let mut arg = |name: &str| -> Result<Value, Error> {
        match positional.next() {
            Some(v) => Ok(v),
            None => Ok(kwargs.get::<Option<Value>>(name)?.unwrap_or_default()),
        }
    };
    // Python's parameter order: ensure_ascii, indent, separators, sort_keys.
    let ensure_ascii = arg("ensure_ascii")?;
    let indent = arg("indent")?;
    let separators = arg("separators")?;
    let sort_keys = arg("sort_keys")?;
    kwargs.assert_all_used()?;
    let ensure_ascii = ensure_ascii.is_true();
    let sort_keys = sort_keys.is_true();
    let indent = match indent.kind() {
        ValueKind::Undefined | ValueKind::None => None,
        ValueKind::String => Some(indent.as_str().unwrap_or_default().to_string()),
        ValueKind::Number if indent.is_integer() => Some(" ".repeat(usize::try_from(indent.clone()).unwrap_or(0))),
        _ => {
            return Err(Error::new(ErrorKind::InvalidOperation, "indent must be an int or a string"));
        }
    };
    let (item_sep, key_sep) = match separators.kind() {
        ValueKind::Undefined | ValueKind::None => {
            let item = if indent.is_some() { "," } else { ", " };
            (item.to_string(), ": ".to_string())
        }
        _ => {
            let parts: Vec<Value> = separators.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
                    (item.as_str().unwrap_or_default().to_string(), key.as_str().unwrap_or_default().to_string())
                }
                _ => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "separators must be a pair of strings"));
                }
            }
        }
    };
    let style = JsonStyle { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    dump(value, &style, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Jinja2's `trim(value, chars=None)`: `str(value).strip(chars)`.
pub(super) fn trim(value: &Value, chars: Option<String>) -> String {
    strip(&str_of(value), chars.as_deref(), true, true).to_string()
}

/// Jinja2's `string` filter.
pub(super) fn string(value: &Value) -> String {
    str_of(value)
}

/// String methods whose Python behaviour differs from minijinja-contrib's `pycompat`; all
/// other methods go to `pycompat`.
pub(super) fn unknown_method(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                let left = method != "rstrip";
                let right = method != "lstrip";
                return Ok(Value::from(strip(s, chars, left, right)));
            }
            "split" if args.first().is_none_or(Value::is_none) && args.len() <= 2 => {
                let maxsplit: Option<i64> = args.get(1).and_then(Value::as_i64);
                return Ok(Value::from(split_whitespace(s, maxsplit)));
            }
            "splitlines" => {
                let (keepends,): (Option<bool>,) = from_args(args)?;
                return Ok(Value::from(splitlines(s, keepends.unwrap_or(false))));
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Python's `str.split(None, maxsplit)`.
fn split_whitespace(s: &str, maxsplit: Option<i64>) -> Vec<Value> {
    let mut parts = Vec::new();
    let mut rest = s.trim_start_matches(is_space);
    while !rest.is_empty() {
        if maxsplit.is_some_and(|m| m >= 0 && parts.len() as i64 >= m) {
            parts.push(Value::from(rest));
            break;
        }
        let end = rest.find(is_space).unwrap_or(rest.len());
        parts.push(Value::from(&rest[..end]));
        rest = rest[end..].trim_start_matches(is_space);
    }
    parts
}

const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DateTime {
    pub year: i64,
    pub month: u32, // 1..=12
    pub day: u32,   // 1..=31
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub micros: u32,
    pub weekday: u32,     // 0 = Monday
    pub day_of_year: u32, // 1..=366
}

impl DateTime {
    /// From microseconds since the Unix epoch (civil-from-days, proleptic Gregorian).
    pub fn from_unix_micros(micros: i64) -> Self {
        let secs = micros.div_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy_mar + 2) / 153;
        let day = (doy_mar - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let day_of_year = CUMULATIVE[(month - 1) as usize] + day + u32::from(leap && month > 2);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            micros: micros.rem_euclid(1_000_000) as u32,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as u32,
            day_of_year,
        }
    }

    /// `datetime.strftime` in the C locale for a naive datetime (`%z` and `%Z` are empty).
    /// glibc's `-` flag (no padding) is supported; unknown directives are copied.
    pub fn strftime(&self, format: &str) -> String {
        let mut out = String::new();
        let mut chars = format.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let unpadded = chars.next_if_eq(&'-').is_some();
            let Some(d) = chars.next() else {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                break;
            };
            let num = |out: &mut String, n: i64, width: usize| {
                if unpadded {
                    let _ = write!(out, "{n}");
                } else {
                    let _ = write!(out, "{n:0width$}");
                }
            };
            let hour12 = if self.hour.is_multiple_of(12) { 12 } else { self.hour % 12 };
            let weekday = WEEKDAYS[self.weekday as usize];
            let month = MONTHS[(self.month - 1) as usize];
            match d {
                'a' => out.push_str(&weekday[..3]),
                'A' => out.push_str(weekday),
                'b' | 'h' => out.push_str(&month[..3]),
                'B' => out.push_str(month),
                'd' => num(&mut out, self.day.into(), 2),
                'e' if unpadded => num(&mut out, self.day.into(), 1),
                'e' => {
                    let _ = write!(out, "{:2}", self.day);
                }
                'm' => num(&mut out, self.month.into(), 2),
                'y' => num(&mut out, self.year.rem_euclid(100), 2),
                'Y' => {
                    let _ = write!(out, "{}", self.year);
                }
                'H' => num(&mut out, self.hour.into(), 2),
                'I' => num(&mut out, hour12.into(), 2),
                'M' => num(&mut out, self.minute.into(), 2),
                'S' => num(&mut out, self.second.into(), 2),
                'f' => {
                    let _ = write!(out, "{:06}", self.micros);
                }
                'j' => num(&mut out, self.day_of_year.into(), 3),
                'p' => out.push_str(if self.hour < 12 { "AM" } else { "PM" }),
                'u' => num(&mut out, i64::from(self.weekday) + 1, 1),
                'w' => num(&mut out, i64::from((self.weekday + 1) % 7), 1),
                'D' | 'x' => out.push_str(&self.strftime("%m/%d/%y")),
                'F' => out.push_str(&self.strftime("%Y-%m-%d")),
                'T' | 'X' => out.push_str(&self.strftime("%H:%M:%S")),
                'R' => out.push_str(&self.strftime("%H:%M")),
                'c' => out.push_str(&self.strftime("%a %b %e %H:%M:%S %Y")),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '%' => out.push('%'),
                'z' | 'Z' => {}
                other => {
                    out.push('%');
                    if unpadded {
                        out.push('-');
                    }
                    out.push(other);
                }
            }
        }
        out
    }
}

/// transformers' `strftime_now(format)`: `datetime.now().strftime(format)`. herd uses UTC,
/// where transformers uses the host's local time.
pub(super) fn strftime_now(format: &str) -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    DateTime::from_unix_micros(micros).strftime(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3.11's repr().
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e100, "1e+100"),
            (-2.5e-300, "-2.5e-300"),
            (1.0 / 3.0, "0.3333333333333333"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (12345.678, "12345.678"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn strftime_matches_python() {
        // Expected strings are Python's datetime.strftime on glibc for these instants (UTC).
        let format = "%a %A %b %B %d %-d %e %m %y %Y %H %I %M %S %f %j %p %u %w %D %F %T %c %x %X [%z%Z] %% %q %-H %h";
        let cases = [
            (
                1_709_211_909_123_456,
                "Thu Thursday Feb February 29 29 29 02 24 2024 13 01 05 09 123456 060 PM 4 4 02/29/24 2024-02-29 13:05:09 Thu Feb 29 13:05:09 2024 02/29/24 13:05:09 [] % %q 13 Feb",
            ),
            (
                -1_000_000,
                "Wed Wednesday Dec December 31 31 31 12 69 1969 23 11 59 59 000000 365 PM 3 3 12/31/69 1969-12-31 23:59:59 Wed Dec 31 23:59:59 1969 12/31/69 23:59:59 [] % %q 23 Dec",
            ),
            (
                946_684_800_000_000,
                "Sat Saturday Jan January 01 1  1 01 00 2000 00 12 00 00 000000 001 AM 6 6 01/01/00 2000-01-01 00:00:00 Sat Jan  1 00:00:00 2000 01/01/00 00:00:00 [] % %q 0 Jan",
            ),
            (
                1_735_689_599_000_000,
                "Tue Tuesday Dec December 31 31 31 12 24 2024 23 11 59 59 000000 366 PM 2 2 12/31/24 2024-12-31 23:59:59 Tue Dec 31 23:59:59 2024 12/31/24 23:59:59 [] % %q 23 Dec",
            ),
        ];
        for (micros, want) in cases {
            assert_eq!(DateTime::from_unix_micros(micros).strftime(format), want, "{micros}");
        }
        assert_eq!(DateTime::from_unix_micros(0).strftime("100%"), "100%");
    }

    #[test]
    fn python_whitespace_includes_ascii_separators() {
        assert!(is_space('\u{1c}') && is_space('\u{3000}') && is_space('\u{85}'));
        assert!(!is_space('\u{200b}') && !is_space('x'));
        assert_eq!(strip("\u{1f} a \u{1c}", None, true, true), "a");
        assert_eq!(strip("xxaxx", Some("x"), false, true), "xxa");
    }
}
