//! Emitting with nobody listening never allocates (checked with a counting allocator).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::test_tree;
use qom::{SubscribeOptions, Target, Value};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// thread-local `Cell`, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we forward.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn emitting_without_listeners_does_not_allocate() {
    let tree = test_tree();
    let lamp = tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    tree.create("/objects", "other", "lamp", vec![]).unwrap();
    let tick = lamp.notifier("tick").unwrap();
    let emit_many = || {
        for i in 0..10_000u64 {
            tick.emit(|| Value::map([("n", Value::UInt(i))]));
        }
    };
    assert_eq!(allocations_during(emit_many), 0, "no subscription at all");

    // Subscriptions to another notifier of the same object, and to the same notifier of
    // another object, do not make this emission allocate either.
    let client = tree.subscriber("c");
    client
        .subscribe(
            Target::Object("/objects/lamp".into()),
            "property-changed",
            SubscribeOptions::default(),
        )
        .unwrap();
    client
        .subscribe(
            Target::Object("/objects/other".into()),
            "tick",
            SubscribeOptions::default(),
        )
        .unwrap();
    assert_eq!(allocations_during(emit_many), 0, "listeners elsewhere");

    // The check is real: with a listener, emitting allocates the event.
    client
        .subscribe(
            Target::Object("/objects/lamp".into()),
            "tick",
            SubscribeOptions::default(),
        )
        .unwrap();
    assert!(allocations_during(|| tick.emit(|| Value::map([("n", Value::UInt(1))]))) > 0);
}

#[test]
fn an_event_every_filter_refuses_allocates_nothing_with_emit_fields() {
    let tree = test_tree();
    let lamp = tree.create("/objects", "lamp", "lamp", vec![]).unwrap();
    let tick = lamp.notifier("tick").unwrap();
    let client = tree.subscriber("c");
    // Wide scopes elsewhere, and two filtered subscriptions covering the lamp.
    tree.create("/objects", "other", "lamp", vec![]).unwrap();
    client
        .subscribe(
            Target::Object("/objects/other".into()),
            qom::ALL,
            SubscribeOptions::default(),
        )
        .unwrap();
    for (target, n) in [
        (Target::Object("/objects/lamp".into()), 1_000_000u64),
        (Target::Subtree("/objects".into()), 2_000_000),
    ] {
        client
            .subscribe(
                target,
                "tick",
                SubscribeOptions {
                    filter: vec![("n".into(), Value::UInt(n))],
                    ..SubscribeOptions::default()
                },
            )
            .unwrap();
    }
    let emit_many = || {
        for i in 0..10_000u64 {
            tick.emit_fields(|| [("n", Value::UInt(i))]);
        }
    };
    assert_eq!(
        allocations_during(emit_many),
        0,
        "every filter refused them"
    );
    // The same event that one filter lets through is delivered, payload and all.
    assert!(allocations_during(|| tick.emit_fields(|| [("n", Value::UInt(1_000_000))])) > 0);
    let got = client.drain();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].event.data,
        Value::map([("n", Value::UInt(1_000_000))])
    );
}
