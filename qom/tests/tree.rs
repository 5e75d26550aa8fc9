//! Tree-level tests: every rule of the object model, driven with no front end.

mod common;

use std::collections::BTreeMap;

use common::{all_paths, hook_log_for, props, test_tree};
use qom::{Error, PhasePolicy, PropertyRole, Tree, TypeInfo, Value};

fn names(list: &[qom::TypeSummary]) -> Vec<&str> {
    list.iter().map(|t| t.name.as_str()).collect()
}

#[test]
fn well_known_containers_exist() {
    let tree = Tree::new();
    for path in [
        "/machine",
        "/machine/peripheral",
        "/machine/peripheral-anon",
        "/machine/unattached",
        "/objects",
        "/subscriptions",
    ] {
        assert!(tree.lookup(path).is_ok(), "{path}");
    }
    assert_eq!(
        tree.get("/machine", "type").unwrap(),
        Value::Str("none-machine".into())
    );
    assert_eq!(
        tree.get("/objects", "type").unwrap(),
        Value::Str("container".into())
    );
    assert_eq!(tree.root().path(), "/");
}

#[test]
fn list_types_follows_qemu() {
    let tree = test_tree();
    // Without `abstract`, abstract types are left out.
    let all = tree.list_types(None, false);
    assert!(names(&all).contains(&"lamp"));
    assert!(!names(&all).contains(&"appliance"));
    assert!(!names(&all).contains(&"object"));
    // `implements` includes the type itself, subtypes and implementers of an interface.
    let mut appliances = names(&tree.list_types(Some("appliance"), true))
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    appliances.sort();
    assert_eq!(appliances, ["appliance", "fragile", "lamp"]);
    let mut switchable = names(&tree.list_types(Some("switchable"), false))
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    switchable.sort();
    assert_eq!(switchable, ["fragile", "lamp"]);
    let creatable = tree.list_types(Some("user-creatable"), false);
    assert!(names(&creatable).contains(&"socket"));
    // Parent and abstract flag.
    let lamp = all.iter().find(|t| t.name == "lamp").unwrap();
    assert_eq!(lamp.parent.as_deref(), Some("appliance"));
    assert!(!lamp.is_abstract);
    let abstracts = tree.list_types(Some("machine"), true);
    assert!(
        abstracts
            .iter()
            .any(|t| t.name == "machine" && t.is_abstract)
    );
    // QEMU answers an unknown `implements` with an empty list.
    assert!(tree.list_types(Some("no-such-type"), true).is_empty());
}

#[test]
fn type_properties_include_inherited_and_notifiers() {
    let tree = test_tree();
    let props = tree.type_properties("lamp").unwrap();
    let find = |n: &str| {
        props
            .iter()
            .find(|p| p.name == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert_eq!(find("type").type_name, "str");
    assert_eq!(find("power").type_name, "bool");
    assert_eq!(find("power").declared_by, "appliance");
    assert!(find("power").notifying);
    assert_eq!(find("watts").type_name, "uint8");
    assert_eq!(find("watts").default, Some(Value::UInt(40)));
    assert_eq!(find("slot").policy, PhasePolicy::Prelaunch);
    assert_eq!(find("label").policy, PhasePolicy::BeforeRealize);
    assert_eq!(find("brightness").policy, PhasePolicy::Always);
    assert_eq!(find("socket").type_name, "link<socket>");
    assert_eq!(find("tick").type_name, "notifier<Tick>");
    assert!(matches!(find("tick").role, PropertyRole::Notifier(_)));
    assert_eq!(
        find("property-changed").type_name,
        "notifier<PropertyChanged>"
    );
    // Abstract types can be inspected too.
    assert!(tree.type_properties("appliance").is_ok());
    assert_eq!(
        tree.type_properties("nope").unwrap_err(),
        Error::TypeNotFound {
            typename: "nope".into()
        }
    );
}

#[test]
fn registering_bad_types_is_refused() {
    let tree = test_tree();
    let reg = tree.types();
    assert!(matches!(
        reg.register(TypeInfo::new("lamp", "object")),
        Err(Error::InvalidType { .. })
    ));
    assert!(matches!(
        reg.register(TypeInfo::new("x", "no-parent")),
        Err(Error::InvalidType { .. })
    ));
    assert!(matches!(
        reg.register(TypeInfo::new("y", "object").implements("lamp")),
        Err(Error::InvalidType { .. })
    ));
    assert!(matches!(
        reg.register(TypeInfo::interface("z", "object")),
        Err(Error::InvalidType { .. })
    ));
    let bad_default = TypeInfo::new("w", "object")
        .property(qom::Property::new("p", qom::Kind::uint8()).default(999u32));
    assert!(matches!(
        reg.register(bad_default),
        Err(Error::InvalidType { .. })
    ));
    let twice = TypeInfo::new("v", "lamp").property(qom::Property::new("watts", qom::Kind::Bool));
    assert!(matches!(
        reg.register(twice),
        Err(Error::InvalidType { .. })
    ));
    // Types can be registered after the tree is built, and then instantiated.
    reg.register(TypeInfo::new("late", "object").implements("user-creatable"))
        .unwrap();
    tree.create("/objects", "late0", "late", vec![]).unwrap();
}

#[test]
fn create_and_list_objects() {
    let tree = test_tree();
    let lamp = tree
        .create(
            "/objects",
            "lamp0",
            "lamp",
            props(&[("label", "desk".into())]),
        )
        .unwrap();
    assert_eq!(lamp.path(), "/objects/lamp0");
    assert!(lamp.is_realized());
    assert_eq!(lamp.get("label").unwrap(), Value::Str("desk".into()));
    assert_eq!(lamp.get("watts").unwrap(), Value::UInt(40));
    let listed = tree.list("/objects").unwrap();
    let child = listed.iter().find(|p| p.name == "lamp0").unwrap();
    assert_eq!(child.type_name, "child<lamp>");
    assert_eq!(
        tree.get("/objects", "lamp0").unwrap(),
        Value::Path("/objects/lamp0".into())
    );
    // Children list in natural order.
    for i in [10, 2, 1] {
        tree.create("/objects", &format!("s[{i}]"), "socket", vec![])
            .unwrap();
    }
    let order: Vec<_> = tree
        .lookup("/objects")
        .unwrap()
        .children()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    assert_eq!(order, ["lamp0", "s[1]", "s[2]", "s[10]"]);
}

#[test]
fn creation_errors_change_nothing() {
    let tree = test_tree();
    let before = all_paths(&tree);
    // (parent, name, type, creation properties, why it must fail)
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<(String, Value)>, &'a str);
    let cases: Vec<Case> = vec![
        ("/objects", "a", "appliance", vec![], "abstract"),
        ("/objects", "a", "nope", vec![], "unknown type"),
        ("/objects", "a", "subscription", vec![], "internal type"),
        ("/nowhere", "a", "lamp", vec![], "unknown parent"),
        ("/objects", "a/b", "lamp", vec![], "bad name"),
        ("/objects", "", "lamp", vec![], "empty name"),
        ("/objects", "type", "lamp", vec![], "name of a property"),
        (
            "/objects",
            "a",
            "lamp",
            props(&[("watts", Value::UInt(0))]),
            "out of range",
        ),
        (
            "/objects",
            "a",
            "lamp",
            props(&[("power", "yes".into())]),
            "wrong type",
        ),
        (
            "/objects",
            "a",
            "lamp",
            props(&[("type", "x".into())]),
            "read-only",
        ),
        (
            "/objects",
            "a",
            "lamp",
            props(&[("nope", true.into())]),
            "unknown property",
        ),
        (
            "/objects",
            "a",
            "lamp",
            props(&[("brightness", Value::UInt(13))]),
            "setter refuses",
        ),
        (
            "/objects",
            "a",
            "fragile",
            props(&[("label", "bad".into())]),
            "realize fails",
        ),
    ];
    for (parent, name, typ, p, why) in cases {
        assert!(tree.create(parent, name, typ, p).is_err(), "{why}");
        assert_eq!(all_paths(&tree), before, "{why}");
    }
    tree.create("/objects", "dup", "socket", vec![]).unwrap();
    assert_eq!(
        tree.create("/objects", "dup", "socket", vec![])
            .unwrap_err(),
        Error::DuplicateName {
            path: "/objects".into(),
            name: "dup".into()
        }
    );
}

#[test]
fn failed_realize_undoes_realized_levels() {
    let tree = test_tree();
    let sub = tree.subscriber("t");
    sub.subscribe(
        qom::Target::Object("/objects".into()),
        "child-added",
        Default::default(),
    )
    .unwrap();
    let err = tree
        .create(
            "/objects",
            "f1",
            "fragile",
            props(&[("label", "bad".into())]),
        )
        .unwrap_err();
    assert_eq!(err, Error::Failed("the label is bad".into()));
    // The base level realized, then was undone; the failing level never ran its undo.
    assert_eq!(
        hook_log_for("f1"),
        ["realize-appliance:f1", "unrealize-appliance:f1"]
    );
    assert!(tree.lookup("/objects/f1").is_err());
    assert!(
        sub.drain().is_empty(),
        "no child-added for an object that never appeared"
    );
    // A good one realizes both levels, base first, and unrealizes most derived first.
    tree.create(
        "/objects",
        "f2",
        "fragile",
        props(&[("label", "good".into())]),
    )
    .unwrap();
    tree.delete("/objects/f2").unwrap();
    assert_eq!(
        hook_log_for("f2"),
        [
            "realize-appliance:f2",
            "realize-fragile:f2",
            "unrealize-fragile:f2",
            "unrealize-appliance:f2"
        ]
    );
}

#[test]
fn absolute_paths_follow_children_and_links() {
    let tree = test_tree();
    tree.create("/objects", "sock", "socket", vec![]).unwrap();
    tree.create(
        "/objects",
        "lamp",
        "lamp",
        props(&[("socket", "/objects/sock".into())]),
    )
    .unwrap();
    assert_eq!(
        tree.lookup("//objects//lamp/").unwrap().path(),
        "/objects/lamp"
    );
    assert_eq!(tree.lookup("/").unwrap().path(), "/");
    // Through the link to its target.
    assert_eq!(
        tree.lookup("/objects/lamp/socket").unwrap().path(),
        "/objects/sock"
    );
    assert_eq!(
        tree.get("/objects/lamp", "socket").unwrap(),
        Value::Path("/objects/sock".into())
    );
    assert_eq!(
        tree.lookup("/objects/nope").unwrap_err(),
        Error::NotFound {
            path: "/objects/nope".into()
        }
    );
    // A property that is neither child nor link is not a path component.
    assert!(matches!(
        tree.lookup("/objects/lamp/watts"),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn partial_paths_resolve_like_qemu() {
    let tree = test_tree();
    tree.create("/objects", "lamp0", "lamp", vec![]).unwrap();
    tree.create("/machine/peripheral", "lamp0", "lamp", vec![])
        .unwrap();
    tree.create("/machine/peripheral", "lamp1", "lamp", vec![])
        .unwrap();
    // Unique match at any depth.
    assert_eq!(
        tree.lookup("lamp1").unwrap().path(),
        "/machine/peripheral/lamp1"
    );
    assert_eq!(
        tree.lookup("peripheral/lamp0").unwrap().path(),
        "/machine/peripheral/lamp0"
    );
    assert_eq!(
        tree.lookup("machine/peripheral").unwrap().path(),
        "/machine/peripheral"
    );
    // Two matches: ambiguous. No match: not found.
    assert_eq!(
        tree.lookup("lamp0").unwrap_err(),
        Error::Ambiguous {
            path: "lamp0".into()
        }
    );
    assert_eq!(
        tree.lookup("lamp9").unwrap_err(),
        Error::NotFound {
            path: "lamp9".into()
        }
    );
    assert_eq!(
        tree.lookup("objects/lamp1").unwrap_err(),
        Error::NotFound {
            path: "objects/lamp1".into()
        }
    );
    // Every object matches the empty partial path.
    assert!(matches!(tree.lookup(""), Err(Error::Ambiguous { .. })));
    // A link named like the first component is a starting point too (QEMU counts it).
    tree.create("/objects", "plug", "socket", vec![]).unwrap();
    tree.set("/objects/lamp0", "socket", "/objects/plug".into())
        .unwrap();
    assert_eq!(tree.lookup("socket").unwrap().path(), "/objects/plug");
    tree.create("/machine/unattached", "socket", "socket", vec![])
        .unwrap();
    assert!(matches!(
        tree.lookup("socket"),
        Err(Error::Ambiguous { .. })
    ));
    // Partial paths also work for get/set/call.
    tree.set("lamp1", "watts", Value::UInt(60)).unwrap();
    assert_eq!(
        tree.get("/machine/peripheral/lamp1", "watts").unwrap(),
        Value::UInt(60)
    );
}

#[test]
fn property_writes_are_checked_and_refusals_change_nothing() {
    let tree = test_tree();
    let lamp = tree
        .create(
            "/objects",
            "lamp",
            "lamp",
            props(&[("label", "desk".into())]),
        )
        .unwrap();
    // Wrong value type.
    let err = lamp.set("power", "on").unwrap_err();
    assert_eq!(err.to_string(), "'power' expects a boolean, got string");
    // Out-of-range integer.
    assert_eq!(
        lamp.set("watts", 101u32).unwrap_err(),
        Error::OutOfRange {
            name: "watts".into(),
            value: "101".into(),
            min: "1".into(),
            max: "100".into(),
            type_name: "uint8",
            full_range: false,
        }
    );
    assert_eq!(lamp.get("watts").unwrap(), Value::UInt(40));
    // Read-only.
    assert_eq!(
        lamp.set("type", "other").unwrap_err(),
        Error::ReadOnly {
            path: "/objects/lamp".into(),
            typename: "lamp".into(),
            property: "type".into()
        }
    );
    // Before-realize property after realize.
    let err = lamp.set("label", "x").unwrap_err();
    assert!(matches!(
        err,
        Error::WrongPhase {
            policy: PhasePolicy::BeforeRealize,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "property 'label' of '/objects/lamp' can only be set before the object is realized; the object is realized"
    );
    assert_eq!(lamp.get("label").unwrap(), Value::Str("desk".into()));
    // Prelaunch-only property once the machine runs.
    lamp.set("slot", 3u32).unwrap();
    tree.set_machine_state("running", false);
    let err = lamp.set("slot", 4u32).unwrap_err();
    assert_eq!(
        err.to_string(),
        "property 'slot' of '/objects/lamp' can only be set while the machine is in prelaunch; the machine is running"
    );
    assert_eq!(lamp.get("slot").unwrap(), Value::UInt(3));
    // A computed setter that refuses leaves the value as it was.
    lamp.set("brightness", 7u32).unwrap();
    assert_eq!(
        lamp.set("brightness", 13u32).unwrap_err(),
        Error::Failed("13 is unlucky".into())
    );
    assert_eq!(lamp.get("brightness").unwrap(), Value::UInt(7));
    // Unknown property; children and notifiers are not writable.
    assert_eq!(
        lamp.set("colour", "red").unwrap_err(),
        Error::PropertyNotFound {
            typename: "lamp".into(),
            property: "colour".into()
        }
    );
    assert!(matches!(
        tree.set("/objects", "lamp", "x".into()),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        lamp.set("tick", true),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        lamp.get("colour"),
        Err(Error::PropertyNotFound { .. })
    ));
}

#[test]
fn links_are_typed_and_rechecked_on_use() {
    let tree = test_tree();
    tree.create("/objects", "sock", "socket", vec![]).unwrap();
    let lamp = tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    assert_eq!(lamp.get("socket").unwrap(), Value::Path(String::new()));
    // Wrong target type.
    let other = tree.create("/objects", "other", "lamp", vec![]).unwrap();
    assert_eq!(
        lamp.set("socket", "/objects/other").unwrap_err(),
        Error::LinkTypeMismatch {
            property: "socket".into(),
            expected: "socket".into(),
            target: "/objects/other".into(),
            actual: "lamp".into()
        }
    );
    drop(other);
    // Unknown target.
    assert!(matches!(
        lamp.set("socket", "/objects/none"),
        Err(Error::NotFound { .. })
    ));
    // A partial path is accepted and stored as the object.
    lamp.set("socket", "sock").unwrap();
    assert_eq!(
        lamp.get("socket").unwrap(),
        Value::Path("/objects/sock".into())
    );
    // The target is deleted: the link reads empty and no longer resolves.
    tree.delete("/objects/sock").unwrap();
    assert_eq!(lamp.get("socket").unwrap(), Value::Path(String::new()));
    assert!(tree.lookup("/objects/lamp/socket").is_err());
    // A new object with the same name is a different object: the link stays empty.
    tree.create("/objects", "sock", "socket", vec![]).unwrap();
    assert_eq!(lamp.get("socket").unwrap(), Value::Path(String::new()));
    // Clearing works.
    lamp.set("socket", "/objects/sock").unwrap();
    lamp.set("socket", "").unwrap();
    assert_eq!(lamp.get("socket").unwrap(), Value::Path(String::new()));
}

#[test]
fn actions_check_arguments_before_the_call() {
    let tree = test_tree();
    let lamp = tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let args = |l: &[(&str, Value)]| {
        l.iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        lamp.call("bump", args(&[("by", Value::UInt(2))])).unwrap(),
        Some(Value::UInt(2))
    );
    assert_eq!(
        lamp.call(
            "bump",
            args(&[("by", Value::UInt(3)), ("reason", "test".into())])
        )
        .unwrap(),
        Some(Value::UInt(5))
    );
    assert_eq!(
        lamp.call("bump", args(&[])).unwrap_err(),
        Error::MissingArgument {
            action: "bump".into(),
            argument: "by".into()
        }
    );
    assert_eq!(
        lamp.call(
            "bump",
            args(&[("by", Value::UInt(1)), ("extra", true.into())])
        )
        .unwrap_err(),
        Error::UnexpectedArgument {
            action: "bump".into(),
            argument: "extra".into()
        }
    );
    assert!(matches!(
        lamp.call("bump", args(&[("by", "two".into())])),
        Err(Error::WrongType { .. })
    ));
    assert!(matches!(
        lamp.call("bump", args(&[("by", Value::Int(-1))])),
        Err(Error::OutOfRange { .. })
    ));
    assert_eq!(
        lamp.call("explode", args(&[])).unwrap_err(),
        Error::ActionNotFound {
            typename: "lamp".into(),
            action: "explode".into()
        }
    );
    // None of the refused calls ran the action.
    assert_eq!(
        lamp.call("bump", args(&[("by", Value::UInt(0))])).unwrap(),
        Some(Value::UInt(5))
    );
    // Actions of a deleted object fail.
    tree.delete("/objects/lamp").unwrap();
    assert!(matches!(
        lamp.call("bump", args(&[("by", Value::UInt(1))])),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn deletion_rules() {
    let tree = test_tree();
    let before = all_paths(&tree);
    // Containers, the machine and the root are not deletable by clients.
    for path in ["/", "/machine", "/objects", "/machine/peripheral"] {
        assert!(
            matches!(
                tree.delete(path),
                Err(Error::NotDeletable { .. }) | Err(Error::HasChildren { .. })
            ),
            "{path}"
        );
    }
    // An object with children cannot be deleted until they are gone.
    tree.create("/objects", "parent", "socket", vec![]).unwrap();
    tree.create("/objects/parent", "kid", "socket", vec![])
        .unwrap();
    assert_eq!(
        tree.delete("/objects/parent").unwrap_err(),
        Error::HasChildren {
            path: "/objects/parent".into(),
            child: "kid".into()
        }
    );
    assert!(tree.lookup("/objects/parent/kid").is_ok());
    tree.delete("/objects/parent/kid").unwrap();
    tree.delete("/objects/parent").unwrap();
    assert_eq!(all_paths(&tree), before);
    assert!(matches!(
        tree.delete("/objects/parent"),
        Err(Error::NotFound { .. })
    ));
    // The owning code may remove a whole subtree.
    let p = tree.create("/objects", "p", "socket", vec![]).unwrap();
    tree.create("/objects/p", "c", "socket", vec![]).unwrap();
    tree.delete_subtree(&p).unwrap();
    assert_eq!(all_paths(&tree), before);
}

#[test]
fn notifiers_and_implicit_events() {
    let tree = test_tree();
    let client = tree.subscriber("t");
    let opts = qom::SubscribeOptions::default();
    client
        .subscribe(
            qom::Target::Object("/objects".into()),
            "child-added",
            opts.clone(),
        )
        .unwrap();
    client
        .subscribe(
            qom::Target::Object("/objects".into()),
            "child-removed",
            opts.clone(),
        )
        .unwrap();
    let lamp = tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    client
        .subscribe(
            qom::Target::Object("/objects/lamp".into()),
            "property-changed",
            opts,
        )
        .unwrap();
    lamp.set("power", true).unwrap();
    lamp.set("power", true).unwrap(); // unchanged: no event
    lamp.set("label", "x").unwrap_err(); // refused: no event
    lamp.set("brightness", 9u32).unwrap();
    lamp.set("slot", 1u32).unwrap(); // not notifying: no event
    lamp.notify_property_changed("watts", &Value::UInt(41));
    tree.delete("/objects/lamp").unwrap();

    let got: Vec<(String, String, Value)> = client
        .drain()
        .into_iter()
        .map(|d| {
            (
                d.event.source.to_string(),
                d.event.notifier.to_string(),
                d.event.data.clone(),
            )
        })
        .collect();
    let child = |()| {
        Value::map([
            ("child", Value::Path("/objects/lamp".into())),
            ("type", Value::Str("lamp".into())),
        ])
    };
    let changed =
        |p: &str, v: Value| Value::map([("property", Value::Str(p.into())), ("value", v)]);
    assert_eq!(
        got,
        vec![
            ("/objects".into(), "child-added".into(), child(())),
            (
                "/objects/lamp".into(),
                "property-changed".into(),
                changed("power", Value::Bool(true))
            ),
            (
                "/objects/lamp".into(),
                "property-changed".into(),
                changed("brightness", Value::UInt(9))
            ),
            (
                "/objects/lamp".into(),
                "property-changed".into(),
                changed("watts", Value::UInt(41))
            ),
            ("/objects".into(), "child-removed".into(), child(())),
        ]
    );
}

#[test]
fn events_carry_order_time_and_type() {
    let tree = test_tree();
    let client = tree.subscriber("t");
    let lamp = tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    client
        .subscribe(
            qom::Target::Object("lamp".into()),
            "tick",
            Default::default(),
        )
        .unwrap();
    let before = std::time::SystemTime::now();
    for _ in 0..3 {
        lamp.call("bump", [("by".to_owned(), Value::UInt(1))].into())
            .unwrap();
    }
    let events = client.drain();
    assert_eq!(events.len(), 3);
    assert!(events.windows(2).all(|w| w[0].event.seq < w[1].event.seq));
    assert!(events[0].event.time >= before);
    assert_eq!(&*events[0].event.source_type, "lamp");
    assert_eq!(events[2].event.data, Value::map([("n", Value::UInt(3))]));
    assert_eq!(&*events[0].subscription, "/subscriptions/1");
    assert_eq!(&*events[0].owner, "t");
}

#[test]
fn object_add_and_del_follow_user_creatable() {
    let tree = test_tree();
    let sock = tree.add_user_object("socket", "s1", vec![]).unwrap();
    assert_eq!(sock.path(), "/objects/s1");
    assert_eq!(
        tree.add_user_object("nope", "x", vec![]).unwrap_err(),
        Error::TypeNotFound {
            typename: "nope".into()
        }
    );
    assert_eq!(
        tree.add_user_object("container", "x", vec![]).unwrap_err(),
        Error::NotUserCreatable {
            typename: "container".into()
        }
    );
    assert!(matches!(
        tree.add_user_object("socket", "9x", vec![]),
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        tree.add_user_object("socket", "s1", vec![]),
        Err(Error::DuplicateName { .. })
    ));
    assert!(
        tree.add_user_object("lamp", "l1", props(&[("watts", Value::UInt(500))]))
            .is_err()
    );
    assert!(tree.lookup("/objects/l1").is_err());
    tree.delete_user_object("s1").unwrap();
    assert_eq!(
        tree.delete_user_object("s1").unwrap_err(),
        Error::NotFound { path: "s1".into() }
    );
}
