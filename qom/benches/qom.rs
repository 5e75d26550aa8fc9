//! `scripts/bench qom`: figures of the object model. Prints `bench: NAME VALUE UNIT` lines
//! and `ratio: NAME VALUE` where a baseline is measured in the same run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use qom::{
    ALL, Field, Kind, NotifierDecl, PhasePolicy, Property, SubscribeOptions, Subscriber, Target,
    Tree, TypeInfo, Value,
};

/// Counts live heap bytes, to measure the tree's memory per object; only while
/// `COUNTING` is on, so that the atomic updates do not weigh on the other figures.
struct Counting;
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE_BYTES.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// plain atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we forward.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: `ptr` was allocated by `System` with `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn bench(name: &str, value: f64, unit: &str) {
    println!("bench: {name} {value:.1} {unit}");
}

fn ratio(name: &str, value: f64) {
    println!("ratio: {name} {value:.2}");
}

/// A device-like type: three stored properties (one notifying), one computed, a notifier.
fn bench_tree() -> Tree {
    let b = Tree::builder();
    b.register(
        TypeInfo::new("bench-device", "object")
            .implements("user-creatable")
            .property(Property::new("enabled", Kind::Bool).notifying())
            .property(Property::new("addr", Kind::uint32()).policy(PhasePolicy::BeforeRealize))
            .property(Property::new("label", Kind::Str))
            .property(Property::new("answer", Kind::uint8()).getter(|_| Ok(Value::UInt(42))))
            .notifier(NotifierDecl::new(
                "tick",
                Kind::structure("Tick", vec![Field::new("n", Kind::uint64(), "")]),
            )),
    )
    .expect("bench type");
    // Another type, for wide subscriptions that must not reach bench-device objects.
    b.register(TypeInfo::new("bench-other", "bench-device").implements("user-creatable"))
        .expect("other type");
    b.build().expect("bench tree")
}

/// A tree of `groups` containers under /objects with `per_group` devices each.
fn populate(tree: &Tree, groups: usize, per_group: usize) -> Vec<String> {
    let mut paths = Vec::with_capacity(groups * per_group);
    for g in 0..groups {
        tree.create("/objects", &format!("group{g}"), "bench-device", vec![])
            .expect("group");
        let parent = format!("/objects/group{g}");
        for i in 0..per_group {
            tree.create(&parent, &format!("dev{i}"), "bench-device", vec![])
                .expect("device");
            paths.push(format!("{parent}/dev{i}"));
        }
    }
    paths
}

/// Nanoseconds per lookup of `paths`, best of several rounds.
fn time_lookups(tree: &Tree, paths: &[String], total: usize) -> f64 {
    let rounds = 7;
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let start = Instant::now();
        let mut done = 0;
        while done < total {
            for p in paths {
                black_box(tree.lookup(black_box(p)).expect("lookup"));
            }
            done += paths.len();
        }
        best = best.min(start.elapsed().as_nanos() as f64 / done as f64);
    }
    best
}

/// Wide subscriptions on objects other than `/objects/d`: a `*` subtree, a `*` object and
/// a `*` type subscription, none of which covers it.
fn wide_elsewhere(tree: &Tree, client: &Subscriber) {
    tree.create("/objects", "group", "bench-device", vec![])
        .expect("group");
    for i in 0..10 {
        tree.create("/objects/group", &format!("dev{i}"), "bench-device", vec![])
            .expect("device");
    }
    tree.create("/objects", "other", "bench-other", vec![])
        .expect("other");
    for target in [
        Target::Subtree("/objects/group".into()),
        Target::Object("/objects/group/dev3".into()),
        Target::Type("bench-other".into()),
    ] {
        client
            .subscribe(target, ALL, SubscribeOptions::default())
            .expect("wide sub");
    }
}

/// Nanoseconds per call of `f(i)` for `i` in `0..n`, best of five rounds.
fn best_per_call(n: u64, mut f: impl FnMut(u64)) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for i in 0..n {
            f(i);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

/// Nanoseconds per `tick` emission of `/objects/d`, best of five rounds.
fn time_emits(tick: &qom::Notifier, n: u64) -> f64 {
    best_per_call(n, |i| {
        tick.emit(|| Value::map([("n", Value::UInt(black_box(i)))]));
    })
}

/// A bench tree with one device, `/objects/d`, and its `tick` notifier.
fn tree_with_d() -> (Tree, qom::Notifier) {
    let tree = bench_tree();
    let obj = tree
        .create("/objects", "d", "bench-device", vec![])
        .expect("device");
    let tick = obj.notifier("tick").expect("tick");
    (tree, tick)
}

fn emit_no_subscriber() {
    let (tree, tick) = tree_with_d();
    // A subscription elsewhere on the object, so the check is the real one, not a cold path,
    // and wide-scope subscriptions on other objects of the tree.
    let client = tree.subscriber("bench");
    client
        .subscribe(
            Target::Object("/objects/d".into()),
            "property-changed",
            SubscribeOptions::default(),
        )
        .expect("sub");
    wide_elsewhere(&tree, &client);
    bench("emit_no_subscriber", time_emits(&tick, 20_000_000), "ns");
}

/// An event its subscription's scope matches but its filter does not, emitted as fields
/// (`Notifier::emit_fields`: compared where they are, nothing allocated) and as a payload a
/// closure builds (`Notifier::emit`: the map is built, compared and dropped).
fn emit_filtered_out() {
    let (tree, tick) = tree_with_d();
    let client = tree.subscriber("bench");
    let sub = client
        .subscribe(
            Target::Object("/objects/d".into()),
            "tick",
            SubscribeOptions {
                filter: vec![("n".into(), Value::UInt(u64::MAX))],
                ..SubscribeOptions::default()
            },
        )
        .expect("filtered sub");
    let fields = best_per_call(20_000_000, |i| {
        tick.emit_fields(|| [("n", Value::UInt(black_box(i)))]);
    });
    bench("emit_filtered_out", fields, "ns");
    let filtered_out = time_emits(&tick, 5_000_000);
    bench("emit_filtered_out_built", filtered_out, "ns");
    // Of which the payload itself (the emitter's closure, one allocation), built and
    // dropped alone: what any listener costs the emitter before qomu does anything.
    let payload = best_per_call(5_000_000, |i| {
        black_box(Value::map([("n", Value::UInt(black_box(i)))]));
    });
    bench("emit_payload_build", payload, "ns");
    ratio(
        "emit_filtered_out_built/emit_payload_build",
        filtered_out / payload,
    );
    // It was in scope, and it let nothing through.
    assert_eq!(tree.get(&sub, "matched").expect("matched"), Value::UInt(0));
    assert!(client.drain().is_empty());
}

/// `count` subscriptions on `/objects/d`'s tick; with `wide`, half of them are subtree or
/// `*` subscriptions that cover it (a `*` on it, a subtree of `/objects`, a `*` type
/// subscription, a `*` subtree of it, in turn).
fn emit_with_subscribers(count: usize, wide: bool, name: &str) {
    let (tree, tick) = tree_with_d();
    // One subscriber (connection) per subscription: the most mailboxes to fill.
    let clients: Vec<_> = (0..count)
        .map(|i| tree.subscriber(&format!("client{i}")))
        .collect();
    for (i, c) in clients.iter().enumerate() {
        let (target, notifier) = match (wide && i % 2 == 1, i / 2 % 4) {
            (false, _) => (Target::Object("/objects/d".into()), "tick"),
            (true, 0) => (Target::Object("/objects/d".into()), ALL),
            (true, 1) => (Target::Subtree("/objects".into()), "tick"),
            (true, 2) => (Target::Type("bench-device".into()), ALL),
            (true, _) => (Target::Subtree("/objects/d".into()), ALL),
        };
        c.subscribe(target, notifier, SubscribeOptions::default())
            .expect("sub");
    }
    let mut samples = Vec::new();
    let mut delivered = 0;
    for i in 0..300u64 {
        let start = Instant::now();
        tick.emit(|| Value::map([("n", Value::UInt(i))]));
        samples.push(start.elapsed());
        if i % 100 == 99 {
            delivered += clients.iter().map(|c| c.drain().len()).sum::<usize>();
        }
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    bench(name, median.as_secs_f64() * 1e6, "us");
    // Every emission reached every subscription (none dropped): the full cost was measured.
    assert_eq!(delivered, 300 * count);
}

fn resolve() {
    let small = bench_tree();
    let small_paths = populate(&small, 10, 10);
    let big = bench_tree();
    let big_paths = populate(&big, 100, 1000);
    // The same number of paths, at the same depth, in both trees: the per-request cost
    // as the tree grows.
    let sample: Vec<String> = big_paths
        .iter()
        .step_by(big_paths.len() / small_paths.len())
        .cloned()
        .collect();
    let t_small = time_lookups(&small, &small_paths, 1_000_000);
    let t_big = time_lookups(&big, &sample, 1_000_000);
    bench("resolve_path_100", t_small, "ns");
    bench("resolve_path_100k", t_big, "ns");
    ratio("resolve_path_100k/resolve_path_100", t_big / t_small);
    // Every path of the big tree in turn: mostly cache misses.
    bench(
        "resolve_path_100k_all",
        time_lookups(&big, &big_paths, 1_000_000),
        "ns",
    );
    // A partial path (a unique name) in the big tree.
    let partial = vec!["group42".to_owned()];
    bench(
        "resolve_partial_100k",
        time_lookups(&big, &partial, 1_000_000),
        "ns",
    );
}

fn subscribe_destroy() {
    let tree = bench_tree();
    tree.create("/objects", "d", "bench-device", vec![])
        .expect("device");
    let client = tree.subscriber("bench");
    let n = 100_000;
    let start = Instant::now();
    for _ in 0..n {
        let path = client
            .subscribe(
                Target::Object("/objects/d".into()),
                "tick",
                SubscribeOptions::default(),
            )
            .expect("sub");
        client.unsubscribe(&path).expect("unsub");
    }
    bench(
        "subscribe_destroy",
        n as f64 / start.elapsed().as_secs_f64(),
        "per_s",
    );
}

fn memory_per_object() {
    let tree = bench_tree();
    let n = 100_000;
    tree.create("/objects", "group", "bench-device", vec![])
        .expect("group");
    COUNTING.store(true, Ordering::Relaxed);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 0..n {
        tree.create("/objects/group", &format!("dev{i}"), "bench-device", vec![])
            .expect("device");
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    COUNTING.store(false, Ordering::Relaxed);
    bench(
        "tree_memory_per_object",
        (after - before) as f64 / n as f64,
        "bytes",
    );
    bench("objects_in_tree", tree.object_count() as f64, "objects");
}

fn get_property() {
    let tree = bench_tree();
    tree.create("/objects", "d", "bench-device", vec![])
        .expect("device");
    let n = 1_000_000;
    let start = Instant::now();
    for _ in 0..n {
        black_box(
            tree.get(black_box("/objects/d"), black_box("label"))
                .expect("get"),
        );
    }
    bench(
        "get_property",
        start.elapsed().as_nanos() as f64 / n as f64,
        "ns",
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let started = Instant::now();
    if run("emit") {
        emit_no_subscriber();
        emit_filtered_out();
        emit_with_subscribers(1, false, "emit_1_subscriber");
        emit_with_subscribers(1000, true, "emit_1000_subscribers");
        emit_with_subscribers(1000, false, "emit_1000_subscribers_narrow");
    }
    if run("resolve") {
        resolve();
    }
    if run("get") {
        get_property();
    }
    if run("subscribe") {
        subscribe_destroy();
    }
    if run("memory") {
        memory_per_object();
    }
    eprintln!(
        "qom benchmarks took {:.1?}",
        started.elapsed().max(Duration::ZERO)
    );
}
