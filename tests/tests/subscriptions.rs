//! Wide subscriptions end to end, against a real `qomu` (`-S`, no guest: no KVM needed):
//! a subtree `*` subscription made with `linger` survives its client's disconnect over QMP
//! and over D-Bus, is adopted by a new connection that proves it may (the token), which
//! receives every event queued meanwhile, in order, with contiguous sequence numbers; a
//! client without the token is refused; unadopted, it goes when the linger runs out; bad
//! requests are refused and make nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use qomu_tests::dbus::*;
use qomu_tests::{QmpRaw, Qomu, require_dbus};
use serde_json::{Value as Json, json};
use zbus::{OwnedObjectPath, OwnedVariant as OwnedValue, Variant};

const PERIPHERAL: &str = "/machine/peripheral";

fn qomu() -> Qomu {
    Qomu::spawn(&["-S"])
}

/// The `desc` of the error a command must fail with.
fn error_text(c: &mut QmpRaw, command: &str, arguments: Json) -> String {
    let r = c.execute(command, arguments.clone());
    r["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{command} {arguments}: {r}"))
        .to_owned()
}

/// A UART plugged under /machine/peripheral (ISA: plugged at once, unplugged at once).
fn plug(c: &mut QmpRaw, id: &str, iobase: u16, irq: u8) {
    c.ok(
        "device_add",
        json!({"driver": "isa-serial", "id": id, "iobase": iobase, "irq": irq}),
    );
}

fn unplug(c: &mut QmpRaw, id: &str) {
    c.ok("device_del", json!({"id": id}));
    c.wait_event("DEVICE_DELETED");
}

fn subscriptions(c: &mut QmpRaw) -> Vec<String> {
    c.children("/subscriptions")
        .into_iter()
        .map(|n| format!("/subscriptions/{n}"))
        .collect()
}

/// The `__org.qomu_NOTIFY` data of `sub`, in the order they arrived, until `n` are in.
fn notifications(c: &mut QmpRaw, sub: &str, n: usize) -> Vec<Json> {
    (0..n)
        .map(|_| c.wait_notify_of(sub)["data"].clone())
        .collect()
}

fn what(events: &[Json]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_owned(),
                d["notifier"].as_str().unwrap().to_owned(),
                d["data"]["child"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn sequences(events: &[Json]) -> Vec<u64> {
    events
        .iter()
        .map(|d| d["sequence"].as_u64().unwrap())
        .collect()
}

fn wait_gone(c: &mut QmpRaw, sub: &str, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if !subscriptions(c).iter().any(|s| s == sub) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn over_qmp_a_lingering_subtree_subscription_is_adopted_with_everything_it_queued() {
    let q = qomu();
    let mut first = q.session();
    let made = first.ok(
        "__org.qomu_subscribe",
        json!({"path": PERIPHERAL, "subtree": true, "notifier": "*", "linger": 60}),
    );
    let sub = made["subscription"].as_str().unwrap().to_owned();
    let token = made["token"].as_str().unwrap().to_owned();
    assert_eq!(first.qom_get(&sub, "scope"), "subtree");
    assert_eq!(first.qom_get(&sub, "notifier"), "*");
    assert_eq!(first.qom_get(&sub, "linger"), 60);
    plug(&mut first, "com2", 0x2f8, 3);
    let seen = notifications(&mut first, &sub, 1);
    assert_eq!(sequences(&seen), [1]);
    // The client goes; things happen under /machine/peripheral while nobody listens.
    drop(first);
    let mut other = q.session();
    let end = Instant::now() + Duration::from_secs(10);
    while other.qom_get(&sub, "lingering") != true && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(other.qom_get(&sub, "lingering"), true);
    plug(&mut other, "com3", 0x3e8, 5);
    unplug(&mut other, "com2");
    plug(&mut other, "com4", 0x2e8, 6);
    assert_eq!(other.qom_get(&sub, "pending"), 3);
    // Another client without the token: refused, and it changes nothing.
    let text = error_text(
        &mut other,
        "__org.qomu_adopt",
        json!({"subscription": sub, "token": "0".repeat(token.len())}),
    );
    assert!(text.contains("cannot be adopted"), "{text}");
    assert_eq!(other.qom_get(&sub, "pending"), 3);
    assert!(
        other
            .events
            .iter()
            .all(|e| e["data"]["subscription"] != sub)
    );
    // The token adopts it: the three queued events, in order, numbered on from 1.
    let mut second = q.session();
    let r = second.ok(
        "__org.qomu_adopt",
        json!({"subscription": sub, "token": token}),
    );
    assert_eq!(r, json!({"subscription": sub}));
    let queued = notifications(&mut second, &sub, 3);
    assert_eq!(sequences(&queued), [2, 3, 4]);
    let p = PERIPHERAL;
    assert_eq!(
        what(&queued),
        [
            (p.into(), "child-added".into(), format!("{p}/com3")),
            (p.into(), "child-removed".into(), format!("{p}/com2")),
            (p.into(), "child-added".into(), format!("{p}/com4")),
        ]
    );
    assert_eq!(second.qom_get(&sub, "lingering"), false);
    let owner = second.qom_get(&sub, "owner");
    assert!(
        owner.as_str().is_some_and(|o| o.starts_with("qmp:")),
        "{owner}"
    );
    // It is the adopter's now: the next event comes to it, numbered 5, and it may delete it.
    unplug(&mut other, "com3");
    assert_eq!(sequences(&notifications(&mut second, &sub, 1)), [5]);
    let text = error_text(
        &mut other,
        "__org.qomu_unsubscribe",
        json!({"subscription": sub}),
    );
    assert!(text.contains("belongs to"), "{text}");
    second.ok("__org.qomu_unsubscribe", json!({"subscription": sub}));
    assert!(!subscriptions(&mut second).contains(&sub));
}

#[test]
fn over_qmp_an_unadopted_subscription_goes_when_its_linger_runs_out() {
    let q = qomu();
    let mut first = q.session();
    let made = first.ok(
        "__org.qomu_subscribe",
        json!({"type": "isa-serial", "notifier": "*", "linger": 1}),
    );
    let sub = made["subscription"].as_str().unwrap().to_owned();
    let token = made["token"].as_str().unwrap().to_owned();
    drop(first);
    let mut other = q.session();
    assert!(subscriptions(&mut other).contains(&sub), "it lingers");
    assert!(
        wait_gone(&mut other, &sub, Duration::from_secs(10)),
        "still there after its linger"
    );
    let text = error_text(
        &mut other,
        "__org.qomu_adopt",
        json!({"subscription": sub, "token": token}),
    );
    assert!(text.contains("not found"), "{text}");
}

#[test]
fn over_qmp_filters_and_rate_limits_apply_and_events_carry_sequence_numbers() {
    let q = qomu();
    let mut c = q.session();
    // Only the child-added event whose `child` is com3.
    let filtered = c.ok(
        "__org.qomu_subscribe",
        json!({"path": PERIPHERAL, "notifier": "child-added",
               "filter": {"child": format!("{PERIPHERAL}/com3")}}),
    )["subscription"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        c.qom_get(&filtered, "filter"),
        json!({"child": format!("{PERIPHERAL}/com3")})
    );
    let limited = c.ok(
        "__org.qomu_subscribe",
        json!({"path": PERIPHERAL, "notifier": "*", "min-interval-ms": 300}),
    )["subscription"]
        .as_str()
        .unwrap()
        .to_owned();
    plug(&mut c, "com2", 0x2f8, 3);
    plug(&mut c, "com3", 0x3e8, 5);
    plug(&mut c, "com4", 0x2e8, 6);
    let f = notifications(&mut c, &filtered, 1);
    assert_eq!(f[0]["data"]["child"], format!("{PERIPHERAL}/com3"));
    assert_eq!(sequences(&f), [1], "filtered-out events are not numbered");
    // The rate limit: the first at once, the newest after the interval, one coalesced.
    let l = notifications(&mut c, &limited, 2);
    assert_eq!(sequences(&l), [1, 3]);
    assert_eq!(l[1]["data"]["child"], format!("{PERIPHERAL}/com4"));
    assert_eq!(c.qom_get(&limited, "coalesced"), 1);
    assert_eq!(c.qom_get(&limited, "matched"), 3);
    assert_eq!(c.qom_get(&limited, "delivered"), 2);
}

#[test]
fn over_qmp_bad_subscriptions_and_adoptions_are_refused_and_make_nothing() {
    let q = qomu();
    let mut owner = q.session();
    let live = owner.ok(
        "__org.qomu_subscribe",
        json!({"path": PERIPHERAL, "notifier": "*", "linger": 30}),
    );
    let mut c = q.session();
    let before = subscriptions(&mut c);
    let p = PERIPHERAL;
    for (args, needle) in [
        (
            json!({"path": p, "notifier": "nope", "filter": {"child": "x"}}),
            "Property 'container.nope' not found",
        ),
        (
            json!({"path": p, "notifier": "child-added", "filter": {"nope": 1}}),
            "no payload field 'nope'",
        ),
        (
            json!({"path": p, "notifier": "child-added", "filter": {"child": 3}}),
            "'filter.child', expected: string",
        ),
        (
            json!({"path": p, "notifier": "child-added", "filter": [1]}),
            "'filter', expected: object",
        ),
        (
            json!({"path": p, "notifier": "*", "min-interval-ms": 0}),
            "'min-interval-ms' expects an integer between 1 and 3600000",
        ),
        (
            json!({"path": p, "notifier": "*", "min-interval-ms": 3_600_001}),
            "'min-interval-ms' expects an integer between 1 and 3600000",
        ),
        (
            json!({"path": p, "notifier": "*", "min-interval-ms": "1"}),
            "'min-interval-ms', expected: integer",
        ),
        (
            json!({"path": p, "notifier": "*", "linger": 86_401}),
            "'linger' expects an integer between 1 and 86400",
        ),
        (
            json!({"type": "isa-serial", "subtree": true, "notifier": "*"}),
            "'subtree' goes with 'path'",
        ),
        (
            json!({"path": "/machine/nowhere", "subtree": true, "notifier": "*"}),
            "not found",
        ),
    ] {
        let text = error_text(&mut c, "__org.qomu_subscribe", args.clone());
        assert!(text.contains(needle), "{args}: {text}");
    }
    let sub = live["subscription"].as_str().unwrap();
    let token = live["token"].as_str().unwrap();
    for (args, needle) in [
        // Its owner is still there: not adoptable, even with the token.
        (
            json!({"subscription": sub, "token": token}),
            "cannot be adopted",
        ),
        (
            json!({"subscription": "/subscriptions/9999", "token": token}),
            "not found",
        ),
        (
            json!({"subscription": "/machine", "token": token}),
            "is not a subscription",
        ),
    ] {
        let text = error_text(&mut c, "__org.qomu_adopt", args.clone());
        assert!(text.contains(needle), "{args}: {text}");
    }
    let text = error_text(&mut c, "__org.qomu_adopt", json!({"subscription": sub}));
    assert!(text.contains("'token'"), "{text}");
    assert_eq!(subscriptions(&mut c), before);
    assert_eq!(c.qom_get(sub, "owner"), owner.qom_get(sub, "owner"));
}

#[test]
fn the_schema_lists_the_new_arguments_and_commands() {
    let q = qomu();
    let mut c = q.session();
    let schema = c.ok("query-qmp-schema", json!({}));
    let entries = schema.as_array().unwrap();
    let command = |name: &str| {
        entries
            .iter()
            .find(|e| e["name"] == name && e["meta-type"] == "command")
            .unwrap_or_else(|| panic!("no {name} in the schema"))
            .clone()
    };
    let members = |type_name: &Json| -> Vec<String> {
        entries.iter().find(|e| e["name"] == *type_name).unwrap()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let subscribe = members(&command("__org.qomu_subscribe")["arg-type"]);
    for arg in ["subtree", "filter", "min-interval-ms", "linger"] {
        assert!(subscribe.contains(&arg.to_owned()), "{subscribe:?}");
    }
    let adopt = members(&command("__org.qomu_adopt")["arg-type"]);
    assert_eq!(adopt, ["subscription", "token"]);
    let notify = entries
        .iter()
        .find(|e| e["name"] == "__org.qomu_NOTIFY" && e["meta-type"] == "event")
        .unwrap();
    assert!(members(&notify["arg-type"]).contains(&"sequence".to_owned()));
}

// ---- D-Bus ----

type Options<'a> = HashMap<&'a str, Variant<'a>>;

/// `(o, a{sv})` of a `...Full` subscribe: the path and the token.
fn full_reply(m: &zbus::Message) -> (String, Option<String>) {
    let (path, details): (OwnedObjectPath, HashMap<String, OwnedValue>) =
        m.body().deserialize().expect("(o, a{sv})");
    let token = details
        .get("token")
        .map(|v| String::try_from(v.try_clone().unwrap()).unwrap());
    (path.as_str().to_owned(), token)
}

/// An `org.qomu.Subscription1.Event`: source, notifier, sequence, data.
fn envelope(m: &zbus::Message) -> (String, String, u64, HashMap<String, OwnedValue>) {
    let (source, notifier, sequence, data): (
        OwnedObjectPath,
        String,
        u64,
        HashMap<String, OwnedValue>,
    ) = m.body().deserialize().expect("(osta{sv})");
    (source.as_str().to_owned(), notifier, sequence, data)
}

fn child_of(data: &HashMap<String, OwnedValue>) -> String {
    OwnedObjectPath::try_from(data["child"].try_clone().unwrap())
        .map(|p| p.as_str().to_owned())
        .or_else(|_| String::try_from(data["child"].try_clone().unwrap()))
        .unwrap()
}

const PERIPHERAL_DBUS: &str = "/org/qomu/VM1/machine/peripheral";

#[test]
fn over_dbus_a_lingering_subscription_is_adopted_with_everything_it_queued() {
    require_dbus!();
    let bus = SessionBus::start();
    let q = bus.qomu(&["-S"]);
    let mut qmp = q.session();
    let first = bus.client();
    let opts: Options<'_> = HashMap::from([
        ("subtree", Variant::from(true)),
        ("envelope", Variant::from(true)),
        ("linger", Variant::from(60u32)),
    ]);
    let (sub, token) =
        full_reply(&first.ok(PERIPHERAL_DBUS, OBJECT1, "SubscribeFull", &("*", opts)));
    let token = token.expect("a token with linger");
    let mut signals = first.listen(&format!("type='signal',path='{sub}'"));
    plug(&mut qmp, "com2", 0x2f8, 3);
    let m = signals.wait_for("Event", |m| member(m) == "Event");
    let (source, notifier, sequence, data) = envelope(&m);
    assert_eq!(
        m.header().interface().unwrap().as_str(),
        "org.qomu.Subscription1"
    );
    assert_eq!(
        (source.as_str(), notifier.as_str(), sequence),
        (PERIPHERAL_DBUS, "child-added", 1)
    );
    assert!(child_of(&data).ends_with("/com2"), "{data:?}");

    // The client leaves; the subscription waits, and queues what happens.
    zbus::block_on(first.conn.close()).unwrap();
    let qom_sub = format!("/subscriptions/{}", sub.rsplit('/').next().unwrap());
    let end = Instant::now() + Duration::from_secs(10);
    while qmp.qom_get(&qom_sub, "lingering") != true && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(qmp.qom_get(&qom_sub, "lingering"), true);
    plug(&mut qmp, "com3", 0x3e8, 5);
    unplug(&mut qmp, "com2");

    let second = bus.client();
    let mut signals = second.listen(&format!("type='signal',path='{sub}'"));
    let e = second.err(
        ROOT,
        ROOT1,
        "Adopt",
        &(OwnedObjectPath::try_from(sub.as_str()).unwrap(), "wrong"),
    );
    assert_eq!(e.name, "org.freedesktop.DBus.Error.AccessDenied", "{e:?}");
    assert!(signals.collect(Duration::from_millis(300)).is_empty());
    second.ok(
        ROOT,
        ROOT1,
        "Adopt",
        &(
            OwnedObjectPath::try_from(sub.as_str()).unwrap(),
            token.as_str(),
        ),
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = signals.wait_for("Event", |m| member(m) == "Event");
        got.push(envelope(&m));
    }
    // The child is a path: a D-Bus object path or the qom path, by the payload's kind.
    let got: Vec<_> = got
        .iter()
        .map(|(s, n, q, d)| {
            let child = child_of(d);
            (
                s.as_str(),
                n.as_str(),
                *q,
                child.rsplit('/').next().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (PERIPHERAL_DBUS, "child-added", 2, "com3".to_owned()),
            (PERIPHERAL_DBUS, "child-removed", 3, "com2".to_owned()),
        ]
    );
    assert_eq!(
        String::try_from(second.get(&sub, "org.qomu.Type.Subscription", "Owner")).unwrap(),
        second.unique_name()
    );
    // Its new owner may delete it.
    second.ok(&sub, OBJECT1, "Delete", &());
}

#[test]
fn over_dbus_introspection_shows_the_new_methods_and_the_envelope_signal() {
    require_dbus!();
    let bus = SessionBus::start();
    let _q = bus.qomu(&["-S"]);
    let c = bus.client();
    let root = stdout_ok(&bus.busctl(&["introspect", NAME, ROOT]));
    for (name, sig) in [
        (".Adopt", "os"),
        (".SubscribeTypeFull", "ssa{sv}"),
        (".SubscribeFull", "sa{sv}"),
    ] {
        assert!(
            root.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() >= 4 && cols[0] == name && cols[1] == "method" && cols[2] == sig
            }),
            "no method {name} ({sig}) in:\n{root}"
        );
    }
    let (sub, token) = full_reply(&c.ok(
        ROOT,
        ROOT1,
        "SubscribeTypeFull",
        &("isa-serial", "*", Options::new()),
    ));
    assert_eq!(token, None, "no linger, no token");
    let out = stdout_ok(&bus.busctl(&["introspect", NAME, &sub]));
    assert!(
        out.lines().any(|l| l.starts_with("org.qomu.Subscription1")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() >= 3 && cols[0] == ".Event" && cols[1] == "signal" && cols[2] == "osta{sv}"
        }),
        "{out}"
    );
    for (prop, sig) in [
        (".Lingering", "b"),
        (".MinIntervalMs", "t"),
        (".Coalesced", "t"),
        // Any map of field to value: a variant holding an a{sv}.
        (".Filter", "v"),
    ] {
        assert!(
            out.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() >= 3 && cols[0] == prop && cols[1] == "property" && cols[2] == sig
            }),
            "no property {prop} ({sig}) in:\n{out}"
        );
    }
}

#[test]
fn over_dbus_an_unadopted_subscription_goes_and_bad_requests_are_refused() {
    require_dbus!();
    let bus = SessionBus::start();
    let q = bus.qomu(&["-S"]);
    let mut qmp = q.session();
    let watcher = bus.client();
    let mut removed = watcher.listen(
        "type='signal',interface='org.freedesktop.DBus.ObjectManager',member='InterfacesRemoved'",
    );
    let c = bus.client();
    let before = subscriptions(&mut qmp);
    let refused: [(&str, &str, Options<'_>, &str); 6] = [
        (
            "SubscribeWithOptions",
            "*",
            HashMap::from([("linger", Variant::from(5u32))]),
            "needs SubscribeFull",
        ),
        (
            "SubscribeFull",
            "child-added",
            HashMap::from([(
                "filter",
                Variant::from(HashMap::from([("nope", Variant::from(1u32))])),
            )]),
            "no payload field 'nope'",
        ),
        (
            "SubscribeFull",
            "child-added",
            HashMap::from([(
                "filter",
                Variant::from(HashMap::from([("child", Variant::from(1u32))])),
            )]),
            "filter.child",
        ),
        (
            "SubscribeFull",
            "*",
            HashMap::from([("min-interval-ms", Variant::from(0u32))]),
            "min-interval-ms",
        ),
        (
            "SubscribeFull",
            "*",
            HashMap::from([("linger", Variant::from(86_401u32))]),
            "linger",
        ),
        (
            "SubscribeFull",
            "*",
            HashMap::from([("filter", Variant::from("child"))]),
            "unknown or mistyped subscription option 'filter'",
        ),
    ];
    for (method, notifier, opts, needle) in refused {
        let e = c.err(PERIPHERAL_DBUS, OBJECT1, method, &(notifier, opts));
        assert_eq!(
            e.name, "org.freedesktop.DBus.Error.InvalidArgs",
            "{method}: {e:?}"
        );
        assert!(e.message.contains(needle), "{method}: {e:?}");
    }
    let e = c.err(
        ROOT,
        ROOT1,
        "Adopt",
        &(
            OwnedObjectPath::try_from("/org/qomu/VM1/subscriptions/9999").unwrap(),
            "x",
        ),
    );
    assert_eq!(e.name, "org.freedesktop.DBus.Error.UnknownObject", "{e:?}");
    assert_eq!(subscriptions(&mut qmp), before, "nothing was made");

    // A lingering subscription of a client that goes, and is not adopted.
    let owner = bus.client();
    let opts: Options<'_> = HashMap::from([("linger", Variant::from(1u32))]);
    let (sub, token) =
        full_reply(&owner.ok(ROOT, ROOT1, "SubscribeTypeFull", &("isa-serial", "*", opts)));
    // While its owner is there, someone else's Adopt with the token is refused.
    let e = c.err(
        ROOT,
        ROOT1,
        "Adopt",
        &(
            OwnedObjectPath::try_from(sub.as_str()).unwrap(),
            token.as_deref().unwrap(),
        ),
    );
    assert_eq!(e.name, "org.freedesktop.DBus.Error.AccessDenied", "{e:?}");
    zbus::block_on(owner.conn.close()).unwrap();
    let m = removed.wait_for("InterfacesRemoved of the expired subscription", |m| {
        m.body()
            .deserialize::<(OwnedObjectPath, Vec<String>)>()
            .is_ok_and(|(p, _)| p.as_str() == sub)
    });
    let (_, ifaces): (OwnedObjectPath, Vec<String>) = m.body().deserialize().unwrap();
    assert!(
        ifaces.contains(&"org.qomu.Subscription1".to_owned()),
        "{ifaces:?}"
    );
    assert_eq!(subscriptions(&mut qmp), before);
}
