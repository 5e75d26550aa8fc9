//! `scripts/bench hotplug`: how quickly a client learns that a hotplug step happened.
//!
//! - `device_add_to_plugged`: from writing `device_add` to the client reading the device's
//!   `plugged` event.
//! - `eject_to_device_deleted`: from the guest's write to the hotplug controller's eject
//!   register (the time stamp of the controller's `eject` event, taken on the vCPU thread
//!   as it writes) to the client reading DEVICE_DELETED.
//!
//! The `virtio` driver guest serves the hotplug controller: it brings each new slot up and
//! ejects what it is asked to.
//!
//! Baseline, same run: QEMU's `device_add` of a `virtio-rng-pci` into `-M pc -S`, from
//! writing the command to reading its reply; QEMU has no event for a plugged device, so
//! its reply is the earliest a client can know. QEMU's `device_del` there waits for a guest
//! that is not running, so each QEMU process takes 30 devices (its free slots) and a fresh
//! one the next 30.

mod common;
use common::{Client, percentile, start, start_qomu};

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;

const CYCLES: usize = 200;

/// The first queued or arriving event `pred` accepts; earlier ones are dropped.
fn wait(c: &mut Client, pred: impl Fn(&Json) -> bool) -> Json {
    loop {
        while let Some(e) = c.events.pop_front() {
            if pred(&e) {
                return e;
            }
        }
        c.pump();
    }
}

fn notify(notifier: &'static str) -> impl Fn(&Json) -> bool {
    move |e| e["event"] == "__org.qomu_NOTIFY" && e["data"]["notifier"] == notifier
}

fn since_epoch(e: &Json) -> Duration {
    let t = &e["timestamp"];
    Duration::from_secs(t["seconds"].as_u64().expect("seconds"))
        + Duration::from_micros(t["microseconds"].as_u64().expect("microseconds"))
}

fn main() {
    let dir = std::env::temp_dir().join(format!("qomu-bench-hotplug-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("qmp.sock");
    let console = dir.join("console");
    let guest = qomu_guests::path("virtio").display().to_string();
    let server = start_qomu(
        &[
            "-S",
            "--kernel",
            &guest,
            "--append",
            &format!("min=0 hotplug={}", CYCLES + 1),
            "--serial",
            &format!("file:{}", console.display()),
        ],
        sock,
    );
    let mut c = Client::handshake(&server.sock);
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"type": "virtio-device", "notifier": "plugged"}}"#);
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "/machine/unattached/pci-hotplug", "notifier": "eject"}}"#);
    c.cmd(r#"{"execute": "cont"}"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("hotplug: ready")
    {
        assert!(Instant::now() < deadline, "the guest did not get ready");
        std::thread::sleep(Duration::from_millis(10));
    }

    let (mut plug, mut eject) = (Vec::new(), Vec::new());
    for _ in 0..CYCLES {
        c.events.clear();
        let t = Instant::now();
        c.stream
            .write_all(br#"{"execute": "device_add", "arguments": {"driver": "virtio-rng-pci", "id": "rng0"}}"#)
            .expect("write");
        wait(&mut c, notify("plugged"));
        plug.push(t.elapsed());
        let r = c.reply();
        assert_eq!(r["return"], serde_json::json!({}), "{r}");

        let r = c.cmd(r#"{"execute": "device_del", "arguments": {"id": "rng0"}}"#);
        assert_eq!(r["return"], serde_json::json!({}), "{r}");
        let e = wait(&mut c, notify("eject"));
        assert_eq!(e["data"]["data"]["requested"], true, "{e}");
        wait(&mut c, |e| e["event"] == "DEVICE_DELETED");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
        eject.push(now.saturating_sub(since_epoch(&e)));
    }
    plug.sort();
    eject.sort();
    for (name, v) in [
        ("device_add_to_plugged", &plug),
        ("eject_to_device_deleted", &eject),
    ] {
        println!("bench: {name} {:.1} us", percentile(v, 0.5));
        println!("bench: {name}_p99 {:.1} us", percentile(v, 0.99));
    }
    drop(server);
    match qemu_device_add(&dir) {
        Some(qemu) => {
            println!("bench: qemu_device_add {qemu:.1} us");
            println!(
                "ratio: device_add_to_plugged/qemu_device_add {:.3}",
                percentile(&plug, 0.5) / qemu
            );
        }
        None => eprintln!("qemu-system-x86_64 is not installed: no baseline"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Median time of QEMU's `device_add` of a virtio-rng-pci, in µs.
fn qemu_device_add(dir: &std::path::Path) -> Option<f64> {
    let program = "qemu-system-x86_64";
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .ok()?;
    let sock = dir.join("qemu.sock");
    let args: Vec<String> = ["-M", "pc", "-S", "-display", "none", "-nodefaults", "-qmp"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("unix:{},server=on,wait=off", sock.display())])
        .collect();
    let mut times = Vec::new();
    while times.len() < CYCLES {
        let server = start(program, &args, sock.clone());
        let mut c = Client::handshake(&server.sock);
        for i in 0..30 {
            let add = format!(
                r#"{{"execute": "device_add", "arguments": {{"driver": "virtio-rng-pci", "id": "rng{i}"}}}}"#
            );
            let t = Instant::now();
            let r = c.cmd(&add);
            times.push(t.elapsed());
            assert_eq!(r["return"], serde_json::json!({}), "{r}");
        }
    }
    times.sort();
    Some(percentile(&times, 0.5))
}
