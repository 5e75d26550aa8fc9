//! The D-Bus bridge in process, over its peer-to-peer socket (no bus needed): every kind of
//! value both ways, signals whose payload has optional fields, action errors, and a seeded
//! random-call test. The end-to-end tests against a real qomu on a real bus are in
//! tests/tests/dbus.rs.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bus_bridge::dbus::{DbusBridge, DbusConfig};
use common::Rng;
use futures_util::StreamExt;
use qom::{Action, Error, Field, Kind, NotifierDecl, PhasePolicy, Property, Tree, TypeInfo, Value};
use zbus::wire::{Array, Dict, Signature, Str, Structure};
use zbus::{
    Connection, Message, MessageStream, ObjectPath, OwnedObjectPath, OwnedVariant, Variant,
};

/// Held by `a_waiting_call_holds_up_its_caller_only` while `slow` must wait.
static SLOW_GATE: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
static SLOW_ENTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const G1: &str = "/org/qomu/VM1/objects/g1";
const G2: &str = "/org/qomu/VM1/objects/g2";
const GADGET: &str = "org.qomu.Type.Gadget";
const PROPS: &str = "org.freedesktop.DBus.Properties";

fn tree() -> Tree {
    let b = Tree::builder();
    b.register(
        TypeInfo::new("gadget", "object")
            .implements("user-creatable")
            .property(Property::new("level", Kind::uint_range(0, 10)).notifying())
            .property(Property::new("tags", Kind::list(Kind::Str)))
            .property(Property::link("peer", "gadget"))
            .property(Property::new(
                "mode",
                Kind::enumeration("GadgetMode", &["off", "on"]),
            ))
            .property(Property::new("blob", Kind::Any))
            .property(Property::new("early", Kind::Bool).policy(PhasePolicy::BeforeRealize))
            .property(Property::new("slow", Kind::uint64()).getter(|_| {
                // Waits while a test holds the gate, as a getter behind long work would.
                SLOW_ENTERED.store(true, std::sync::atomic::Ordering::Release);
                drop(SLOW_GATE.lock());
                Ok(Value::UInt(1))
            }))
            .notifier(NotifierDecl::new(
                "pinged",
                Kind::structure(
                    "Pinged",
                    vec![
                        Field::new("text", Kind::Str, ""),
                        Field::optional("count", Kind::uint32(), ""),
                    ],
                ),
            ))
            .action(
                Action::new("ping", |o, a| {
                    let text = a
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    let mut data = vec![("text", Value::Str(text.clone()))];
                    if let Some(c) = a.get("count") {
                        data.push(("count", c.clone()));
                    }
                    o.notifier("pinged")?.emit(|| Value::map(data));
                    Ok(Some(Value::UInt(text.len() as u64)))
                })
                .arg(Field::new("text", Kind::Str, ""))
                .arg(Field::optional("count", Kind::uint32(), ""))
                .returns(Kind::uint64()),
            )
            .action(Action::new("fail", |_, _| Err(Error::failed("it broke")))),
    )
    .unwrap();
    let tree = b.build().unwrap();
    tree.add_user_object("gadget", "g1", vec![]).unwrap();
    tree.add_user_object("gadget", "g2", vec![]).unwrap();
    tree
}

struct Setup {
    tree: Tree,
    bridge: DbusBridge,
    conn: Connection,
    socket: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.bridge.shutdown();
        let _ = std::fs::remove_dir_all(self.socket.parent().unwrap());
    }
}

fn setup(tag: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("qomu-dbus-p2p-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("p2p.sock");
    let tree = tree();
    let bridge = DbusBridge::start(
        tree.clone(),
        DbusConfig {
            bus: None,
            name: "org.qomu.VM1".into(),
            p2p: vec![socket.clone().into()],
        },
    )
    .unwrap();
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let conn =
        zbus::block_on(zbus::connection::Builder::unix_stream(stream).p2p().build()).unwrap();
    Setup {
        tree,
        bridge,
        conn,
        socket,
    }
}

fn call<B>(
    conn: &Connection,
    path: &str,
    iface: &str,
    member: &str,
    body: &B,
) -> Result<Message, (String, String)>
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    let reply = zbus::block_on(async {
        let rt = zruntime::SharedRuntime::current().unwrap();
        rt.timeout(
            Duration::from_secs(30),
            conn.call_method(None::<&str>, path, Some(iface), member, body),
        )
        .await
    })
    .unwrap_or_else(|_| panic!("{iface}.{member} at {path}: no reply"));
    match reply {
        Ok(m) => Ok(m),
        Err(zbus::Error::MethodError(name, text, _)) => {
            Err((name.as_str().to_owned(), text.unwrap_or_default()))
        }
        Err(zbus::Error::FDO(e)) => {
            use zbus::DBusError;
            Err((
                e.name().as_str().to_owned(),
                e.description().unwrap_or_default().to_owned(),
            ))
        }
        Err(e) => panic!("{iface}.{member}: {e}"),
    }
}

fn get(conn: &Connection, prop: &str) -> OwnedVariant {
    call(conn, G1, PROPS, "Get", &(GADGET, prop))
        .unwrap()
        .body()
        .deserialize()
        .unwrap()
}

fn set(conn: &Connection, prop: &str, v: Variant<'_>) -> Result<(), (String, String)> {
    call(conn, G1, PROPS, "Set", &(GADGET, prop, v)).map(|_| ())
}

#[test]
fn every_kind_both_ways() {
    let s = setup("kinds");
    let c = &s.conn;
    set(c, "Level", Variant::from(7u8)).unwrap();
    assert_eq!(u8::try_from(get(c, "Level")).unwrap(), 7);
    let e = set(c, "Level", Variant::from(11u8)).unwrap_err();
    assert_eq!(e.0, "org.freedesktop.DBus.Error.InvalidArgs");
    assert!(
        e.1.contains("between 0 and 10") && e.1.contains("'y'"),
        "{e:?}"
    );

    set(c, "Tags", Variant::from(vec!["a", "b"])).unwrap();
    assert_eq!(Vec::<String>::try_from(get(c, "Tags")).unwrap(), ["a", "b"]);
    let e = set(c, "Tags", Variant::from(vec![1u32])).unwrap_err();
    assert!(e.1.contains("'as'") && e.1.contains("'au'"), "{e:?}");

    // Links are object paths; "/" is no object.
    set(c, "Peer", Variant::from(ObjectPath::try_from(G2).unwrap())).unwrap();
    assert_eq!(
        OwnedObjectPath::try_from(get(c, "Peer")).unwrap().as_str(),
        G2
    );
    assert_eq!(
        s.tree.get("/objects/g1", "peer").unwrap(),
        Value::Path("/objects/g2".into())
    );
    let e = set(
        c,
        "Peer",
        Variant::from(ObjectPath::try_from("/org/qomu/VM1/objects/nope").unwrap()),
    )
    .unwrap_err();
    assert_eq!(e.0, "org.freedesktop.DBus.Error.UnknownObject", "{e:?}");
    set(c, "Peer", Variant::from(ObjectPath::try_from("/").unwrap())).unwrap();
    assert_eq!(
        OwnedObjectPath::try_from(get(c, "Peer")).unwrap().as_str(),
        "/"
    );

    set(c, "Mode", Variant::from("on")).unwrap();
    let e = set(c, "Mode", Variant::from("sideways")).unwrap_err();
    assert!(e.1.contains("off, on"), "{e:?}");
    assert_eq!(String::try_from(get(c, "Mode")).unwrap(), "on");

    // `any` is a variant, whatever it holds.
    let mut dict = Dict::new(&Signature::Str, &Signature::Variant);
    dict.append(
        Variant::Str(Str::from("x")),
        Variant::Variant(Box::new(Variant::I32(-4))),
    )
    .unwrap();
    set(c, "Blob", Variant::Dict(dict)).unwrap();
    assert_eq!(
        s.tree.get("/objects/g1", "blob").unwrap(),
        Value::map([("x", Value::Int(-4))])
    );
    let e = set(c, "Blob", Variant::F64(1.5)).unwrap_err();
    assert_eq!(e.0, "org.freedesktop.DBus.Error.InvalidArgs");

    let e = set(c, "Early", Variant::from(true)).unwrap_err();
    assert_eq!(e.0, "org.qomu.Error.WrongPhase");

    // GetAll has every property of the interface, typed as introspection says.
    let all: HashMap<String, OwnedVariant> = call(c, G1, PROPS, "GetAll", &(GADGET,))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    let xml: String = call(
        c,
        G1,
        "org.freedesktop.DBus.Introspectable",
        "Introspect",
        &(),
    )
    .unwrap()
    .body()
    .deserialize()
    .unwrap();
    for (name, value) in &all {
        let declared = format!(
            r#"<property name="{name}" type="{}""#,
            value.value_signature()
        );
        assert!(xml.contains(&declared), "{declared} not in:\n{xml}");
    }
    assert_eq!(all.len(), 7);
}

/// The next signal named `member` (others are skipped); panics after a minute.
fn next_signal(stream: &mut MessageStream, member: &str) -> Message {
    zbus::block_on(async {
        let rt = zruntime::SharedRuntime::current().unwrap();
        let wanted = async {
            loop {
                let m = stream.next().await.unwrap().unwrap();
                if m.message_type() == zbus::message::Type::Signal
                    && m.header().member().is_some_and(|n| n.as_str() == member)
                {
                    return m;
                }
            }
        };
        rt.timeout(Duration::from_secs(60), wanted)
            .await
            .unwrap_or_else(|_| panic!("no {member} signal within a minute"))
    })
}

#[test]
fn signals_with_optional_fields_carry_a_dict() {
    let s = setup("signals");
    let c = &s.conn;
    let sub: OwnedObjectPath = call(c, G1, "org.qomu.Object1", "Subscribe", &("pinged",))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    let mut stream = MessageStream::from(c);
    let opts = HashMap::from([("count", Variant::from(3u32))]);
    let n: u64 = call(c, G1, GADGET, "Ping", &("abc", opts))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    assert_eq!(n, 3);
    let signal = next_signal(&mut stream, "Pinged");
    let hdr = signal.header();
    assert_eq!(hdr.path().unwrap().as_str(), sub.as_str());
    assert_eq!(hdr.interface().unwrap().as_str(), GADGET);
    assert_eq!(hdr.member().unwrap().as_str(), "Pinged");
    let (source, data): (OwnedObjectPath, HashMap<String, OwnedVariant>) =
        signal.body().deserialize().unwrap();
    assert_eq!(source.as_str(), G1);
    assert_eq!(
        String::try_from(data["text"].try_clone().unwrap()).unwrap(),
        "abc"
    );
    assert_eq!(
        u32::try_from(data["count"].try_clone().unwrap()).unwrap(),
        3
    );

    // A NUL the device emits cannot travel in a D-Bus string: it arrives as U+FFFD.
    let pinged = s
        .tree
        .lookup("/objects/g1")
        .unwrap()
        .notifier("pinged")
        .unwrap();
    pinged.emit(|| Value::map([("text", Value::Str("a\0b".into()))]));
    let signal = next_signal(&mut stream, "Pinged");
    let (_, data): (OwnedObjectPath, HashMap<String, OwnedVariant>) =
        signal.body().deserialize().unwrap();
    assert_eq!(
        String::try_from(data["text"].try_clone().unwrap()).unwrap(),
        "a\u{fffd}b"
    );
    assert!(!data.contains_key("count"));

    // Notifying properties: PropertiesChanged to everyone, whoever set them.
    s.tree.set("/objects/g1", "level", Value::UInt(4)).unwrap();
    let changed = next_signal(&mut stream, "PropertiesChanged");
    let (iface, props, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
        changed.body().deserialize().unwrap();
    assert_eq!(iface, GADGET);
    assert_eq!(
        u8::try_from(props["Level"].try_clone().unwrap()).unwrap(),
        4
    );
}

#[test]
fn action_errors_and_objects_created_over_dbus() {
    let s = setup("actions");
    let c = &s.conn;
    let e = call(c, G1, GADGET, "Fail", &()).unwrap_err();
    assert_eq!(
        e,
        ("org.qomu.Error.Failed".to_owned(), "it broke".to_owned())
    );
    let e = call(c, G1, GADGET, "Ping", &(1u32,)).unwrap_err();
    assert_eq!(e.1, "org.qomu.Type.Gadget.Ping takes (sa{sv}), got (u)");
    let props = HashMap::from([("level", Variant::from(2u8))]);
    let obj: OwnedObjectPath = call(
        c,
        "/org/qomu/VM1",
        "org.qomu.Root1",
        "AddObject",
        &("gadget", "g3", props),
    )
    .unwrap()
    .body()
    .deserialize()
    .unwrap();
    assert_eq!(obj.as_str(), "/org/qomu/VM1/objects/g3");
    assert_eq!(s.tree.get("/objects/g3", "level").unwrap(), Value::UInt(2));
    let bad = HashMap::from([("level", Variant::from("two"))]);
    let e = call(
        c,
        "/org/qomu/VM1",
        "org.qomu.Root1",
        "AddObject",
        &("gadget", "g4", bad),
    )
    .unwrap_err();
    assert!(e.1.contains("'level'") && e.1.contains("'y'"), "{e:?}");
    assert!(
        s.tree.lookup("/objects/g4").is_err(),
        "a refused AddObject left an object"
    );
    call(c, obj.as_str(), "org.qomu.Object1", "Delete", &()).unwrap();
    assert!(s.tree.lookup("/objects/g3").is_err());
}

/// A random variant of a random D-Bus type, nested a little.
fn random_variant(rng: &mut Rng, depth: usize) -> Variant<'static> {
    let strings = [
        "",
        "a\0b",
        "on",
        "/org/qomu/VM1/objects/g2",
        "é∂",
        "gadget",
        "level",
        "pinged",
    ];
    match rng.below(if depth > 2 { 9 } else { 12 }) {
        0 => Variant::Bool(rng.below(2) == 1),
        1 => Variant::U8(rng.next() as u8),
        2 => Variant::I16(rng.next() as i16),
        3 => Variant::U32(rng.next() as u32),
        4 => Variant::I64(rng.next() as i64),
        5 => Variant::U64(rng.next()),
        6 => Variant::F64(rng.next() as f64),
        7 => Variant::Str(Str::from(*rng.pick(&strings))),
        8 => Variant::ObjectPath(
            ObjectPath::try_from(*rng.pick(&[G1, G2, "/", "/org/qomu/VM1/x_zz"])).unwrap(),
        ),
        9 => Variant::Variant(Box::new(random_variant(rng, depth + 1))),
        10 => {
            let mut a = Array::new(&Signature::Variant);
            for _ in 0..rng.below(4) {
                a.append(Variant::Variant(Box::new(random_variant(rng, depth + 1))))
                    .unwrap();
            }
            Variant::Array(a)
        }
        _ => {
            let mut d = Dict::new(&Signature::Str, &Signature::Variant);
            for _ in 0..rng.below(4) {
                let key = Variant::Str(Str::from(*rng.pick(&[
                    "count",
                    "queue-limit",
                    "coalesce",
                    "level",
                    "x",
                ])));
                let _ = d.append(
                    key,
                    Variant::Variant(Box::new(random_variant(rng, depth + 1))),
                );
            }
            Variant::Dict(d)
        }
    }
}

#[test]
fn random_calls_never_break_the_bridge() {
    let s = setup("random");
    let c = &s.conn;
    let mut rng = Rng(0xdb05_5eed_u64);
    let paths = [
        G1,
        G2,
        "/org/qomu/VM1",
        "/org/qomu/VM1/objects",
        "/",
        "/org",
        "/org/qomu/VM1/objects/g_31",
        "/org/qomu/VM1/subscriptions",
        "/nope",
    ];
    let ifaces = [
        PROPS,
        GADGET,
        "org.qomu.Object1",
        "org.qomu.Root1",
        "org.qomu.Type.Object",
        "org.freedesktop.DBus.Peer",
        "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.ObjectManager",
        "org.freedesktop.DBus",
        "org.example.Nope",
    ];
    let members = [
        "Get",
        "GetAll",
        "Set",
        "Ping",
        "Fail",
        "Subscribe",
        "SubscribeWithOptions",
        "SubscribeType",
        "Unsubscribe",
        "GetProperty",
        "SetProperty",
        "ListProperties",
        "Delete",
        "AddObject",
        "ListTypes",
        "Introspect",
        "GetManagedObjects",
        "Hello",
        "GetNameOwner",
        "Nope",
    ];
    let (mut replies, mut errors) = (0, 0);
    // Well-formed calls to mix in, with random values where they take some.
    let valid: [(&str, &str, &str, &[&str]); 8] = [
        (G1, PROPS, "Get", &[GADGET, "Level"]),
        (G1, PROPS, "GetAll", &[GADGET]),
        (G1, PROPS, "Set", &[GADGET, "Level"]),
        (G1, PROPS, "Set", &[GADGET, "Mode"]),
        (G1, "org.qomu.Object1", "Subscribe", &["pinged"]),
        (G2, "org.qomu.Object1", "ListProperties", &[]),
        (
            "/org/qomu/VM1",
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
            &[],
        ),
        (G2, "org.freedesktop.DBus.Introspectable", "Introspect", &[]),
    ];
    for _ in 0..1500 {
        let mut body = Structure::builder();
        let (path, iface, member, n) = if rng.below(3) == 0 {
            let (path, iface, member, fixed) = *rng.pick(&valid);
            for arg in fixed {
                body = body.append_field(Variant::Str(Str::from(*arg)));
            }
            let mut n = fixed.len();
            if member == "Set" {
                body = body.append_field(Variant::Variant(Box::new(random_variant(&mut rng, 1))));
                n += 1;
            }
            (path, iface, member, n)
        } else {
            let n = rng.below(4);
            for _ in 0..n {
                body = body.append_field(random_variant(&mut rng, 0));
            }
            (
                *rng.pick(&paths),
                *rng.pick(&ifaces),
                *rng.pick(&members),
                n,
            )
        };
        let result = if n == 0 {
            call(c, path, iface, member, &())
        } else {
            call(c, path, iface, member, &body.build().unwrap())
        };
        match result {
            Ok(_) => replies += 1,
            Err((name, text)) => {
                assert!(
                    name.starts_with("org.freedesktop.DBus.Error.")
                        || name.starts_with("org.qomu.Error."),
                    "{name}"
                );
                assert!(!text.is_empty(), "{name} without a text");
                errors += 1;
            }
        }
    }
    assert!(
        replies > 50 && errors > 500,
        "{replies} replies, {errors} errors"
    );
    // Still serving, still consistent.
    call(c, G1, "org.freedesktop.DBus.Peer", "Ping", &()).unwrap();
    assert!(s.tree.lookup("/objects/g1").is_ok());
    let level = s.tree.get("/objects/g1", "level").unwrap();
    assert!(matches!(level, Value::UInt(0..=10)), "{level:?}");
}

#[test]
fn a_peer_that_stops_reading_is_dropped_not_waited_for() {
    let s = setup("stuck");
    // This peer subscribes, then never reads: its one-message queue fills, then its socket.
    let socket = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    let stuck = zbus::block_on(
        zbus::connection::Builder::unix_stream(socket)
            .p2p()
            .max_queued(std::num::NonZeroUsize::new(1).unwrap())
            .build(),
    )
    .unwrap();
    let opts = HashMap::from([("queue-limit", Variant::from(1u32 << 20))]);
    let stuck_sub: OwnedObjectPath = call(
        &stuck,
        G1,
        "org.qomu.Object1",
        "SubscribeWithOptions",
        &("pinged", opts),
    )
    .unwrap()
    .body()
    .deserialize()
    .unwrap();
    let _never_read = MessageStream::from(&stuck);
    // A healthy peer on another object.
    let c = &s.conn;
    let sub: OwnedObjectPath = call(c, G2, "org.qomu.Object1", "Subscribe", &("pinged",))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    let mut stream = MessageStream::from(c);
    let flood = s
        .tree
        .lookup("/objects/g1")
        .unwrap()
        .notifier("pinged")
        .unwrap();
    let text = "x".repeat(1000);
    for _ in 0..20_000 {
        flood.emit(|| Value::map([("text", Value::Str(text.clone()))]));
    }
    s.tree
        .lookup("/objects/g2")
        .unwrap()
        .notifier("pinged")
        .unwrap()
        .emit(|| Value::map([("text", Value::Str("still here".into()))]));
    let m = next_signal(&mut stream, "Pinged");
    assert_eq!(m.header().path().unwrap().as_str(), sub.as_str());
    // The stuck peer was dropped, its subscription with it.
    let qom_path = &stuck_sub.as_str()["/org/qomu/VM1".len()..];
    assert!(
        s.tree.lookup(qom_path).is_err(),
        "{qom_path} outlived its stuck peer"
    );
}

/// A call that waits (a getter behind long work) holds up its own caller only: another
/// connection's Ping, Get, Introspect and GetAll answer meanwhile; the waiting
/// caller's later calls queue behind it in order, up to the lane's limit, past which they
/// are refused with LimitsExceeded; once the getter returns, every queued call is answered.
#[test]
fn a_waiting_call_holds_up_its_caller_only() {
    use std::sync::atomic::Ordering;
    let s = setup("lanes");
    let gate = SLOW_GATE.lock();
    let waiting = s.conn.clone();
    let slow = std::thread::spawn(move || {
        let v: OwnedVariant = call(&waiting, G1, PROPS, "Get", &(GADGET, "Slow"))
            .unwrap()
            .body()
            .deserialize()
            .unwrap();
        u64::try_from(v).unwrap()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !SLOW_ENTERED.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "the getter never ran");
        std::thread::sleep(Duration::from_millis(1));
    }

    // The waiting caller's next calls: a Set, then gets that must see it, pipelined.
    let burst = 1100;
    let pipelined = s.conn.clone();
    let queued = std::thread::spawn(move || {
        zbus::block_on(async {
            let level = (GADGET, "Level", Variant::from(9u8));
            let which = (GADGET, "Level");
            let set = pipelined.call_method(None::<&str>, G1, Some(PROPS), "Set", &level);
            let gets = (0..burst)
                .map(|_| pipelined.call_method(None::<&str>, G1, Some(PROPS), "Get", &which));
            let (set, gets) =
                futures_util::future::join(set, futures_util::future::join_all(gets)).await;
            (set.is_ok(), gets)
        })
    });

    // Everyone else goes on, while the getter waits.
    let other = setup_client(&s.socket);
    let t = std::time::Instant::now();
    call(&other, G1, "org.freedesktop.DBus.Peer", "Ping", &()).unwrap();
    call(&other, G2, PROPS, "Get", &(GADGET, "Level")).unwrap();
    call(
        &other,
        G1,
        "org.freedesktop.DBus.Introspectable",
        "Introspect",
        &(),
    )
    .unwrap();
    // (Not GetManagedObjects: it reads every property, `slow` among them. That is why
    // what clients poll must never wait: docs/object-model.md.)
    call(&other, G2, PROPS, "GetAll", &("org.qomu.Object1",)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!slow.is_finished(), "the getter still waits");
    // Give the burst time to arrive (1024 fit in the lane, behind the Set).
    std::thread::sleep(Duration::from_millis(500));
    drop(gate);

    assert_eq!(slow.join().unwrap(), 1);
    let (set_ok, gets) = queued.join().unwrap();
    assert!(set_ok, "the Set queued behind the getter was answered");
    let mut answered = 0;
    let mut refused = 0;
    for r in gets {
        match r {
            Ok(m) => {
                let v: OwnedVariant = m.body().deserialize().unwrap();
                // Queued after the Set, answered after it: they all see its value.
                assert_eq!(u8::try_from(v).unwrap(), 9);
                answered += 1;
            }
            Err(zbus::Error::MethodError(name, _, _)) => {
                assert_eq!(name.as_str(), "org.freedesktop.DBus.Error.LimitsExceeded");
                refused += 1;
            }
            Err(zbus::Error::FDO(e)) => {
                assert!(matches!(*e, zbus::fdo::Error::LimitsExceeded(_)), "{e}");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The lane held the Set and 1023 gets; the rest were refused at once.
    assert_eq!(answered, 1023, "answered {answered}, refused {refused}");
    assert_eq!(refused, burst - 1023);
    // And the caller is served as before.
    assert_eq!(u8::try_from(get(&s.conn, "Level")).unwrap(), 9);
}

fn setup_client(socket: &std::path::Path) -> Connection {
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    zbus::block_on(zbus::connection::Builder::unix_stream(stream).p2p().build()).unwrap()
}
