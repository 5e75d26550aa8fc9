//! Virtio device work happens off the vCPU threads: a slow disk request holds up no vCPU
//! and no `stop`, notifications arrive through KVM ioeventfds, and `ioeventfd=off` still
//! works through exits. The driver guest is tests/guests/c/virtio.c in its `slow` mode.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use qomu_tests::{QmpRaw, Qomu, TempDir, require_kvm};
use serde_json::{Value as Json, json};

/// The next console line (the serial's `line` notifier) containing `text`.
fn wait_line(c: &mut QmpRaw, text: &str) -> String {
    loop {
        let line = c.wait_notify("line", "/machine/unattached/serial0");
        let line = line["line"].as_str().unwrap_or_default().to_owned();
        assert!(!line.contains("failed at step"), "the guest failed: {line}");
        if line.contains(text) {
            return line;
        }
    }
}

fn get(c: &mut QmpRaw, path: &str, property: &str) -> Json {
    let r = c.cmd(
        &json!({"execute": "qom-get", "arguments": {"path": path, "property": property}})
            .to_string(),
    );
    r.get("return")
        .cloned()
        .unwrap_or_else(|| panic!("qom-get {path} {property}: {r}"))
}

/// vCPU 1's count, read from guest memory with `pmemsave`.
fn steps(c: &mut QmpRaw, dir: &TempDir, at: u64) -> u64 {
    let file = dir.path("steps");
    let r = c.cmd(
        &json!({"execute": "pmemsave", "arguments": {"val": at, "size": 8, "filename": file}})
            .to_string(),
    );
    assert_eq!(r, json!({"return": {}}));
    let bytes = std::fs::read(&file).expect("pmemsave wrote the file");
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// The serial device's QMP path in these tests.
const SERIAL: &str = "/machine/unattached/serial0";

#[test]
fn a_slow_disk_request_holds_up_no_vcpu_and_no_stop() {
    require_kvm!();
    let dir = TempDir::new("virtio-slow");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut q = Qomu::spawn_with(
        &[
            "-S",
            "--cpus",
            "2",
            "--kernel",
            &qomu_guests::path("virtio").display().to_string(),
            "--append",
            "min=2 slow=1",
            "--device",
            "isa-debug-exit",
            "--device",
            &format!("virtio-blk-pci,id=disk0,file={}", disk.display()),
            "--device",
            "virtio-rng-pci,id=rng0,ioeventfd=off",
            "--serial",
            "stdio",
        ],
        |cmd| {
            cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        },
    );
    let mut c = q.connect();
    c.negotiate();
    let sub = c.cmd(
        &json!({"execute": "__org.qomu_subscribe", "arguments": {"path": SERIAL, "notifier": "line"}})
            .to_string(),
    );
    assert!(sub["return"]["subscription"].is_string(), "{sub}");
    c.cmd(r#"{"execute": "cont"}"#);

    let line = wait_line(&mut c, "slow: vcpu 1 counts at ");
    let at = u64::from_str_radix(line.rsplit("0x").next().unwrap().trim(), 16)
        .unwrap_or_else(|e| panic!("no address in '{line}': {e}"));

    // The setup requests went through ioeventfds: no notification exited.
    assert_eq!(get(&mut c, "disk0", "ioeventfd-active"), json!(true));
    assert!(get(&mut c, "disk0", "notifications").as_u64().unwrap() >= 5);
    assert_eq!(get(&mut c, "disk0", "notify-exits"), json!(0));
    // ioeventfd=off: the same work, every notification an exit the vCPU hands over.
    assert_eq!(get(&mut c, "rng0", "ioeventfd-active"), json!(false));
    let exits = get(&mut c, "rng0", "notify-exits").as_u64().unwrap();
    assert!(exits >= 2, "rng notify-exits {exits}");
    assert_eq!(get(&mut c, "rng0", "notifications"), json!(exits));

    // Every request from now on takes a second on the host; then the guest reads a sector.
    let r = c.cmd(r#"{"execute": "qom-set", "arguments": {"path": "disk0", "property": "x-delay-ms", "value": 1000}}"#);
    assert_eq!(r, json!({"return": {}}));
    let reads = get(&mut c, "disk0", "read-bytes");
    let stdin = q.child.stdin.as_mut().unwrap();
    stdin.write_all(b"g").unwrap();
    stdin.flush().unwrap();
    wait_line(&mut c, "slow: request sent");
    let sent = Instant::now();

    // While the request is served, vCPU 1 keeps computing.
    std::thread::sleep(Duration::from_millis(50));
    let first = steps(&mut c, &dir, at);
    std::thread::sleep(Duration::from_millis(200));
    let second = steps(&mut c, &dir, at);
    assert!(second > first, "vCPU 1 stood still: {first} then {second}");

    // And `stop` answers at once, the request still in flight.
    let t = Instant::now();
    let r = c.cmd(r#"{"execute": "stop"}"#);
    let answered = t.elapsed();
    eprintln!(
        "stop answered in {answered:?}, the request in flight for {:?}",
        sent.elapsed()
    );
    assert_eq!(r, json!({"return": {}}));
    assert!(
        sent.elapsed() < Duration::from_millis(900),
        "too late to show anything: the request may be done"
    );
    assert_eq!(get(&mut c, "disk0", "read-bytes"), reads, "still in flight");
    assert!(
        answered < Duration::from_millis(20),
        "stop took {answered:?} with a disk request in flight"
    );
    assert_eq!(
        c.cmd(r#"{"execute": "query-status"}"#)["return"]["status"],
        "paused"
    );
    let stopped = steps(&mut c, &dir, at);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(steps(&mut c, &dir, at), stopped, "the guest is stopped");

    // The request completes; resumed, the guest sees it and ends well.
    c.cmd(r#"{"execute": "cont"}"#);
    let served = wait_line(&mut c, "slow: served");
    assert!(served.ends_with(" meanwhile"), "{served}");
    // isa-debug-exit: the guest's 0 is qomu's (0 << 1) | 1.
    assert_eq!(q.wait_exit(Duration::from_secs(60)), Some(1));
}
