//! A seeded random-input test of the QMP input path (run in CI): mutated commands, random
//! bytes, deep nesting and long strings, fed in random chunks. Every output line must be
//! one well-formed response, nothing may panic, and after a recovery byte (the QMP spec's
//! way to resynchronise) a valid command must get its answer.

mod common;

use bus_bridge::qmp::session::Session;
use common::Rng;
use qom::Tree;
use serde_json::Value as Json;

const SEEDS: &[&str] = &[
    r#"{"execute": "qmp_capabilities"}"#,
    r#"{"execute": "qom-list", "arguments": {"path": "/machine"}, "id": 1}"#,
    r#"{"execute": "qom-get", "arguments": {"path": "/objects", "property": "type"}}"#,
    r#"{"execute": "qom-set", "arguments": {"path": "/machine", "property": "type", "value": [1, {"a": null}]}}"#,
    r#"{'execute': 'qom-list-types', 'arguments': {'implements': 'object', 'abstract': true}}"#,
    r#"{"execute": "__org.qomu_subscribe", "arguments": {"type": "object", "notifier": "child-added", "queue-limit": 3}}"#,
    r#"{"execute": "object-add", "arguments": {"qom-type": "container", "id": "x\u00e9\ud83d\ude00"}}"#,
    r#"{"execute": "query-qmp-schema"}"#,
    r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info qtree"}}"#,
    r#"[1.5e10, -0, "\\\"", true, false, null, {}]"#,
];

const NASTY: &[&[u8]] = &[
    b"{", b"}", b"[", b"]", b"\"", b"'", b"\\", b":", b",", b"\x00", b"\xff", b"\xfe", b"\x1b",
    b"\xc3", b"-", b"1e", b"nul", b"%d",
];

fn mutate(rng: &mut Rng) -> Vec<u8> {
    match rng.below(6) {
        0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
        1 => {
            let depth = rng.below(3000);
            let open = if rng.below(2) == 0 { b"[" } else { b"{" };
            let mut v = open.repeat(depth);
            if rng.below(2) == 0 {
                v.extend(b"]".repeat(rng.below(depth + 1)));
            }
            v
        }
        2 => {
            let mut v = b"{\"execute\": \"".to_vec();
            v.extend(std::iter::repeat_n(b'x', rng.below(200_000)));
            v.extend(b"\"}");
            v
        }
        _ => {
            let mut v = rng.pick(SEEDS).as_bytes().to_vec();
            for _ in 0..=rng.below(8) {
                let at = rng.below(v.len() + 1);
                match rng.below(3) {
                    0 => {
                        let junk = *rng.pick(NASTY);
                        v.splice(at..at, junk.iter().copied());
                    }
                    1 if at < v.len() => {
                        v.remove(at);
                    }
                    _ if at < v.len() => v[at] = rng.next() as u8,
                    _ => {}
                }
            }
            if rng.below(4) == 0 {
                v.truncate(rng.below(v.len() + 1));
            }
            v
        }
    }
}

fn check_line(line: &str) {
    let json: Json =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let obj = json
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    let has_return = obj.contains_key("return");
    let has_error = obj.contains_key("error");
    assert!(
        has_return != has_error,
        "exactly one of return and error: {line}"
    );
    assert!(
        obj.keys()
            .all(|k| matches!(k.as_str(), "return" | "error" | "id")),
        "{line}"
    );
    if has_error {
        assert!(
            obj["error"]["class"].is_string() && obj["error"]["desc"].is_string(),
            "{line}"
        );
    }
    assert!(line.is_ascii(), "output must be ASCII: {line}");
}

#[test]
fn random_input_never_breaks_the_session() {
    let tree = Tree::new();
    let mut rng = Rng(0x005e_ed0f_9a11_u64);
    let mut session = Session::new(tree.clone(), 1);
    for round in 0..3000 {
        let input = mutate(&mut rng);
        let mut at = 0;
        while at < input.len() {
            let n = 1 + rng.below(64.min(input.len() - at));
            for line in session.feed(&input[at..at + n]) {
                check_line(&line);
            }
            at += n;
        }
        // Resynchronise as the QMP spec says, then a valid command must be answered.
        let mut last = None;
        for line in session.feed(b"\x1b{\"execute\": \"qmp_capabilities\", \"id\": \"sync\"}") {
            check_line(&line);
            last = Some(line);
        }
        let last: Json = serde_json::from_str(
            &last.unwrap_or_else(|| panic!("round {round}: no answer after resync")),
        )
        .unwrap();
        assert_eq!(last["id"], "sync", "round {round}: {last}");
        for line in session.drain_events() {
            serde_json::from_str::<Json>(&line).unwrap();
        }
        if round % 500 == 499 {
            session = Session::new(tree.clone(), round as u64);
        }
    }
    // Whatever the rounds created, the tree is consistent and its subscriptions accounted.
    drop(session);
    assert!(tree.subscriptions().is_empty());
}
