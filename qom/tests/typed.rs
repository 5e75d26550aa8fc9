//! Types declared over their instance (`TypedInfo`), and the one rule that turns the values
//! clients give (command-line text, JSON) into typed property values (`Class::coerce`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use qom::{
    Action, Error, Field, Kind, ObjectRef, PhasePolicy, Property, Tree, TypeInfo, TypedInfo, Value,
};

/// A heater: a level set through the instance, a realize/unrealize log, a state.
struct Heater {
    level: AtomicU64,
    log: Mutex<Vec<String>>,
}

fn tree() -> Tree {
    let b = Tree::builder();
    b.register(
        TypedInfo::<Heater>::new("heater", "object")
            .implements("user-creatable")
            .property(Property::new("zone", Kind::Str).policy(PhasePolicy::BeforeRealize))
            .getter(Property::new("doubled", Kind::uint64()), |h| {
                Value::UInt(2 * h.level.load(Ordering::Relaxed))
            })
            .accessor(
                Property::new("level", Kind::uint_range(0, 9)),
                |h, _| Ok(Value::UInt(h.level.load(Ordering::Relaxed))),
                |h, _, v| {
                    h.level.store(v.as_u64().unwrap_or(0), Ordering::Relaxed);
                    Ok(())
                },
            )
            .try_getter(Property::new("where", Kind::Str), |_, o: &ObjectRef| {
                Ok(Value::Str(format!(
                    "{} in {}",
                    o.path(),
                    o.get("zone")?.as_str().unwrap_or_default()
                )))
            })
            .action(
                Action::declare("warm")
                    .arg(Field::new("by", Kind::uint64(), ""))
                    .returns(Kind::uint64()),
                |h, _, args| {
                    let by = args.get("by").and_then(Value::as_u64).unwrap_or(0);
                    Ok(Some(Value::UInt(
                        h.level.fetch_add(by, Ordering::Relaxed) + by,
                    )))
                },
            )
            .realize(|h, o| {
                h.log.lock().unwrap().push(format!("realize {}", o.name()));
                Ok(())
            })
            .unrealize(|h, o| {
                h.log
                    .lock()
                    .unwrap()
                    .push(format!("unrealize {}", o.name()))
            })
            .state(
                1,
                |h, _| Ok(h.level.load(Ordering::Relaxed).to_le_bytes().to_vec()),
                |h, _, bytes| {
                    let raw: [u8; 8] = bytes.try_into().map_err(|_| Error::failed("short"))?;
                    h.level.store(u64::from_le_bytes(raw), Ordering::Relaxed);
                    Ok(())
                },
            )
            .constructor(|_| {
                Ok(Heater {
                    level: AtomicU64::new(1),
                    log: Mutex::new(Vec::new()),
                })
            })
            .build(),
    )
    .unwrap();
    // A type whose properties read a Heater instance but whose constructor makes none.
    b.register(
        TypedInfo::<Heater>::new("broken", "object")
            .implements("user-creatable")
            .getter(Property::new("doubled", Kind::uint64()), |_| Value::UInt(0))
            .into(),
    )
    .unwrap();
    b.register(
        TypeInfo::new("knobs", "object")
            .implements("user-creatable")
            .property(Property::new("count", Kind::uint32()))
            .property(Property::new("size", Kind::size()))
            .property(Property::new("on", Kind::Bool))
            .property(Property::new("name", Kind::Str))
            .property(Property::new(
                "mode",
                Kind::enumeration("Mode", &["slow", "fast"]),
            ))
            .property(Property::new("offset", Kind::int32()))
            .property(Property::new("anything", Kind::Any))
            .property(Property::link("peer", "knobs")),
    )
    .unwrap();
    b.build().unwrap()
}

#[test]
fn properties_actions_and_hooks_run_on_the_instance() {
    let t = tree();
    let o = t
        .add_user_object(
            "heater",
            "h1",
            vec![("zone".into(), Value::Str("hall".into()))],
        )
        .unwrap();
    let h = o.instance::<Heater>().unwrap();
    assert_eq!(*h.log.lock().unwrap(), ["realize h1"]);
    assert_eq!(o.get("level").unwrap(), Value::UInt(1));
    o.set("level", Value::UInt(4)).unwrap();
    assert_eq!(o.get("doubled").unwrap(), Value::UInt(8));
    // The kind is checked before the setter runs.
    assert!(matches!(
        o.set("level", Value::UInt(10)),
        Err(Error::OutOfRange { .. })
    ));
    assert_eq!(o.get("level").unwrap(), Value::UInt(4));
    assert_eq!(
        o.get("where").unwrap(),
        Value::Str("/objects/h1 in hall".into())
    );
    let r = t
        .call(
            "/objects/h1",
            "warm",
            [("by".to_owned(), Value::UInt(3))].into(),
        )
        .unwrap();
    assert_eq!(r, Some(Value::UInt(7)));
    // Read-only: a getter alone.
    assert!(matches!(
        o.set("doubled", Value::UInt(1)),
        Err(Error::ReadOnly { .. })
    ));
    let hooks = &o.class().state_hooks()[0];
    let saved = (hooks.save)(&o).unwrap();
    o.set("level", Value::UInt(0)).unwrap();
    (hooks.load)(&o, &saved).unwrap();
    assert_eq!(o.get("level").unwrap(), Value::UInt(7));
    t.delete("/objects/h1").unwrap();
    assert_eq!(*h.log.lock().unwrap(), ["realize h1", "unrealize h1"]);
}

#[test]
fn a_missing_instance_is_an_error_not_a_panic() {
    let t = tree();
    let o = t.add_user_object("broken", "b", vec![]).unwrap();
    let e = o.get("doubled").unwrap_err();
    assert!(
        e.to_string().contains("'/objects/b' has no") && e.to_string().contains("Heater"),
        "{e}"
    );
}

#[test]
fn an_undeclared_action_handler_fails_clearly() {
    let b = Tree::builder();
    b.register(
        TypeInfo::new("plain", "object")
            .implements("user-creatable")
            .action(Action::declare("noop")),
    )
    .unwrap();
    let t = b.build().unwrap();
    t.add_user_object("plain", "p", vec![]).unwrap();
    let e = t
        .call("/objects/p", "noop", Default::default())
        .unwrap_err();
    assert_eq!(e.to_string(), "action 'noop' is not bound to its type");
}

#[test]
fn client_values_are_coerced_by_one_rule() {
    let t = tree();
    let class = t.types().get("knobs").unwrap();
    let text = |s: &str| Value::Str(s.into());
    // Text for kinds that are not text is parsed with the kind's syntax...
    assert_eq!(
        class.coerce("count", text("0x2f8")).unwrap(),
        Value::UInt(0x2f8)
    );
    assert_eq!(
        class.coerce("size", text("2M")).unwrap(),
        Value::UInt(2 << 20)
    );
    assert_eq!(class.coerce("on", text("on")).unwrap(), Value::Bool(true));
    assert_eq!(class.coerce("on", text("no")).unwrap(), Value::Bool(false));
    assert_eq!(class.coerce("offset", text("-5")).unwrap(), Value::Int(-5));
    assert_eq!(
        class.coerce("peer", text("/objects/k")).unwrap(),
        Value::Path("/objects/k".into())
    );
    // ...text for text kinds stays text (checked when set)...
    assert_eq!(class.coerce("name", text("0x10")).unwrap(), text("0x10"));
    assert_eq!(class.coerce("mode", text("fast")).unwrap(), text("fast"));
    assert_eq!(class.coerce("anything", text("1")).unwrap(), text("1"));
    // ...and typed values pass on unchanged.
    assert_eq!(
        class.coerce("count", Value::UInt(7)).unwrap(),
        Value::UInt(7)
    );
    assert_eq!(
        class.coerce("on", Value::Bool(true)).unwrap(),
        Value::Bool(true)
    );
    // Refusals name the property.
    assert!(matches!(
        class.coerce("colour", text("red")),
        Err(Error::PropertyNotFound { ref typename, ref property }) if typename == "knobs" && property == "colour"
    ));
    assert!(matches!(
        class.coerce("count", text("lots")),
        Err(Error::WrongType { ref name, .. }) if name == "count"
    ));
    assert!(matches!(
        class.coerce("on", text("maybe")),
        Err(Error::WrongType { .. })
    ));
    assert!(matches!(
        class.coerce("count", text("0x100000000")),
        Err(Error::OutOfRange { .. })
    ));
    // All of a request, in order; the first refusal is the answer.
    let all = class
        .coerce_all([
            ("count".to_owned(), text("3")),
            ("name".to_owned(), text("x")),
        ])
        .unwrap();
    assert_eq!(
        all,
        [
            ("count".to_owned(), Value::UInt(3)),
            ("name".to_owned(), text("x"))
        ]
    );
    assert!(
        class
            .coerce_all([("count".to_owned(), text("3")), ("x".to_owned(), text("y"))])
            .is_err()
    );
}
