//! Subscriptions: per object and per type, as tree objects, with counters, limits,
//! coalescing, ownership, and death with their subscriber.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::{props, test_tree};
use qom::{Error, SubscribeOptions, Target, Value};

fn bump(tree: &qom::Tree, path: &str) {
    tree.call(path, "bump", [("by".to_owned(), Value::UInt(1))].into())
        .unwrap();
}

fn counters(tree: &qom::Tree, sub: &str) -> (u64, u64, u64, u64) {
    let get = |p| tree.get(sub, p).unwrap().as_u64().unwrap();
    (
        get("matched"),
        get("delivered"),
        get("dropped"),
        get("pending"),
    )
}

#[test]
fn a_subscription_is_an_object_with_its_properties() {
    let tree = test_tree();
    tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let client = tree.subscriber("qmp:7");
    let path = client
        .subscribe(
            Target::Object("lamp".into()),
            "tick",
            SubscribeOptions {
                queue_limit: Some(5),
                coalesce: false,
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    assert_eq!(path, "/subscriptions/1");
    assert_eq!(
        tree.get(&path, "type").unwrap(),
        Value::Str("subscription".into())
    );
    assert_eq!(
        tree.get(&path, "target").unwrap(),
        Value::Str("/objects/lamp".into())
    );
    assert_eq!(
        tree.get(&path, "scope").unwrap(),
        Value::Enum("object".into())
    );
    assert_eq!(
        tree.get(&path, "notifier").unwrap(),
        Value::Str("tick".into())
    );
    assert_eq!(
        tree.get(&path, "owner").unwrap(),
        Value::Str("qmp:7".into())
    );
    assert_eq!(tree.get(&path, "queue-limit").unwrap(), Value::UInt(5));
    assert_eq!(tree.get(&path, "coalesce").unwrap(), Value::Bool(false));
    assert_eq!(counters(&tree, &path), (0, 0, 0, 0));
    assert!(
        tree.list("/subscriptions")
            .unwrap()
            .iter()
            .any(|p| p.name == "1" && p.type_name == "child<subscription>")
    );
    // The counters are read-only; the limit and coalescing are settable, with checks.
    assert!(matches!(
        tree.set(&path, "delivered", Value::UInt(3)),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        tree.set(&path, "queue-limit", Value::UInt(0)),
        Err(Error::OutOfRange { .. })
    ));
    tree.set(&path, "queue-limit", Value::UInt(2)).unwrap();
    tree.set(&path, "coalesce", Value::Bool(true)).unwrap();
    assert_eq!(tree.get(&path, "coalesce").unwrap(), Value::Bool(true));
    // Subscription objects cannot be made by hand.
    assert!(
        tree.create("/subscriptions", "99", "subscription", vec![])
            .is_err()
    );
}

#[test]
fn a_full_queue_drops_and_counts() {
    let tree = test_tree();
    tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let client = tree.subscriber("c");
    let sub = client
        .subscribe(
            Target::Object("/objects/lamp".into()),
            "tick",
            SubscribeOptions {
                queue_limit: Some(3),
                coalesce: false,
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    for _ in 0..10 {
        bump(&tree, "lamp");
    }
    assert_eq!(counters(&tree, &sub), (10, 0, 7, 3));
    let got = client.drain();
    // The oldest three were kept; later ones were dropped.
    let ns: Vec<_> = got
        .iter()
        .map(|d| d.event.data.field("n").unwrap().as_u64().unwrap())
        .collect();
    assert_eq!(ns, [1, 2, 3]);
    assert_eq!(counters(&tree, &sub), (10, 3, 7, 0));
    bump(&tree, "lamp");
    assert_eq!(counters(&tree, &sub), (11, 3, 7, 1));
}

#[test]
fn coalescing_keeps_the_newest_event_per_source_in_order() {
    let tree = test_tree();
    tree.create("/objects", "a", "lamp", vec![]).unwrap();
    tree.create("/objects", "b", "lamp", vec![]).unwrap();
    let client = tree.subscriber("c");
    let sub = client
        .subscribe(
            Target::Type("lamp".into()),
            "tick",
            SubscribeOptions {
                queue_limit: None,
                coalesce: true,
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    bump(&tree, "/objects/a"); // a:1
    bump(&tree, "/objects/b"); // b:1
    bump(&tree, "/objects/a"); // a:2 supersedes a:1
    bump(&tree, "/objects/a"); // a:3 supersedes a:2
    // Superseded events count as coalesced, not dropped: nothing was lost for lack of room.
    assert_eq!(counters(&tree, &sub), (4, 0, 0, 2));
    assert_eq!(tree.get(&sub, "coalesced").unwrap(), Value::UInt(2));
    let got: Vec<_> = client
        .drain()
        .iter()
        .map(|d| {
            (
                d.event.source.to_string(),
                d.event.data.field("n").unwrap().as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [("/objects/b".to_owned(), 1), ("/objects/a".to_owned(), 3)]
    );
    assert_eq!(counters(&tree, &sub), (4, 2, 0, 0));
    // Many superseded events do not grow the queue without bound.
    for _ in 0..10_000 {
        bump(&tree, "/objects/a");
    }
    assert_eq!(counters(&tree, &sub).3, 1);
    assert_eq!(client.drain().len(), 1);
}

#[test]
fn type_subscriptions_match_subtypes_interfaces_and_later_objects() {
    let tree = test_tree();
    let client = tree.subscriber("c");
    // Made before any object of the type exists.
    let by_type = client
        .subscribe(Target::Type("appliance".into()), "tick", Default::default())
        .unwrap();
    let by_iface = client
        .subscribe(
            Target::Type("switchable".into()),
            "property-changed",
            Default::default(),
        )
        .unwrap();
    assert_eq!(
        tree.get(&by_type, "scope").unwrap(),
        Value::Enum("type".into())
    );
    assert_eq!(
        tree.get(&by_type, "target").unwrap(),
        Value::Str("appliance".into())
    );
    tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    tree.create(
        "/objects",
        "frag",
        "fragile",
        props(&[("label", "ok".into())]),
    )
    .unwrap();
    tree.create("/objects", "sock", "socket", vec![]).unwrap();
    bump(&tree, "lamp");
    bump(&tree, "frag");
    tree.set("lamp", "power", true.into()).unwrap();
    let got: Vec<_> = client
        .drain()
        .iter()
        .map(|d| (d.subscription.to_string(), d.event.source.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            (by_type.clone(), "/objects/lamp".to_owned()),
            (by_type.clone(), "/objects/frag".to_owned()),
            (by_iface.clone(), "/objects/lamp".to_owned())
        ]
    );
    // Objects created and deleted repeatedly: the subscription keeps matching new ones.
    for i in 0..50 {
        let name = format!("l{i}");
        tree.create("/objects", &name, "lamp", vec![]).unwrap();
        bump(&tree, &format!("/objects/{name}"));
        tree.delete(&format!("/objects/{name}")).unwrap();
    }
    assert_eq!(client.drain().len(), 50);
    assert_eq!(counters(&tree, &by_type), (52, 52, 0, 0));
}

#[test]
fn subscribing_to_something_missing_is_refused() {
    let tree = test_tree();
    tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let client = tree.subscriber("c");
    let opts = SubscribeOptions::default();
    assert_eq!(
        client
            .subscribe(Target::Object("lamp".into()), "nope", opts.clone())
            .unwrap_err(),
        Error::PropertyNotFound {
            typename: "lamp".into(),
            property: "nope".into()
        }
    );
    assert_eq!(
        client
            .subscribe(Target::Object("lamp".into()), "watts", opts.clone())
            .unwrap_err(),
        Error::NotANotifier {
            typename: "lamp".into(),
            property: "watts".into()
        }
    );
    assert!(matches!(
        client.subscribe(Target::Object("/none".into()), "tick", opts.clone()),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        client.subscribe(Target::Type("nope".into()), "tick", opts.clone()),
        Err(Error::TypeNotFound { .. })
    ));
    assert!(matches!(
        client.subscribe(Target::Type("socket".into()), "tick", opts.clone()),
        Err(Error::PropertyNotFound { .. })
    ));
    assert!(matches!(
        client.subscribe(
            Target::Object("lamp".into()),
            "tick",
            SubscribeOptions {
                queue_limit: Some(0),
                coalesce: false,
                ..SubscribeOptions::default()
            }
        ),
        Err(Error::OutOfRange { .. })
    ));
    assert!(
        tree.subscriptions().is_empty(),
        "no subscription object was left behind"
    );
    assert!(tree.lookup("/subscriptions").unwrap().children().is_empty());
}

#[test]
fn reading_a_notifier_subscribes() {
    let tree = test_tree();
    tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    assert_eq!(
        tree.get("lamp", "tick").unwrap_err(),
        Error::NeedsSubscriber {
            property: "tick".into()
        }
    );
    let client = tree.subscriber("c");
    let path = client.get("lamp", "tick").unwrap();
    assert_eq!(path, Value::Path("/subscriptions/1".into()));
    assert_eq!(
        tree.get("/subscriptions/1", "target").unwrap(),
        Value::Str("/objects/lamp".into())
    );
    bump(&tree, "lamp");
    assert_eq!(client.drain().len(), 1);
    // Other properties read normally through a subscriber.
    assert_eq!(client.get("lamp", "watts").unwrap(), Value::UInt(40));
}

#[test]
fn unsubscribe_and_ownership() {
    let tree = test_tree();
    tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let alice = tree.subscriber("alice");
    let bob = tree.subscriber("bob");
    let sub = alice
        .subscribe(Target::Object("lamp".into()), "tick", Default::default())
        .unwrap();
    bump(&tree, "lamp");
    // Someone else's subscription cannot be destroyed.
    assert_eq!(
        bob.unsubscribe(&sub).unwrap_err(),
        Error::NotOwner {
            path: sub.clone(),
            owner: "alice".into()
        }
    );
    assert!(matches!(
        alice.unsubscribe("/objects/lamp"),
        Err(Error::NotASubscription { .. })
    ));
    assert!(matches!(
        alice.unsubscribe("/subscriptions/77"),
        Err(Error::NotFound { .. })
    ));
    alice.unsubscribe(&sub).unwrap();
    assert!(tree.lookup(&sub).is_err());
    // Pending events of a destroyed subscription are discarded, and no more arrive.
    bump(&tree, "lamp");
    assert!(alice.drain().is_empty());
    assert!(matches!(
        alice.unsubscribe(&sub),
        Err(Error::NotFound { .. })
    ));
    // Deleting the object is unsubscribing too.
    let sub2 = alice
        .subscribe(Target::Object("lamp".into()), "tick", Default::default())
        .unwrap();
    tree.delete(&sub2).unwrap();
    bump(&tree, "lamp");
    assert!(alice.drain().is_empty());
}

#[test]
fn subscriptions_die_with_their_subscriber() {
    let tree = test_tree();
    tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let keep = tree.subscriber("keep");
    let kept = keep
        .subscribe(Target::Object("lamp".into()), "tick", Default::default())
        .unwrap();
    {
        let gone = tree.subscriber("gone");
        gone.subscribe(Target::Object("lamp".into()), "tick", Default::default())
            .unwrap();
        gone.subscribe(Target::Type("lamp".into()), "tick", Default::default())
            .unwrap();
        assert_eq!(tree.subscriptions().len(), 3);
    } // dropped: its connection closed
    assert_eq!(tree.subscriptions(), std::slice::from_ref(&kept));
    assert_eq!(tree.lookup("/subscriptions").unwrap().children().len(), 1);
    // Owner labels within one subscriber (D-Bus peers through one bridge).
    let bridge = tree.subscriber("dbus");
    bridge
        .subscribe_for(
            ":1.5",
            Target::Object("lamp".into()),
            "tick",
            Default::default(),
        )
        .unwrap();
    bridge
        .subscribe_for(
            ":1.5",
            Target::Type("lamp".into()),
            "tick",
            Default::default(),
        )
        .unwrap();
    let other = bridge
        .subscribe_for(
            ":1.6",
            Target::Object("lamp".into()),
            "tick",
            Default::default(),
        )
        .unwrap()
        .path;
    assert_eq!(
        tree.get(&other, "owner").unwrap(),
        Value::Str(":1.6".into())
    );
    assert!(matches!(
        bridge.unsubscribe_for(":1.5", &other),
        Err(Error::NotOwner { .. })
    ));
    assert_eq!(bridge.drop_owner(":1.5"), 2);
    assert_eq!(bridge.subscriptions(), std::slice::from_ref(&other));
    // A closed subscriber cannot subscribe again.
    bridge.close();
    assert_eq!(
        bridge
            .subscribe(Target::Object("lamp".into()), "tick", Default::default())
            .unwrap_err(),
        Error::SubscriberClosed
    );
    assert_eq!(tree.subscriptions(), [kept]);
}

#[test]
fn subscriptions_outlive_their_target_object() {
    let tree = test_tree();
    let lamp = tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let tick = lamp.notifier("tick").unwrap();
    let client = tree.subscriber("c");
    let sub = client
        .subscribe(Target::Object("lamp".into()), "tick", Default::default())
        .unwrap();
    tree.delete("/objects/lamp").unwrap();
    // A last event emitted by the departing device still reaches the subscriber.
    tick.emit(|| Value::map([("n", Value::UInt(99))]));
    assert_eq!(client.drain().len(), 1);
    assert_eq!(
        tree.get(&sub, "target").unwrap(),
        Value::Str("/objects/lamp".into())
    );
    client.unsubscribe(&sub).unwrap();
    assert!(!tick.has_subscribers());
}

struct FlagWaker(std::sync::atomic::AtomicBool);
impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn front_ends_can_wait_async_or_blocking() {
    let tree = test_tree();
    tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let client = tree.subscriber("c");
    client
        .subscribe(Target::Object("lamp".into()), "tick", Default::default())
        .unwrap();

    // Async: pending until an event arrives, and the waker is woken by the emitter.
    let flag = Arc::new(FlagWaker(false.into()));
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut ready = pin!(client.ready());
    assert_eq!(ready.as_mut().poll(&mut cx), Poll::Pending);
    bump(&tree, "lamp");
    assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(ready.as_mut().poll(&mut cx), Poll::Ready(()));
    assert_eq!(client.drain().len(), 1);

    // Blocking: times out with nothing, wakes when another thread emits.
    assert!(!client.wait(Duration::from_millis(20)));
    let t2 = tree.clone();
    let emitter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        bump(&t2, "lamp");
    });
    assert!(client.wait(Duration::from_secs(10)));
    emitter.join().unwrap();
    assert!(client.has_pending());
    assert_eq!(client.drain().len(), 1);
}
