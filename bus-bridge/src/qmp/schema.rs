//! `query-qmp-schema`: the commands, their arguments and the events, in QEMU's
//! introspection format (SchemaInfo), generated from the command table and `/machine`'s
//! actions and notifiers.

use std::collections::BTreeMap;

use qom::{Kind, Tree};
use serde_json::{Value as Json, json};

use super::args::{ArgSpec, ArgType};
use super::commands::{ACTIONS, BUILTINS};
use super::session::{LIFECYCLE_EVENTS, NOTIFY_EVENT};

struct Builder {
    entries: Vec<Json>,
    types: BTreeMap<String, Json>,
}

impl Builder {
    fn type_name(&mut self, ty: &ArgType) -> String {
        let name = ty.schema_name();
        if let ArgType::List(inner) = ty {
            let element = self.type_name(inner);
            self.types.entry(name.clone()).or_insert_with(
                || json!({"name": name, "meta-type": "array", "element-type": element}),
            );
        }
        name
    }

    /// An object type for a command's or event's members.
    fn object(&mut self, name: &str, members: &[ArgSpec]) -> String {
        let members: Vec<Json> = members
            .iter()
            .map(|m| {
                let ty = self.type_name(&m.ty);
                if m.optional {
                    json!({"name": m.name, "type": ty, "default": null})
                } else {
                    json!({"name": m.name, "type": ty})
                }
            })
            .collect();
        self.types.insert(
            name.to_owned(),
            json!({"name": name, "meta-type": "object", "members": members}),
        );
        name.to_owned()
    }
}

fn fields_of(kind: &Kind) -> Vec<ArgSpec> {
    match kind {
        Kind::Struct(s) => s.fields.iter().map(ArgSpec::of_field).collect(),
        _ => Vec::new(),
    }
}

/// The schema as `query-qmp-schema` returns it.
pub fn build(tree: &Tree) -> Json {
    let mut b = Builder {
        entries: Vec::new(),
        types: BTreeMap::new(),
    };
    for (name, json_type) in [
        ("str", "string"),
        ("int", "int"),
        ("bool", "boolean"),
        ("any", "value"),
        ("null", "null"),
    ] {
        b.types.insert(
            name.into(),
            json!({"name": name, "meta-type": "builtin", "json-type": json_type}),
        );
    }
    for cmd in BUILTINS {
        let args = b.object(&format!("q_obj_{}-arg", cmd.name), &(cmd.args)());
        b.entries.push(
            json!({"name": cmd.name, "meta-type": "command", "arg-type": args, "ret-type": "any"}),
        );
    }
    let machine = tree.lookup("/machine").ok();
    let class = machine.as_ref().map(|m| m.class().clone());
    for (qmp, action) in ACTIONS {
        let Some(decl) = class.as_ref().and_then(|c| c.action(action)) else {
            continue;
        };
        let specs: Vec<ArgSpec> = decl.args().iter().map(ArgSpec::of_field).collect();
        let args = b.object(&format!("q_obj_{qmp}-arg"), &specs);
        b.entries.push(
            json!({"name": qmp, "meta-type": "command", "arg-type": args, "ret-type": "any"}),
        );
    }
    for event in LIFECYCLE_EVENTS {
        let Some((_, decl)) = class.as_ref().and_then(|c| c.notifier(event)) else {
            continue;
        };
        let args = b.object(&format!("q_obj_{event}-arg"), &fields_of(decl.payload()));
        b.entries
            .push(json!({"name": event, "meta-type": "event", "arg-type": args}));
    }
    let notify = [
        ArgSpec::required("subscription", ArgType::Str),
        ArgSpec::required("sequence", ArgType::Int),
        ArgSpec::required("path", ArgType::Str),
        ArgSpec::required("notifier", ArgType::Str),
        ArgSpec::required("data", ArgType::Any),
    ];
    let args = b.object(&format!("q_obj_{NOTIFY_EVENT}-arg"), &notify);
    b.entries
        .push(json!({"name": NOTIFY_EVENT, "meta-type": "event", "arg-type": args}));
    let mut all = b.entries;
    all.extend(b.types.into_values());
    Json::Array(all)
}
