//! Many threads at once: emitters, and threads creating and destroying subscriptions and
//! objects, over every scope (object, type, subtree, `*`), with coalescing, rate limits and
//! filters. No deadlock, no panic, and `matched == delivered + dropped + pending + coalesced`
//! for every subscription at every moment, with exact totals for subscriptions that live
//! throughout.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::test_tree;
use qom::{ALL, SubscribeOptions, Target, Tree, Value, subscription_of};

const RUN_FOR: Duration = Duration::from_secs(3);
const EMITTERS: usize = 4;

fn check_identity(tree: &Tree) -> usize {
    let mut checked = 0;
    for path in tree.subscriptions() {
        // It may be destroyed between listing and reading: that is fine.
        let Ok(obj) = tree.lookup(&path) else {
            continue;
        };
        let Ok(sub) = subscription_of(&obj) else {
            continue;
        };
        let c = sub.counters();
        assert_eq!(
            c.matched,
            c.delivered + c.dropped + c.pending + c.coalesced,
            "{path}: {c:?}"
        );
        checked += 1;
    }
    checked
}

#[test]
fn emitters_and_churn_in_parallel() {
    let tree = test_tree();
    // Stable objects every emitter hits; the churn threads add and remove others.
    for i in 0..4 {
        tree.create("/objects", &format!("stable{i}"), "lamp", vec![])
            .unwrap();
    }
    // Subscriptions that live through the whole run, with a small queue so that drops
    // happen, drained by their own thread: plain, coalescing, rate-limited, and a rate
    // limit with coalescing.
    let watcher = Arc::new(tree.subscriber("watcher"));
    let stable_subs: Vec<String> = (0..4)
        .map(|i| {
            watcher
                .subscribe(
                    Target::Object(format!("/objects/stable{i}")),
                    "tick",
                    SubscribeOptions {
                        queue_limit: Some(64),
                        coalesce: i % 2 == 1,
                        min_interval_ms: (i >= 2).then_some(1),
                        ..SubscribeOptions::default()
                    },
                )
                .unwrap()
        })
        .collect();
    let by_type = watcher
        .subscribe(
            Target::Type("appliance".into()),
            "tick",
            SubscribeOptions::default(),
        )
        .unwrap();
    // Wide scopes that see the churned objects come and go as well as the stable ones.
    let wide = [
        watcher
            .subscribe(
                Target::Subtree("/objects".into()),
                ALL,
                SubscribeOptions {
                    queue_limit: Some(256),
                    ..SubscribeOptions::default()
                },
            )
            .unwrap(),
        watcher
            .subscribe(
                Target::Type("lamp".into()),
                ALL,
                SubscribeOptions {
                    min_interval_ms: Some(2),
                    coalesce: true,
                    ..SubscribeOptions::default()
                },
            )
            .unwrap(),
        watcher
            .subscribe(
                Target::Subtree("/objects".into()),
                "property-changed",
                SubscribeOptions {
                    filter: vec![("property".into(), Value::Str("power".into()))],
                    ..SubscribeOptions::default()
                },
            )
            .unwrap(),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let emitted_stable = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel::<&'static str>();
    let mut handles = Vec::new();

    for _ in 0..EMITTERS {
        let (tree, stop, emitted, done) = (
            tree.clone(),
            stop.clone(),
            emitted_stable.clone(),
            done_tx.clone(),
        );
        handles.push(thread::spawn(move || {
            let stable: Vec<_> = (0..4)
                .map(|i| {
                    tree.lookup(&format!("/objects/stable{i}"))
                        .unwrap()
                        .notifier("tick")
                        .unwrap()
                })
                .collect();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for t in &stable {
                    t.emit(|| Value::map([("n", Value::UInt(n))]));
                    n += 1;
                }
                emitted.fetch_add(stable.len() as u64, Ordering::Relaxed);
                // Also emit on whatever churn objects exist right now.
                if n.is_multiple_of(64) {
                    for obj in tree
                        .lookup("/objects")
                        .unwrap()
                        .children()
                        .into_iter()
                        .filter(|o| !o.name().starts_with("stable"))
                    {
                        if let Ok(t) = obj.notifier("tick") {
                            t.emit(|| Value::map([("n", Value::UInt(0))]));
                        }
                        let _ = obj.set("power", n.is_multiple_of(128));
                    }
                }
            }
            done.send("emitter").unwrap();
        }));
    }

    // Two churn threads: create/destroy objects and subscriptions, through their own
    // subscribers that are themselves dropped and recreated.
    for c in 0..2 {
        let (tree, stop, done) = (tree.clone(), stop.clone(), done_tx.clone());
        handles.push(thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let client = tree.subscriber(&format!("churn{c}"));
                let name = format!("churn{c}-{round}");
                let path = format!("/objects/{name}");
                let _ = tree.create("/objects", &name, "lamp", vec![]);
                let opts = SubscribeOptions {
                    queue_limit: Some(8),
                    coalesce: round.is_multiple_of(2),
                    ..SubscribeOptions::default()
                };
                let wide = if round.is_multiple_of(2) {
                    Target::Subtree("/objects".into())
                } else {
                    Target::Type("lamp".into())
                };
                let _ = client.subscribe(wide, ALL, opts.clone());
                let _ = client.subscribe(
                    Target::Subtree(path.clone()),
                    "tick",
                    SubscribeOptions {
                        min_interval_ms: Some(1),
                        ..opts.clone()
                    },
                );
                let s1 = client.subscribe(Target::Object(path.clone()), "tick", opts.clone());
                let _ = client.subscribe(
                    Target::Type("lamp".into()),
                    "property-changed",
                    opts.clone(),
                );
                let _ = client.subscribe(Target::Object("/objects/stable0".into()), "tick", opts);
                let _ = tree.call(&path, "bump", [("by".to_owned(), Value::UInt(1))].into());
                let _ = client.drain();
                if round.is_multiple_of(3)
                    && let Ok(s) = s1
                {
                    let _ = client.unsubscribe(&s);
                }
                let _ = tree.delete(&path);
                if round.is_multiple_of(2) {
                    drop(client); // destroys the rest
                } else {
                    client.close();
                }
                round += 1;
            }
            done.send("churn").unwrap();
        }));
    }

    // The watcher drains while everything runs; a checker verifies the identity live.
    let delivered_stable = Arc::new(AtomicU64::new(0));
    {
        let (watcher, stop, delivered, done, stable_subs) = (
            watcher.clone(),
            stop.clone(),
            delivered_stable.clone(),
            done_tx.clone(),
            stable_subs.clone(),
        );
        handles.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                watcher.wait(Duration::from_millis(5));
                let n = watcher
                    .drain()
                    .iter()
                    .filter(|d| stable_subs.iter().any(|s| **s == *d.subscription))
                    .count();
                delivered.fetch_add(n as u64, Ordering::Relaxed);
                thread::sleep(Duration::from_micros(200));
            }
            done.send("drainer").unwrap();
        }));
    }
    {
        let (tree, stop, done) = (tree.clone(), stop.clone(), done_tx.clone());
        handles.push(thread::spawn(move || {
            let mut checks = 0;
            while !stop.load(Ordering::Relaxed) {
                checks += check_identity(&tree);
            }
            assert!(checks > 0);
            done.send("checker").unwrap();
        }));
    }
    drop(done_tx);

    let started = Instant::now();
    thread::sleep(RUN_FOR);
    stop.store(true, Ordering::Relaxed);
    // Every thread must finish soon after: a deadlock fails here instead of hanging.
    for _ in 0..handles.len() {
        let left =
            Duration::from_secs(30).saturating_sub(started.elapsed().saturating_sub(RUN_FOR));
        done_rx
            .recv_timeout(left)
            .expect("a thread did not finish: deadlock or panic");
    }
    for h in handles {
        h.join().expect("a thread panicked");
    }

    // Final accounting for the subscriptions that lived throughout, once the rate limits'
    // held events have gone on.
    thread::sleep(Duration::from_millis(50));
    check_identity(&tree);
    let late = watcher
        .drain()
        .iter()
        .filter(|d| stable_subs.iter().any(|s| **s == *d.subscription))
        .count() as u64;
    let delivered = delivered_stable.load(Ordering::Relaxed) + late;
    let mut total = qom::Counters::default();
    for s in &stable_subs {
        let c = subscription_of(&tree.lookup(s).unwrap())
            .unwrap()
            .counters();
        assert_eq!(c.pending, 0);
        total.matched += c.matched;
        total.delivered += c.delivered;
        total.dropped += c.dropped;
        total.coalesced += c.coalesced;
    }
    let emitted = emitted_stable.load(Ordering::Relaxed);
    assert!(emitted > 1000, "the emitters ran ({emitted})");
    // Every emission on a stable object matched exactly its one stable subscription.
    assert_eq!(total.matched, emitted);
    assert_eq!(total.delivered, delivered);
    assert_eq!(total.delivered + total.dropped + total.coalesced, emitted);
    assert!(
        total.coalesced > 0,
        "coalescing and the rate limits held some back"
    );
    let c = subscription_of(&tree.lookup(&by_type).unwrap())
        .unwrap()
        .counters();
    assert_eq!(c.matched, c.delivered + c.dropped + c.pending + c.coalesced);
    assert!(
        c.matched >= emitted,
        "the type subscription saw the stable objects' events too"
    );
    let wide: Vec<_> = wide
        .iter()
        .map(|s| {
            subscription_of(&tree.lookup(s).unwrap())
                .unwrap()
                .counters()
        })
        .collect();
    assert!(
        wide[0].matched >= emitted,
        "the subtree `*` subscription saw every tick: {wide:?}"
    );
    assert!(wide[1].coalesced > 0, "the rate-limited `*` held some back");
    assert!(
        wide[2].matched > 0,
        "the filter let `power` changes through"
    );

    // Everything churned is gone again.
    drop(watcher);
    assert!(
        tree.subscriptions().is_empty(),
        "{:?}",
        tree.subscriptions()
    );
    let left: Vec<_> = tree
        .lookup("/objects")
        .unwrap()
        .children()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    assert_eq!(left, ["stable0", "stable1", "stable2", "stable3"]);
}
