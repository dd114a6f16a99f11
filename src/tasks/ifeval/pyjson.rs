//! Whether Python's `json.loads` accepts a string without raising `ValueError`, for
//! `detectable_format:json_format`. serde_json draws the line elsewhere (it refuses
//! `NaN`, `Infinity`, lone `\ud800` escapes, numbers beyond f64 and deep nesting), so
//! this follows CPython's scanner instead.

/// CPython's default limit on digits in an int literal (`sys.set_int_max_str_digits`,
/// Python 3.11 and later); `int()` of a longer literal raises `ValueError`.
const INT_MAX_STR_DIGITS: usize = 4300;

/// Container being parsed; an explicit stack so deep nesting cannot overflow ours.
#[derive(Clone, Copy, PartialEq)]
enum Frame {
    Array,
    Object,
}

struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// JSON's whitespace only: CPython's scanner skips `[ \t\n\r]`, nothing else.
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &[u8]) -> bool {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    /// `_match_number_unicode`: a fraction or exponent without digits is not consumed,
    /// which leaves it as "Extra data".
    fn number(&mut self) -> bool {
        let start = self.i;
        self.eat(b"-");
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return false,
        }
        let int_digits = self.i - start - usize::from(self.s[start] == b'-');
        let mut is_float = false;
        if self.peek() == Some(b'.') && self.s.get(self.i + 1).is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
            self.digits();
            is_float = true;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            let e_start = self.i;
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() > 0 {
                is_float = true;
            } else {
                self.i = e_start;
            }
        }
        is_float || int_digits <= INT_MAX_STR_DIGITS
    }

    /// `scanstring` in strict mode, called after the opening quote.
    fn string(&mut self) -> bool {
        loop {
            match self.peek() {
                None => return false,
                Some(b'"') => {
                    self.i += 1;
                    return true;
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            // Any four hex digits: lone surrogates are accepted.
                            let hex = self.s.get(self.i + 1..self.i + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return false;
                            }
                            self.i += 5;
                        }
                        _ => return false,
                    }
                }
                Some(b) if b < 0x20 => return false,
                Some(_) => self.i += 1,
            }
        }
    }

    /// One value that is not a container; containers are pushed by `accepts`.
    fn scalar(&mut self) -> bool {
        match self.peek() {
            Some(b'"') => {
                self.i += 1;
                self.string()
            }
            Some(b'n') => self.eat(b"null"),
            Some(b't') => self.eat(b"true"),
            Some(b'f') => self.eat(b"false"),
            Some(b'N') => self.eat(b"NaN"),
            Some(b'I') => self.eat(b"Infinity"),
            Some(b'-') if self.s[self.i..].starts_with(b"-Infinity") => self.eat(b"-Infinity"),
            _ => self.number(),
        }
    }
}

/// True when `json.loads(text)` returns instead of raising `ValueError`.
///
/// CPython raises `RecursionError` (not a `ValueError`, so the harness would crash)
/// past about a thousand nested containers; here such text is simply accepted.
pub(crate) fn python_json_loads_ok(text: &str) -> bool {
    let mut sc = Scanner {
        s: text.as_bytes(),
        i: 0,
    };
    let mut stack: Vec<Frame> = Vec::new();
    sc.skip_ws();
    // `want_value`: a value starts here; otherwise one has just ended.
    let mut want_value = true;
    loop {
        if want_value {
            match sc.peek() {
                Some(b'[') => {
                    sc.i += 1;
                    sc.skip_ws();
                    if sc.peek() == Some(b']') {
                        sc.i += 1;
                    } else {
                        stack.push(Frame::Array);
                        continue;
                    }
                }
                Some(b'{') => {
                    sc.i += 1;
                    sc.skip_ws();
                    match sc.peek() {
                        Some(b'}') => sc.i += 1,
                        Some(b'"') => {
                            stack.push(Frame::Object);
                            if !object_key(&mut sc) {
                                return false;
                            }
                            continue;
                        }
                        _ => return false,
                    }
                }
                _ => {
                    if !sc.scalar() {
                        return false;
                    }
                }
            }
        }
        // A value just ended: close containers or move to the next element.
        sc.skip_ws();
        let Some(&frame) = stack.last() else {
            return sc.i == sc.s.len();
        };
        match (frame, sc.peek()) {
            (Frame::Array, Some(b',')) => {
                sc.i += 1;
                sc.skip_ws();
                want_value = true;
            }
            (Frame::Object, Some(b',')) => {
                sc.i += 1;
                sc.skip_ws();
                if sc.peek() != Some(b'"') || !object_key(&mut sc) {
                    return false;
                }
                want_value = true;
            }
            (Frame::Array, Some(b']')) | (Frame::Object, Some(b'}')) => {
                sc.i += 1;
                stack.pop();
                want_value = false;
            }
            _ => return false,
        }
    }
}

/// A key, its colon and the whitespace before the value; at the opening quote.
fn object_key(sc: &mut Scanner<'_>) -> bool {
    sc.i += 1;
    if !sc.string() {
        return false;
    }
    sc.skip_ws();
    if sc.peek() != Some(b':') {
        return false;
    }
    sc.i += 1;
    sc.skip_ws();
    true
}
