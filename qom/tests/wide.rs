//! Subscriptions beyond one notifier of one object: `*` and subtree scopes, payload
//! filters, rate limits, sequence numbers, and lingering through a reconnect.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::test_tree;
use qom::{ALL, Delivery, Error, SubscribeOptions, Target, Tree, Value};

fn bump(tree: &Tree, path: &str) {
    tree.call(path, "bump", [("by".to_owned(), Value::UInt(1))].into())
        .unwrap();
}

fn lamp(tree: &Tree, parent: &str, name: &str) {
    tree.create(parent, name, "lamp", vec![]).unwrap();
}

fn prop(tree: &Tree, sub: &str, name: &str) -> Value {
    tree.get(sub, name).unwrap()
}

fn count(tree: &Tree, sub: &str, name: &str) -> u64 {
    prop(tree, sub, name).as_u64().unwrap()
}

/// `matched == delivered + dropped + pending + coalesced`, read from the object.
fn identity_holds(tree: &Tree, sub: &str) {
    let c = |n| count(tree, sub, n);
    assert_eq!(
        c("matched"),
        c("delivered") + c("dropped") + c("pending") + c("coalesced"),
        "{sub}"
    );
}

/// Drains until `n` deliveries arrived or `within` passed.
fn drain_n(client: &qom::Subscriber, n: usize, within: Duration) -> Vec<Delivery> {
    let end = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < end {
        client.wait(Duration::from_millis(10));
        got.extend(client.drain());
    }
    got
}

fn sources_and_notifiers(got: &[Delivery]) -> Vec<(String, String)> {
    got.iter()
        .map(|d| (d.event.source.to_string(), d.event.notifier.to_string()))
        .collect()
}

#[test]
fn a_star_type_subscription_made_before_any_object_sees_every_notifier_of_it() {
    let tree = test_tree();
    let client = tree.subscriber("t");
    let sub = client
        .subscribe(
            Target::Type("lamp".into()),
            ALL,
            SubscribeOptions::default(),
        )
        .unwrap();
    assert_eq!(prop(&tree, &sub, "notifier"), Value::Str("*".into()));
    assert_eq!(prop(&tree, &sub, "scope"), Value::Enum("type".into()));
    // The first lamp appears after the subscription; each of its notifiers fires once:
    // its own (`tick`), and the implicit ones every object has.
    lamp(&tree, "/objects", "l");
    bump(&tree, "/objects/l");
    tree.set("/objects/l", "power", Value::from(true)).unwrap();
    tree.create("/objects/l", "s", "socket", vec![]).unwrap();
    tree.delete("/objects/l/s").unwrap();
    // Another type's events are not this subscription's.
    tree.create("/objects", "sock", "socket", vec![]).unwrap();
    tree.set("/objects/sock", "type", Value::from("x"))
        .unwrap_err();
    let got = client.drain();
    let notifiers: BTreeSet<&str> = got.iter().map(|d| &*d.event.notifier).collect();
    let declared: BTreeSet<String> = tree
        .types()
        .get("lamp")
        .unwrap()
        .notifiers()
        .iter()
        .map(|n| n.item.name().to_string())
        .collect();
    assert_eq!(
        notifiers,
        declared.iter().map(String::as_str).collect(),
        "every notifier lamp has, and nothing else"
    );
    assert!(
        got.iter().all(|d| &*d.event.source == "/objects/l"),
        "{got:?}"
    );
    assert_eq!(
        got.iter().map(|d| d.sequence).collect::<Vec<_>>(),
        (1..=got.len() as u64).collect::<Vec<_>>()
    );
    identity_holds(&tree, &sub);
}

#[test]
fn a_star_object_subscription_sees_every_notifier_of_that_object_only() {
    let tree = test_tree();
    lamp(&tree, "/objects", "a");
    lamp(&tree, "/objects", "b");
    let client = tree.subscriber("t");
    let sub = client
        .subscribe(Target::Object("a".into()), ALL, SubscribeOptions::default())
        .unwrap();
    bump(&tree, "/objects/a");
    tree.set("/objects/a", "watts", Value::from(50u32)).unwrap();
    bump(&tree, "/objects/b");
    assert_eq!(
        sources_and_notifiers(&client.drain()),
        [
            ("/objects/a".into(), "tick".into()),
            ("/objects/a".into(), "property-changed".into())
        ]
    );
    assert_eq!(count(&tree, &sub, "matched"), 2);
}

#[test]
fn a_subtree_subscription_sees_objects_created_under_it_later_and_nothing_beside_it() {
    let tree = test_tree();
    tree.create("/objects", "bay", "socket", vec![]).unwrap();
    tree.create("/objects", "bayx", "socket", vec![]).unwrap();
    let client = tree.subscriber("t");
    let sub = client
        .subscribe(
            Target::Subtree("/objects/bay".into()),
            "tick",
            SubscribeOptions::default(),
        )
        .unwrap();
    assert_eq!(prop(&tree, &sub, "scope"), Value::Enum("subtree".into()));
    assert_eq!(
        prop(&tree, &sub, "target"),
        Value::Str("/objects/bay".into())
    );
    // Plugged in after the subscription, at two depths.
    lamp(&tree, "/objects/bay", "one");
    tree.create("/objects/bay", "rack", "socket", vec![])
        .unwrap();
    lamp(&tree, "/objects/bay/rack", "two");
    // Beside the subtree: a sibling whose name only starts the same.
    lamp(&tree, "/objects/bayx", "out");
    lamp(&tree, "/objects", "top");
    for p in [
        "/objects/bay/one",
        "/objects/bay/rack/two",
        "/objects/bayx/out",
        "/objects/top",
    ] {
        bump(&tree, p);
    }
    assert_eq!(
        sources_and_notifiers(&client.drain()),
        [
            ("/objects/bay/one".into(), "tick".into()),
            ("/objects/bay/rack/two".into(), "tick".into())
        ]
    );
    // Unplugged and plugged again: the new object is seen too.
    tree.delete("/objects/bay/one").unwrap();
    lamp(&tree, "/objects/bay", "one");
    bump(&tree, "/objects/bay/one");
    assert_eq!(client.drain().len(), 1);
    identity_holds(&tree, &sub);
}

#[test]
fn a_star_subtree_subscription_follows_a_plug_and_unplug() {
    let tree = test_tree();
    tree.create("/objects", "bay", "socket", vec![]).unwrap();
    let client = tree.subscriber("t");
    client
        .subscribe(
            Target::Subtree("/objects/bay".into()),
            ALL,
            SubscribeOptions::default(),
        )
        .unwrap();
    lamp(&tree, "/objects/bay", "dev");
    tree.set("/objects/bay/dev", "power", Value::from(true))
        .unwrap();
    tree.delete("/objects/bay/dev").unwrap();
    assert_eq!(
        sources_and_notifiers(&client.drain()),
        [
            ("/objects/bay".into(), "child-added".into()),
            ("/objects/bay/dev".into(), "property-changed".into()),
            ("/objects/bay".into(), "child-removed".into()),
        ]
    );
}

#[test]
fn a_filter_passes_only_events_whose_fields_are_equal() {
    let tree = test_tree();
    lamp(&tree, "/objects", "l");
    let client = tree.subscriber("t");
    let sub = client
        .subscribe(
            Target::Subtree("/objects".into()),
            "property-changed",
            SubscribeOptions {
                filter: vec![("property".into(), Value::Str("power".into()))],
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    tree.set("/objects/l", "watts", Value::from(60u32)).unwrap();
    tree.set("/objects/l", "power", Value::from(true)).unwrap();
    tree.set("/objects/l", "brightness", Value::from(3u32))
        .unwrap();
    tree.set("/objects/l", "power", Value::from(false)).unwrap();
    let got = client.drain();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|d| d.event.data.field("property") == Some(&Value::Str("power".into())))
    );
    // Filtered-out events are not matched, and so not counted anywhere.
    assert_eq!(count(&tree, &sub, "matched"), 2);
    assert_eq!(
        prop(&tree, &sub, "filter"),
        Value::map([("property", Value::Str("power".into()))])
    );
    identity_holds(&tree, &sub);

    // A filter value is coerced as the payload field's kind: `n` is a uint64.
    let ticks = client
        .subscribe(
            Target::Object("l".into()),
            "tick",
            SubscribeOptions {
                filter: vec![("n".into(), Value::Int(2))],
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    for _ in 0..3 {
        bump(&tree, "/objects/l");
    }
    let got = client.drain();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.data.field("n"), Some(&Value::UInt(2)));
    assert_eq!(count(&tree, &ticks, "matched"), 1);
}

#[test]
fn bad_subscriptions_are_refused_with_clear_errors_and_make_nothing() {
    let tree = test_tree();
    lamp(&tree, "/objects", "l");
    let client = tree.subscriber("t");
    let with = |filter: Vec<(&str, Value)>| SubscribeOptions {
        filter: filter.into_iter().map(|(f, v)| (f.to_owned(), v)).collect(),
        ..SubscribeOptions::default()
    };
    let before = tree.subscriptions();
    let children = tree.lookup("/subscriptions").unwrap().children().len();

    // A field the payload does not have: the error names the fields it has.
    let e = client
        .subscribe(
            Target::Object("l".into()),
            "tick",
            with(vec![("count", Value::UInt(1))]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::NoFilterField { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("'count'") && text.contains("'tick'") && text.contains("fields: n"),
        "{text}"
    );
    // The right field with the wrong type.
    let e = client
        .subscribe(
            Target::Subtree("/objects".into()),
            "property-changed",
            with(vec![("property", Value::UInt(3))]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::WrongType { .. }), "{e:?}");
    assert!(e.to_string().contains("property"), "{e}");
    // An unknown notifier, with or without a filter, on each scope.
    for target in [
        Target::Object("l".into()),
        Target::Type("lamp".into()),
        Target::Subtree("/objects".into()),
    ] {
        let e = client
            .subscribe(target.clone(), "nope", with(vec![("n", Value::UInt(1))]))
            .unwrap_err();
        assert!(
            matches!(e, Error::PropertyNotFound { .. }),
            "{target:?}: {e:?}"
        );
    }
    // A value, not a notifier.
    let e = client
        .subscribe(
            Target::Object("l".into()),
            "watts",
            SubscribeOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::NotANotifier { .. }), "{e:?}");
    // Rate limits and lingers out of range.
    for (min_interval_ms, linger_s) in [
        (Some(0), None),
        (Some(qom::MAX_MIN_INTERVAL_MS + 1), None),
        (None, Some(0)),
        (None, Some(qom::MAX_LINGER_S + 1)),
    ] {
        let e = client
            .subscribe(
                Target::Object("l".into()),
                "tick",
                SubscribeOptions {
                    min_interval_ms,
                    linger_s,
                    ..SubscribeOptions::default()
                },
            )
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("min-interval-ms") || text.contains("linger"),
            "{text}"
        );
    }
    // A subtree of nothing.
    let e = client
        .subscribe(
            Target::Subtree("/objects/none".into()),
            ALL,
            SubscribeOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");

    assert_eq!(tree.subscriptions(), before);
    assert_eq!(
        tree.lookup("/subscriptions").unwrap().children().len(),
        children
    );
}

#[test]
fn a_rate_limit_delivers_the_newest_event_per_source_after_the_interval() {
    let tree = test_tree();
    lamp(&tree, "/objects", "a");
    lamp(&tree, "/objects", "b");
    let client = tree.subscriber("t");
    let sub = client
        .subscribe(
            Target::Type("lamp".into()),
            "tick",
            SubscribeOptions {
                min_interval_ms: Some(200),
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    assert_eq!(count(&tree, &sub, "min-interval-ms"), 200);
    let started = Instant::now();
    for _ in 0..5 {
        bump(&tree, "/objects/a");
    }
    bump(&tree, "/objects/b");
    // The first of each source goes at once; a's newest waits out the interval.
    let first = client.drain();
    assert_eq!(
        first
            .iter()
            .map(|d| (&*d.event.source, d.event.data.field("n").cloned()))
            .collect::<Vec<_>>(),
        [
            ("/objects/a", Some(Value::UInt(1))),
            ("/objects/b", Some(Value::UInt(1)))
        ]
    );
    assert_eq!(count(&tree, &sub, "pending"), 1);
    assert_eq!(count(&tree, &sub, "coalesced"), 3);
    identity_holds(&tree, &sub);
    let later = drain_n(&client, 1, Duration::from_secs(5));
    assert_eq!(later.len(), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "held for the interval"
    );
    assert_eq!(later[0].event.data.field("n"), Some(&Value::UInt(5)));
    // Numbered in the subscription's order: a's five were 1..5 (2..4 coalesced), b's 6.
    assert_eq!(later[0].sequence, 5);
    assert_eq!(first[1].sequence, 6);
    assert_eq!(count(&tree, &sub, "delivered"), 3);
    assert_eq!(count(&tree, &sub, "dropped"), 0);
    assert_eq!(count(&tree, &sub, "coalesced"), 3);
    identity_holds(&tree, &sub);
}

#[test]
fn sequence_numbers_show_drops_as_gaps_and_dropped_stays_exact() {
    let tree = test_tree();
    lamp(&tree, "/objects", "l");
    let client = tree.subscriber("t");
    let sub = client
        .subscribe(
            Target::Object("l".into()),
            "tick",
            SubscribeOptions {
                queue_limit: Some(3),
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    for _ in 0..5 {
        bump(&tree, "/objects/l");
    }
    let seqs = |got: Vec<Delivery>| got.iter().map(|d| d.sequence).collect::<Vec<_>>();
    assert_eq!(seqs(client.drain()), [1, 2, 3]);
    assert_eq!(count(&tree, &sub, "dropped"), 2);
    bump(&tree, "/objects/l");
    assert_eq!(seqs(client.drain()), [6], "the gap 4..5 is the two dropped");
    identity_holds(&tree, &sub);
}

#[test]
fn a_lingering_subscription_keeps_its_queue_until_its_token_adopts_it() {
    let tree = test_tree();
    lamp(&tree, "/objects", "l");
    let first = tree.subscriber("qmp:1");
    let made = first
        .subscribe_full(
            Target::Subtree("/objects".into()),
            "tick",
            SubscribeOptions {
                linger_s: Some(60),
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    let token = made
        .token
        .clone()
        .expect("a lingering subscription has a token");
    assert!(token.len() >= 32, "{token}");
    let sub = made.path;
    assert_eq!(count(&tree, &sub, "linger"), 60);
    bump(&tree, "/objects/l");
    bump(&tree, "/objects/l");
    assert_eq!(prop(&tree, &sub, "lingering"), Value::Bool(false));
    // While its owner is there, nobody adopts it, not even with the token.
    let second = tree.subscriber("qmp:2");
    assert!(matches!(
        second.adopt(&sub, &token),
        Err(Error::NotAdoptable { .. })
    ));
    // The owner goes with two events undelivered; three more happen meanwhile.
    drop(first);
    assert_eq!(prop(&tree, &sub, "lingering"), Value::Bool(true));
    for _ in 0..3 {
        bump(&tree, "/objects/l");
    }
    assert_eq!(count(&tree, &sub, "pending"), 5);
    identity_holds(&tree, &sub);
    // The wrong token, a path that is no subscription, a missing one: refused, no change.
    for (path, tok) in [
        (sub.as_str(), "0".repeat(token.len())),
        (sub.as_str(), String::new()),
        ("/objects/l", token.clone()),
        ("/subscriptions/999", token.clone()),
    ] {
        let e = second.adopt(path, &tok).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NotAdoptable { .. }
                    | Error::NotASubscription { .. }
                    | Error::NotFound { .. }
            ),
            "{path}: {e:?}"
        );
    }
    assert!(second.drain().is_empty());
    assert_eq!(prop(&tree, &sub, "lingering"), Value::Bool(true));
    // The right token: all five, in order, numbered 1..5, and the adopter owns it.
    assert_eq!(second.adopt(&sub, &token).unwrap(), sub);
    let got = second.drain();
    assert_eq!(
        got.iter().map(|d| d.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        got.iter()
            .map(|d| d.event.data.field("n").cloned().unwrap())
            .collect::<Vec<_>>(),
        (1..=5).map(Value::UInt).collect::<Vec<_>>()
    );
    assert!(got.iter().all(|d| &*d.owner == "qmp:2"));
    assert_eq!(prop(&tree, &sub, "owner"), Value::Str("qmp:2".into()));
    assert_eq!(prop(&tree, &sub, "lingering"), Value::Bool(false));
    assert_eq!(second.subscriptions(), std::slice::from_ref(&sub));
    // Adopted once, it is not adoptable again while its new owner is there.
    let third = tree.subscriber("qmp:3");
    assert!(third.adopt(&sub, &token).is_err());
    bump(&tree, "/objects/l");
    assert_eq!(second.drain()[0].sequence, 6);
    // Its new owner leaves too: it lingers again, and the same token adopts it again.
    drop(second);
    bump(&tree, "/objects/l");
    third.adopt(&sub, &token).unwrap();
    assert_eq!(third.drain()[0].sequence, 7);
    identity_holds(&tree, &sub);
}

#[test]
fn an_unadopted_subscription_goes_when_its_linger_runs_out() {
    let tree = test_tree();
    lamp(&tree, "/objects", "l");
    let first = tree.subscriber("qmp:1");
    let made = first
        .subscribe_full(
            Target::Object("l".into()),
            ALL,
            SubscribeOptions {
                linger_s: Some(1),
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    // Without linger there is no token, and the subscription dies with its owner.
    let plain = first
        .subscribe_full(Target::Object("l".into()), ALL, SubscribeOptions::default())
        .unwrap();
    assert_eq!(plain.token, None);
    drop(first);
    assert!(tree.lookup(&plain.path).is_err());
    assert!(tree.lookup(&made.path).is_ok(), "it lingers");
    bump(&tree, "/objects/l");
    let end = Instant::now() + Duration::from_secs(10);
    while tree.lookup(&made.path).is_ok() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(tree.lookup(&made.path).is_err(), "gone after its linger");
    assert!(tree.subscriptions().is_empty());
    let late = tree.subscriber("qmp:2");
    assert!(matches!(
        late.adopt(&made.path, made.token.as_deref().unwrap()),
        Err(Error::NotFound { .. })
    ));
}
