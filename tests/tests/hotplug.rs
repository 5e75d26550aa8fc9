//! PCI and virtio devices end to end: a driver guest (tests/guests/c/virtio.c) finds and
//! uses them, clients watch them come and work through subscriptions, and bad requests
//! change nothing.

use std::time::Duration;

use qomu_tests::{QmpRaw, Qomu, TempDir, require_dbus, require_kvm};
use serde_json::{Value as Json, json};

fn guest(name: &str) -> String {
    qomu_guests::path(name).display().to_string()
}

fn peripherals(c: &mut QmpRaw) -> Json {
    c.cmd(r#"{"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}"#)
}

fn pci_slots(c: &mut QmpRaw) -> Json {
    c.cmd(r#"{"execute": "qom-get", "arguments": {"path": "/machine/unattached/pci-host", "property": "slots"}}"#)["return"].clone()
}

#[test]
fn a_type_subscription_sees_a_virtio_rng_plugged_and_driven() {
    require_kvm!();
    let dir = TempDir::new("virtio-rng");
    let console = dir.path("console");
    let mut q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--device",
        "isa-debug-exit",
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    for notifier in ["plugged", "driver-ok"] {
        let r = c.cmd(&format!(
            r#"{{"execute": "__org.qomu_subscribe", "arguments": {{"type": "virtio-device", "notifier": "{notifier}"}}}}"#
        ));
        assert!(r["return"]["subscription"].is_string(), "{r}");
    }
    let r = c.cmd(r#"{"execute": "device_add", "arguments": {"driver": "virtio-rng-pci", "id": "rng0", "bus": "pci.0", "addr": "0x5"}}"#);
    assert_eq!(r, json!({"return": {}}));
    let plugged = c.wait_notify("plugged", "/machine/peripheral/rng0");
    assert_eq!(plugged, json!({"bus": "pci.0", "slot": 5}));
    assert_eq!(
        pci_slots(&mut c),
        json!([
            {"slot": 0, "device": "/machine/unattached/pci-host"},
            {"slot": 5, "device": "/machine/peripheral/rng0"}
        ])
    );
    c.cmd(r#"{"execute": "cont"}"#);
    let ok = c.wait_notify("driver-ok", "/machine/peripheral/rng0");
    assert_eq!(
        ok["features"].as_u64().unwrap() >> 32 & 1,
        1,
        "VERSION_1: {ok}"
    );
    // The guest takes EVENT_IDX and notifies only when the device asks, as Linux does.
    assert_eq!(
        ok["features"].as_u64().unwrap() >> 29 & 1,
        1,
        "EVENT_IDX: {ok}"
    );
    assert_eq!(
        q.wait_exit(Duration::from_secs(60)),
        Some(1),
        "the guest's verdict"
    );
    let out = std::fs::read_to_string(&console).unwrap();
    assert!(out.contains("pci 5 0x1af4:0x1044"), "{out}");
    assert!(out.contains("virtio: pci-cfg window ok"), "{out}");
    assert!(out.contains("virtio-rng: ok"), "{out}");
}

#[test]
fn bad_device_requests_are_refused_and_change_nothing() {
    let dir = TempDir::new("bad-devices");
    let image = dir.path("disk.img").display().to_string();
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let missing = dir.path("missing.img").display().to_string();
    let q = Qomu::spawn(&["-S", "--device", "virtio-rng-pci,id=taken,addr=3"]);
    let mut c = q.connect();
    c.negotiate();
    let before = (peripherals(&mut c), pci_slots(&mut c));
    let class = |r: &Json| r["error"]["class"].as_str().unwrap_or_default().to_owned();
    let desc = |r: &Json| r["error"]["desc"].as_str().unwrap_or_default().to_owned();
    for (args, want) in [
        (
            json!({"driver": "virtio-nothing-pci", "id": "x"}),
            "'virtio-nothing-pci' is not a valid device model name",
        ),
        (
            json!({"driver": "virtio-rng-pci", "id": "x", "colour": "red"}),
            "Property 'virtio-rng-pci.colour' not found",
        ),
        (
            json!({"driver": "virtio-rng-pci", "id": "x", "addr": "0x20"}),
            "Property 'virtio-rng-pci.addr' doesn't take value '0x20'",
        ),
        (
            json!({"driver": "virtio-rng-pci", "id": "x", "addr": "zz"}),
            "Property 'virtio-rng-pci.addr' doesn't take value 'zz'",
        ),
        (
            json!({"driver": "virtio-rng-pci", "id": "x", "addr": "3"}),
            "PCI: slot 3 function 0 not available for virtio-rng-pci, in use by virtio-rng-pci,id=taken",
        ),
        (
            json!({"driver": "virtio-rng-pci", "id": "taken"}),
            "Duplicate device ID 'taken'",
        ),
        (
            json!({"driver": "virtio-rng-pci", "id": "x", "bus": "pcie.0"}),
            "Bus 'pcie.0' not found",
        ),
        (
            json!({"driver": "isa-serial", "id": "x", "bus": "pci.0"}),
            "Device 'isa-serial' can't go on PCI bus",
        ),
        (
            json!({"driver": "virtio-rng-pci", "id": "x", "rng": "/objects/none"}),
            "Device '/objects/none' not found",
        ),
        (
            json!({"driver": "virtio-blk-pci", "id": "x", "file": missing}),
            &format!("Could not open '{missing}': No such file or directory (os error 2)"),
        ),
        (
            json!({"driver": "virtio-blk-pci", "id": "x", "file": image, "serial": "123456789012345678901"}),
            "Property 'virtio-blk-pci.serial' takes at most 20 bytes",
        ),
        (
            json!({"driver": "virtio-device", "id": "x"}),
            "Parameter 'driver' expects a non-abstract device type",
        ),
    ] {
        let r = c.cmd(&json!({"execute": "device_add", "arguments": args}).to_string());
        // QEMU's class for a link to nothing, as for its own.
        let expected = if want.ends_with("not found") && want.starts_with("Device") {
            "DeviceNotFound"
        } else {
            "GenericError"
        };
        assert_eq!(class(&r), expected, "{args}: {r}");
        assert_eq!(desc(&r), want, "{args}");
        assert_eq!(
            (peripherals(&mut c), pci_slots(&mut c)),
            before,
            "{args} changed the tree"
        );
    }
    // Fill the bus: slot 0 is the host's, 3 is taken; 30 more fit, the next does not.
    for i in 0..30 {
        let r = c.cmd(&json!({"execute": "device_add", "arguments": {"driver": "virtio-rng-pci", "id": format!("r{i}")}}).to_string());
        assert_eq!(r, json!({"return": {}}), "{i}");
    }
    let r = c.cmd(r#"{"execute": "device_add", "arguments": {"driver": "virtio-rng-pci", "id": "one-too-many"}}"#);
    assert_eq!(
        desc(&r),
        "PCI: no slot/function available for virtio-rng-pci, all in use or reserved"
    );
    assert_eq!(pci_slots(&mut c).as_array().unwrap().len(), 32);
}

/// A raw image of `sectors` sectors whose sector 0 starts with `text`.
fn image(dir: &TempDir, sectors: usize, text: &str) -> std::path::PathBuf {
    let path = dir.path("disk.img");
    let mut bytes = vec![0u8; sectors * 512];
    bytes[..text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(&path, bytes).unwrap();
    path
}

fn sector(path: &std::path::Path, n: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[n * 512..(n + 1) * 512].to_vec()
}

#[test]
fn virtio_blk_reads_writes_flushes_and_identifies() {
    require_kvm!();
    let dir = TempDir::new("virtio-blk");
    let disk = image(&dir, 64, "QOMU-TEST-SECTOR-0");
    let console = dir.path("console");
    let mut q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--append",
        "min=2 wsector=7",
        "--device",
        "isa-debug-exit",
        "--device",
        "virtio-rng-pci,id=rng0",
        "--device",
        &format!(
            "virtio-blk-pci,id=disk0,file={},serial=SN-0042",
            disk.display()
        ),
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    let get = |c: &mut QmpRaw, property: &str| {
        c.cmd(&format!(r#"{{"execute": "qom-get", "arguments": {{"path": "disk0", "property": "{property}"}}}}"#))["return"].clone()
    };
    assert_eq!(get(&mut c, "size"), json!(64 * 512));
    assert_eq!(get(&mut c, "slot"), json!(2));
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"type": "virtio-device", "notifier": "driver-ok"}}"#);
    c.cmd(r#"{"execute": "cont"}"#);
    c.wait_notify("driver-ok", "/machine/peripheral/rng0");
    c.wait_notify("driver-ok", "/machine/peripheral/disk0");
    assert_eq!(q.wait_exit(Duration::from_secs(60)), Some(1));
    let out = std::fs::read_to_string(&console).unwrap();
    for line in [
        "virtio-blk: 64 sectors",
        "virtio-blk: serial SN-0042",
        "virtio-blk: sector 0: QOMU-TEST-SECTOR-0",
        "virtio-blk: wrote, read back, flushed",
        "virtio-blk: ok",
        "virtio: 2 devices",
    ] {
        assert!(out.contains(line), "no '{line}' in:\n{out}");
    }
    assert!(sector(&disk, 7).starts_with(b"written by the qomu test guest\0"));
    assert!(
        sector(&disk, 1).iter().all(|&b| b == 0),
        "only sector 7 was written"
    );
}

#[test]
fn a_read_only_virtio_blk_refuses_writes_with_io_error_events() {
    require_kvm!();
    let dir = TempDir::new("virtio-blk-ro");
    let disk = image(&dir, 8, "READ-ONLY");
    let before = std::fs::read(&disk).unwrap();
    let console = dir.path("console");
    let mut q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--device",
        "isa-debug-exit",
        "--device",
        &format!(
            "virtio-blk-pci,id=disk0,file={},read-only=on",
            disk.display()
        ),
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "disk0", "notifier": "io-error"}}"#);
    c.cmd(r#"{"execute": "cont"}"#);
    let write = c.wait_notify("io-error", "/machine/peripheral/disk0");
    assert_eq!(write["operation"], "write");
    assert_eq!(write["sector"], 1);
    assert_eq!(write["error"], "the device is read-only");
    let past_end = c.wait_notify("io-error", "/machine/peripheral/disk0");
    assert_eq!(past_end["operation"], "read");
    assert_eq!(past_end["sector"], 8);
    assert_eq!(q.wait_exit(Duration::from_secs(60)), Some(1));
    let out = std::fs::read_to_string(&console).unwrap();
    assert!(out.contains("8 sectors, read-only"), "{out}");
    assert!(out.contains("virtio-blk: write refused"), "{out}");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "the image is untouched"
    );
}

#[test]
fn a_host_io_error_is_answered_ioerr_and_the_vmm_goes_on() {
    require_kvm!();
    let dir = TempDir::new("virtio-blk-eio");
    let disk = image(&dir, 64, "SOON GONE");
    let mut q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--device",
        "isa-debug-exit",
        "--device",
        &format!("virtio-blk-pci,id=disk0,file={}", disk.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "disk0", "notifier": "io-error"}}"#);
    // The image shrinks under the device: its reads now fail on the host.
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(0)
        .unwrap();
    c.cmd(r#"{"execute": "cont"}"#);
    let e = c.wait_notify("io-error", "/machine/peripheral/disk0");
    assert_eq!(
        (e["operation"].as_str(), e["sector"].as_u64()),
        (Some("read"), Some(0)),
        "{e}"
    );
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("the image file ends before the request does"),
        "{e}"
    );
    // The guest saw IOERR on its sector 0 read (step 23) and says so.
    assert_eq!(q.wait_exit(Duration::from_secs(60)), Some(23 << 1 | 1));
}

/// Waits until the console file has `text`.
fn wait_console(path: &std::path::Path, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no '{text}' on the console"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Hot-plugs a virtio-rng-pci with `id`, which must land in slot 1 and be driven.
fn plug_rng_into_slot_1(c: &mut QmpRaw, id: &str) {
    let r = c.cmd(
        &json!({"execute": "device_add", "arguments": {"driver": "virtio-rng-pci", "id": id}})
            .to_string(),
    );
    assert_eq!(r, json!({"return": {}}));
    let path = format!("/machine/peripheral/{id}");
    assert_eq!(
        c.wait_notify("plugged", &path),
        json!({"bus": "pci.0", "slot": 1})
    );
    c.wait_notify("driver-ok", &path);
}

#[test]
fn hot_plug_and_unplug_of_a_running_guest_over_qmp() {
    require_kvm!();
    let dir = TempDir::new("hotplug");
    let console = dir.path("console");
    let disk = image(&dir, 16, "HOT-PLUGGED DISK");
    let mut q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--append",
        // The guest ends after the third eject: the checks between the second and the
        // third must not race with its end.
        "min=0 hotplug=3",
        "--device",
        "isa-debug-exit",
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    for notifier in ["plugged", "driver-ok", "unplug-requested", "unplugged"] {
        c.cmd(&format!(
            r#"{{"execute": "__org.qomu_subscribe", "arguments": {{"type": "virtio-device", "notifier": "{notifier}"}}}}"#
        ));
    }
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "/machine/unattached/pci-hotplug", "notifier": "eject"}}"#);
    let tree_before = peripherals(&mut c);
    c.cmd(r#"{"execute": "cont"}"#);
    wait_console(&console, "hotplug: ready");

    plug_rng_into_slot_1(&mut c, "rng0");
    let r = c.cmd(&json!({"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "id": "disk0", "file": disk, "serial": "HOT"}}).to_string());
    assert_eq!(r, json!({"return": {}}));
    c.wait_notify("driver-ok", "/machine/peripheral/disk0");

    // Unplug is a request; a second one while it is pending is refused. The guest is
    // paused meanwhile, so that it cannot answer the first before the second is sent.
    assert_eq!(c.cmd(r#"{"execute": "stop"}"#), json!({"return": {}}));
    assert_eq!(
        c.cmd(r#"{"execute": "device_del", "arguments": {"id": "rng0"}}"#),
        json!({"return": {}})
    );
    let again = c.cmd(r#"{"execute": "device_del", "arguments": {"id": "rng0"}}"#);
    assert_eq!(
        again["error"]["desc"], "Device rng0 is already in the process of unplug",
        "{again}"
    );
    assert_eq!(c.cmd(r#"{"execute": "cont"}"#), json!({"return": {}}));
    let requested = c.wait_notify_event("unplug-requested", "/machine/peripheral/rng0");
    let eject = c.wait_notify_event("eject", "/machine/unattached/pci-hotplug");
    assert_eq!(eject["data"]["data"], json!({"slot": 1, "requested": true}));
    let unplugged = c.wait_notify_event("unplugged", "/machine/peripheral/rng0");
    // In the order they happened: the request, the guest's eject, the removal.
    assert!(
        emitted_at(&requested) <= emitted_at(&eject)
            && emitted_at(&eject) <= emitted_at(&unplugged),
        "{requested} {eject} {unplugged}"
    );
    let deleted = c.wait_event("DEVICE_DELETED");
    assert_eq!(
        deleted["data"],
        json!({"device": "rng0", "path": "/machine/peripheral/rng0"})
    );
    assert_eq!(
        c.cmd(r#"{"execute": "device_del", "arguments": {"id": "disk0"}}"#),
        json!({"return": {}})
    );
    c.wait_notify("unplugged", "/machine/peripheral/disk0");
    c.wait_event("DEVICE_DELETED");
    // The tree and the bus are as before.
    assert_eq!(peripherals(&mut c), tree_before);
    assert_eq!(
        pci_slots(&mut c),
        json!([{"slot": 0, "device": "/machine/unattached/pci-host"}])
    );
    // The freed slot takes a device again, which the guest brings up and ejects.
    plug_rng_into_slot_1(&mut c, "rng1");
    c.cmd(r#"{"execute": "device_del", "arguments": {"id": "rng1"}}"#);
    assert_eq!(q.wait_exit(Duration::from_secs(60)), Some(1));
    let out = std::fs::read_to_string(&console).unwrap();
    for line in [
        "hotplug: slot 1 added",
        "virtio-rng: ok",
        "hotplug: slot 2 added",
        "virtio-blk: sector 0: HOT-PLUGGED DISK",
        "hotplug: ejecting slot 1",
        "hotplug: ejecting slot 2",
        "hotplug: 3 ejected",
    ] {
        assert!(out.contains(line), "no '{line}' in:\n{out}");
    }
}

#[test]
fn bad_hotplug_requests_on_a_running_guest_change_nothing() {
    require_kvm!();
    let dir = TempDir::new("hotplug-bad");
    let console = dir.path("console");
    let q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--append",
        "min=0 hotplug=1",
        "--device",
        "isa-debug-exit,id=dbg",
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    c.cmd(r#"{"execute": "cont"}"#);
    wait_console(&console, "hotplug: ready");
    let before = (peripherals(&mut c), pci_slots(&mut c));
    let missing = dir.path("missing.img").display().to_string();
    let directory = dir.0.display().to_string();
    for (execute, args, want) in [
        (
            "device_del",
            json!({"id": "dbg"}),
            "Device 'isa-debug-exit' does not support hotplugging",
        ),
        (
            "device_del",
            json!({"id": "/machine/unattached/serial0"}),
            "Device 'isa-serial' does not support hotplugging",
        ),
        (
            "device_del",
            json!({"id": "/machine/unattached/pci-host"}),
            "Device 'pci-host' does not support hotplugging",
        ),
        (
            "device_add",
            json!({"driver": "isa-serial", "id": "com2"}),
            "Parameter 'driver' expects a pluggable device type",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "disk0"}),
            "virtio-blk-pci: file property not set",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "disk0", "file": missing}),
            &format!("Could not open '{missing}': No such file or directory (os error 2)"),
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "disk0", "file": directory}),
            &format!("Could not open '{directory}': Is a directory (os error 21)"),
        ),
        (
            "device_add",
            json!({"driver": "virtio-rng-pci", "id": "rng0", "addr": "0"}),
            "PCI: slot 0 function 0 not available for virtio-rng-pci, in use by pci-host",
        ),
    ] {
        let r = c.cmd(&json!({"execute": execute, "arguments": args}).to_string());
        assert_eq!(r["error"]["class"], "GenericError", "{execute} {args}: {r}");
        assert_eq!(r["error"]["desc"], want, "{execute} {args}");
        assert_eq!(
            (peripherals(&mut c), pci_slots(&mut c)),
            before,
            "{execute} {args} changed the tree"
        );
    }
    // Nothing reached the guest: no slot was announced to it.
    let r = c.cmd(r#"{"execute": "qom-get", "arguments": {"path": "/machine/unattached/pci-hotplug", "property": "added"}}"#);
    assert_eq!(r["return"], json!(0), "{r}");
}

#[test]
fn hot_plug_and_unplug_of_a_running_guest_over_dbus() {
    use qomu_tests::dbus::{MACHINE, MACHINE_IFACE, NAME, ROOT, ROOT1, SessionBus, member, path};
    use std::collections::HashMap;
    use zbus::{OwnedObjectPath, Variant};

    require_kvm!();
    require_dbus!();
    let dir = TempDir::new("hotplug-dbus");
    let console = dir.path("console");
    let disk = image(&dir, 16, "PLUGGED OVER D-BUS");
    let bus = SessionBus::start();
    // The guest waits for a second eject, so it is still there to look at afterwards. It
    // leaves EVENT_IDX out: its notifications follow the used ring's NO_NOTIFY flag.
    let q = bus.qomu(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--append",
        "min=0 hotplug=2 event_idx=0",
        "--device",
        "isa-debug-exit",
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let c = bus.client();
    let watcher = bus.client();
    let mut removed = watcher.listen(
        "type='signal',interface='org.freedesktop.DBus.ObjectManager',member='InterfacesRemoved'",
    );
    // Subscribe on the type before anything is plugged.
    let mut events = Vec::new();
    for notifier in ["plugged", "driver-ok", "unplugged"] {
        let m = c.ok(ROOT, ROOT1, "SubscribeType", &("virtio-device", notifier));
        let sub: OwnedObjectPath = m.body().deserialize().unwrap();
        events.push(c.listen(&format!("type='signal',path='{}'", sub.as_str())));
    }
    let [plugged, driver_ok, unplugged] = &mut events[..] else {
        unreachable!()
    };
    c.ok(MACHINE, MACHINE_IFACE, "Cont", &());
    wait_console(&console, "hotplug: ready");

    let props: HashMap<&str, Variant<'_>> = HashMap::from([
        ("file", Variant::from(disk.to_str().unwrap())),
        ("serial", Variant::from("DBUS")),
    ]);
    let opts: HashMap<&str, Variant<'_>> = HashMap::from([
        ("id", Variant::from("disk0")),
        ("bus", Variant::from("pci.0")),
        ("properties", Variant::from(props)),
    ]);
    c.ok(
        MACHINE,
        MACHINE_IFACE,
        "DeviceAdd",
        &("virtio-blk-pci", opts),
    );
    let device = "/org/qomu/VM1/machine/peripheral/disk0";
    let m = plugged.wait_for("Plugged", |m| member(m) == "Plugged");
    let (source, bus_name, slot): (OwnedObjectPath, String, u8) = m.body().deserialize().unwrap();
    assert_eq!(
        (source.as_str(), bus_name.as_str(), slot),
        (device, "pci.0", 1)
    );
    let m = driver_ok.wait_for("DriverOk", |m| member(m) == "DriverOk");
    let (source, features): (OwnedObjectPath, u64) = m.body().deserialize().unwrap();
    assert_eq!(source.as_str(), device);
    assert_eq!(features >> 32 & 1, 1, "VERSION_1");
    assert_eq!(features >> 29 & 1, 0, "no EVENT_IDX");

    // Refusals carry qomu's D-Bus names and the layer's own words, not QMP's.
    let again: HashMap<&str, Variant<'_>> = HashMap::from([("id", Variant::from("disk0"))]);
    let e = c.err(
        MACHINE,
        MACHINE_IFACE,
        "DeviceAdd",
        &("virtio-rng-pci", again),
    );
    assert_eq!(e.name, "org.qomu.Error.DuplicateId", "{e:?}");
    assert_eq!(e.message, "a device with id 'disk0' exists already");
    let elsewhere: HashMap<&str, Variant<'_>> = HashMap::from([("bus", Variant::from("isa.0"))]);
    let e = c.err(
        MACHINE,
        MACHINE_IFACE,
        "DeviceAdd",
        &("virtio-rng-pci", elsewhere),
    );
    assert_eq!(e.name, "org.qomu.Error.NoSuchBus", "{e:?}");
    let e = c.err(
        MACHINE,
        MACHINE_IFACE,
        "DeviceAdd",
        &("virtio-device", HashMap::<&str, Variant<'_>>::new()),
    );
    assert_eq!(e.name, "org.qomu.Error.NotPluggable", "{e:?}");
    let e = c.err(
        MACHINE,
        MACHINE_IFACE,
        "DeviceDel",
        &("/machine/unattached/serial0",),
    );
    assert_eq!(e.name, "org.qomu.Error.NotUnpluggable", "{e:?}");

    // Paused, the guest cannot answer the first request before the second is sent.
    c.ok(MACHINE, MACHINE_IFACE, "Stop", &());
    c.ok(MACHINE, MACHINE_IFACE, "DeviceDel", &("disk0",));
    let e = c.err(MACHINE, MACHINE_IFACE, "DeviceDel", &("disk0",));
    assert_eq!(e.name, "org.qomu.Error.Busy", "an unplug under way: {e:?}");
    c.ok(MACHINE, MACHINE_IFACE, "Cont", &());
    let m = unplugged.wait_for("Unplugged", |m| member(m) == "Unplugged");
    let (source,): (OwnedObjectPath,) = m.body().deserialize().unwrap();
    assert_eq!(source.as_str(), device);
    let m = removed.wait_for("the device's InterfacesRemoved", |m| {
        m.body()
            .deserialize::<(OwnedObjectPath, Vec<String>)>()
            .is_ok_and(|(p, _)| p.as_str() == device)
    });
    assert_eq!(path(&m), ROOT);
    // Clean: not on D-Bus, not in the tree, not on the bus.
    let tree = qomu_tests::dbus::stdout_ok(&bus.busctl(&["tree", NAME]));
    assert!(!tree.contains(device), "{tree}");
    let mut qmp = q.connect();
    qmp.negotiate();
    let children = peripherals(&mut qmp)["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"].as_str().unwrap().starts_with("child<"))
        .count();
    assert_eq!(children, 0, "/machine/peripheral is empty again");
    assert_eq!(
        pci_slots(&mut qmp),
        json!([{"slot": 0, "device": "/machine/unattached/pci-host"}])
    );
    let out = std::fs::read_to_string(&console).unwrap();
    for line in [
        "hotplug: slot 1 added",
        "virtio-blk: serial DBUS",
        "virtio-blk: sector 0: PLUGGED OVER D-BUS",
        "virtio-blk: ok",
        "hotplug: ejecting slot 1",
    ] {
        assert!(out.contains(line), "no '{line}' in:\n{out}");
    }
}

/// What a plug/unplug cycle could leak, read from outside the process and over QMP.
#[derive(Debug, PartialEq)]
struct Footprint {
    fds: usize,
    tree: std::collections::BTreeSet<String>,
    subscriptions: usize,
}

fn footprint(q: &Qomu, c: &mut QmpRaw) -> (Footprint, u64) {
    let pid = q.child.id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let tree = c.tree();
    let subscriptions = tree
        .iter()
        .filter(|p| p.starts_with("/subscriptions/"))
        .count();
    (
        Footprint {
            fds,
            tree,
            subscriptions,
        },
        rss_kib,
    )
}

/// The footprint once it is `start` again, or as it is after 2 s: an unplug takes its
/// ioeventfds from KVM just after DEVICE_DELETED (KVM's grace period is most of an unplug's
/// time), holding a duplicate of each kick eventfd until then.
fn settled_footprint(q: &Qomu, c: &mut QmpRaw, start: &Footprint) -> Footprint {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let (now, _) = footprint(q, c);
        if &now == start || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// An event's time stamp, in microseconds.
fn emitted_at(event: &Json) -> u64 {
    let t = &event["timestamp"];
    t["seconds"].as_u64().unwrap() * 1_000_000 + t["microseconds"].as_u64().unwrap()
}

#[test]
fn a_hundred_plug_unplug_cycles_leave_nothing_behind() {
    require_kvm!();
    const CYCLES: usize = 100;
    let dir = TempDir::new("hotplug-cycles");
    let console = dir.path("console");
    let disk = image(&dir, 16, "CYCLED");
    // The guest serves more ejects than asked for, so it is still running at the end.
    let q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--append",
        &format!("min=0 hotplug={}", CYCLES + 1),
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    for notifier in ["plugged", "driver-ok"] {
        c.cmd(&format!(
            r#"{{"execute": "__org.qomu_subscribe", "arguments": {{"type": "virtio-device", "notifier": "{notifier}"}}}}"#
        ));
    }
    c.cmd(r#"{"execute": "cont"}"#);
    wait_console(&console, "hotplug: ready");
    let (start, _) = footprint(&q, &mut c);
    let mut rss = Vec::new();
    for i in 0..CYCLES {
        let (driver, extra) = if i % 2 == 0 {
            ("virtio-rng-pci", json!({}))
        } else {
            ("virtio-blk-pci", json!({"file": disk}))
        };
        let mut args = json!({"driver": driver, "id": "dev"});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = c.cmd(&json!({"execute": "device_add", "arguments": args}).to_string());
        assert_eq!(r, json!({"return": {}}), "cycle {i}");
        let path = "/machine/peripheral/dev";
        // `plugged` is sent before the guest is told, so it precedes `driver-ok`.
        let plugged = c.wait_notify_event("plugged", path);
        let driver_ok = c.wait_notify_event("driver-ok", path);
        assert!(
            emitted_at(&plugged) <= emitted_at(&driver_ok),
            "cycle {i}: driver-ok before plugged: {plugged} {driver_ok}"
        );
        // The slot's notify addresses were free again for KVM: the last device's
        // ioeventfds, taken away after its DEVICE_DELETED, went before these came.
        let r = c.cmd(&format!(
            r#"{{"execute": "qom-get", "arguments": {{"path": "{path}", "property": "ioeventfd-active"}}}}"#
        ));
        assert_eq!(r, json!({"return": true}), "cycle {i}");
        // A subscription to the device itself, which its owner removes afterwards.
        let r = c.cmd(&format!(
            r#"{{"execute": "__org.qomu_subscribe", "arguments": {{"path": "{path}", "notifier": "unplugged"}}}}"#
        ));
        let sub = r["return"]["subscription"].as_str().unwrap().to_owned();
        let r = c.cmd(r#"{"execute": "device_del", "arguments": {"id": "dev"}}"#);
        assert_eq!(r, json!({"return": {}}), "cycle {i}");
        c.wait_notify("unplugged", path);
        c.wait_event("DEVICE_DELETED");
        let r = c.cmd(&format!(
            r#"{{"execute": "__org.qomu_unsubscribe", "arguments": {{"subscription": "{sub}"}}}}"#
        ));
        assert_eq!(r, json!({"return": {}}), "cycle {i}");
        if i % 10 == 9 {
            rss.push(footprint(&q, &mut c).1);
        }
    }
    let end = settled_footprint(&q, &mut c, &start);
    assert_eq!(end, start, "after {CYCLES} cycles");
    // The allocator keeps what it got once; what must not happen is growth with the
    // number of cycles. The first ten warm it up; the last ninety may not add 1 MiB.
    eprintln!("RSS every 10 cycles (KiB): {rss:?}");
    let grown = rss.last().unwrap().saturating_sub(rss[0]);
    assert!(grown < 1024, "RSS grew {grown} KiB over 90 cycles: {rss:?}");
    let out = std::fs::read_to_string(&console).unwrap();
    assert_eq!(
        out.matches("hotplug: ejecting slot 1").count(),
        CYCLES,
        "{out}"
    );
}

/// 100 cycles of a stream netdev and a virtio-net-pci on it: netdev_add, device_add, the
/// guest's driver brings the NIC up (DRIVER_OK, a control command, a reset), device_del,
/// netdev_del; descriptors, threads' sockets, the tree and the subscriptions end as they
/// began, and RSS does not grow with the cycles.
#[test]
fn a_hundred_nic_and_netdev_cycles_leave_nothing_behind() {
    require_kvm!();
    const CYCLES: usize = 100;
    let dir = TempDir::new("nic-cycles");
    let console = dir.path("console");
    let socket = dir.path("peer.socket");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--append",
        &format!("min=0 nettraffic=0 hotplug={}", CYCLES + 1),
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"type": "virtio-device", "notifier": "driver-ok"}}"#);
    c.cmd(r#"{"execute": "cont"}"#);
    wait_console(&console, "hotplug: ready");
    let (start, _) = footprint(&q, &mut c);
    let mut rss = Vec::new();
    let path = "/machine/peripheral/nic";
    for i in 0..CYCLES {
        let r = c.cmd(
            &json!({"execute": "netdev_add", "arguments": {"type": "stream", "id": "hn", "addr": {"type": "unix", "path": socket}}})
                .to_string(),
        );
        assert_eq!(r, json!({"return": {}}), "cycle {i}");
        let (peer, _) = listener.accept().unwrap();
        let r = c.cmd(
            r#"{"execute": "device_add", "arguments": {"driver": "virtio-net-pci", "id": "nic", "netdev": "hn"}}"#,
        );
        assert_eq!(r, json!({"return": {}}), "cycle {i}");
        c.wait_notify("driver-ok", path);
        let r = c.cmd(r#"{"execute": "device_del", "arguments": {"id": "nic"}}"#);
        assert_eq!(r, json!({"return": {}}), "cycle {i}");
        c.wait_event("DEVICE_DELETED");
        let r = c.cmd(r#"{"execute": "netdev_del", "arguments": {"id": "hn"}}"#);
        assert_eq!(r, json!({"return": {}}), "cycle {i}");
        // The netdev closed its end: the peer reads its end of the stream.
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(
            std::io::Read::read(&mut &peer, &mut [0u8; 16]).unwrap(),
            0,
            "cycle {i}"
        );
        if i % 10 == 9 {
            rss.push(footprint(&q, &mut c).1);
        }
    }
    let end = settled_footprint(&q, &mut c, &start);
    assert_eq!(end, start, "after {CYCLES} cycles");
    eprintln!("RSS every 10 cycles (KiB): {rss:?}");
    let grown = rss.last().unwrap().saturating_sub(rss[0]);
    assert!(grown < 1024, "RSS grew {grown} KiB over 90 cycles: {rss:?}");
    let out = std::fs::read_to_string(&console).unwrap();
    assert_eq!(out.matches("virtio-net: ok").count(), CYCLES, "{out}");
}

fn example(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// Runs an example to its end; on failure says what it and the guest (`console`) wrote.
fn run_example(cmd: &mut std::process::Command, console: &std::path::Path) -> String {
    let out = cmd.output().expect("run the example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{text}\nthe guest's console:\n{}",
        std::fs::read_to_string(console).unwrap_or_default()
    );
    text
}

#[test]
fn the_hotplug_examples_plug_and_unplug_a_device_over_qmp_and_dbus() {
    use qomu_tests::dbus::SessionBus;

    require_kvm!();
    require_dbus!();
    if !qomu_tests::python_modules_present(&[("qemu.qmp", "qemu.qmp")]) {
        return;
    }
    let dir = TempDir::new("hotplug-examples");
    let console = dir.path("console");
    let disk = image(&dir, 16, "EXAMPLE DISK");
    let bus = SessionBus::start();
    // Two ejects for the examples, a third that never comes keeps the guest running.
    let q = bus.qomu(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--append",
        "min=0 hotplug=3",
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    c.cmd(r#"{"execute": "cont"}"#);
    wait_console(&console, "hotplug: ready");
    let before = c.tree();

    let out = run_example(
        std::process::Command::new("python3")
            .arg(example("hotplug.py"))
            .arg(&q.qmp)
            .args(["--id", "rng9", "--timeout", "30"]),
        &console,
    );
    for line in [
        "subscribed to plugged of every virtio-rng-pci: /subscriptions/",
        "plugged (bus pci.0, slot 1) after",
        "driver-ok (features 0x1",
        "unplugged after",
        "DEVICE_DELETED after",
    ] {
        assert!(out.contains(line), "no '{line}' in:\n{out}");
    }

    let out = run_example(
        std::process::Command::new("bash")
            .arg(example("hotplug.sh"))
            .args([
                "virtio-blk-pci",
                "disk-9",
                &format!("file={}", disk.display()),
                "serial=EX9",
            ])
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .env("QOMU_TIMEOUT", "30"),
        &console,
    );
    for line in [
        "subscribed to driver-ok of every virtio-blk-pci: \"/org/qomu/VM1/subscriptions/",
        "plugged ('pci.0', byte 0x01) after",
        "driver-ok (features uint64 ",
        "unplugged after",
    ] {
        assert!(out.contains(line), "no '{line}' in:\n{out}");
    }
    let guest = std::fs::read_to_string(&console).unwrap();
    for line in [
        "virtio-rng: ok",
        "virtio-blk: serial EX9",
        "virtio-blk: sector 0: EXAMPLE DISK",
        "hotplug: ejecting slot 1",
    ] {
        assert!(guest.contains(line), "no '{line}' in:\n{guest}");
    }
    // Both examples' subscriptions ended with their connections (the bus tells qomu that
    // the monitor left a moment after the script has ended).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.tree() != before {
        assert!(
            std::time::Instant::now() < deadline,
            "the examples left {:?}",
            c.tree().difference(&before).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn virtio_interrupts_go_through_msi_x_once_the_driver_enables_it() {
    require_kvm!();
    let dir = TempDir::new("virtio-msix");
    let console = dir.path("console");
    let mut q = Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("virtio"),
        "--append",
        // hotplug=1: the guest stays, waiting for an eject, while the counters are read.
        "msix=1 hotplug=1",
        "--device",
        "isa-debug-exit",
        "--device",
        "virtio-rng-pci,id=rng0",
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    let mut c = q.connect();
    c.negotiate();
    let get = |c: &mut QmpRaw, property: &str| {
        c.cmd(&format!(
            r#"{{"execute": "qom-get", "arguments": {{"path": "rng0", "property": "{property}"}}}}"#
        ))["return"]
            .clone()
    };
    c.cmd(r#"{"execute": "cont"}"#);
    wait_console(&console, "hotplug: ready");
    let out = std::fs::read_to_string(&console).unwrap();
    assert!(out.contains("virtio-rng: msi-x ok"), "{out}");
    // One message held back by the mask and sent on unmasking, one sent at once; no INTx.
    assert_eq!(get(&mut c, "msix-messages"), json!(2));
    assert_eq!(get(&mut c, "interrupts"), json!(0));
    assert!(q.is_running());
}
