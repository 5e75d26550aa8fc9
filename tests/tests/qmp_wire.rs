//! QMP on the wire against a real qomu: exact bytes and texts, the limits that protect the
//! VMM, many clients at once, and clients that misbehave. The VMM must stay up and
//! consistent through all of it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use qomu_tests::{QmpRaw, Qomu, require_kvm};
use serde_json::{Value as Json, json};

fn guest(name: &str) -> String {
    qomu_guests::path(name).display().to_string()
}

#[test]
fn greeting_framing_and_socket_mode() {
    let q = Qomu::spawn(&["-S"]);
    let mode = std::fs::metadata(&q.qmp).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the QMP socket is private");
    let mut c = q.connect();
    assert_eq!(
        serde_json::to_string(&c.greeting).unwrap(),
        format!(
            r#"{{"QMP":{{"version":{{"qemu":{{"micro":0,"minor":1,"major":10}},"package":"qomu {}"}},"capabilities":[]}}}}"#,
            env!("CARGO_PKG_VERSION")
        )
    );
    // Replies are single lines with QEMU's spacing, CRLF-terminated, the id echoed as given.
    c.send(r#"{"execute": "qmp_capabilities", "id": {"seq": [1, "two"]}}"#);
    assert_eq!(
        c.read_line(),
        r#"{"return": {}, "id": {"seq": [1, "two"]}}"#
    );
    // Commands may come with no newline and split anywhere, several in one write.
    c.send(r#"{"execute":"query-status","id":1}{"exec"#);
    c.send(r#"ute":"query-name","id":2}"#);
    assert_eq!(
        c.read_line(),
        r#"{"return": {"running": false, "status": "prelaunch"}, "id": 1}"#
    );
    assert_eq!(c.read_line(), r#"{"return": {}, "id": 2}"#);
}

#[test]
fn error_paths_have_qemus_texts() {
    require_kvm!();
    let q = Qomu::spawn(&[
        "--kernel",
        &guest("spin"),
        "--append",
        "iters=1000000000",
        "--device",
        "isa-debug-exit",
    ]);
    let mut c = q.connect();
    let cases_before: &[(&str, Json)] = &[(
        r#"{"execute": "query-status", "id": "a"}"#,
        json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": "a"}),
    )];
    for (input, expected) in cases_before {
        assert_eq!(&c.cmd(input), expected, "{input}");
    }
    c.negotiate();
    // A second object of the name makes the partial path ambiguous.
    let r = c.cmd(
        r#"{"execute": "object-add", "arguments": {"qom-type": "rng-builtin", "id": "serial0"}}"#,
    );
    assert_eq!(r, json!({"return": {}}));
    let e = |class: &str, desc: &str| json!({"error": {"class": class, "desc": desc}});
    let cases: &[(&str, Json)] = &[
        (
            r#"{"execute": "frobnicate"}"#,
            e(
                "CommandNotFound",
                "The command frobnicate has not been found",
            ),
        ),
        (
            r#"{"execute": "qmp_capabilities"}"#,
            e(
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored",
            ),
        ),
        (
            r#"{"execute": "qom-get", "arguments": {"path": "/machine", "property": }}"#,
            e("GenericError", "JSON parse error, expecting value"),
        ),
        (
            r#"["execute"]"#,
            e("GenericError", "QMP input must be a JSON object"),
        ),
        (
            r#"{"execute": ["stop"]}"#,
            e(
                "GenericError",
                "QMP input member 'execute' must be a string",
            ),
        ),
        (
            r#"{"execute": "qom-list", "arguments": {"path": 5}}"#,
            e(
                "GenericError",
                "Invalid parameter type for 'path', expected: string",
            ),
        ),
        (
            r#"{"execute": "qom-list", "arguments": {}}"#,
            e("GenericError", "Parameter 'path' is missing"),
        ),
        (
            r#"{"execute": "qom-list", "arguments": {"path": "/machine/nope"}}"#,
            e("DeviceNotFound", "Device '/machine/nope' not found"),
        ),
        (
            r#"{"execute": "qom-list", "arguments": {"path": "serial0"}}"#,
            e("GenericError", "Path 'serial0' is ambiguous"),
        ),
        (
            r#"{"execute": "qom-get", "arguments": {"path": "serial0", "property": "type"}}"#,
            e("DeviceNotFound", "Device 'serial0' not found"),
        ),
        (
            r#"{"execute": "qom-set", "arguments": {"path": "/machine/unattached/serial0", "property": "iobase", "value": 760}}"#,
            e(
                "GenericError",
                "Attempt to set property 'iobase' on device 'serial0' (type 'isa-serial') after it was realized",
            ),
        ),
        (
            r#"{"execute": "qom-set", "arguments": {"path": "/machine", "property": "cpus", "value": 2}}"#,
            e(
                "GenericError",
                "property 'cpus' of '/machine' can only be set while the machine is in prelaunch; the machine is running",
            ),
        ),
        (
            r#"{"execute": "qom-set", "arguments": {"path": "/machine", "property": "status", "value": "paused"}}"#,
            e(
                "GenericError",
                "Property 'qomu-x86-machine.status' is not writable",
            ),
        ),
        (
            r#"{"execute": "memsave", "arguments": {"val": 0, "size": 16, "filename": "/tmp/x", "cpu-index": -1}}"#,
            e("GenericError", "Parameter 'cpu-index' expects uint32"),
        ),
        (
            r#"{"execute": "cont", "arguments": {"now": true}}"#,
            e("GenericError", "Parameter 'now' is unexpected"),
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(&c.cmd(input), expected, "{input}");
    }
    // A stray byte: one error, then the stream goes on.
    c.send("\u{1}");
    assert_eq!(
        c.reply(),
        e("GenericError", "JSON parse error, stray '\u{1}'")
    );
    assert_eq!(
        c.cmd(r#"{"execute": "query-status"}"#)["return"]["status"],
        "running"
    );
}

#[test]
fn oversized_and_deeply_nested_input_is_refused() {
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.connect();
    c.negotiate();
    // More than 64 MiB in one message.
    let writer = {
        let mut s = c.stream.try_clone().unwrap();
        std::thread::spawn(move || {
            s.write_all(br#"{"execute": "qom-get", "arguments": {"path": ""#)
                .unwrap();
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..65 {
                s.write_all(&chunk).unwrap();
            }
            s.write_all(br#"", "property": "type"}}"#).unwrap();
        })
    };
    assert_eq!(
        c.reply(),
        json!({"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}})
    );
    writer.join().unwrap();
    // The rest of that message is garbage to the parser; resynchronise and go on.
    c.send("\u{1b}");
    c.send(r#"{"execute": "query-status", "id": "after-big"}"#);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.reply();
        if r.get("id") == Some(&json!("after-big")) {
            assert_eq!(r["return"]["status"], "prelaunch");
            break;
        }
        assert!(Instant::now() < deadline);
    }
    // Nesting beyond 1024.
    c.send(&"[".repeat(1025));
    assert_eq!(
        c.reply(),
        json!({"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}})
    );
    // The recovery byte itself is a lexical error (clients ignore that reply, as with QEMU).
    c.send("\u{1b}");
    assert_eq!(
        c.reply(),
        json!({"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u{1b}'"}})
    );
    assert_eq!(c.cmd(r#"{"execute": "query-status", "id": 3}"#)["id"], 3);
    // The deepest allowed message is parsed (and refused for what it is, not crashing).
    let deep = format!("{}{}", "[".repeat(1024), "]".repeat(1024));
    c.send(&deep);
    assert_eq!(
        c.reply(),
        json!({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
    );
    assert_eq!(c.cmd(r#"{"execute": "query-status", "id": 4}"#)["id"], 4);
}

#[test]
fn many_clients_come_and_go_while_another_subscribes() {
    require_kvm!();
    let q = Qomu::spawn(&[
        "--kernel",
        &guest("spin"),
        "--append",
        "iters=1000000000 step=2000",
        "--device",
        "isa-debug-exit",
    ]);
    let path = q.qmp.clone();
    let churn = std::thread::spawn(move || {
        for i in 0..50 {
            let mut c = QmpRaw::connect(&path);
            if i % 2 == 0 {
                c.negotiate();
                let r = c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "serial0", "notifier": "line"}}"#);
                assert!(r["return"]["subscription"].is_string(), "{r}");
                if i % 4 == 0 {
                    // Half of those leave in the middle of a command.
                    c.send(r#"{"execute": "qom-list", "argum"#);
                }
            }
            drop(c);
        }
    });
    let mut main = q.connect();
    main.negotiate();
    let mut mine = Vec::new();
    for _ in 0..30 {
        let r = main.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"type": "isa-serial", "notifier": "line", "queue-limit": 16}}"#);
        mine.push(r["return"]["subscription"].as_str().unwrap().to_owned());
        let r = main.cmd(
            r#"{"execute": "qom-get", "arguments": {"path": "/machine", "property": "status"}}"#,
        );
        assert_eq!(r["return"], "running");
    }
    churn.join().unwrap();
    // Only this client's subscriptions remain (its 30 and its lifecycle ones).
    let expected = 30 + bus_bridge::qmp::session::LIFECYCLE_EVENTS.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let subs = main.cmd(r#"{"execute": "qom-list", "arguments": {"path": "/subscriptions"}}"#);
        let n = subs["return"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["type"] == "child<subscription>")
            .count();
        if n == expected {
            break;
        }
        assert!(Instant::now() < deadline, "{n} subscriptions remain");
        std::thread::sleep(Duration::from_millis(20));
    }
    // qom-list-get reads one counter after the other: with the guest still printing, a line
    // matched between two reads would make a consistent subscription look inconsistent.
    // Stopped, nothing matches any more, and deliveries happen only while this client's own
    // commands are answered, after the counters were read.
    main.cmd(r#"{"execute": "stop"}"#);
    main.wait_event("STOP");
    for sub in &mine {
        let r = main.cmd(&format!(
            r#"{{"execute": "qom-list-get", "arguments": {{"paths": ["{sub}"]}}}}"#
        ));
        let props: std::collections::HashMap<String, u64> = r["return"][0]["properties"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| Some((p["name"].as_str()?.to_owned(), p["value"].as_u64()?)))
            .collect();
        assert_eq!(
            props["matched"],
            props["delivered"] + props["dropped"] + props["pending"],
            "{sub}: {props:?}"
        );
    }
    main.cmd(r#"{"execute": "quit"}"#);
}

/// The spin guest printing a line per iteration for `iters` (with `extra` options), a client
/// subscribed to its lines with `queue_limit` and the subscription's path, and a second
/// client, which has started the guest.
fn flood(iters: u64, extra: &[&str], queue_limit: u32) -> (Qomu, QmpRaw, String, QmpRaw) {
    let guest = guest("spin");
    let append = format!("iters={iters} step=1");
    let mut args = vec!["--kernel", &guest, "--append", &append, "-S"];
    args.extend_from_slice(extra);
    let q = Qomu::spawn(&args);
    let mut subscriber = q.connect();
    subscriber.negotiate();
    let r = subscriber.cmd(&format!(
        r#"{{"execute": "__org.qomu_subscribe", "arguments": {{"path": "serial0", "notifier": "line", "queue-limit": {queue_limit}}}}}"#
    ));
    let sub = r["return"]["subscription"].as_str().unwrap().to_owned();
    let mut other = q.connect();
    other.negotiate();
    other.cmd(r#"{"execute": "cont"}"#);
    (q, subscriber, sub, other)
}

#[test]
fn a_client_that_never_reads_loses_events_and_blocks_nobody() {
    require_kvm!();
    // step=1: one line of output per iteration, a flood.
    let (mut q, _sleeper, sub, mut busy) = flood(20000, &["--device", "isa-debug-exit"], 8);
    // From here on the sleeper never reads again.
    let mut worst = Duration::ZERO;
    let mut dropped = 0;
    while q.is_running() {
        let t = Instant::now();
        // The guest may end (and qomu with it) at any moment: stop at the first failure.
        let Some(r) = busy.try_cmd(&format!(
            r#"{{"execute": "qom-get", "arguments": {{"path": "{sub}", "property": "dropped"}}}}"#
        )) else {
            break;
        };
        worst = worst.max(t.elapsed());
        match r["return"].as_u64() {
            Some(d) => dropped = d,
            None => break,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        dropped > 0,
        "events beyond the sleeper's queue were dropped and counted"
    );
    assert!(
        worst < Duration::from_secs(5),
        "other clients kept being served ({worst:?})"
    );
    // The guest ran to its end, and qomu ended on time despite the stuck client.
    assert_eq!(q.wait_exit(Duration::from_secs(30)), Some(1));
}

/// Events for a client that stops reading for a while wait, and reach it whole and in
/// order once it reads again: the event writer leaves what the full socket did not take to
/// the connection's own thread, which sends it before anything newer; another client's
/// commands are answered meanwhile.
#[test]
fn a_client_that_stops_reading_for_a_while_gets_every_event_in_order() {
    require_kvm!();
    const LINES: u64 = 5000;
    // About 1.5 MB of events: many socket buffers full.
    let (_q, mut reader, sub, mut other) = flood(LINES, &[], 1048576);
    // The reader reads nothing until the guest has printed every line.
    let matched = |c: &mut QmpRaw| {
        c.cmd(&format!(
            r#"{{"execute": "qom-get", "arguments": {{"path": "{sub}", "property": "matched"}}}}"#
        ))["return"]
            .as_u64()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut worst = Duration::ZERO;
    loop {
        let t = Instant::now();
        let n = matched(&mut other);
        worst = worst.max(t.elapsed());
        if n > LINES {
            break;
        }
        assert!(Instant::now() < deadline, "the guest printed {n} lines");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        worst < Duration::from_secs(5),
        "the other client waited {worst:?}"
    );
    // Every progress line, in order, each event whole, numbered one after the other.
    let mut next_line = 1;
    let mut last_sequence = None;
    while next_line <= LINES {
        let m = reader.read_message();
        if m["event"] != "__org.qomu_NOTIFY" {
            // The run states' own events (RESUME) come to every client.
            continue;
        }
        let sequence = m["data"]["sequence"].as_u64().unwrap();
        if let Some(last) = last_sequence {
            assert_eq!(sequence, last + 1, "{m}");
        }
        last_sequence = Some(sequence);
        let text = m["data"]["data"]["line"].as_str().unwrap_or_default();
        if let Some(i) = text.strip_prefix("spin guest: ")
            && let Ok(i) = i.trim().parse::<u64>()
        {
            assert_eq!(i, next_line, "{m}");
            next_line += 1;
        }
    }
    let r = reader.cmd(&format!(
        r#"{{"execute": "qom-get", "arguments": {{"path": "{sub}", "property": "dropped"}}}}"#
    ));
    assert_eq!(r["return"], 0, "nothing dropped");
}

#[test]
fn closed_stdout_and_stderr_stop_nothing() {
    require_kvm!();
    // `qomu | head`: once the reader is gone every console write and log line fails. The
    // guest must go on, the monitor answer, and a shutdown end the process.
    let mut q = Qomu::spawn_with(&["--serial", "stdio"], |cmd| {
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
    });
    drop(q.child.stdout.take());
    drop(q.child.stderr.take());
    let mut c = q.connect();
    c.negotiate();
    // The demo guest answers the power button on its console (which fails), then powers off.
    assert_eq!(
        c.cmd(r#"{"execute":"system_powerdown"}"#),
        json!({"return": {}})
    );
    c.wait_event("SHUTDOWN");
    assert_eq!(q.wait_exit(Duration::from_secs(30)), Some(0));
}
