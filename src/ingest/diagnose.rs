//! A second look at a body simd-json refused, on that path only: a plain JSON scanner (RFC 8259)
//! that either says what is wrong and at which byte, or finds the body valid and lists what
//! simd-json cannot hold: numbers beyond 64-bit integers and beyond `f64`. Those are still the
//! client's data; `widen_numbers` lets simd-json parse the body with them stood in for.

use std::ops::Range;

/// What the scanner learned of a body that is valid JSON.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diagnosis {
    /// Number tokens simd-json refuses: integers outside i64 and u64, numbers beyond `f64`.
    pub wide_numbers: Vec<Range<usize>>,
    /// Byte ranges of the elements of a top-level array, each as sent.
    pub elements: Vec<Range<usize>>,
}

/// Stand-ins for a wide number: valid for simd-json, a number as well, and as far out of any
/// range the server checks (`timestamp`) as the number it stands for.
const POSITIVE_STAND_IN: &[u8] = b"1e308";
const NEGATIVE_STAND_IN: &[u8] = b"-1e308";

/// Where `bytes` stops being JSON, as the detail of an `invalid JSON` answer, or what in it
/// simd-json cannot hold.
pub fn diagnose(bytes: &[u8]) -> Result<Diagnosis, String> {
    if let Err(error) = std::str::from_utf8(bytes) {
        return Err(format!("invalid UTF-8 at byte {}", error.valid_up_to()));
    }
    Scanner { bytes, at: 0 }.document()
}

/// Overwrites each wide number in `body` (a copy of the scanned bytes) with a stand-in of the
/// same sign padded with spaces, so every other byte keeps its place.
pub fn widen_numbers(body: &mut [u8], wide_numbers: &[Range<usize>]) {
    for range in wide_numbers {
        let stand_in = match body[range.start] {
            b'-' => NEGATIVE_STAND_IN,
            _ => POSITIVE_STAND_IN,
        };
        // Every integer beyond 64 bits has 19 digits or more, and a number beyond f64 needs an
        // exponent of 3 digits: the stand-in always fits.
        if range.len() >= stand_in.len() {
            body[range.start..range.start + stand_in.len()].copy_from_slice(stand_in);
            body[range.start + stand_in.len()..range.end].fill(b' ');
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Container {
    Array,
    Object,
}

struct Scanner<'b> {
    bytes: &'b [u8],
    at: usize,
}

impl Scanner<'_> {
    /// The whole body: one value, then only whitespace. Nesting is followed with a stack, not
    /// recursion, so any depth is safe.
    fn document(mut self) -> Result<Diagnosis, String> {
        let mut diagnosis = Diagnosis::default();
        let mut stack: Vec<Container> = Vec::new();
        let mut root_is_array = false;
        let mut element_start = None;
        loop {
            // A value is expected here.
            self.skip_whitespace();
            if stack.len() == 1 && root_is_array {
                element_start = Some(self.at);
            }
            match self.peek() {
                Some(b'{') => {
                    if !self.open_is_empty(b'}') {
                        stack.push(Container::Object);
                        self.key()?;
                        continue;
                    }
                }
                Some(b'[') => {
                    root_is_array |= stack.is_empty();
                    if !self.open_is_empty(b']') {
                        stack.push(Container::Array);
                        continue;
                    }
                }
                Some(b'"') => self.string()?,
                Some(b'-' | b'0'..=b'9') => self.number(&mut diagnosis.wide_numbers)?,
                Some(b't') => self.literal("true")?,
                Some(b'f') => self.literal("false")?,
                Some(b'n') => self.literal("null")?,
                _ => return Err(self.unexpected("a value")),
            }
            // A value just ended; close what it completes, up to the next expected value.
            loop {
                if stack.len() == 1 && root_is_array {
                    if let Some(start) = element_start.take() {
                        diagnosis.elements.push(start..self.at);
                    }
                }
                self.skip_whitespace();
                match stack.last() {
                    None if self.at < self.bytes.len() => {
                        return Err(format!("trailing characters at byte {}", self.at));
                    }
                    None => return Ok(diagnosis),
                    Some(Container::Array) => match self.peek() {
                        Some(b',') => {
                            self.at += 1;
                            break;
                        }
                        Some(b']') => {
                            self.at += 1;
                            stack.pop();
                        }
                        _ => return Err(self.unexpected("',' or ']'")),
                    },
                    Some(Container::Object) => match self.peek() {
                        Some(b',') => {
                            self.at += 1;
                            self.skip_whitespace();
                            self.key()?;
                            break;
                        }
                        Some(b'}') => {
                            self.at += 1;
                            stack.pop();
                        }
                        _ => return Err(self.unexpected("',' or '}'")),
                    },
                }
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Steps over an opening `{` or `[`; when `close` follows (an empty container), steps over
    /// it too and says so.
    fn open_is_empty(&mut self, close: u8) -> bool {
        self.at += 1;
        self.skip_whitespace();
        let empty = self.peek() == Some(close);
        if empty {
            self.at += 1;
        }
        empty
    }

    /// What was found instead of what was expected, at the current byte.
    fn unexpected(&self, expected: &str) -> String {
        match self.bytes.get(self.at..) {
            Some(rest) if !rest.is_empty() => {
                // The scanner only stops on character boundaries of valid UTF-8.
                let found = String::from_utf8_lossy(&rest[..rest.len().min(4)])
                    .chars()
                    .next()
                    .unwrap_or('?');
                format!(
                    "unexpected character {found:?} at byte {}, expected {expected}",
                    self.at
                )
            }
            _ => format!(
                "unexpected end of input at byte {}, expected {expected}",
                self.at
            ),
        }
    }

    /// An object key and its colon; whitespace before the key is already skipped.
    fn key(&mut self) -> Result<(), String> {
        if self.peek() != Some(b'"') {
            return Err(self.unexpected("a string key"));
        }
        self.string()?;
        self.skip_whitespace();
        if self.peek() != Some(b':') {
            return Err(self.unexpected("':'"));
        }
        self.at += 1;
        Ok(())
    }

    fn string(&mut self) -> Result<(), String> {
        let start = self.at;
        self.at += 1;
        loop {
            match self.peek() {
                None => return Err(format!("unterminated string starting at byte {start}")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(());
                }
                Some(b'\\') => self.escape()?,
                Some(byte) if byte < 0x20 => {
                    return Err(format!(
                        "unescaped control character in a string at byte {}",
                        self.at
                    ))
                }
                Some(_) => self.at += 1,
            }
        }
    }

    /// One escape sequence. A `\u` escape of a UTF-16 surrogate must be a pair: a lone half
    /// stands for no character (and simd-json refuses it).
    fn escape(&mut self) -> Result<(), String> {
        let start = self.at;
        match self.bytes.get(start + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.at += 2;
                Ok(())
            }
            Some(b'u') => {
                let unit = self.unicode_unit(start)?;
                if (0xDC00..0xE000).contains(&unit) {
                    return Err(format!(
                        "unpaired surrogate in a \\u escape at byte {start}"
                    ));
                }
                if (0xD800..0xDC00).contains(&unit) {
                    let low_start = self.at;
                    let low = match self.bytes.get(low_start..low_start + 2) {
                        Some(b"\\u") => self.unicode_unit(low_start)?,
                        _ => 0,
                    };
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err(format!(
                            "unpaired surrogate in a \\u escape at byte {start}"
                        ));
                    }
                }
                Ok(())
            }
            Some(_) => {
                let rest = &self.bytes[start + 1..];
                let found = String::from_utf8_lossy(&rest[..rest.len().min(4)])
                    .chars()
                    .next()
                    .unwrap_or('?');
                Err(format!("invalid escape '\\{found}' at byte {start}"))
            }
            None => Err(format!("unterminated string at byte {start}")),
        }
    }

    /// The four hex digits of the `\u` escape at `start`; moves past them.
    fn unicode_unit(&mut self, start: usize) -> Result<u32, String> {
        let digits = self
            .bytes
            .get(start + 2..start + 6)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .filter(|digits| digits.bytes().all(|byte| byte.is_ascii_hexdigit()))
            .ok_or_else(|| format!("invalid \\u escape at byte {start}"))?;
        self.at = start + 6;
        Ok(u32::from_str_radix(digits, 16).expect("four hex digits"))
    }

    /// A number as RFC 8259 writes it; one simd-json cannot hold is noted in `wide`.
    fn number(&mut self, wide: &mut Vec<Range<usize>>) -> Result<(), String> {
        let start = self.at;
        let invalid = || format!("invalid number at byte {start}");
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(invalid()),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.at += 1;
            if !self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
                return Err(invalid());
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            integer = false;
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if !self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
                return Err(invalid());
            }
            self.digits();
        }
        if matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
        ) {
            // `01`, `1.2.3`, `1e5e5`: a number runs on past where JSON ends it.
            return Err(invalid());
        }
        let text = std::str::from_utf8(&self.bytes[start..self.at]).expect("ASCII digits");
        let fits = match integer {
            true => text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok(),
            false => text.parse::<f64>().is_ok_and(f64::is_finite),
        };
        if !fits {
            wide.push(start..self.at);
        }
        Ok(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
            self.at += 1;
        }
    }

    fn literal(&mut self, word: &str) -> Result<(), String> {
        if self.bytes[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(())
        } else {
            Err(format!(
                "invalid literal at byte {}, expected {word}",
                self.at
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(json: &str) -> String {
        diagnose(json.as_bytes()).expect_err(json)
    }

    fn wide(json: &str) -> Vec<&str> {
        let diagnosis = diagnose(json.as_bytes()).expect(json);
        diagnosis
            .wide_numbers
            .iter()
            .map(|range| &json[range.clone()])
            .collect()
    }

    #[test]
    fn each_problem_is_named_with_its_byte() {
        let cases: &[(&str, &str)] = &[
            ("", "unexpected end of input at byte 0, expected a value"),
            ("  ", "unexpected end of input at byte 2, expected a value"),
            (r#"{"a":1} x"#, "trailing characters at byte 8"),
            ("{}{}", "trailing characters at byte 2"),
            (
                "NaN",
                "unexpected character 'N' at byte 0, expected a value",
            ),
            (
                r#"{"a":NaN}"#,
                "unexpected character 'N' at byte 5, expected a value",
            ),
            (r#"{"a":nan}"#, "invalid literal at byte 5, expected null"),
            (r#"{"a":tru}"#, "invalid literal at byte 5, expected true"),
            (r#"{"a":01}"#, "invalid number at byte 5"),
            (r#"{"a":1.}"#, "invalid number at byte 5"),
            (r#"{"a":-}"#, "invalid number at byte 5"),
            (
                r#"{"a":+1}"#,
                "unexpected character '+' at byte 5, expected a value",
            ),
            (r#"{"a":1e}"#, "invalid number at byte 5"),
            (
                r#"{"a" 1}"#,
                "unexpected character '1' at byte 5, expected ':'",
            ),
            (
                r#"{"a":1,}"#,
                "unexpected character '}' at byte 7, expected a string key",
            ),
            (
                "{'a':1}",
                "unexpected character '\\'' at byte 1, expected a string key",
            ),
            (
                "[1,]",
                "unexpected character ']' at byte 3, expected a value",
            ),
            (
                "[1 2]",
                "unexpected character '2' at byte 3, expected ',' or ']'",
            ),
            (
                r#"{"a":1"#,
                "unexpected end of input at byte 6, expected ',' or '}'",
            ),
            (r#"{"a":"x}"#, "unterminated string starting at byte 5"),
            (r#"{"a":"\x"}"#, "invalid escape '\\x' at byte 6"),
            (r#"{"a":"\u12G4"}"#, "invalid \\u escape at byte 6"),
            (
                r#"{"a":"\ud800"}"#,
                "unpaired surrogate in a \\u escape at byte 6",
            ),
            (
                r#"{"a":"\udc00"}"#,
                "unpaired surrogate in a \\u escape at byte 6",
            ),
            (
                "{\"a\":\"\u{1}\"}",
                "unescaped control character in a string at byte 6",
            ),
            (
                "[é]",
                "unexpected character 'é' at byte 1, expected a value",
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(&problem(json), expected, "{json}");
        }
        assert_eq!(
            diagnose(b"{\"a\":\"\xff\"}"),
            Err("invalid UTF-8 at byte 6".to_owned())
        );
    }

    #[test]
    fn valid_json_passes_whatever_its_shape() {
        for json in [
            "0",
            "-0.0e-0",
            r#""\ud83d\ude00 \u00e9 \" \\ \/ \b\f\n\r\t""#,
            " [ ] ",
            r#"{"a":{"b":[true,false,null,{},[]]}}"#,
            &format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        ] {
            let wide_numbers = diagnose(json.as_bytes()).map(|d| d.wide_numbers);
            assert_eq!(
                wide_numbers,
                Ok(Vec::new()),
                "{}",
                &json[..json.len().min(80)]
            );
        }
    }

    #[test]
    fn numbers_beyond_64_bits_are_found_and_only_those() {
        let big = format!("1{}", "0".repeat(400));
        let json = format!(
            r#"{{"a":18446744073709551616,"b":[-9223372036854775809,1e999,-1E+400],"c":{big},
            "fit":[18446744073709551615,-9223372036854775808,1.5e308,1e-999,0.1]}}"#
        );
        assert_eq!(
            wide(&json),
            [
                "18446744073709551616",
                "-9223372036854775809",
                "1e999",
                "-1E+400",
                big.as_str()
            ]
        );
    }

    #[test]
    fn array_elements_are_found_as_sent() {
        let json = r#" [ {"a":[1,2]} , 3,"x" ,[[]],{}] "#;
        let diagnosis = diagnose(json.as_bytes()).unwrap();
        let elements: Vec<&str> = diagnosis
            .elements
            .iter()
            .map(|range| &json[range.clone()])
            .collect();
        assert_eq!(elements, [r#"{"a":[1,2]}"#, "3", r#""x""#, "[[]]", "{}"]);
        assert!(diagnose(br#"{"a":[1]}"#).unwrap().elements.is_empty());
    }

    #[test]
    fn stand_ins_keep_every_other_byte_in_place() {
        let json = r#"[18446744073709551616,-9223372036854775809,1e999,-1e999]"#;
        let mut body = json.as_bytes().to_vec();
        widen_numbers(&mut body, &diagnose(json.as_bytes()).unwrap().wide_numbers);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "[1e308               ,-1e308              ,1e308,-1e308]"
        );
        assert!(diagnose(&body).unwrap().wide_numbers.is_empty());
    }
}
