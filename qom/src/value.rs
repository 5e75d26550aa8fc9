//! The one value type of the tree.
//!
//! Values serialize to plain JSON (QMP's form): booleans, numbers, strings, arrays and
//! objects, with no tags. Deserializing plain JSON yields the loosest variant (a string
//! becomes [`Value::Str`], a non-negative number [`Value::Int`] when it fits), and
//! [`Kind::check`](crate::Kind::check) then turns it into what a property or argument
//! declares ([`Value::Enum`], [`Value::Path`], [`Value::UInt`], ...).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A property value, action argument or result, or notifier payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Str(String),
    /// One of an enum's declared values.
    Enum(String),
    /// A qom object path (empty for an unset link).
    Path(String),
    List(Vec<Value>),
    Map(Fields),
}

/// A field name: borrowed when the program spells it (`"child"`), owned when it came in
/// from a client.
pub type Name = Cow<'static, str>;

/// The fields of a [`Value::Map`], kept sorted by name.
///
/// A payload has a handful of fields and is built for every event someone listens to:
/// one vector and names the program spells need one allocation, where a `BTreeMap` of
/// `String`s needed a node and a string per field (docs/benchmarks.md, `emit_*`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields(Vec<(Name, Value)>);

impl Fields {
    pub fn new() -> Self {
        Fields(Vec::new())
    }

    pub fn with_capacity(n: usize) -> Self {
        Fields(Vec::with_capacity(n))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// Sets a field; returns the value it replaced.
    pub fn insert(&mut self, name: impl Into<Name>, value: Value) -> Option<Value> {
        let name = name.into();
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Value> {
        self.position(name).ok().map(|i| self.0.remove(i).1)
    }

    /// The fields in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> {
        self.0.iter().map(|(k, _)| &**k)
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &Value> {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn into_keys(self) -> impl Iterator<Item = String> {
        self.0.into_iter().map(|(k, _)| k.into_owned())
    }
}

impl IntoIterator for Fields {
    type Item = (String, Value);
    type IntoIter =
        std::iter::Map<std::vec::IntoIter<(Name, Value)>, fn((Name, Value)) -> (String, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter().map(|(k, v)| (k.into_owned(), v))
    }
}

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a str, &'a Value);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Name, Value)>,
        fn(&'a (Name, Value)) -> (&'a str, &'a Value),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (&**k, v))
    }
}

impl<K: Into<Name>> FromIterator<(K, Value)> for Fields {
    #[inline]
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(items: I) -> Self {
        // One allocation of the right size; payloads mostly come with their fields in
        // order already, and the sort and dedup below are then a scan each.
        let mut v: Vec<(Name, Value)> = items.into_iter().map(|(k, v)| (k.into(), v)).collect();
        if !v.is_sorted_by(|a, b| a.0 < b.0) {
            // Stable, so that of fields named twice the last one given stays last...
            v.sort_by(|a, b| a.0.cmp(&b.0));
            // ...and wins, as a later insert would.
            let mut out: Vec<(Name, Value)> = Vec::with_capacity(v.len());
            for item in v {
                match out.last_mut() {
                    Some(last) if last.0 == item.0 => *last = item,
                    _ => out.push(item),
                }
            }
            v = out;
        }
        Fields(v)
    }
}

impl<K: Into<Name>> Extend<(K, Value)> for Fields {
    fn extend<I: IntoIterator<Item = (K, Value)>>(&mut self, items: I) {
        let items = items.into_iter();
        self.0.reserve(items.size_hint().0);
        for (k, v) in items {
            self.insert(k, v);
        }
    }
}

impl From<BTreeMap<String, Value>> for Fields {
    fn from(map: BTreeMap<String, Value>) -> Self {
        // Already sorted.
        Fields(map.into_iter().map(|(k, v)| (Name::Owned(k), v)).collect())
    }
}

impl Value {
    /// Builds a [`Value::Map`] from name/value pairs.
    #[inline]
    pub fn map<K: Into<Name>>(fields: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Map(fields.into_iter().collect())
    }

    /// A short name of the variant, as used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Bool(_) => "boolean",
            Value::Int(_) | Value::UInt(_) => "integer",
            Value::Str(_) => "string",
            Value::Enum(_) => "enum value",
            Value::Path(_) => "object path",
            Value::List(_) => "list",
            Value::Map(_) => "object",
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as `i64`, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::UInt(u) => i64::try_from(*u).ok(),
            _ => None,
        }
    }

    /// The value as `u64`, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::UInt(u) => Some(*u),
            _ => None,
        }
    }

    /// The text of a string, enum value or path.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) | Value::Enum(s) | Value::Path(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&Fields> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// A field of a map value.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.as_map().and_then(|m| m.get(name))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::UInt(v)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::UInt(v.into())
    }
}
impl From<u16> for Value {
    fn from(v: u16) -> Self {
        Value::UInt(v.into())
    }
}
impl From<u8> for Value {
    fn from(v: u8) -> Self {
        Value::UInt(v.into())
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Self {
        Value::List(v.into_iter().map(Into::into).collect())
    }
}

impl fmt::Display for Value {
    /// JSON-like text, for messages and the human monitor.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Str(s) | Value::Enum(s) | Value::Path(s) => write!(f, "{s:?}"),
            Value::List(l) => {
                f.write_str("[")?;
                for (i, v) in l.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Value::Map(m) => {
                f.write_str("{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k:?}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Str(v) | Value::Enum(v) | Value::Path(v) => s.serialize_str(v),
            Value::List(l) => {
                let mut seq = s.serialize_seq(Some(l.len()))?;
                for v in l {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Map(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a boolean, integer, string, list or object")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::UInt(v), Value::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Err(E::custom(format_args!(
            "floating-point number {v} is not supported"
        )))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Err(E::custom("null is not a value"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::List(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Fields::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            out.insert(k, v);
        }
        Ok(Value::Map(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_is_untagged() {
        let v = Value::map([
            ("a", Value::Bool(true)),
            ("b", Value::Int(-3)),
            ("c", Value::UInt(u64::MAX)),
            ("d", Value::from(vec!["x", "y"])),
            ("e", Value::Path("/machine".into())),
        ]);
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(
            text,
            r#"{"a":true,"b":-3,"c":18446744073709551615,"d":["x","y"],"e":"/machine"}"#
        );
        let back: Value = serde_json::from_str(&text).unwrap();
        // Paths come back as plain strings: the declared kind restores them.
        assert_eq!(back.field("e"), Some(&Value::Str("/machine".into())));
        assert_eq!(back.field("c"), Some(&Value::UInt(u64::MAX)));
        assert_eq!(back.field("b"), Some(&Value::Int(-3)));
    }

    #[test]
    fn fields_stay_sorted_and_the_last_of_a_name_wins() {
        let v = Value::map([
            ("b", Value::UInt(1)),
            ("a", Value::UInt(2)),
            ("b", Value::UInt(3)),
        ]);
        let m = v.as_map().unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m.get("b"), Some(&Value::UInt(3)));
        let mut f: Fields = [("z", Value::Bool(true))].into_iter().collect();
        assert_eq!(f.insert("m", Value::Int(1)), None);
        assert_eq!(f.insert("z", Value::Bool(false)), Some(Value::Bool(true)));
        assert_eq!(f.keys().collect::<Vec<_>>(), ["m", "z"]);
        assert_eq!(f.remove("m"), Some(Value::Int(1)));
        assert_eq!(f.len(), 1);
        // Equal maps compare equal whatever order they were built in.
        assert_eq!(
            Value::map([("x", Value::Int(1)), ("y", Value::Int(2))]),
            Value::map([("y", Value::Int(2)), ("x", Value::Int(1))])
        );
    }

    #[test]
    fn floats_and_null_are_refused() {
        assert!(serde_json::from_str::<Value>("1.5").is_err());
        assert!(serde_json::from_str::<Value>("null").is_err());
    }
}
