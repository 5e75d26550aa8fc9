//! Kinds: the declared shape of a property, an action argument or a notifier payload.
//!
//! A kind names itself the way QEMU's `qom-list` does (`bool`, `uint32`, `str`, `link<T>`,
//! `child<T>`, an enum's QAPI name), checks and converts incoming values, and carries the
//! range of an integer so that an out-of-range write is refused before anything changes.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::value::Value;

/// A signed integer kind with its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntKind {
    pub name: &'static str,
    pub min: i64,
    pub max: i64,
}

/// An unsigned integer kind with its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UIntKind {
    pub name: &'static str,
    pub min: u64,
    pub max: u64,
}

/// An enumeration: a named set of strings (QEMU's QAPI enums, e.g. `RunState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumKind {
    pub name: String,
    pub values: Vec<String>,
}

/// A field of a struct kind (a notifier payload, an action result, a map argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub kind: Kind,
    pub optional: bool,
    pub description: String,
}

impl Field {
    /// A required field.
    pub fn new(name: &str, kind: Kind, description: &str) -> Self {
        Field {
            name: name.to_owned(),
            kind,
            optional: false,
            description: description.to_owned(),
        }
    }

    /// An optional field.
    pub fn optional(name: &str, kind: Kind, description: &str) -> Self {
        Field {
            optional: true,
            ..Field::new(name, kind, description)
        }
    }
}

/// A struct: a map value with declared fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructKind {
    pub name: String,
    pub fields: Vec<Field>,
}

/// The declared shape of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int(IntKind),
    UInt(UIntKind),
    Str,
    Enum(Arc<EnumKind>),
    /// Any object path (for arguments).
    Path,
    /// `link<T>`: a path to an object of type `T`, checked on write and re-checked on use.
    Link(Arc<str>),
    /// `child<T>`: an owned child; listed, never written.
    Child(Arc<str>),
    List(Arc<Kind>),
    Struct(Arc<StructKind>),
    Any,
}

macro_rules! int_kinds {
    ($($fname:ident $name:literal $t:ty;)*) => {$(
        #[doc = concat!("`", $name, "`: the full range of `", stringify!($t), "`.")]
        pub fn $fname() -> Kind {
            Kind::Int(IntKind { name: $name, min: <$t>::MIN.into(), max: <$t>::MAX.into() })
        }
    )*};
}
macro_rules! uint_kinds {
    ($($fname:ident $name:literal $t:ty;)*) => {$(
        #[doc = concat!("`", $name, "`: the full range of `", stringify!($t), "`.")]
        pub fn $fname() -> Kind {
            Kind::UInt(UIntKind { name: $name, min: 0, max: <$t>::MAX.into() })
        }
    )*};
}

impl Kind {
    int_kinds! {
        int8 "int8" i8;
        int16 "int16" i16;
        int32 "int32" i32;
        int64 "int64" i64;
    }
    uint_kinds! {
        uint8 "uint8" u8;
        uint16 "uint16" u16;
        uint32 "uint32" u32;
        uint64 "uint64" u64;
    }

    /// An unsigned integer limited to `min..=max`, named like the narrowest QEMU type holding it.
    pub fn uint_range(min: u64, max: u64) -> Kind {
        let name = match max {
            m if m <= u8::MAX.into() => "uint8",
            m if m <= u16::MAX.into() => "uint16",
            m if m <= u32::MAX.into() => "uint32",
            _ => "uint64",
        };
        Kind::UInt(UIntKind { name, min, max })
    }

    /// A signed integer limited to `min..=max`.
    pub fn int_range(min: i64, max: i64) -> Kind {
        Kind::Int(IntKind {
            name: "int64",
            min,
            max,
        })
    }

    /// QEMU's `size`: a byte count.
    pub fn size() -> Kind {
        Kind::UInt(UIntKind {
            name: "size",
            min: 0,
            max: u64::MAX,
        })
    }

    /// An enum kind from its QAPI name and values.
    pub fn enumeration(name: &str, values: &[&str]) -> Kind {
        Kind::Enum(Arc::new(EnumKind {
            name: name.to_owned(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }))
    }

    /// A struct kind from its name and fields.
    pub fn structure(name: &str, fields: Vec<Field>) -> Kind {
        Kind::Struct(Arc::new(StructKind {
            name: name.to_owned(),
            fields,
        }))
    }

    pub fn list(of: Kind) -> Kind {
        Kind::List(Arc::new(of))
    }

    pub fn link(typename: &str) -> Kind {
        Kind::Link(typename.into())
    }

    /// The name `qom-list` shows for this kind.
    pub fn type_name(&self) -> String {
        match self {
            Kind::Bool => "bool".into(),
            Kind::Int(i) => i.name.into(),
            Kind::UInt(u) => u.name.into(),
            Kind::Str => "str".into(),
            Kind::Enum(e) => e.name.clone(),
            Kind::Path => "path".into(),
            Kind::Link(t) => format!("link<{t}>"),
            Kind::Child(t) => format!("child<{t}>"),
            Kind::List(k) => format!("list<{}>", k.type_name()),
            Kind::Struct(s) => s.name.clone(),
            Kind::Any => "any".into(),
        }
    }

    /// The JSON type values of this kind travel as: `boolean`, `integer`, `string`,
    /// `array`, `object`, or `any`.
    pub fn json_type(&self) -> &'static str {
        match self {
            Kind::Bool => "boolean",
            Kind::Int(_) | Kind::UInt(_) => "integer",
            Kind::Str | Kind::Enum(_) | Kind::Path | Kind::Link(_) | Kind::Child(_) => "string",
            Kind::List(_) => "array",
            Kind::Struct(_) => "object",
            Kind::Any => "any",
        }
    }

    /// The out-of-range error for `value` of this (integer) kind.
    fn out_of_range(&self, name: &str, value: &Value) -> Error {
        let (min, max, type_name, full_range) = match self {
            Kind::Int(k) => {
                let full: (i64, i64) = match k.name {
                    "int8" => (i8::MIN.into(), i8::MAX.into()),
                    "int16" => (i16::MIN.into(), i16::MAX.into()),
                    "int32" => (i32::MIN.into(), i32::MAX.into()),
                    _ => (i64::MIN, i64::MAX),
                };
                (
                    k.min.to_string(),
                    k.max.to_string(),
                    k.name,
                    (k.min, k.max) == full,
                )
            }
            Kind::UInt(k) => {
                let full: u64 = match k.name {
                    "uint8" => u8::MAX.into(),
                    "uint16" => u16::MAX.into(),
                    "uint32" => u32::MAX.into(),
                    _ => u64::MAX,
                };
                (
                    k.min.to_string(),
                    k.max.to_string(),
                    k.name,
                    k.min == 0 && k.max == full,
                )
            }
            _ => (String::new(), String::new(), "integer", false),
        };
        Error::OutOfRange {
            name: name.to_owned(),
            value: value.to_string(),
            min,
            max,
            type_name,
            full_range,
        }
    }

    /// What the kind accepts, for error messages ("an integer between 1 and 255").
    pub fn describe(&self) -> String {
        match self {
            Kind::Bool => "a boolean".into(),
            Kind::Int(i) => format!("an integer between {} and {}", i.min, i.max),
            Kind::UInt(u) => format!("an integer between {} and {}", u.min, u.max),
            Kind::Str => "a string".into(),
            Kind::Enum(e) => format!("one of {}", e.values.join(", ")),
            Kind::Path | Kind::Child(_) => "an object path".into(),
            Kind::Link(t) => format!("the path of a '{t}' object, or an empty string"),
            Kind::List(k) => format!("a list of {}", k.type_name()),
            Kind::Struct(s) => {
                let mut out = format!("an object ({})", s.name);
                if !s.fields.is_empty() {
                    out.push_str(" with ");
                    for (i, f) in s.fields.iter().enumerate() {
                        let _ = write!(
                            out,
                            "{}{}{}",
                            if i > 0 { ", " } else { "" },
                            f.name,
                            if f.optional { "?" } else { "" }
                        );
                    }
                }
                out
            }
            Kind::Any => "any value".into(),
        }
    }

    /// Checks `value` against the kind and converts it to the kind's canonical variant.
    ///
    /// `name` is what the error messages call the value (a property or argument name).
    ///
    /// # Errors
    /// [`Error::WrongType`], [`Error::OutOfRange`] or [`Error::InvalidEnum`]; struct kinds
    /// also report [`Error::MissingArgument`] and [`Error::UnexpectedArgument`] for fields.
    pub fn check(&self, name: &str, value: Value) -> Result<Value> {
        match (self, value) {
            (Kind::Bool, v @ Value::Bool(_)) => Ok(v),
            (Kind::Int(k), v @ (Value::Int(_) | Value::UInt(_))) => {
                match v.as_i64().filter(|i| (k.min..=k.max).contains(i)) {
                    Some(i) => Ok(Value::Int(i)),
                    None => Err(self.out_of_range(name, &v)),
                }
            }
            (Kind::UInt(k), v @ (Value::Int(_) | Value::UInt(_))) => {
                match v.as_u64().filter(|u| (k.min..=k.max).contains(u)) {
                    Some(u) => Ok(Value::UInt(u)),
                    None => Err(self.out_of_range(name, &v)),
                }
            }
            (Kind::Str, Value::Str(s) | Value::Enum(s) | Value::Path(s)) => Ok(Value::Str(s)),
            (Kind::Enum(e), Value::Str(s) | Value::Enum(s)) => {
                if e.values.contains(&s) {
                    Ok(Value::Enum(s))
                } else {
                    Err(Error::InvalidEnum {
                        name: name.to_owned(),
                        value: s,
                        allowed: e.values.join(", "),
                    })
                }
            }
            (Kind::Path | Kind::Link(_), Value::Str(s) | Value::Path(s)) => Ok(Value::Path(s)),
            (Kind::List(k), Value::List(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| k.check(&format!("{name}[{i}]"), v))
                .collect::<Result<Vec<_>>>()
                .map(Value::List),
            (Kind::Struct(s), Value::Map(mut fields)) => {
                let mut out = crate::Fields::with_capacity(s.fields.len());
                for f in &s.fields {
                    match fields.remove(&f.name) {
                        Some(v) => {
                            out.insert(f.name.clone(), f.kind.check(&f.name, v)?);
                        }
                        None if f.optional => {}
                        None => {
                            return Err(Error::MissingArgument {
                                action: s.name.clone(),
                                argument: f.name.clone(),
                            });
                        }
                    }
                }
                if let Some(extra) = fields.into_keys().next() {
                    return Err(Error::UnexpectedArgument {
                        action: s.name.clone(),
                        argument: extra,
                    });
                }
                Ok(Value::Map(out))
            }
            (Kind::Any, v) => Ok(v),
            (kind, v) => Err(Error::wrong_type(name, kind, v.type_name())),
        }
    }

    /// Parses a value given as text (a command-line `KEY=VALUE`), as QEMU's option parser
    /// does: `on`/`off`/`true`/`false`/`yes`/`no` for booleans, decimal or `0x` hex
    /// integers, sizes with a `k`/`M`/`G`/`T` suffix (powers of 1024), then checks it.
    ///
    /// # Errors
    /// Text that does not parse as the kind, and everything [`Kind::check`] reports.
    pub fn parse_text(&self, name: &str, text: &str) -> Result<Value> {
        let value = match self {
            Kind::Bool => match text {
                "on" | "true" | "yes" => Value::Bool(true),
                "off" | "false" | "no" => Value::Bool(false),
                _ => return Err(Error::wrong_type(name, self, &format!("'{text}'"))),
            },
            Kind::Int(_) => {
                let (negative, digits) = match text.strip_prefix('-') {
                    Some(rest) => (true, rest),
                    None => (false, text),
                };
                let magnitude = parse_unsigned(digits, false)
                    .ok_or_else(|| Error::wrong_type(name, self, &format!("'{text}'")))?;
                let v = i128::from(magnitude) * if negative { -1 } else { 1 };
                match i64::try_from(v) {
                    Ok(i) => Value::Int(i),
                    Err(_) => {
                        return Err(self.out_of_range(name, &Value::Str(text.to_owned())));
                    }
                }
            }
            Kind::UInt(k) => Value::UInt(
                parse_unsigned(text, k.name == "size")
                    .ok_or_else(|| Error::wrong_type(name, self, &format!("'{text}'")))?,
            ),
            Kind::Str | Kind::Enum(_) | Kind::Any => Value::Str(text.to_owned()),
            Kind::Path | Kind::Link(_) => Value::Path(text.to_owned()),
            Kind::Child(_) | Kind::List(_) | Kind::Struct(_) => {
                return Err(Error::wrong_type(name, self, "text"));
            }
        };
        self.check(name, value)
    }

    /// True if `value` already is in this kind's canonical form (used to check what type
    /// code returns and emits, in debug builds).
    pub fn accepts(&self, value: &Value) -> bool {
        self.check("value", value.clone())
            .is_ok_and(|v| v == *value)
    }
}

/// Parses a decimal or `0x` hex number, with a binary size suffix if `size`.
fn parse_unsigned(text: &str, size: bool) -> Option<u64> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if size && "kKmMgGtT".contains(c) => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                _ => 40,
            };
            (&text[..i], shift)
        }
        Some((i, 'b' | 'B')) if size => (&text[..i], 0),
        _ => (text, 0),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<u64>().ok()?,
    };
    n.checked_mul(1u64.checked_shl(shift)?)
        .filter(|v| shift == 0 || v >> shift == n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_range_checked_and_normalised() {
        assert_eq!(
            Kind::uint8().check("x", Value::Int(255)),
            Ok(Value::UInt(255))
        );
        assert!(matches!(
            Kind::uint8().check("x", Value::Int(256)),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            Kind::uint8().check("x", Value::Int(-1)),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(Kind::int8().check("x", Value::UInt(5)), Ok(Value::Int(5)));
        assert!(matches!(
            Kind::int64().check("x", Value::UInt(u64::MAX)),
            Err(Error::OutOfRange { .. })
        ));
        let cpus = Kind::uint_range(1, 255);
        assert!(matches!(
            cpus.check("cpus", Value::Int(0)),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(cpus.type_name(), "uint8");
    }

    #[test]
    fn range_errors_say_whether_the_whole_type_range_applies() {
        let full = Kind::uint8().check("x", Value::UInt(256)).unwrap_err();
        assert!(matches!(
            full,
            Error::OutOfRange {
                type_name: "uint8",
                full_range: true,
                ..
            }
        ));
        let part = Kind::uint_range(1, 100)
            .check("x", Value::UInt(101))
            .unwrap_err();
        assert!(matches!(
            part,
            Error::OutOfRange {
                full_range: false,
                ..
            }
        ));
        let err = Kind::Bool.check("x", Value::UInt(1)).unwrap_err();
        assert!(matches!(
            err,
            Error::WrongType {
                json_type: "boolean",
                ..
            }
        ));
    }

    #[test]
    fn wrong_types_name_what_is_expected() {
        let err = Kind::Bool
            .check("enabled", Value::Str("yes".into()))
            .unwrap_err();
        assert_eq!(err.to_string(), "'enabled' expects a boolean, got string");
    }

    #[test]
    fn enums_accept_only_declared_values() {
        let k = Kind::enumeration("OnOff", &["on", "off"]);
        assert_eq!(
            k.check("x", Value::Str("on".into())),
            Ok(Value::Enum("on".into()))
        );
        let err = k.check("x", Value::Str("maybe".into())).unwrap_err();
        assert_eq!(err.to_string(), "'x' must be one of on, off, got 'maybe'");
    }

    #[test]
    fn text_values_parse_per_kind() {
        assert_eq!(Kind::Bool.parse_text("x", "on"), Ok(Value::Bool(true)));
        assert!(Kind::Bool.parse_text("x", "maybe").is_err());
        assert_eq!(
            Kind::uint16().parse_text("iobase", "0x3f8"),
            Ok(Value::UInt(0x3f8))
        );
        assert!(matches!(
            Kind::uint16().parse_text("iobase", "0x10000"),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(Kind::int32().parse_text("x", "-5"), Ok(Value::Int(-5)));
        assert_eq!(
            Kind::size().parse_text("m", "256M"),
            Ok(Value::UInt(256 << 20))
        );
        assert_eq!(Kind::size().parse_text("m", "2G"), Ok(Value::UInt(2 << 30)));
        assert!(Kind::size().parse_text("m", "99999999999T").is_err());
        assert!(
            Kind::uint32().parse_text("x", "12M").is_err(),
            "suffixes only for sizes"
        );
        assert_eq!(
            Kind::enumeration("E", &["a"]).parse_text("e", "a"),
            Ok(Value::Enum("a".into()))
        );
    }

    #[test]
    fn structs_check_fields() {
        let k = Kind::structure(
            "Args",
            vec![
                Field::new("a", Kind::Bool, ""),
                Field::optional("b", Kind::Str, ""),
            ],
        );
        assert!(
            k.check("args", Value::map([("a", Value::Bool(true))]))
                .is_ok()
        );
        assert!(matches!(
            k.check("args", Value::map([("b", Value::from("x"))])),
            Err(Error::MissingArgument { .. })
        ));
        assert!(matches!(
            k.check(
                "args",
                Value::map([("a", Value::Bool(true)), ("c", Value::Bool(true))])
            ),
            Err(Error::UnexpectedArgument { .. })
        ));
        let nested = Kind::list(Kind::uint8());
        assert!(matches!(
            nested.check("l", Value::from(vec![1u32, 300])),
            Err(Error::OutOfRange { name, .. }) if name == "l[1]"
        ));
    }
}
