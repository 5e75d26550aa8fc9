//! How qom values travel on D-Bus: each [`Kind`] has one D-Bus type, and values convert
//! both ways.
//!
//! | qom kind | D-Bus |
//! |---|---|
//! | `bool` | `b` |
//! | `uint8` / `uint16` / `uint32` / `uint64`, `size` | `y` / `q` / `u` / `t` |
//! | `int8`, `int16` / `int32` / `int64` | `n` / `i` / `x` |
//! | `str`, enums | `s` |
//! | `path`, `link<T>`, `child<T>` | `o` (the object's D-Bus path; `/` for an unset link) |
//! | `list<K>` | `a` + K's type |
//! | structs | `a{sv}`, one entry per field present |
//! | `any` | `v` |
//!
//! Incoming values are accepted loosely where nothing can be lost: any integer type for an
//! integer kind (the kind's range is then checked by the tree, as for QMP), and a qom path
//! string `s` where an object path `o` is declared.

use qom::{Kind, Value};
use zbus::wire::{Array, Dict, Signature, Str};
use zbus::{ObjectPath, Variant};

use super::names;

/// The D-Bus type of a kind.
pub fn signature(kind: &Kind) -> Signature {
    match kind {
        Kind::Bool => Signature::Bool,
        Kind::Int(k) => match k.name {
            "int8" | "int16" => Signature::I16,
            "int32" => Signature::I32,
            _ => Signature::I64,
        },
        Kind::UInt(k) => match k.name {
            "uint8" => Signature::U8,
            "uint16" => Signature::U16,
            "uint32" => Signature::U32,
            _ => Signature::U64,
        },
        Kind::Str | Kind::Enum(_) => Signature::Str,
        Kind::Path | Kind::Link(_) | Kind::Child(_) => Signature::ObjectPath,
        Kind::List(k) => Signature::array(signature(k)),
        Kind::Struct(_) => dict_signature(),
        Kind::Any => Signature::Variant,
    }
}

/// `a{sv}`.
pub fn dict_signature() -> Signature {
    Signature::dict(Signature::Str, Signature::Variant)
}

/// Converts values for one VM: object paths are mapped under its root.
#[derive(Debug, Clone)]
pub struct Codec {
    root: String,
}

/// A value that does not have the D-Bus type a kind needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMismatch {
    /// The D-Bus type wanted.
    pub expected: String,
    /// The D-Bus type given, or what was wrong with it.
    pub got: String,
}

impl TypeMismatch {
    fn new(kind: &Kind, got: impl Into<String>) -> Self {
        TypeMismatch {
            expected: signature(kind).to_string(),
            got: got.into(),
        }
    }
}

/// D-Bus strings may not hold NUL.
fn dbus_string(s: &str) -> Variant<'static> {
    if s.contains('\0') {
        Variant::Str(Str::from(s.replace('\0', "\u{fffd}")))
    } else {
        Variant::Str(Str::from(s.to_owned()))
    }
}

impl Codec {
    pub fn new(root: &str) -> Self {
        Codec {
            root: root.to_owned(),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// The D-Bus object path of a qom path value: `/` for an empty (unset) link or a path
    /// that is not absolute.
    pub fn object_path(&self, qom_path: &str) -> ObjectPath<'static> {
        if qom_path.starts_with('/') {
            ObjectPath::from_string_unchecked(names::object_path(&self.root, qom_path))
        } else {
            ObjectPath::from_static_str_unchecked("/")
        }
    }

    /// `value` as the D-Bus type of `kind`, or `None` if it does not fit (a getter that
    /// returned something other than what its property declares).
    pub fn to_variant(&self, kind: &Kind, value: &Value) -> Option<Variant<'static>> {
        Some(match (kind, value) {
            (Kind::Bool, Value::Bool(b)) => Variant::Bool(*b),
            (Kind::Int(_), v @ (Value::Int(_) | Value::UInt(_))) => {
                let i = v.as_i64()?;
                match signature(kind) {
                    Signature::I16 => Variant::I16(i16::try_from(i).ok()?),
                    Signature::I32 => Variant::I32(i32::try_from(i).ok()?),
                    _ => Variant::I64(i),
                }
            }
            (Kind::UInt(_), v @ (Value::Int(_) | Value::UInt(_))) => {
                let u = v.as_u64()?;
                match signature(kind) {
                    Signature::U8 => Variant::U8(u8::try_from(u).ok()?),
                    Signature::U16 => Variant::U16(u16::try_from(u).ok()?),
                    Signature::U32 => Variant::U32(u32::try_from(u).ok()?),
                    _ => Variant::U64(u),
                }
            }
            (Kind::Str | Kind::Enum(_), Value::Str(s) | Value::Enum(s) | Value::Path(s)) => {
                dbus_string(s)
            }
            (Kind::Path | Kind::Link(_) | Kind::Child(_), Value::Path(p) | Value::Str(p)) => {
                Variant::ObjectPath(self.object_path(p))
            }
            (Kind::List(k), Value::List(items)) => {
                let mut array = Array::new(&signature(k));
                for item in items {
                    array.append(self.to_variant(k, item)?).ok()?;
                }
                Variant::Array(array)
            }
            (Kind::Struct(s), Value::Map(fields)) => {
                let mut dict = Dict::new(&Signature::Str, &Signature::Variant);
                for (name, v) in fields {
                    let field_kind = s
                        .fields
                        .iter()
                        .find(|f| f.name == *name)
                        .map_or(&Kind::Any, |f| &f.kind);
                    dict.append(dbus_string(name), self.dict_entry(field_kind, v)?)
                        .ok()?;
                }
                Variant::Dict(dict)
            }
            (Kind::Any, v) => Variant::Variant(Box::new(self.any_to_variant(v))),
            _ => return None,
        })
    }

    /// The value of an `a{sv}` entry: the typed value in a variant (not a variant in a
    /// variant for `any` fields).
    pub fn dict_entry(&self, kind: &Kind, value: &Value) -> Option<Variant<'static>> {
        match kind {
            Kind::Any => Some(Variant::Variant(Box::new(self.any_to_variant(value)))),
            k => Some(Variant::Variant(Box::new(self.to_variant(k, value)?))),
        }
    }

    /// A value of no declared kind, in the D-Bus type its own shape suggests.
    pub fn any_to_variant(&self, value: &Value) -> Variant<'static> {
        match value {
            Value::Bool(b) => Variant::Bool(*b),
            Value::Int(i) => Variant::I64(*i),
            Value::UInt(u) => Variant::U64(*u),
            Value::Str(s) | Value::Enum(s) => dbus_string(s),
            Value::Path(p) => Variant::ObjectPath(self.object_path(p)),
            Value::List(items) => {
                let mut array = Array::new(&Signature::Variant);
                for item in items {
                    // A variant always fits an array of variants.
                    let _ = array.append(Variant::Variant(Box::new(self.any_to_variant(item))));
                }
                Variant::Array(array)
            }
            Value::Map(fields) => {
                let mut dict = Dict::new(&Signature::Str, &Signature::Variant);
                for (name, v) in fields {
                    let _ = dict.append(
                        dbus_string(name),
                        Variant::Variant(Box::new(self.any_to_variant(v))),
                    );
                }
                Variant::Dict(dict)
            }
        }
    }

    /// A D-Bus value for `kind`, as the loosest qom value; the tree then checks it against
    /// the kind (ranges, enum values, struct fields) as it checks QMP's JSON.
    ///
    /// # Errors
    /// A D-Bus type that cannot carry a value of `kind`.
    pub fn from_variant(&self, kind: &Kind, v: &Variant<'_>) -> Result<Value, TypeMismatch> {
        // Properties.Set and a{sv} entries wrap values in variants.
        if let (Variant::Variant(inner), false) = (v, matches!(kind, Kind::Any)) {
            return self.from_variant(kind, inner);
        }
        let mismatch = || TypeMismatch::new(kind, v.value_signature().to_string());
        Ok(match kind {
            Kind::Bool => match v {
                Variant::Bool(b) => Value::Bool(*b),
                _ => return Err(mismatch()),
            },
            Kind::Int(_) | Kind::UInt(_) => integer(v).ok_or_else(mismatch)?,
            Kind::Str | Kind::Enum(_) => match v {
                Variant::Str(s) => Value::Str(s.as_str().to_owned()),
                _ => return Err(mismatch()),
            },
            Kind::Path | Kind::Link(_) | Kind::Child(_) => match v {
                Variant::ObjectPath(p) if p.as_str() == "/" => Value::Path(String::new()),
                Variant::ObjectPath(p) => match names::qom_path(&self.root, p.as_str()) {
                    Some(path) => Value::Path(path),
                    None => {
                        return Err(TypeMismatch::new(
                            kind,
                            format!("'{}', which is no object of this VM", p.as_str()),
                        ));
                    }
                },
                Variant::Str(s) => Value::Path(s.as_str().to_owned()),
                _ => return Err(mismatch()),
            },
            Kind::List(k) => match v {
                Variant::Array(a) => Value::List(
                    a.inner()
                        .iter()
                        .map(|item| self.from_variant(k, item))
                        .collect::<Result<_, _>>()
                        .map_err(|_| mismatch())?,
                ),
                _ => return Err(mismatch()),
            },
            Kind::Struct(s) => match v {
                Variant::Dict(d) => {
                    let mut out = qom::Fields::new();
                    for (key, value) in d.iter() {
                        let Variant::Str(key) = key else {
                            return Err(mismatch());
                        };
                        let field_kind = s
                            .fields
                            .iter()
                            .find(|f| f.name == key.as_str())
                            .map_or(&Kind::Any, |f| &f.kind);
                        out.insert(
                            key.as_str().to_owned(),
                            self.from_variant(field_kind, value)?,
                        );
                    }
                    Value::Map(out)
                }
                _ => return Err(mismatch()),
            },
            Kind::Any => self.any_from_variant(v).ok_or_else(mismatch)?,
        })
    }

    /// A value of any shape; D-Bus types qom has no value for (doubles, file descriptors,
    /// dictionaries with non-string keys) give `None`.
    pub fn any_from_variant(&self, v: &Variant<'_>) -> Option<Value> {
        Some(match v {
            Variant::Variant(inner) => self.any_from_variant(inner)?,
            Variant::Bool(b) => Value::Bool(*b),
            Variant::Str(s) => Value::Str(s.as_str().to_owned()),
            Variant::Signature(s) => Value::Str(s.to_string()),
            Variant::ObjectPath(p) if p.as_str() == "/" => Value::Path(String::new()),
            Variant::ObjectPath(p) => Value::Path(names::qom_path(&self.root, p.as_str())?),
            Variant::Array(a) => Value::List(
                a.inner()
                    .iter()
                    .map(|item| self.any_from_variant(item))
                    .collect::<Option<_>>()?,
            ),
            Variant::Structure(s) => Value::List(
                s.fields()
                    .iter()
                    .map(|item| self.any_from_variant(item))
                    .collect::<Option<_>>()?,
            ),
            Variant::Dict(d) => {
                let mut out = qom::Fields::new();
                for (key, value) in d.iter() {
                    let Variant::Str(key) = key else {
                        return None;
                    };
                    out.insert(key.as_str().to_owned(), self.any_from_variant(value)?);
                }
                Value::Map(out)
            }
            // A descriptor (`h`): handed over as a token (qom::handover) the receiving
            // object takes; what the call does not take is closed after it.
            Variant::Fd(fd) => {
                let fd = std::os::fd::AsFd::as_fd(fd).try_clone_to_owned().ok()?;
                Value::Str(qom::handover::deposit(fd))
            }
            other => integer(other)?,
        })
    }
}

fn integer(v: &Variant<'_>) -> Option<Value> {
    Some(match v {
        Variant::U8(u) => Value::UInt((*u).into()),
        Variant::U16(u) => Value::UInt((*u).into()),
        Variant::U32(u) => Value::UInt((*u).into()),
        Variant::U64(u) => Value::UInt(*u),
        Variant::I16(i) => Value::Int((*i).into()),
        Variant::I32(i) => Value::Int((*i).into()),
        Variant::I64(i) => Value::Int(*i),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qom::Field;

    fn codec() -> Codec {
        Codec::new(names::DEFAULT_ROOT)
    }

    #[test]
    fn signatures() {
        let sig = |k: &Kind| signature(k).to_string();
        assert_eq!(sig(&Kind::Bool), "b");
        assert_eq!(sig(&Kind::uint8()), "y");
        assert_eq!(sig(&Kind::uint_range(1, 100)), "y");
        assert_eq!(sig(&Kind::uint16()), "q");
        assert_eq!(sig(&Kind::uint32()), "u");
        assert_eq!(sig(&Kind::size()), "t");
        assert_eq!(sig(&Kind::int8()), "n");
        assert_eq!(sig(&Kind::int32()), "i");
        assert_eq!(sig(&Kind::int64()), "x");
        assert_eq!(sig(&Kind::enumeration("E", &["a"])), "s");
        assert_eq!(sig(&Kind::link("device")), "o");
        assert_eq!(sig(&Kind::list(Kind::Str)), "as");
        assert_eq!(sig(&Kind::list(Kind::Any)), "av");
        assert_eq!(sig(&Kind::structure("S", vec![])), "a{sv}");
        assert_eq!(sig(&Kind::Any), "v");
    }

    #[test]
    fn values_round_trip() {
        let c = codec();
        let point = Kind::structure(
            "Point",
            vec![
                Field::new("x", Kind::int32(), ""),
                Field::optional("label", Kind::Str, ""),
                Field::new("owner", Kind::Path, ""),
            ],
        );
        let cases = [
            (Kind::Bool, Value::Bool(true)),
            (Kind::uint8(), Value::UInt(200)),
            (Kind::size(), Value::UInt(u64::MAX)),
            (Kind::int8(), Value::Int(-5)),
            (Kind::int64(), Value::Int(i64::MIN)),
            (Kind::Str, Value::Str("héllo".into())),
            (
                Kind::link("x"),
                Value::Path("/machine/peripheral-anon/device[0]".into()),
            ),
            (Kind::link("x"), Value::Path(String::new())),
            (
                Kind::list(Kind::uint16()),
                Value::List(vec![Value::UInt(1), Value::UInt(2)]),
            ),
            (Kind::list(Kind::Str), Value::List(vec![])),
            (
                point.clone(),
                Value::map([
                    ("x", Value::Int(-3)),
                    ("owner", Value::Path("/machine".into())),
                ]),
            ),
            (
                Kind::Any,
                Value::map([
                    (
                        "a",
                        Value::List(vec![Value::Bool(false), Value::Str("s".into())]),
                    ),
                    ("b", Value::UInt(7)),
                ]),
            ),
        ];
        for (kind, value) in cases {
            let v = c.to_variant(&kind, &value).unwrap();
            assert_eq!(v.value_signature(), &signature(&kind), "{kind:?}");
            let back = c.from_variant(&kind, &v).unwrap();
            assert_eq!(
                kind.check("v", back).unwrap(),
                kind.check("v", value).unwrap()
            );
        }
    }

    #[test]
    fn link_paths_map_under_the_root() {
        let c = codec();
        let v = c
            .to_variant(&Kind::link("t"), &Value::Path("/machine/unattached".into()))
            .unwrap();
        assert_eq!(
            v,
            Variant::ObjectPath(ObjectPath::try_from("/org/qomu/VM1/machine/unattached").unwrap())
        );
        let foreign = Variant::ObjectPath(ObjectPath::try_from("/org/other").unwrap());
        let err = c.from_variant(&Kind::link("t"), &foreign).unwrap_err();
        assert_eq!(err.expected, "o");
        assert!(err.got.contains("no object of this VM"), "{err:?}");
    }

    #[test]
    fn integers_are_accepted_in_any_width_but_not_as_strings() {
        let c = codec();
        assert_eq!(
            c.from_variant(&Kind::uint64(), &Variant::U8(3)),
            Ok(Value::UInt(3))
        );
        assert_eq!(
            c.from_variant(
                &Kind::uint32(),
                &Variant::Variant(Box::new(Variant::I32(-1)))
            ),
            Ok(Value::Int(-1)) // the tree then refuses it as out of range
        );
        let err = c
            .from_variant(&Kind::uint32(), &Variant::Str(Str::from("3")))
            .unwrap_err();
        assert_eq!(
            err,
            TypeMismatch {
                expected: "u".into(),
                got: "s".into()
            }
        );
        assert!(c.from_variant(&Kind::Bool, &Variant::U8(1)).is_err());
        assert!(c.any_from_variant(&Variant::F64(1.5)).is_none());
    }

    #[test]
    fn nul_bytes_are_replaced() {
        let v = codec()
            .to_variant(&Kind::Str, &Value::Str("a\0b".into()))
            .unwrap();
        assert_eq!(v, Variant::Str(Str::from("a\u{fffd}b")));
    }

    #[test]
    fn mismatched_values_give_none() {
        assert!(codec().to_variant(&Kind::Bool, &Value::UInt(1)).is_none());
        assert!(
            codec()
                .to_variant(&Kind::uint8(), &Value::UInt(256))
                .is_none()
        );
    }
}
