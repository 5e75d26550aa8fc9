//! The QMP commands. Each is one tree operation, or an action of `/machine` (QEMU's
//! machine commands are actions of the machine object: `stop` is "call `stop` on
//! `/machine`"); none holds machine logic.

use qom::{Action, PropertyInfo, PropertyRole, SubscribeOptions, Target, Tree, Value};
use serde_json::{Map, Value as Json, json};

use super::args::{self, ArgSpec, ArgType, Args};
use super::error::{Context, QmpError, from_qom};
use super::session::{QEMU_VERSION, Session, package};
use super::{hmp, json, schema};

/// How a command runs.
pub enum Handler {
    Builtin(&'static Builtin),
    /// An action of `/machine`, by name.
    Action(&'static str),
}

/// A command the front end implements itself, with its arguments.
pub struct Builtin {
    pub name: &'static str,
    pub args: fn() -> Vec<ArgSpec>,
    /// Whether keys beyond `args` are allowed (object-add, device_add take properties).
    pub extra: bool,
    pub run: Run,
}

/// A builtin's code: it returns a value, or its reply already written as JSON text (for
/// the replies built straight into text, without a value in between: `qom-list`).
pub enum Run {
    Value(fn(&mut Session, &Args) -> Result<Json, QmpError>),
    Text(fn(&mut Session, &Args) -> Result<String, QmpError>),
}

/// What a command returns.
pub enum Reply {
    Value(Json),
    /// JSON text, written as QEMU writes it (json.rs).
    Text(String),
}

/// QMP commands that are `/machine` actions: (QMP name, action name).
pub const ACTIONS: &[(&str, &str)] = &[
    ("stop", "stop"),
    ("cont", "cont"),
    ("system_reset", "system-reset"),
    ("system_powerdown", "system-powerdown"),
    ("quit", "quit"),
    ("pmemsave", "pmemsave"),
    ("memsave", "memsave"),
    ("query-cpus-fast", "query-cpus-fast"),
    ("device_del", "device-del"),
    ("query-migrate", "query-migrate"),
    ("migrate_cancel", "migrate-cancel"),
    ("announce-self", "announce-self"),
    ("migrate-set-parameters", "migrate-set-parameters"),
    ("query-migrate-parameters", "query-migrate-parameters"),
    ("migrate-set-capabilities", "migrate-set-capabilities"),
    ("query-migrate-capabilities", "query-migrate-capabilities"),
];

fn s(name: &str) -> ArgSpec {
    ArgSpec::required(name, ArgType::Str)
}
fn opt(name: &str, ty: ArgType) -> ArgSpec {
    ArgSpec::optional(name, ty)
}

pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "qmp_capabilities",
        args: || vec![opt("enable", ArgType::List(Box::new(ArgType::Str)))],
        extra: false,
        run: Run::Value(|_, _| Ok(json!({}))),
    },
    Builtin {
        name: "query-version",
        args: Vec::new,
        extra: false,
        run: Run::Value(query_version),
    },
    Builtin {
        name: "query-commands",
        args: Vec::new,
        extra: false,
        run: Run::Value(query_commands),
    },
    Builtin {
        name: "query-qmp-schema",
        args: Vec::new,
        extra: false,
        run: Run::Value(|s, _| Ok(schema::build(&s.tree))),
    },
    Builtin {
        name: "query-status",
        args: Vec::new,
        extra: false,
        run: Run::Value(query_status),
    },
    Builtin {
        name: "query-name",
        args: Vec::new,
        extra: false,
        run: Run::Value(query_name),
    },
    Builtin {
        name: "qom-list",
        args: || vec![s("path")],
        extra: false,
        run: Run::Text(qom_list),
    },
    Builtin {
        name: "qom-get",
        args: || vec![s("path"), s("property")],
        extra: false,
        run: Run::Value(qom_get),
    },
    Builtin {
        name: "qom-set",
        args: || {
            vec![
                s("path"),
                s("property"),
                ArgSpec::required("value", ArgType::Any),
            ]
        },
        extra: false,
        run: Run::Value(qom_set),
    },
    Builtin {
        name: "qom-list-get",
        args: || {
            vec![ArgSpec::required(
                "paths",
                ArgType::List(Box::new(ArgType::Str)),
            )]
        },
        extra: false,
        run: Run::Value(qom_list_get),
    },
    Builtin {
        name: "qom-list-types",
        args: || {
            vec![
                opt("implements", ArgType::Str),
                opt("abstract", ArgType::Bool),
            ]
        },
        extra: false,
        run: Run::Value(qom_list_types),
    },
    Builtin {
        name: "qom-list-properties",
        args: || vec![s("typename")],
        extra: false,
        run: Run::Value(qom_list_properties),
    },
    Builtin {
        name: "device-list-properties",
        args: || vec![s("typename")],
        extra: false,
        run: Run::Value(device_list_properties),
    },
    Builtin {
        name: "object-add",
        args: || vec![s("qom-type"), s("id")],
        extra: true,
        run: Run::Value(object_add),
    },
    Builtin {
        name: "object-del",
        args: || vec![s("id")],
        extra: false,
        run: Run::Value(object_del),
    },
    Builtin {
        name: "device_add",
        args: || {
            vec![
                s("driver"),
                opt("id", ArgType::Str),
                opt("bus", ArgType::Str),
            ]
        },
        extra: true,
        run: Run::Value(device_add),
    },
    Builtin {
        name: "netdev_add",
        args: || vec![s("type"), opt("id", ArgType::Str)],
        extra: true,
        run: Run::Value(netdev_add),
    },
    Builtin {
        name: "getfd",
        args: || vec![s("fdname")],
        extra: false,
        run: Run::Value(getfd),
    },
    Builtin {
        name: "closefd",
        args: || vec![s("fdname")],
        extra: false,
        run: Run::Value(closefd),
    },
    Builtin {
        name: "netdev_del",
        args: || vec![s("id")],
        extra: false,
        run: Run::Value(netdev_del),
    },
    Builtin {
        name: "migrate",
        args: || {
            vec![
                s("uri"),
                opt("detach", ArgType::Bool),
                opt("resume", ArgType::Bool),
            ]
        },
        extra: false,
        run: Run::Value(migrate),
    },
    Builtin {
        name: "migrate-incoming",
        args: || vec![s("uri")],
        extra: false,
        run: Run::Value(migrate_incoming),
    },
    Builtin {
        name: "set_link",
        args: || vec![s("name"), ArgSpec::required("up", ArgType::Bool)],
        extra: false,
        run: Run::Value(set_link),
    },
    Builtin {
        name: "query-rx-filter",
        args: || vec![opt("name", ArgType::Str)],
        extra: false,
        run: Run::Value(query_rx_filter),
    },
    Builtin {
        name: "human-monitor-command",
        args: || vec![s("command-line"), opt("cpu-index", ArgType::Int)],
        extra: false,
        run: Run::Value(human_monitor_command),
    },
    Builtin {
        name: "__org.qomu_subscribe",
        args: || {
            vec![
                opt("path", ArgType::Str),
                opt("type", ArgType::Str),
                opt("subtree", ArgType::Bool),
                s("notifier"),
                opt("queue-limit", ArgType::Int),
                opt("coalesce", ArgType::Bool),
                opt("filter", ArgType::Object),
                opt("min-interval-ms", ArgType::Int),
                opt("linger", ArgType::Int),
            ]
        },
        extra: false,
        run: Run::Value(subscribe),
    },
    Builtin {
        name: "__org.qomu_adopt",
        args: || vec![s("subscription"), s("token")],
        extra: false,
        run: Run::Value(adopt),
    },
    Builtin {
        name: "__org.qomu_unsubscribe",
        args: || vec![s("subscription")],
        extra: false,
        run: Run::Value(unsubscribe),
    },
];

/// The `/machine` action behind a QMP command, if `/machine` has it.
fn machine_action(tree: &Tree, action: &str) -> Option<std::sync::Arc<Action>> {
    tree.lookup("/machine")
        .ok()?
        .class()
        .action(action)
        .cloned()
}

/// Finds a command (after negotiation).
pub fn find(tree: &Tree, name: &str) -> Option<Handler> {
    if let Some(b) = BUILTINS.iter().find(|b| b.name == name) {
        return Some(Handler::Builtin(b));
    }
    ACTIONS
        .iter()
        .find(|(qmp, _)| *qmp == name)
        .filter(|(_, action)| machine_action(tree, action).is_some())
        .map(|(_, action)| Handler::Action(action))
}

/// Runs a command: its arguments are checked first, in QEMU's order.
pub fn run(session: &mut Session, handler: Handler, args: &Args) -> Result<Reply, QmpError> {
    match handler {
        Handler::Builtin(b) => {
            args::check(args, &(b.args)(), b.extra)?;
            match b.run {
                Run::Value(run) => run(session, args).map(Reply::Value),
                Run::Text(run) => run(session, args).map(Reply::Text),
            }
        }
        Handler::Action(action) => call_action(session, action, args).map(Reply::Value),
    }
}

/// Every command name a client can run now (after negotiation).
pub fn names(tree: &Tree) -> Vec<&'static str> {
    let mut names: Vec<&str> = BUILTINS.iter().map(|b| b.name).collect();
    names.extend(
        ACTIONS
            .iter()
            .filter(|(_, a)| machine_action(tree, a).is_some())
            .map(|(q, _)| *q),
    );
    names
}

/// Runs a QMP command that is an action of `/machine`.
pub fn call_action(session: &mut Session, action: &str, args: &Args) -> Result<Json, QmpError> {
    let decl = machine_action(&session.tree, action).ok_or_else(|| {
        QmpError::command_not_found(format!("The command {action} has not been found"))
    })?;
    let specs: Vec<ArgSpec> = decl.args().iter().map(ArgSpec::of_field).collect();
    args::check(args, &specs, false)?;
    let mut qom_args = qom::Args::new();
    for (name, json) in args {
        let kind = decl
            .args()
            .iter()
            .find(|f| f.name == *name)
            .map(|f| &f.kind);
        qom_args.insert(name.clone(), args::to_value_of(name, kind, json)?);
    }
    let result = session
        .tree
        .call("/machine", action, qom_args)
        .map_err(|e| from_qom(&e, Context::Other))?;
    Ok(result.as_ref().map_or(json!({}), args::to_json))
}

fn str_arg<'a>(args: &'a Args, name: &str) -> &'a str {
    args.get(name).and_then(Json::as_str).unwrap_or_default()
}

fn query_version(_: &mut Session, _: &Args) -> Result<Json, QmpError> {
    let (major, minor, micro) = QEMU_VERSION;
    Ok(json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package()}))
}

fn query_commands(session: &mut Session, _: &Args) -> Result<Json, QmpError> {
    Ok(Json::Array(
        names(&session.tree)
            .into_iter()
            .map(|n| json!({"name": n}))
            .collect(),
    ))
}

fn query_status(session: &mut Session, _: &Args) -> Result<Json, QmpError> {
    let status = match session.tree.get("/machine", "status") {
        Ok(v) => v.as_str().unwrap_or("prelaunch").to_owned(),
        Err(_) => session.tree.machine_state().0,
    };
    Ok(json!({"running": status == "running", "status": status}))
}

fn query_name(session: &mut Session, _: &Args) -> Result<Json, QmpError> {
    match session.tree.get("/machine", "name") {
        Ok(Value::Str(name)) if !name.is_empty() => Ok(json!({"name": name})),
        _ => Ok(json!({})),
    }
}

/// `ObjectPropertyInfo` of a listed property.
fn property_info(p: &PropertyInfo, with_details: bool) -> Json {
    let mut info = Map::new();
    info.insert("name".into(), json!(p.name));
    info.insert("type".into(), json!(p.type_name));
    if with_details {
        if let Some(d) = &p.description {
            info.insert("description".into(), json!(d));
        }
        if let Some(d) = &p.default {
            info.insert("default-value".into(), args::to_json(d));
        }
    }
    Json::Object(info)
}

/// `qom-list`, written straight into JSON text: the reply clients ask for most after
/// `qom-get`, answered from the type's shared list with nothing built per entry.
fn qom_list(session: &mut Session, args: &Args) -> Result<String, QmpError> {
    let props = session
        .tree
        .lookup(str_arg(args, "path"))
        .map_err(|e| from_qom(&e, Context::List))?
        .property_list();
    let mut out = String::with_capacity(48 * props.len() + 2);
    out.push('[');
    for (i, p) in props.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str("{\"name\": ");
        json::write_str(&p.name, &mut out);
        out.push_str(", \"type\": ");
        json::write_str(&p.type_name, &mut out);
        out.push('}');
    }
    out.push(']');
    Ok(out)
}

fn qom_get(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let path = str_arg(args, "path");
    // Reading a notifier subscribes this connection and returns the subscription's path.
    let value = session
        .events
        .subscriber()
        .get(path, str_arg(args, "property"))
        .map_err(|e| from_qom(&e, Context::Lookup))?;
    Ok(args::to_json(&value))
}

fn qom_set(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let (path, property) = (str_arg(args, "path"), str_arg(args, "property"));
    let obj = session
        .tree
        .lookup(path)
        .map_err(|e| from_qom(&e, Context::Lookup))?;
    let kind = obj.class().property(property).map(|p| p.kind().clone());
    let value = args::to_value_of(property, kind.as_ref(), &args["value"])?;
    obj.set(property, value)
        .map_err(|e| from_qom(&e, Context::Lookup))?;
    Ok(json!({}))
}

fn qom_list_get(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let paths: Vec<&str> = args["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .collect();
    // Every path must resolve before anything is read, as in QEMU.
    let objects = paths
        .iter()
        .map(|p| session.tree.lookup(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| from_qom(&e, Context::List))?;
    let mut out = Vec::new();
    for obj in objects {
        let mut props = Vec::new();
        for p in obj.list_properties() {
            let mut entry = Map::new();
            entry.insert("name".into(), json!(p.name));
            entry.insert("type".into(), json!(p.type_name));
            if !matches!(p.role, PropertyRole::Notifier(_))
                && let Ok(v) = obj.get(&p.name)
            {
                entry.insert("value".into(), args::to_json(&v));
            }
            props.push(Json::Object(entry));
        }
        out.push(json!({"properties": props}));
    }
    Ok(Json::Array(out))
}

fn qom_list_types(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let implements = args.get("implements").and_then(Json::as_str);
    let include_abstract = args
        .get("abstract")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let types = session.tree.list_types(implements, include_abstract);
    Ok(Json::Array(
        types
            .iter()
            .map(|t| {
                let mut info = Map::new();
                info.insert("name".into(), json!(t.name));
                if t.is_abstract {
                    info.insert("abstract".into(), json!(true));
                }
                if let Some(p) = &t.parent {
                    info.insert("parent".into(), json!(p));
                }
                Json::Object(info)
            })
            .collect(),
    ))
}

fn qom_list_properties(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let props = session
        .tree
        .type_properties(str_arg(args, "typename"))
        .map_err(|e| from_qom(&e, Context::ClassQuery))?;
    Ok(Json::Array(
        props.iter().map(|p| property_info(p, true)).collect(),
    ))
}

/// Properties QEMU leaves out of device-list-properties.
const HIDDEN_DEVICE_PROPERTIES: &[&str] = &[
    "type",
    "realized",
    "hotpluggable",
    "hotplugged",
    "parent_bus",
];

fn device_list_properties(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let typename = str_arg(args, "typename");
    let class = session
        .tree
        .types()
        .get(typename)
        .map_err(|_| QmpError::device_not_found(typename))?;
    if !class.implements("device") {
        return Err(QmpError::generic("Parameter 'typename' expects device"));
    }
    if class.is_abstract() {
        return Err(QmpError::generic(
            "Parameter 'typename' expects a non-abstract device type",
        ));
    }
    let props = class.property_infos();
    Ok(Json::Array(
        props
            .iter()
            .filter(|p| matches!(p.role, PropertyRole::Value(_)) && p.policy.is_writable())
            .filter(|p| {
                !HIDDEN_DEVICE_PROPERTIES.contains(&p.name.as_str())
                    && !p.name.starts_with("legacy-")
            })
            .map(|p| property_info(p, true))
            .collect(),
    ))
}

/// Property values of object-add/device_add: JSON values, or text as QEMU's keyval
/// parser gives them (the owning code parses text per property kind).
fn property_values(args: &Args, skip: &[&str]) -> Result<Vec<(String, Value)>, QmpError> {
    args.iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| Ok((k.clone(), args::to_value_of(k, None, v)?)))
        .collect()
}

fn object_add(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let (typename, id) = (str_arg(args, "qom-type"), str_arg(args, "id"));
    let class = session
        .tree
        .types()
        .get(typename)
        .map_err(|e| from_qom(&e, Context::ObjectAdd))?;
    let props = class
        .coerce_all(property_values(args, &["qom-type", "id"])?)
        .map_err(|e| from_qom(&e, Context::ObjectAdd))?;
    session
        .tree
        .add_user_object(typename, id, props)
        .map_err(|e| from_qom(&e, Context::ObjectAdd))?;
    Ok(json!({}))
}

fn object_del(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    session
        .tree
        .delete_user_object(str_arg(args, "id"))
        .map_err(|e| from_qom(&e, Context::ObjectDel))?;
    Ok(json!({}))
}

fn device_add(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let mut action_args = Map::new();
    for key in ["driver", "id", "bus"] {
        if let Some(v) = args.get(key) {
            action_args.insert(key.into(), v.clone());
        }
    }
    let properties: Map<String, Json> = args
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "driver" | "id" | "bus"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !properties.is_empty() {
        action_args.insert("properties".into(), Json::Object(properties));
    }
    call_action(session, "device-add", &action_args)
}

/// `netdev_add` with QEMU's flat arguments: `type`, `id`, the type's options, and for
/// `stream` QEMU's `addr: {type: "unix", path}`, which becomes the netdev's `path`.
fn netdev_add(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let typename = str_arg(args, "type");
    let mut properties: Map<String, Json> = args
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "type" | "id" | "addr"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let netdev = session
        .tree
        .types()
        .get(typename)
        .ok()
        .filter(|c| c.implements("netdev") && !c.is_abstract());
    if let Some(class) = &netdev {
        if typename == "stream" {
            let addr = match args.get("addr") {
                Some(Json::Object(addr)) => addr,
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'addr', expected: object",
                    ));
                }
                None if args.get("id").is_some() => {
                    return Err(QmpError::generic("Parameter 'addr' is missing"));
                }
                None => &Map::new(),
            };
            match addr.get("type").and_then(Json::as_str) {
                Some("unix") => {}
                Some(other) => {
                    return Err(QmpError::generic(format!(
                        "stream netdev: addr.type '{other}' is not supported; qomu takes 'unix'"
                    )));
                }
                None if args.get("id").is_some() => {
                    return Err(QmpError::generic("Parameter 'addr.type' is missing"));
                }
                None => {}
            }
            match addr.get("path") {
                Some(path) => {
                    properties.insert("path".into(), path.clone());
                }
                None if args.get("id").is_some() => {
                    return Err(QmpError::generic("Parameter 'addr.path' is missing"));
                }
                None => {}
            }
        } else if args.contains_key("addr") {
            return Err(QmpError::generic("Parameter 'addr' is unexpected"));
        }
        if let Some(k) = properties.keys().find(|k| class.property(k).is_none()) {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        // QEMU's netdev_add takes JSON booleans only (no keyval text, unlike device_add).
        if let Some(k) = properties.iter().find_map(|(k, v)| {
            let flag = class
                .property(k)
                .is_some_and(|p| matches!(p.kind(), qom::Kind::Bool));
            (flag && !v.is_boolean()).then_some(k)
        }) {
            return Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: boolean"
            )));
        }
    }
    // A tap by descriptor: the one this connection named with getfd goes to the tap through
    // qom's handover table (the tap is told its token), and is this connection's no more.
    let mut token = None;
    if netdev.is_some()
        && typename == "tap"
        && let Some(Json::String(name)) = properties.get("fd")
    {
        if properties.contains_key("ifname") {
            return Err(QmpError::generic(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= are invalid with fd=",
            ));
        }
        let Some(fd) = session.fds.remove(name.as_str()) else {
            return Err(QmpError::generic(format!(
                "File descriptor named '{name}' has not been found"
            )));
        };
        let t = qom::handover::deposit(fd);
        properties.insert("fd".into(), Json::String(t.clone()));
        token = Some(t);
    }
    let mut action_args = Map::new();
    action_args.insert("type".into(), Json::String(typename.to_owned()));
    if let Some(id) = args.get("id") {
        action_args.insert("id".into(), id.clone());
    }
    if !properties.is_empty() {
        action_args.insert("properties".into(), Json::Object(properties));
    }
    let result = call_action(session, "netdev-add", &action_args);
    // Refused before the tap took it: closed, as QEMU closes a descriptor it failed on.
    if let Some(t) = token {
        qom::handover::discard(&t);
    }
    result
}

/// `getfd {fdname}`: names the descriptor that came with this command (SCM_RIGHTS) in
/// this connection's table, replacing one of the same name, as QEMU's monitor does.
fn getfd(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let name = str_arg(args, "fdname");
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(QmpError::generic(
            "Parameter 'fdname' expects a name not starting with a digit",
        ));
    }
    let Some(fd) = session.received.pop() else {
        return Err(QmpError::generic(
            "No file descriptor supplied via SCM_RIGHTS",
        ));
    };
    session.received.clear();
    session.fds.insert(name.to_owned(), fd);
    Ok(json!({}))
}

/// `closefd {fdname}`: closes a descriptor `getfd` named.
fn closefd(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let name = str_arg(args, "fdname");
    match session.fds.remove(name) {
        Some(_) => Ok(json!({})),
        None => Err(QmpError::generic(format!(
            "File descriptor named '{name}' not found"
        ))),
    }
}

fn netdev_del(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let mut action_args = Map::new();
    action_args.insert("id".into(), Json::String(str_arg(args, "id").to_owned()));
    call_action(session, "netdev-del", &action_args)
}

/// A migration URI with `fd:NAME` (a descriptor `getfd` named on this connection) made
/// into `fd:TOKEN` for the machine (qom::handover); the token, to discard after the call.
fn with_fd_token(session: &mut Session, args: &Args) -> Result<(Args, Option<String>), QmpError> {
    let mut args = args.clone();
    let uri = str_arg(&args, "uri").to_owned();
    let Some(name) = uri.strip_prefix("fd:").filter(|n| !n.is_empty()) else {
        return Ok((args, None));
    };
    let Some(fd) = session.fds.remove(name) else {
        return Err(QmpError::generic(format!(
            "File descriptor named '{name}' has not been found"
        )));
    };
    let token = qom::handover::deposit(fd);
    args.insert("uri".into(), Json::String(format!("fd:{token}")));
    Ok((args, Some(token)))
}

/// `migrate {uri}`: the machine's `migrate`, an `fd:` name turned into the descriptor.
fn migrate(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let (args, token) = with_fd_token(session, args)?;
    let result = call_action(session, "migrate", &args);
    // The migration thread takes the descriptor when it starts; if it never does, closed.
    if result.is_err()
        && let Some(t) = token
    {
        qom::handover::discard(&t);
    }
    result
}

/// `migrate-incoming {uri}`: the machine's `migrate-incoming`, likewise.
fn migrate_incoming(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let (args, token) = with_fd_token(session, args)?;
    let result = call_action(session, "migrate-incoming", &args);
    if let Some(t) = token {
        qom::handover::discard(&t);
    }
    result
}

/// `set_link {name, up}`: the machine's `set-link`.
fn set_link(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    call_action(session, "set-link", args)
}

/// `query-rx-filter {name?}`: the machine's `query-rx-filter`.
fn query_rx_filter(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    call_action(session, "query-rx-filter", args)
}

fn human_monitor_command(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    Ok(Json::String(hmp::run(
        session,
        str_arg(args, "command-line"),
    )))
}

fn subscribe(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let subtree = args.get("subtree").and_then(Json::as_bool).unwrap_or(false);
    let target = match (
        args.get("path").and_then(Json::as_str),
        args.get("type").and_then(Json::as_str),
    ) {
        (Some(p), None) if subtree => Target::Subtree(p.to_owned()),
        (Some(p), None) => Target::Object(p.to_owned()),
        (None, Some(_)) if subtree => {
            return Err(QmpError::generic("'subtree' goes with 'path', not 'type'"));
        }
        (None, Some(t)) => Target::Type(t.to_owned()),
        _ => {
            return Err(QmpError::generic(
                "Exactly one of 'path' and 'type' must be given",
            ));
        }
    };
    let number = |name: &str, max: u64| -> Result<Option<u64>, QmpError> {
        match args.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter '{name}' expects an integer between 1 and {max}"
                ))
            }),
        }
    };
    let filter = match args.get("filter") {
        None => Vec::new(),
        Some(Json::Object(fields)) => fields
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    args::to_value_of(&format!("filter.{k}"), None, v)?,
                ))
            })
            .collect::<Result<_, QmpError>>()?,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'filter', expected: object",
            ));
        }
    };
    let opts = SubscribeOptions {
        queue_limit: number("queue-limit", qom::MAX_QUEUE_LIMIT.into())?,
        coalesce: args
            .get("coalesce")
            .and_then(Json::as_bool)
            .unwrap_or(false),
        filter,
        min_interval_ms: number("min-interval-ms", qom::MAX_MIN_INTERVAL_MS)?,
        linger_s: number("linger", qom::MAX_LINGER_S)?,
    };
    let ctx = if matches!(target, Target::Type(_)) {
        Context::ClassQuery
    } else {
        Context::Lookup
    };
    let made = session
        .events
        .subscriber()
        .subscribe_full(target, str_arg(args, "notifier"), opts)
        .map_err(|e| from_qom(&e, ctx))?;
    Ok(match made.token {
        Some(token) => json!({"subscription": made.path, "token": token}),
        None => json!({"subscription": made.path}),
    })
}

fn adopt(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    let path = session
        .events
        .subscriber()
        .adopt(str_arg(args, "subscription"), str_arg(args, "token"))
        .map_err(|e| from_qom(&e, Context::Lookup))?;
    Ok(json!({"subscription": path}))
}

fn unsubscribe(session: &mut Session, args: &Args) -> Result<Json, QmpError> {
    session
        .events
        .subscriber()
        .unsubscribe(str_arg(args, "subscription"))
        .map_err(|e| from_qom(&e, Context::Lookup))?;
    Ok(json!({}))
}
