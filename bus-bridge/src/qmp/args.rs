//! Checking command arguments as QEMU's QAPI input visitor does, and converting JSON to
//! and from qom values.

use qom::{Field, Kind, Value};
use serde_json::{Map, Value as Json};

use super::error::QmpError;

/// Arguments of a command.
pub type Args = Map<String, Json>;

/// The QAPI type of an argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgType {
    Str,
    Int,
    Bool,
    /// Any JSON value.
    Any,
    Object,
    List(Box<ArgType>),
}

impl ArgType {
    /// The JSON type name QEMU uses in "expected: ..." messages.
    fn json_name(&self) -> &'static str {
        match self {
            ArgType::Str => "string",
            ArgType::Int => "integer",
            ArgType::Bool => "boolean",
            ArgType::Any => "any",
            ArgType::Object => "object",
            ArgType::List(_) => "array",
        }
    }

    /// The QAPI schema name of the type (`str`, `int`, `[str]`, ...).
    pub fn schema_name(&self) -> String {
        match self {
            ArgType::Str => "str".into(),
            ArgType::Int => "int".into(),
            ArgType::Bool => "bool".into(),
            ArgType::Any | ArgType::Object => "any".into(),
            ArgType::List(t) => format!("[{}]", t.schema_name()),
        }
    }

    /// The argument type values of a qom kind travel as.
    pub fn of_kind(kind: &Kind) -> ArgType {
        match kind {
            Kind::Bool => ArgType::Bool,
            Kind::Int(_) | Kind::UInt(_) => ArgType::Int,
            Kind::Str | Kind::Enum(_) | Kind::Path | Kind::Link(_) | Kind::Child(_) => ArgType::Str,
            Kind::List(k) => ArgType::List(Box::new(ArgType::of_kind(k))),
            Kind::Struct(_) => ArgType::Object,
            Kind::Any => ArgType::Any,
        }
    }

    fn accepts(&self, value: &Json, name: &str) -> Result<(), QmpError> {
        let ok = match (self, value) {
            (ArgType::Any, _) => true,
            (ArgType::Str, Json::String(_))
            | (ArgType::Bool, Json::Bool(_))
            | (ArgType::Object, Json::Object(_)) => true,
            (ArgType::Int, Json::Number(n)) => n.is_i64() || n.is_u64(),
            (ArgType::List(inner), Json::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    inner.accepts(item, &format!("{name}[{i}]"))?;
                }
                true
            }
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(QmpError::generic(format!(
                "Invalid parameter type for '{name}', expected: {}",
                self.json_name()
            )))
        }
    }
}

/// A declared argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgSpec {
    pub name: String,
    pub ty: ArgType,
    pub optional: bool,
}

impl ArgSpec {
    pub fn required(name: &str, ty: ArgType) -> Self {
        ArgSpec {
            name: name.to_owned(),
            ty,
            optional: false,
        }
    }

    pub fn optional(name: &str, ty: ArgType) -> Self {
        ArgSpec {
            name: name.to_owned(),
            ty,
            optional: true,
        }
    }

    /// The spec of an action's argument.
    pub fn of_field(field: &Field) -> Self {
        ArgSpec {
            name: field.name.clone(),
            ty: ArgType::of_kind(&field.kind),
            optional: field.optional,
        }
    }
}

/// Checks `args` in QEMU's order: each declared argument (missing or mistyped), then
/// anything undeclared (unless `extra` allows it).
///
/// # Errors
/// `Parameter 'x' is missing`, `Invalid parameter type for 'x', expected: T`,
/// `Parameter 'x' is unexpected`.
pub fn check(args: &Args, specs: &[ArgSpec], extra: bool) -> Result<(), QmpError> {
    for spec in specs {
        match args.get(&spec.name) {
            Some(v) => spec.ty.accepts(v, &spec.name)?,
            None if spec.optional => {}
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is missing",
                    spec.name
                )));
            }
        }
    }
    if !extra && let Some(k) = args.keys().find(|k| !specs.iter().any(|s| s.name == **k)) {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    Ok(())
}

/// A JSON value as a qom value; `None` for what qom has no value for (null, non-integer
/// numbers), anywhere inside.
pub fn to_value(json: &Json) -> Option<Value> {
    Some(match json {
        Json::Null => return None,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => return None,
        },
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(items) => Value::List(items.iter().map(to_value).collect::<Option<_>>()?),
        Json::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| Some((k.clone(), to_value(v)?)))
                .collect::<Option<_>>()?,
        ),
    })
}

/// A qom value as JSON.
pub fn to_json(value: &Value) -> Json {
    serde_json::to_value(value).unwrap_or(Json::Null)
}

/// `value` for a property or argument of `kind`, or QEMU's type error naming `name`.
pub fn to_value_of(name: &str, kind: Option<&Kind>, json: &Json) -> Result<Value, QmpError> {
    to_value(json).ok_or_else(|| {
        let expected = kind.map_or("a value", Kind::json_type);
        QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Json) -> Args {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn checks_in_qemus_order() {
        let specs = [
            ArgSpec::required("path", ArgType::Str),
            ArgSpec::optional("n", ArgType::Int),
        ];
        assert!(check(&args(json!({"path": "/"})), &specs, false).is_ok());
        assert_eq!(
            check(&args(json!({})), &specs, false).unwrap_err().desc,
            "Parameter 'path' is missing"
        );
        assert_eq!(
            check(&args(json!({"path": 1})), &specs, false)
                .unwrap_err()
                .desc,
            "Invalid parameter type for 'path', expected: string"
        );
        assert_eq!(
            check(&args(json!({"path": "/", "n": 1.5})), &specs, false)
                .unwrap_err()
                .desc,
            "Invalid parameter type for 'n', expected: integer"
        );
        assert_eq!(
            check(&args(json!({"path": "/", "x": 1})), &specs, false)
                .unwrap_err()
                .desc,
            "Parameter 'x' is unexpected"
        );
        // Missing comes before unexpected, as in QEMU.
        assert_eq!(
            check(&args(json!({"x": 1})), &specs, false)
                .unwrap_err()
                .desc,
            "Parameter 'path' is missing"
        );
        let list = [ArgSpec::required(
            "paths",
            ArgType::List(Box::new(ArgType::Str)),
        )];
        assert_eq!(
            check(&args(json!({"paths": ["/", 2]})), &list, false)
                .unwrap_err()
                .desc,
            "Invalid parameter type for 'paths[1]', expected: string"
        );
    }

    #[test]
    fn json_values() {
        assert_eq!(
            to_value(&json!({"a": [1, "x", true]})),
            Some(Value::map([(
                "a",
                Value::List(vec![Value::Int(1), "x".into(), true.into()])
            )]))
        );
        assert_eq!(to_value(&json!([null])), None);
        assert_eq!(to_value(&json!(1.5)), None);
        assert_eq!(to_json(&Value::UInt(u64::MAX)), json!(u64::MAX));
    }
}
