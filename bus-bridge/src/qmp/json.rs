//! JSON as QEMU's monitor reads and writes it.
//!
//! Input is a byte stream with no framing: [`Streamer`] cuts it into messages the way
//! QEMU's lexer and streamer do (qobject/json-lexer.c, json-streamer.c): single-quoted
//! strings and `\'` are accepted; a byte that cannot start or continue a token is a lexical
//! error (`JSON parse error, stray '...'`), after which input is skipped up to the next
//! structural or control character; a message ends when its braces and brackets balance;
//! limits on message size (64 MiB), token count (2 Mi) and nesting (1024) protect the
//! VMM. Parse errors carry QEMU's texts (`JSON parse error, expecting value`, ...).
//!
//! Output ([`write`]) is one line of ASCII JSON per message with QEMU's spacing
//! (`{"return": {}}`), non-ASCII characters escaped.

use serde_json::{Map, Number, Value as Json};

/// Longest message, in bytes of tokens.
pub const MAX_TOKEN_SIZE: usize = 64 << 20;
/// Most tokens in one message.
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest nesting of objects and arrays.
pub const MAX_NESTING: i64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Comma,
    Colon,
    Integer,
    Float,
    Keyword,
    Str,
    /// A lexical error; the token holds the offending text.
    Error,
    /// A single token longer than the size limit.
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Digits,
    Sign,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one byte does in one state.
enum Step {
    /// Consume the byte and go to a state.
    Go(State),
    /// Consume the byte and finish a token.
    Emit(Tok),
    /// Finish the current token without consuming the byte (it is looked at again).
    EmitBefore(Tok),
    /// Go back to the start state without consuming the byte.
    Restart,
}

fn step(state: State, b: u8) -> Step {
    use State::*;
    use Step::*;
    let printable = (0x20..=0xfd).contains(&b);
    match state {
        Recovery => match b {
            b'\t' => Go(Recovery),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => Restart,
            _ => Go(Recovery),
        },
        DqString => match b {
            b'\\' => Go(DqEscape),
            b'"' => Emit(Tok::Str),
            _ if printable => Go(DqString),
            _ => Emit(Tok::Error),
        },
        DqEscape if printable => Go(DqString),
        SqString => match b {
            b'\\' => Go(SqEscape),
            b'\'' => Emit(Tok::Str),
            _ if printable => Go(SqString),
            _ => Emit(Tok::Error),
        },
        SqEscape if printable => Go(SqString),
        DqEscape | SqEscape => Emit(Tok::Error),
        Zero => match b {
            b'0'..=b'9' => Emit(Tok::Error),
            b'.' => Go(Mantissa),
            _ => EmitBefore(Tok::Integer),
        },
        Digits => match b {
            b'0'..=b'9' => Go(Digits),
            b'e' | b'E' => Go(ExpE),
            b'.' => Go(Mantissa),
            _ => EmitBefore(Tok::Integer),
        },
        Sign => match b {
            b'0' => Go(Zero),
            b'1'..=b'9' => Go(Digits),
            _ => Emit(Tok::Error),
        },
        Mantissa => match b {
            b'0'..=b'9' => Go(MantissaDigits),
            _ => Emit(Tok::Error),
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Go(MantissaDigits),
            b'e' | b'E' => Go(ExpE),
            _ => EmitBefore(Tok::Float),
        },
        ExpE => match b {
            b'+' | b'-' => Go(ExpSign),
            b'0'..=b'9' => Go(ExpDigits),
            _ => Emit(Tok::Error),
        },
        ExpSign => match b {
            b'0'..=b'9' => Go(ExpDigits),
            _ => Emit(Tok::Error),
        },
        ExpDigits => match b {
            b'0'..=b'9' => Go(ExpDigits),
            _ => EmitBefore(Tok::Float),
        },
        Keyword => match b {
            b'a'..=b'z' => Go(Keyword),
            _ => EmitBefore(Tok::Keyword),
        },
        Start => match b {
            b'"' => Go(DqString),
            b'\'' => Go(SqString),
            b'0' => Go(Zero),
            b'1'..=b'9' => Go(Digits),
            b'-' => Go(Sign),
            b'{' => Emit(Tok::LCurly),
            b'}' => Emit(Tok::RCurly),
            b'[' => Emit(Tok::LSquare),
            b']' => Emit(Tok::RSquare),
            b',' => Emit(Tok::Comma),
            b':' => Emit(Tok::Colon),
            b'a'..=b'z' => Go(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Restart,
            _ => Emit(Tok::Error),
        },
    }
}

/// One parsed message, or the error to answer it with.
pub type Message = Result<Json, String>;

/// Cuts a byte stream into JSON messages, as QEMU's monitor does.
pub struct Streamer {
    state: State,
    token: Vec<u8>,
    tokens: Vec<(Tok, Vec<u8>)>,
    braces: i64,
    brackets: i64,
    size: usize,
    out: Vec<Message>,
}

impl Default for Streamer {
    fn default() -> Self {
        Streamer {
            state: State::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
            size: 0,
            out: Vec::new(),
        }
    }
}

impl Streamer {
    pub fn new() -> Self {
        Streamer::default()
    }

    /// Feeds bytes; returns every message (or error) they complete.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Message> {
        for &b in data {
            self.feed_byte(b);
        }
        std::mem::take(&mut self.out)
    }

    fn feed_byte(&mut self, b: u8) {
        loop {
            match step(self.state, b) {
                Step::Go(next) => {
                    if next == State::Recovery {
                        self.token.clear();
                    } else {
                        self.token.push(b);
                    }
                    self.state = next;
                    if self.token.len() > MAX_TOKEN_SIZE {
                        self.token.clear();
                        self.state = State::Recovery;
                        self.token_done(Tok::TooLong);
                    }
                    return;
                }
                Step::Emit(tok) => {
                    self.token.push(b);
                    self.token_done(tok);
                    self.state = if tok == Tok::Error {
                        State::Recovery
                    } else {
                        State::Start
                    };
                    return;
                }
                Step::EmitBefore(tok) => {
                    self.token_done(tok);
                    self.state = State::Start;
                }
                Step::Restart => {
                    self.token.clear();
                    let was = self.state;
                    self.state = State::Start;
                    if was == State::Start {
                        return;
                    }
                }
            }
        }
    }

    fn reset(&mut self) {
        self.tokens.clear();
        self.braces = 0;
        self.brackets = 0;
        self.size = 0;
    }

    fn fail(&mut self, message: String) {
        self.out.push(Err(message));
        self.reset();
    }

    /// QEMU's `json_message_process_token()`.
    fn token_done(&mut self, tok: Tok) {
        let text = std::mem::take(&mut self.token);
        match tok {
            Tok::LCurly => self.braces += 1,
            Tok::RCurly => self.braces -= 1,
            Tok::LSquare => self.brackets += 1,
            Tok::RSquare => self.brackets -= 1,
            Tok::Error => {
                return self.fail(format!(
                    "JSON parse error, stray '{}'",
                    String::from_utf8_lossy(&text)
                ));
            }
            Tok::TooLong => return self.fail("JSON token size limit exceeded".into()),
            _ => {}
        }
        if self.size + text.len() + 1 > MAX_TOKEN_SIZE {
            return self.fail("JSON token size limit exceeded".into());
        }
        if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            return self.fail("JSON token count limit exceeded".into());
        }
        if self.braces + self.brackets > MAX_NESTING {
            return self.fail("JSON nesting depth limit exceeded".into());
        }
        self.size += text.len();
        self.tokens.push((tok, text));
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let tokens = std::mem::take(&mut self.tokens);
        let parsed = parse(&tokens);
        self.reset();
        self.out
            .push(parsed.map_err(|e| format!("JSON parse error, {e}")));
    }
}

/// Where a value being parsed goes.
enum Open {
    Array(Vec<Json>),
    /// An object waiting for its next key.
    Key(Map<String, Json>),
    /// An object waiting for the value of `key`.
    Member(Map<String, Json>, String),
}

type ParseResult<T> = Result<T, String>;

/// Parses one message's tokens (QEMU's `json_parser_parse()`, with its error texts).
///
/// Iterative, with an explicit stack: nesting is bounded by the streamer, but a recursive
/// parser would still put a client-chosen depth on a thread's stack.
fn parse(tokens: &[(Tok, Vec<u8>)]) -> ParseResult<Json> {
    const EOI: &str = "premature EOI";
    let mut stack: Vec<Open> = Vec::new();
    let mut i = 0;
    let next = |i: &mut usize| {
        let t = tokens.get(*i).map(|t| t.0);
        *i += 1;
        t
    };
    'value: loop {
        // Parse one value: a scalar, an empty container, or open a container.
        let (tok, text) = tokens.get(i).ok_or(EOI)?;
        i += 1;
        let mut value = match tok {
            Tok::LCurly => {
                if tokens.get(i).ok_or(EOI)?.0 == Tok::RCurly {
                    i += 1;
                    Json::Object(Map::new())
                } else {
                    stack.push(Open::Key(Map::new()));
                    continue 'value;
                }
            }
            Tok::LSquare => {
                if tokens.get(i).ok_or(EOI)?.0 == Tok::RSquare {
                    i += 1;
                    Json::Array(Vec::new())
                } else {
                    stack.push(Open::Array(Vec::new()));
                    continue 'value;
                }
            }
            Tok::Str => Json::String(parse_string(text)?),
            Tok::Integer | Tok::Float => parse_number(text),
            Tok::Keyword => match text.as_slice() {
                b"true" => Json::Bool(true),
                b"false" => Json::Bool(false),
                b"null" => Json::Null,
                other => {
                    return Err(format!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(other)
                    ));
                }
            },
            _ => return Err("expecting value".into()),
        };
        // Hand the finished value to its container, closing containers as they end.
        loop {
            match stack.pop() {
                None => return Ok(value),
                Some(Open::Array(mut list)) => {
                    list.push(value);
                    match next(&mut i).ok_or(EOI)? {
                        Tok::RSquare => value = Json::Array(list),
                        Tok::Comma => {
                            stack.push(Open::Array(list));
                            continue 'value;
                        }
                        _ => return Err("expected separator in list".into()),
                    }
                }
                Some(Open::Key(map)) => {
                    let Json::String(key) = value else {
                        return Err("key is not a string in object".into());
                    };
                    if next(&mut i).ok_or(EOI)? != Tok::Colon {
                        return Err("missing : in object pair".into());
                    }
                    stack.push(Open::Member(map, key));
                    continue 'value;
                }
                Some(Open::Member(mut map, key)) => {
                    if map.contains_key(&key) {
                        return Err("duplicate key".into());
                    }
                    map.insert(key, value);
                    match next(&mut i).ok_or(EOI)? {
                        Tok::RCurly => value = Json::Object(map),
                        Tok::Comma => {
                            stack.push(Open::Key(map));
                            continue 'value;
                        }
                        _ => return Err("expected separator in dict".into()),
                    }
                }
            }
        }
    }
}

/// An integer as i64 if it fits, else u64, else a float; floats as floats.
fn parse_number(text: &[u8]) -> Json {
    let text = String::from_utf8_lossy(text);
    if let Ok(i) = text.parse::<i64>() {
        return Json::Number(i.into());
    }
    if let Ok(u) = text.parse::<u64>() {
        return Json::Number(u.into());
    }
    text.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Json::Null, Json::Number)
}

fn hex4(bytes: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(bytes.get(..4)?).ok()?;
    u32::from_str_radix(s, 16)
        .ok()
        .filter(|_| s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A string token's value, escapes resolved (QEMU's `parse_string()`).
fn parse_string(token: &[u8]) -> ParseResult<String> {
    let quote = token[0];
    let body = &token[1..token.len() - 1];
    debug_assert_eq!(token.last(), Some(&quote));
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let esc = body.get(i + 1).copied().unwrap_or(0);
        i += 2;
        let c = match esc {
            b'"' => '"',
            b'\'' => '\'',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let start = i - 2;
                let mut cp = hex4(&body[i..]);
                i += 4;
                if let Some(lead @ 0xd800..=0xdbff) = cp
                    && body.get(i) == Some(&b'\\')
                    && body.get(i + 1) == Some(&b'u')
                {
                    cp = match hex4(&body[i + 2..]) {
                        Some(trail @ 0xdc00..=0xdfff) => {
                            i += 6;
                            Some(0x10000 + ((lead & 0x3ff) << 10) + (trail & 0x3ff))
                        }
                        _ => None,
                    };
                }
                match cp.and_then(char::from_u32) {
                    Some(c) => c,
                    None => {
                        let end = i.min(body.len());
                        return Err(format!(
                            "{} is not a valid Unicode character",
                            String::from_utf8_lossy(&body[start..end])
                        ));
                    }
                }
            }
            _ => return Err("invalid escape sequence in string".into()),
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    String::from_utf8(out).map_err(|_| "invalid UTF-8 sequence in string".into())
}

/// Writes `value` as QEMU does: `{"a": 1, "b": [1, 2]}`, ASCII only.
pub fn write(value: &Json) -> String {
    let mut out = String::new();
    write_into(value, &mut out);
    out
}

/// Writes a string as [`write`] does, escaped and quoted, at the end of `out`.
pub fn write_str(s: &str, out: &mut String) {
    write_string(s, out);
}

/// Appends `value` to `out` as [`write`] writes it.
pub fn write_into(value: &Json, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&n.to_string()),
        Json::String(s) => write_string(s, out),
        Json::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_into(v, out);
            }
            out.push(']');
        }
        Json::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(k, out);
                out.push_str(": ");
                write_into(v, out);
            }
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    out.push('"');
    // Most strings (names, paths, types) need no escape: copy them whole.
    if s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04X}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed(input: &str) -> Vec<Message> {
        Streamer::new().feed(input.as_bytes())
    }

    #[test]
    fn messages_without_framing() {
        let out = feed(
            r#"{"execute": "a"}{'execute':'b', "arguments": {"x": [1, -2, 3.5, true, null]}}"#,
        );
        assert_eq!(
            out,
            vec![
                Ok(json!({"execute": "a"})),
                Ok(json!({"execute": "b", "arguments": {"x": [1, -2, 3.5, true, null]}}))
            ]
        );
        // Split anywhere.
        let mut s = Streamer::new();
        let text = br#"{"execute": "qom-get", "arguments": {"path": "/machine"}}"#;
        let mut got = Vec::new();
        for chunk in text.chunks(3) {
            got.extend(s.feed(chunk));
        }
        assert_eq!(
            got,
            vec![Ok(
                json!({"execute": "qom-get", "arguments": {"path": "/machine"}})
            )]
        );
        // A top-level number needs the next byte to end.
        assert_eq!(feed("42 "), vec![Ok(json!(42))]);
        assert_eq!(
            feed("18446744073709551615 "),
            vec![Ok(json!(18446744073709551615u64))]
        );
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(
            feed(r#"["a\"b\'c\\\/\n\u00e9\ud83d\ude00"]"#),
            vec![Ok(json!(["a\"b'c\\/\n\u{e9}\u{1f600}"]))]
        );
        assert_eq!(feed(r#"['it"s']"#), vec![Ok(json!(["it\"s"]))]);
        assert_eq!(
            feed(r#"["\q"]"#),
            vec![Err(
                "JSON parse error, invalid escape sequence in string".into()
            )]
        );
        assert_eq!(
            feed(r#"["\ud800"]"#),
            vec![Err(
                "JSON parse error, \\ud800 is not a valid Unicode character".into()
            )]
        );
    }

    #[test]
    fn errors_have_qemus_texts_and_recover() {
        assert_eq!(
            feed("{]"),
            vec![Err("JSON parse error, expecting value".into())]
        );
        assert_eq!(
            feed(r#"{"a" 1}"#),
            vec![Err("JSON parse error, missing : in object pair".into())]
        );
        assert_eq!(
            feed(r#"{"a": 1 "b": 2}"#),
            vec![Err("JSON parse error, expected separator in dict".into())]
        );
        assert_eq!(
            feed(r#"{1: 2}"#),
            vec![Err("JSON parse error, key is not a string in object".into())]
        );
        assert_eq!(
            feed(r#"{"a": 1, "a": 2}"#),
            vec![Err("JSON parse error, duplicate key".into())]
        );
        assert_eq!(
            feed(r#"[1 2]"#),
            vec![Err("JSON parse error, expected separator in list".into())]
        );
        assert_eq!(
            feed(r#"{"a": nope}"#),
            vec![Err("JSON parse error, invalid keyword 'nope'".into())]
        );
        // QEMU keeps the first error: "Missing value in dict" never shows.
        assert_eq!(
            feed(r#"{"a": }"#),
            vec![Err("JSON parse error, expecting value".into())]
        );
        assert_eq!(
            feed(r#"{[1 2]: 3}"#),
            vec![Err("JSON parse error, expected separator in list".into())]
        );
        assert_eq!(
            feed(r#"{"a": [1, {"b": [true]}], "c": {}}"#),
            vec![Ok(json!({"a": [1, {"b": [true]}], "c": {}}))]
        );
        assert_eq!(
            feed("}"),
            vec![Err("JSON parse error, expecting value".into())]
        );
        // A stray byte, then everything up to the next structural character is skipped.
        assert_eq!(
            feed(r#"@garbage {"ok": 1}"#),
            vec![
                Err("JSON parse error, stray '@'".into()),
                Ok(json!({"ok": 1}))
            ]
        );
        assert_eq!(
            feed("01 "),
            vec![Err("JSON parse error, stray '01'".into())]
        );
        // A control character forces a known state (the QMP spec's recovery).
        let out = feed("{\"execute\": \"x\x1b{\"ok\": 2}");
        assert_eq!(out.len(), 2);
        assert!(
            out[0]
                .as_ref()
                .unwrap_err()
                .starts_with("JSON parse error, stray")
        );
        assert_eq!(out[1], Ok(json!({"ok": 2})));
    }

    #[test]
    fn limits_protect_the_vmm() {
        let deep = "[".repeat(1100);
        let out = feed(&deep);
        assert_eq!(out, vec![Err("JSON nesting depth limit exceeded".into())]);
        // The deepest message allowed parses (on a small stack: the parser does not recurse).
        let ok = format!("{}{}", "[".repeat(1024), "]".repeat(1024));
        let parsed = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || feed(&ok))
            .unwrap()
            .join()
            .unwrap();
        assert!(parsed[0].is_ok());
        let mut s = Streamer::new();
        let big = format!("[\"{}\"]", "x".repeat(MAX_TOKEN_SIZE + 1));
        let out = s.feed(big.as_bytes());
        assert!(
            out.iter()
                .any(|m| m == &Err("JSON token size limit exceeded".to_owned())),
            "{:?}",
            out.len()
        );
        // After the limit, the streamer still works.
        assert_eq!(s.feed(br#"{"ok": 3}"#).last(), Some(&Ok(json!({"ok": 3}))));
    }

    #[test]
    fn writes_like_qemu() {
        let v = json!({"return": {}, "id": "x\u{e9}\n", "l": [1, {}], "e": []});
        assert_eq!(
            write(&v),
            r#"{"return": {}, "id": "x\u00E9\n", "l": [1, {}], "e": []}"#
        );
        assert_eq!(write(&json!("\u{1f600}")), r#""\uD83D\uDE00""#);
    }
}
