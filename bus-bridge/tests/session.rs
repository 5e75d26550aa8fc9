//! The QMP session in process, against a tree with a small test machine: negotiation,
//! QEMU's dispatch checks and error texts, the qom commands, subscriptions and events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bus_bridge::qmp::session::Session;
use qom::{Action, Field, Kind, NotifierDecl, PhasePolicy, Property, Tree, TypeInfo, Value};
use serde_json::{Value as Json, json};

/// A tree whose machine has `status`, `stop`/`cont` with STOP/RESUME, a prelaunch
/// property, and a `widget` type with a notifier.
fn tree() -> Tree {
    let b = Tree::builder();
    let running = Arc::new(AtomicBool::new(true));
    let (r1, r2, r3) = (running.clone(), running.clone(), running);
    b.register(
        TypeInfo::new("test-machine", "machine")
            .property(
                Property::new(
                    "status",
                    Kind::enumeration("RunState", &["running", "paused"]),
                )
                .getter(move |_| {
                    Ok(Value::Enum(
                        if r1.load(Ordering::SeqCst) {
                            "running"
                        } else {
                            "paused"
                        }
                        .into(),
                    ))
                }),
            )
            .property(
                Property::new("memory-size", Kind::size())
                    .policy(PhasePolicy::Prelaunch)
                    .default(1u64 << 28),
            )
            .notifier(NotifierDecl::new("STOP", Kind::structure("Stop", vec![])))
            .notifier(NotifierDecl::new(
                "RESUME",
                Kind::structure("Resume", vec![]),
            ))
            .action(Action::new("stop", move |o, _| {
                r2.store(false, Ordering::SeqCst);
                o.notifier("STOP")?.emit(|| Value::map::<&str>([]));
                Ok(None)
            }))
            .action(Action::new("cont", move |o, _| {
                r3.store(true, Ordering::SeqCst);
                o.notifier("RESUME")?.emit(|| Value::map::<&str>([]));
                Ok(None)
            }))
            .action(
                Action::new("pmemsave", |_, _| Ok(None))
                    .arg(Field::new("val", Kind::uint64(), ""))
                    .arg(Field::new("size", Kind::uint64(), ""))
                    .arg(Field::new("filename", Kind::Str, "")),
            ),
    )
    .unwrap();
    b.register(
        TypeInfo::new("widget", "object")
            .implements("user-creatable")
            .property(Property::new("size", Kind::uint8()).notifying())
            .property(Property::new("label", Kind::Str).policy(PhasePolicy::BeforeRealize))
            .notifier(NotifierDecl::new(
                "ping",
                Kind::structure("Ping", vec![Field::new("n", Kind::uint32(), "")]),
            ))
            .action(Action::new("ping", |o, _| {
                o.notifier("ping")?
                    .emit(|| Value::map([("n", Value::UInt(7))]));
                Ok(None)
            })),
    )
    .unwrap();
    let tree = b.machine_type("test-machine").build().unwrap();
    tree.set_machine_state("running", false);
    tree
}

fn run(s: &mut Session, input: &str) -> Vec<Json> {
    s.feed(input.as_bytes())
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn one(s: &mut Session, input: &str) -> Json {
    let mut out = run(s, input);
    assert_eq!(out.len(), 1, "{out:?}");
    out.remove(0)
}

fn negotiated(tree: &Tree) -> Session {
    negotiated_as(tree, 1)
}

fn negotiated_as(tree: &Tree, id: u64) -> Session {
    let mut s = Session::new(tree.clone(), id);
    assert_eq!(
        one(&mut s, r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    s
}

fn err(class: &str, desc: &str) -> Json {
    json!({"error": {"class": class, "desc": desc}})
}

#[test]
fn negotiation() {
    let tree = tree();
    let mut s = Session::new(tree.clone(), 1);
    assert_eq!(
        one(&mut s, r#"{"execute": "query-status", "id": 1}"#),
        json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1})
    );
    assert_eq!(
        one(&mut s, r#"{"execute": "nonsense"}"#),
        err(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#
        ),
        err("GenericError", "Capability oob not available")
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["fast"]}}"#
        ),
        err(
            "GenericError",
            "Parameter 'enable[0]' does not accept value 'fast'"
        )
    );
    assert_eq!(
        one(&mut s, r#"{"execute": "qmp_capabilities", "id": "x"}"#),
        json!({"return": {}, "id": "x"})
    );
    assert_eq!(
        one(&mut s, r#"{"execute": "qmp_capabilities"}"#),
        err(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    assert_eq!(
        one(&mut s, r#"{"execute": "query-status"}"#),
        json!({"return": {"running": true, "status": "running"}})
    );
}

#[test]
fn dispatch_errors_have_qemus_texts() {
    let tree = tree();
    let mut s = negotiated(&tree);
    let cases = [
        (
            r#"[1, 2]"#,
            err("GenericError", "QMP input must be a JSON object"),
        ),
        (
            r#"{"id": 5}"#,
            json!({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 5}),
        ),
        (
            r#"{"execute": 1}"#,
            err(
                "GenericError",
                "QMP input member 'execute' must be a string",
            ),
        ),
        (
            r#"{"execute": "stop", "arguments": []}"#,
            err(
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
        ),
        (
            r#"{"execute": "stop", "bogus": 1}"#,
            err("GenericError", "QMP input member 'bogus' is unexpected"),
        ),
        (
            r#"{"exec-oob": "stop"}"#,
            err("GenericError", "QMP input member 'exec-oob' is unexpected"),
        ),
        (
            r#"{"execute": "frobnicate"}"#,
            err(
                "CommandNotFound",
                "The command frobnicate has not been found",
            ),
        ),
        (
            r#"{"execute": "qom-get", "arguments": {"path": "/machine"}}"#,
            err("GenericError", "Parameter 'property' is missing"),
        ),
        (
            r#"{"execute": "qom-get", "arguments": {"path": 1, "property": "type"}}"#,
            err(
                "GenericError",
                "Invalid parameter type for 'path', expected: string",
            ),
        ),
        (
            r#"{"execute": "qom-get", "arguments": {"path": "/machine", "property": "type", "x": 1}}"#,
            err("GenericError", "Parameter 'x' is unexpected"),
        ),
        (
            r#"{"execute": "pmemsave", "arguments": {"val": 0, "size": 1}}"#,
            err("GenericError", "Parameter 'filename' is missing"),
        ),
        (
            r#"{"execute": "pmemsave", "arguments": {"val": "0", "size": 1, "filename": "/tmp/x"}}"#,
            err(
                "GenericError",
                "Invalid parameter type for 'val', expected: integer",
            ),
        ),
        (
            r#"{"execute": "pmemsave", "arguments": {"val": -1, "size": 1, "filename": "/tmp/x"}}"#,
            err("GenericError", "Parameter 'val' expects uint64"),
        ),
        (
            r#"{"execute": "stop" "id": 1}"#,
            err(
                "GenericError",
                "JSON parse error, expected separator in dict",
            ),
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(one(&mut s, input), expected, "{input}");
    }
    // An incomplete message waits for the rest.
    assert!(run(&mut s, r#"{"execute": "query-st"#).is_empty());
    assert_eq!(one(&mut s, r#"atus"}"#)["return"]["status"], "running");
    // A parse error in the middle of a stream does not lose what follows.
    let out = run(&mut s, r#"{"execute": @}{"execute": "query-status"}"#);
    assert_eq!(out[0], err("GenericError", "JSON parse error, stray '@'"));
    assert_eq!(out.last().unwrap()["return"]["status"], "running");
}

#[test]
fn qom_commands_and_their_errors() {
    let tree = tree();
    tree.create("/objects", "w1", "widget", vec![]).unwrap();
    tree.create("/machine/unattached", "w1", "widget", vec![])
        .unwrap();
    let mut s = negotiated(&tree);
    let listed = one(
        &mut s,
        r#"{"execute": "qom-list", "arguments": {"path": "/objects"}}"#,
    );
    assert!(
        listed["return"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "w1", "type": "child<widget>"}))
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-get", "arguments": {"path": "/objects/w1", "property": "size"}}"#
        ),
        json!({"return": 0})
    );
    // Partial paths: unique works; ambiguous differs between qom-list and qom-get, as in QEMU.
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-get", "arguments": {"path": "peripheral-anon", "property": "type"}}"#
        ),
        json!({"return": "container"})
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-list", "arguments": {"path": "w1"}}"#
        ),
        err("GenericError", "Path 'w1' is ambiguous")
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-get", "arguments": {"path": "w1", "property": "size"}}"#
        ),
        err("DeviceNotFound", "Device 'w1' not found")
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-list", "arguments": {"path": "/nope"}}"#
        ),
        err("DeviceNotFound", "Device '/nope' not found")
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-get", "arguments": {"path": "/objects/w1", "property": "colour"}}"#
        ),
        err("GenericError", "Property 'widget.colour' not found")
    );
    // qom-set: values, types, ranges, read-only, phases.
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-set", "arguments": {"path": "/objects/w1", "property": "size", "value": 9}}"#
        ),
        json!({"return": {}})
    );
    let set = |v: &str, p: &str| {
        format!(
            r#"{{"execute": "qom-set", "arguments": {{"path": "/objects/w1", "property": "{p}", "value": {v}}}}}"#
        )
    };
    assert_eq!(
        one(&mut s, &set("\"big\"", "size")),
        err(
            "GenericError",
            "Invalid parameter type for 'size', expected: integer"
        )
    );
    assert_eq!(
        one(&mut s, &set("1.5", "size")),
        err(
            "GenericError",
            "Invalid parameter type for 'size', expected: integer"
        )
    );
    assert_eq!(
        one(&mut s, &set("256", "size")),
        err("GenericError", "Parameter 'size' expects uint8")
    );
    assert_eq!(
        one(&mut s, &set("\"x\"", "type")),
        err("GenericError", "Property 'widget.type' is not writable")
    );
    assert_eq!(
        one(&mut s, &set("\"x\"", "label")),
        err(
            "GenericError",
            "Attempt to set property 'label' on device 'w1' (type 'widget') after it was realized"
        )
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-set", "arguments": {"path": "/machine", "property": "memory-size", "value": 1}}"#
        ),
        err(
            "GenericError",
            "property 'memory-size' of '/machine' can only be set while the machine is in prelaunch; the machine is running"
        )
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-get", "arguments": {"path": "/objects/w1", "property": "size"}}"#
        ),
        json!({"return": 9})
    );
    // qom-list-get fails whole when a path is bad; notifiers have no value.
    let lg = one(
        &mut s,
        r#"{"execute": "qom-list-get", "arguments": {"paths": ["/objects/w1", "/objects"]}}"#,
    );
    let props = lg["return"][0]["properties"].as_array().unwrap();
    assert!(props.contains(&json!({"name": "size", "type": "uint8", "value": 9})));
    assert!(props.contains(&json!({"name": "ping", "type": "notifier<Ping>"})));
    assert!(
        lg["return"][1]["properties"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "w1", "type": "child<widget>", "value": "/objects/w1"}))
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-list-get", "arguments": {"paths": ["/objects/w1", "w1"]}}"#
        ),
        err("GenericError", "Path 'w1' is ambiguous")
    );
    // Types.
    let types = one(
        &mut s,
        r#"{"execute": "qom-list-types", "arguments": {"implements": "machine", "abstract": true}}"#,
    );
    assert!(
        types["return"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "machine", "abstract": true, "parent": "object"}))
    );
    assert!(
        types["return"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "test-machine", "parent": "machine"}))
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "qom-list-properties", "arguments": {"typename": "gizmo"}}"#
        ),
        err("DeviceNotFound", "Class 'gizmo' not found")
    );
}

#[test]
fn object_add_and_del() {
    let tree = tree();
    let mut s = negotiated(&tree);
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "object-add", "arguments": {"qom-type": "widget", "id": "g1", "size": "7", "label": "hi"}}"#
        ),
        json!({"return": {}})
    );
    assert_eq!(tree.get("/objects/g1", "size").unwrap(), Value::UInt(7));
    let cases = [
        (
            r#"{"qom-type": "gizmo", "id": "g2"}"#,
            "invalid object type: gizmo",
        ),
        (
            r#"{"qom-type": "container", "id": "g2"}"#,
            "object type 'container' isn't supported by object-add",
        ),
        (
            r#"{"qom-type": "widget", "id": "2g"}"#,
            "Parameter 'id' expects an identifier",
        ),
        (
            r#"{"qom-type": "widget", "id": "g1"}"#,
            "attempt to add duplicate property 'g1' to object (type 'container')",
        ),
        (
            r#"{"qom-type": "widget", "id": "g3", "size": 300}"#,
            "Parameter 'size' expects uint8",
        ),
        (
            r#"{"qom-type": "widget", "id": "g3", "weight": 3}"#,
            "Property 'widget.weight' not found",
        ),
        (r#"{"id": "g3"}"#, "Parameter 'qom-type' is missing"),
    ];
    for (args, desc) in cases {
        assert_eq!(
            one(
                &mut s,
                &format!(r#"{{"execute": "object-add", "arguments": {args}}}"#)
            ),
            err("GenericError", desc),
            "{args}"
        );
    }
    assert!(
        tree.lookup("/objects/g3").is_err(),
        "nothing was left behind"
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "object-del", "arguments": {"id": "g1"}}"#
        ),
        json!({"return": {}})
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "object-del", "arguments": {"id": "g1"}}"#
        ),
        err("GenericError", "object 'g1' not found")
    );
}

#[test]
fn lifecycle_events_and_subscriptions() {
    let tree = tree();
    tree.create("/objects", "w1", "widget", vec![]).unwrap();
    let mut s = negotiated(&tree);
    assert_eq!(
        s.lifecycle_subscriptions().len(),
        2,
        "STOP and RESUME exist on this machine"
    );
    assert_eq!(one(&mut s, r#"{"execute": "stop"}"#), json!({"return": {}}));
    let events: Vec<Json> = s
        .drain_events()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"], "STOP");
    assert!(
        events[0].get("data").is_none(),
        "QEMU sends STOP without data"
    );
    assert!(events[0]["timestamp"]["seconds"].as_u64().unwrap() > 1_700_000_000);
    // Subscriptions: per object, per type, and by reading a notifier.
    let sub = one(
        &mut s,
        r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "w1", "notifier": "ping"}}"#,
    );
    let sub_path = sub["return"]["subscription"].as_str().unwrap().to_owned();
    let by_type = one(
        &mut s,
        r#"{"execute": "__org.qomu_subscribe", "arguments": {"type": "widget", "notifier": "property-changed", "coalesce": true}}"#,
    );
    assert!(by_type["return"]["subscription"].is_string());
    let by_read = one(
        &mut s,
        r#"{"execute": "qom-get", "arguments": {"path": "w1", "property": "ping"}}"#,
    );
    assert!(
        by_read["return"]
            .as_str()
            .unwrap()
            .starts_with("/subscriptions/")
    );
    assert_eq!(
        tree.get(&sub_path, "owner").unwrap(),
        Value::Str("qmp:1".into())
    );
    tree.call("/objects/w1", "ping", Default::default())
        .unwrap();
    tree.create("/objects", "w2", "widget", vec![]).unwrap();
    tree.set("/objects/w2", "size", Value::UInt(3)).unwrap();
    let events: Vec<Json> = s
        .drain_events()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["event"], "__org.qomu_NOTIFY");
    assert_eq!(
        events[0]["data"],
        json!({"subscription": sub_path, "sequence": 1, "path": "/objects/w1", "notifier": "ping", "data": {"n": 7}})
    );
    assert_eq!(
        events[2]["data"]["path"], "/objects/w2",
        "the type subscription matched an object created after it"
    );
    assert_eq!(
        events[2]["data"]["data"],
        json!({"property": "size", "value": 3})
    );
    // Errors of the extension.
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "__org.qomu_subscribe", "arguments": {"notifier": "ping"}}"#
        ),
        err(
            "GenericError",
            "Exactly one of 'path' and 'type' must be given"
        )
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "w1", "notifier": "pong"}}"#
        ),
        err("GenericError", "Property 'widget.pong' not found")
    );
    assert_eq!(
        one(
            &mut s,
            r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "w1", "notifier": "size"}}"#
        ),
        err("GenericError", "property 'widget.size' is not a notifier")
    );
    let mut other = negotiated_as(&tree, 2);
    assert_eq!(
        one(
            &mut other,
            &format!(
                r#"{{"execute": "__org.qomu_unsubscribe", "arguments": {{"subscription": "{sub_path}"}}}}"#
            )
        ),
        err(
            "GenericError",
            &format!("subscription '{sub_path}' belongs to 'qmp:1'")
        )
    );
    assert_eq!(
        one(
            &mut s,
            &format!(
                r#"{{"execute": "__org.qomu_unsubscribe", "arguments": {{"subscription": "{sub_path}"}}}}"#
            )
        ),
        json!({"return": {}})
    );
    // Closing the connection (dropping the session) removes everything it owned.
    let before = tree.subscriptions().len();
    drop(s);
    assert_eq!(
        tree.subscriptions().len(),
        before - 4,
        "the two lifecycle subscriptions and the two left"
    );
    assert!(
        tree.subscriptions()
            .iter()
            .all(|p| tree.get(p, "owner").unwrap() != Value::Str("qmp:1".into()))
    );
}

#[test]
fn introspection() {
    let tree = tree();
    let mut s = negotiated(&tree);
    let names: Vec<String> = one(&mut s, r#"{"execute": "query-commands"}"#)["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    for c in [
        "qom-get",
        "stop",
        "cont",
        "pmemsave",
        "__org.qomu_subscribe",
        "human-monitor-command",
    ] {
        assert!(names.contains(&c.to_owned()), "{c}");
    }
    assert!(
        !names.contains(&"quit".to_owned()),
        "this machine has no quit action"
    );
    let schema = one(&mut s, r#"{"execute": "query-qmp-schema"}"#)["return"].clone();
    let entries = schema.as_array().unwrap();
    let find = |n: &str| {
        entries
            .iter()
            .find(|e| e["name"] == n)
            .cloned()
            .unwrap_or(Json::Null)
    };
    assert_eq!(find("qom-get")["meta-type"], "command");
    let args = find(find("pmemsave")["arg-type"].as_str().unwrap());
    assert_eq!(args["members"][0], json!({"name": "val", "type": "int"}));
    assert_eq!(find("STOP")["meta-type"], "event");
    assert_eq!(find("__org.qomu_NOTIFY")["meta-type"], "event");
    let version = one(&mut s, r#"{"execute": "query-version"}"#);
    assert_eq!(
        version["return"]["qemu"],
        json!({"major": 10, "minor": 1, "micro": 0})
    );
    let hmp = one(
        &mut s,
        r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}"#,
    );
    assert_eq!(hmp, json!({"return": "VM status: running\r\n"}));
    let hmp = one(
        &mut s,
        r#"{"execute": "human-monitor-command", "arguments": {"command-line": "frob"}}"#,
    );
    assert_eq!(hmp, json!({"return": "unknown command: 'frob'\r\n"}));
}
