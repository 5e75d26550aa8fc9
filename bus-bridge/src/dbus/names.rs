//! How qom names become D-Bus names.
//!
//! - **Object paths**: a qom path maps to an object path under the root (`/org/qomu/VM1`) with
//!   a reversible escape: every byte outside `[A-Za-z0-9]` becomes `_xx` (two lower-case hex
//!   digits), so `/machine/peripheral-anon/device[0]` is
//!   `/org/qomu/VM1/machine/peripheral_2danon/device_5b0_5d`. Only the canonical form maps
//!   back; anything else names no object.
//! - **Interface and member names**: qom names are split at `-`, `_` and `.` and joined in
//!   CamelCase (`isa-serial` → `IsaSerial`, `queue-limit` → `QueueLimit`); an all-capitals
//!   word is capitalised (`STOP` → `Stop`, `DEVICE_DELETED` → `DeviceDeleted`); any other
//!   byte that D-Bus forbids is dropped, and a name that would start with a digit gets a
//!   leading `_`. Two qom names of one scope that map to the same D-Bus name are told apart
//!   by a `_2`, `_3`... suffix on the later one (see [`NameTable`]).

use std::collections::HashMap;
use std::fmt::Write as _;

/// The object path of the qom root when the bus name is the default one.
pub const DEFAULT_ROOT: &str = "/org/qomu/VM1";

/// The object path of `qom_path` (absolute, canonical) under `root`.
pub fn object_path(root: &str, qom_path: &str) -> String {
    let mut out = String::with_capacity(root.len() + qom_path.len() + 8);
    out.push_str(root);
    for segment in qom_path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        escape_segment(segment, &mut out);
    }
    out
}

/// Appends the escaped form of one path segment.
pub fn escape_segment(segment: &str, out: &mut String) {
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "_{b:02x}");
        }
    }
}

/// The qom path an object path under `root` names, if it is in canonical escaped form.
pub fn qom_path(root: &str, object_path: &str) -> Option<String> {
    let rest = object_path.strip_prefix(root)?;
    if rest.is_empty() {
        return Some("/".to_owned());
    }
    let rest = rest.strip_prefix('/')?;
    let mut out = String::with_capacity(rest.len());
    for segment in rest.split('/') {
        out.push('/');
        out.push_str(&unescape_segment(segment)?);
    }
    Some(out)
}

/// The qom name of one escaped segment; `None` unless `segment` is canonical.
pub fn unescape_segment(segment: &str) -> Option<String> {
    if segment.is_empty() {
        return None;
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex
                    .iter()
                    .all(|h| h.is_ascii_digit() || (b'a'..=b'f').contains(h))
                {
                    return None;
                }
                let byte = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                // `_41` for `A` is not the canonical form of anything.
                if byte.is_ascii_alphanumeric() || byte == b'/' || byte == 0 {
                    return None;
                }
                out.push(byte);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// The CamelCase D-Bus form of a qom name, before collisions are resolved.
pub fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for word in name.split(['-', '_', '.', ' ']).filter(|w| !w.is_empty()) {
        let word: String = word.chars().filter(char::is_ascii_alphanumeric).collect();
        let shouting = word.chars().any(|c| c.is_ascii_uppercase())
            && !word.chars().any(|c| c.is_ascii_lowercase());
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            if shouting {
                out.extend(chars.map(|c| c.to_ascii_lowercase()));
            } else {
                out.extend(chars);
            }
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The `snake_case` form of a qom name, for method and signal argument names.
pub fn arg_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Gives qom names of one scope distinct D-Bus names, first come first served: the first
/// name to claim a CamelCase form keeps it; a later different name with the same form gets
/// `_2`, `_3`... Names are handed out once and never change while the process lives.
#[derive(Debug, Default)]
pub struct NameTable {
    by_qom: HashMap<String, String>,
    taken: HashMap<String, String>,
}

impl NameTable {
    /// The D-Bus name of `qom_name`, assigning one on first use.
    pub fn name_of(&mut self, qom_name: &str) -> String {
        if let Some(name) = self.by_qom.get(qom_name) {
            return name.clone();
        }
        let base = camel_case(qom_name);
        let mut candidate = base.clone();
        let mut n = 2;
        while self.taken.contains_key(&candidate) {
            candidate = format!("{base}_{n}");
            n += 1;
        }
        self.taken.insert(candidate.clone(), qom_name.to_owned());
        self.by_qom.insert(qom_name.to_owned(), candidate.clone());
        candidate
    }

    /// The qom name a D-Bus name was given to.
    pub fn qom_name(&self, dbus_name: &str) -> Option<&str> {
        self.taken.get(dbus_name).map(String::as_str)
    }
}

/// Checks a well-known bus name (`org.qomu.VM1`) as the D-Bus specification defines it.
///
/// # Errors
/// What is wrong with it, in a sentence.
pub fn check_bus_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("'{name}' is not a valid bus name: {why}"));
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if name.starts_with(':') {
        return bad("unique names (':1.2') are given by the bus");
    }
    let elements: Vec<&str> = name.split('.').collect();
    if elements.len() < 2 {
        return bad("it needs at least two elements separated by '.'");
    }
    for e in elements {
        if e.is_empty() {
            return bad("it has an empty element");
        }
        if e.starts_with(|c: char| c.is_ascii_digit()) {
            return bad("an element starts with a digit");
        }
        if !e
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad("only letters, digits, '_' and '-' are allowed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example() {
        let p = object_path(DEFAULT_ROOT, "/machine/peripheral-anon/device[0]");
        assert_eq!(p, "/org/qomu/VM1/machine/peripheral_2danon/device_5b0_5d");
        assert_eq!(
            qom_path(DEFAULT_ROOT, &p).as_deref(),
            Some("/machine/peripheral-anon/device[0]")
        );
        assert_eq!(object_path(DEFAULT_ROOT, "/"), DEFAULT_ROOT);
        assert_eq!(qom_path(DEFAULT_ROOT, DEFAULT_ROOT).as_deref(), Some("/"));
    }

    #[test]
    fn escape_round_trips_every_byte() {
        let all: String = (1u8..128).map(char::from).filter(|&c| c != '/').collect();
        let path = format!("/{all}/x_y/é∂");
        let escaped = object_path(DEFAULT_ROOT, &path);
        assert!(
            escaped
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'/')
        );
        assert_eq!(qom_path(DEFAULT_ROOT, &escaped), Some(path));
    }

    #[test]
    fn only_canonical_paths_map_back() {
        for bad in [
            "/org/qomu/VM1/machine/_41", // escaped alphanumeric
            "/org/qomu/VM1/machine/_2",  // truncated
            "/org/qomu/VM1/machine/_2D", // upper-case hex
            "/org/qomu/VM1/machine/_zz", // not hex
            "/org/qomu/VM1/machine/_2f", // a slash inside a segment
            "/org/qomu/VM1/machine/_00", // NUL
            "/org/qomu/VM1/machine/_c3", // not UTF-8
            "/org/qomu/VM1machine",      // not below the root
            "/org/qomu/VM2/machine",     // another root
            "/org/qomu/VM1/",            // empty segment
        ] {
            assert_eq!(qom_path(DEFAULT_ROOT, bad), None, "{bad}");
        }
    }

    #[test]
    fn camel_case_forms() {
        assert_eq!(camel_case("isa-serial"), "IsaSerial");
        assert_eq!(camel_case("queue-limit"), "QueueLimit");
        assert_eq!(camel_case("STOP"), "Stop");
        assert_eq!(camel_case("DEVICE_DELETED"), "DeviceDeleted");
        assert_eq!(camel_case("x86_64-cpu"), "X8664Cpu");
        assert_eq!(camel_case("mc146818rtc"), "Mc146818rtc");
        assert_eq!(camel_case("qomuX86Machine"), "QomuX86Machine");
        assert_eq!(camel_case("8250"), "_8250");
        assert_eq!(camel_case("-"), "_");
        assert_eq!(arg_name("cpu-index"), "cpu_index");
    }

    #[test]
    fn bus_names() {
        assert!(check_bus_name("org.qomu.VM1").is_ok());
        assert!(check_bus_name("org.qomu.vm-2_b").is_ok());
        for bad in [
            "qomu",
            "org..qomu",
            "org.1qomu",
            ":1.2",
            "org.qomu.VM1!",
            "",
        ] {
            assert!(check_bus_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn collisions_get_suffixes() {
        let mut t = NameTable::default();
        assert_eq!(t.name_of("foo-bar"), "FooBar");
        assert_eq!(t.name_of("foo_bar"), "FooBar_2");
        assert_eq!(t.name_of("FOO-BAR"), "FooBar_3");
        assert_eq!(t.name_of("foo-bar"), "FooBar");
        assert_eq!(t.qom_name("FooBar_2"), Some("foo_bar"));
        assert_eq!(t.qom_name("Nope"), None);
    }
}
