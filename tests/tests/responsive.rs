//! The control plane never waits on long work (docs/object-model.md, "Threads and locks"):
//! while a save of a large guest holds the machine lock, and while a slow disk request
//! holds a virtio device's transport, what clients poll answers at once, over QMP and over
//! D-Bus. Each figure is measured in the test and asserted with a margin; each test also
//! checks that the long work was really under way while it measured.

use std::time::{Duration, Instant};

use qomu_tests::dbus::{MACHINE, MACHINE_IFACE, ROOT, SessionBus};
use qomu_tests::{QmpRaw, TempDir, require_dbus, require_kvm};
use serde_json::Value as Json;

fn guest(name: &str) -> String {
    qomu_guests::path(name).display().to_string()
}

/// The time `f` takes, and what it returned.
fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

fn migration_status(c: &mut QmpRaw) -> String {
    let r = c.cmd(r#"{"execute": "query-migrate"}"#);
    r["return"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The slowest of each call, over the rounds made while the save was active.
#[derive(Default, Debug)]
struct Slowest {
    rounds: u32,
    ping: Duration,
    dbus_status: Duration,
    managed_objects: Duration,
    query_status: Duration,
    qom_get: Duration,
}

#[test]
fn both_front_ends_answer_while_a_large_guest_is_saved() {
    require_kvm!();
    require_dbus!();
    let bus = SessionBus::start();
    let q = bus.qomu(&["--kernel", &guest("idle"), "-m", "3G"]);
    let dir = TempDir::new("responsive-save");
    let file = dir.path("vm.snap");
    let mut control = q.connect();
    control.negotiate();
    let mut poller = q.connect();
    poller.negotiate();
    let dbus = bus.client();
    assert_eq!(
        poller.cmd(r#"{"execute": "query-status"}"#)["return"]["status"],
        "running"
    );

    let migrate = format!(
        r#"{{"execute": "migrate", "arguments": {{"uri": "file:{}"}}}}"#,
        file.display()
    );
    assert_eq!(control.cmd(&migrate), serde_json::json!({"return": {}}));
    let deadline = Instant::now() + Duration::from_secs(60);
    while migration_status(&mut control) == "setup" {
        assert!(Instant::now() < deadline, "the save never became active");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut slowest = Slowest::default();
    loop {
        let before = migration_status(&mut control);
        if before != "active" {
            assert_eq!(before, "completed", "the save ended");
            break;
        }
        let (ping, _) = timed(|| dbus.ok(MACHINE, "org.freedesktop.DBus.Peer", "Ping", &()));
        let (dbus_status, status) = timed(|| dbus.get(MACHINE, MACHINE_IFACE, "Status"));
        let (managed_objects, _) = timed(|| {
            dbus.ok(
                ROOT,
                "org.freedesktop.DBus.ObjectManager",
                "GetManagedObjects",
                &(),
            )
        });
        let (query_status, qs) = timed(|| poller.cmd(r#"{"execute": "query-status"}"#));
        let (qom_get, qg) = timed(|| {
            poller.cmd(
                r#"{"execute": "qom-get", "arguments": {"path": "/machine/unattached/serial0", "property": "tx-bytes"}}"#,
            )
        });
        if migration_status(&mut control) != "active" {
            // The save may have ended during the round: it does not count.
            continue;
        }
        assert_eq!(String::try_from(status).unwrap(), "finish-migrate");
        assert_eq!(qs["return"]["status"], "finish-migrate", "{qs}");
        assert!(qg["return"].is_u64(), "{qg}");
        slowest.rounds += 1;
        slowest.ping = slowest.ping.max(ping);
        slowest.dbus_status = slowest.dbus_status.max(dbus_status);
        slowest.managed_objects = slowest.managed_objects.max(managed_objects);
        slowest.query_status = slowest.query_status.max(query_status);
        slowest.qom_get = slowest.qom_get.max(qom_get);
    }
    eprintln!("while saving 3 GiB: {slowest:?}");
    assert!(
        slowest.rounds >= 3,
        "too few rounds while the save was active to tell anything: {slowest:?}"
    );
    let dbus_limit = Duration::from_millis(100);
    let qmp_limit = Duration::from_millis(50);
    assert!(slowest.ping < dbus_limit, "{slowest:?}");
    assert!(slowest.dbus_status < dbus_limit, "{slowest:?}");
    assert!(slowest.managed_objects < dbus_limit, "{slowest:?}");
    assert!(slowest.query_status < qmp_limit, "{slowest:?}");
    assert!(slowest.qom_get < qmp_limit, "{slowest:?}");
    let info = control.cmd(r#"{"execute": "query-migrate"}"#);
    assert_eq!(info["return"]["status"], "completed", "{info}");
}

#[test]
fn virtio_blk_counters_and_status_answer_while_a_request_is_served() {
    require_kvm!();
    let dir = TempDir::new("responsive-blk");
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    // Every request waits 200 ms on the host, as a slow disk would: the counter guest
    // keeps one in flight nearly all the time.
    let blk = format!(
        "virtio-blk-pci,id=disk,file={},x-delay-ms=200",
        image.display()
    );
    let q = qomu_tests::Qomu::spawn(&[
        "--kernel",
        &guest("virtio"),
        "--append",
        "counter=1000000",
        "--device",
        &blk,
        "--device",
        "isa-debug-exit",
    ]);
    let mut c = q.connect();
    c.negotiate();
    let get = |c: &mut QmpRaw, property: &str| -> Json {
        c.cmd(&format!(
            r#"{{"execute": "qom-get", "arguments": {{"path": "/machine/peripheral/disk", "property": "{property}"}}}}"#
        ))
    };
    // Wait until the guest's requests flow.
    let deadline = Instant::now() + qomu_tests::patience();
    while get(&mut c, "written-bytes")["return"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the guest never wrote its disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    let written_before = get(&mut c, "written-bytes")["return"].as_u64().unwrap();
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    let mut reads = 0;
    // 2.5 s: a dozen requests, each 200 ms long, nearly every read landing inside one.
    while started.elapsed() < Duration::from_millis(2500) {
        for property in [
            "read-bytes",
            "written-bytes",
            "flushes",
            "io-errors",
            "size",
            "status",
            "guest-features",
            "host-features",
            "notifications",
            "used-batches",
            "interrupts",
            "msix-messages",
        ] {
            let (took, r) = timed(|| get(&mut c, property));
            assert!(r["return"].is_u64(), "{r}");
            slowest = slowest.max(took);
            reads += 1;
        }
        std::thread::sleep(Duration::from_millis(7));
    }
    eprintln!("{reads} counter reads while requests were served, slowest {slowest:?}");
    assert!(slowest < Duration::from_millis(10), "slowest {slowest:?}");
    let written = get(&mut c, "written-bytes")["return"].as_u64().unwrap() - written_before;
    assert!(
        written >= 2 * 512,
        "requests went on meanwhile ({written} bytes)"
    );
}
