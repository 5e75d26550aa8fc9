//! Netdevs end to end against a real `qomu` (`-S`, no guest): tap and stream backends
//! added and removed over QMP, D-Bus and the command line, seen in the tree with their
//! counters, QEMU's NETDEV_STREAM_* events, and bad requests refused with QEMU's texts.
//!
//! Traffic goes only to addresses inside network namespaces this test creates, every loop
//! and wait bounded (docs/network.md).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;

use qomu_tests::dbus::*;
use qomu_tests::{QmpRaw, Qomu, TempDir, require_dbus, skip, wait_until};
use serde_json::json;
use zbus::Variant;

/// Root, /dev/net/tun and `ip`: what a tap in a test namespace needs.
fn can_make_taps() -> bool {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        "not root"
    } else if !std::path::Path::new("/dev/net/tun").exists() {
        "no /dev/net/tun"
    } else if Command::new("ip").arg("-V").output().is_err() {
        "no `ip` (iproute2; scripts/test installs it)"
    } else {
        return true;
    };
    skip(&format!("cannot make taps in a test namespace: {why}"));
    false
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A namespace of this test's own, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("qomu-{tag}-{}", std::process::id());
        assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
        assert!(ip(&["-n", &name, "link", "set", "lo", "up"]));
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

fn netdevs(c: &mut QmpRaw) -> Vec<String> {
    c.children("/netdev")
}

/// One stream frame: its length, big-endian, then the bytes.
fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut f = (bytes.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(bytes);
    f
}

#[test]
fn a_tap_netdev_moved_into_a_test_namespace_counts_what_arrives_and_goes_with_netdev_del() {
    if !can_make_taps() {
        return;
    }
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.session();
    let ifname = format!("qn{}", std::process::id() % 100_000);
    c.ok(
        "netdev_add",
        json!({"type": "tap", "id": "net0", "ifname": ifname, "script": "no", "downscript": "no"}),
    );
    assert_eq!(c.qom_get("/netdev/net0", "type"), "tap");
    assert_eq!(c.qom_get("/netdev/net0", "ifname"), ifname.as_str());
    assert_eq!(c.qom_get("/netdev/net0", "rx-dropped"), 0);
    // The tap goes into a namespace of this test's, with 10.0.2.2/24; a datagram there to
    // 10.0.2.15 makes the kernel ask for that address on the tap (ARP): the frames reach
    // qomu, which has no NIC to give them to, and counts them.
    let ns = Netns::new("tap-e2e");
    assert!(ip(&["link", "set", &ifname, "netns", &ns.0]));
    assert!(ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.0.2.2/24",
        "dev",
        &ifname
    ]));
    assert!(ip(&["-n", &ns.0, "link", "set", &ifname, "up"]));
    let sent = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c"])
        .arg(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             for _ in range(3): s.sendto(b'qomu', ('10.0.2.15', 5555))",
        )
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    wait_until("the ARP request counted as dropped", || {
        c.qom_get("/netdev/net0", "rx-dropped").as_u64().unwrap() >= 1
    });
    assert_eq!(c.qom_get("/netdev/net0", "rx-packets"), 0);
    assert_eq!(c.qom_get("/netdev/net0", "errors"), 0);
    // netdev_del closes the tap: the kernel removes it from the namespace.
    c.ok("netdev_del", json!({"id": "net0"}));
    assert!(netdevs(&mut c).is_empty());
    wait_until("the tap gone", || {
        !ip(&["-n", &ns.0, "link", "show", &ifname])
    });
}

#[test]
fn a_stream_netdev_connects_counts_frames_and_tells_when_its_peer_goes() {
    let dir = TempDir::new("net-stream");
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.session();
    // As a client of a peer that listens (passt's way).
    let path = dir.path("peer.socket");
    let listener = UnixListener::bind(&path).unwrap();
    c.ok(
        "netdev_add",
        json!({"type": "stream", "id": "s0", "server": false,
               "addr": {"type": "unix", "path": path}}),
    );
    let (mut peer, _) = listener.accept().unwrap();
    let e = c.wait_event("NETDEV_STREAM_CONNECTED");
    assert_eq!(
        e["data"],
        json!({"netdev-id": "s0", "addr": {"type": "unix", "path": path}})
    );
    assert_eq!(c.qom_get("/netdev/s0", "connected"), true);
    assert_eq!(c.qom_get("/netdev/s0", "path"), path.to_str().unwrap());
    let mut bytes = frame(&[0xaa; 60]);
    bytes.extend(frame(&[0xbb; 1514]));
    peer.write_all(&bytes).unwrap();
    wait_until("two frames counted", || {
        c.qom_get("/netdev/s0", "rx-dropped") == 2
    });
    drop(peer);
    let e = c.wait_event("NETDEV_STREAM_DISCONNECTED");
    assert_eq!(e["data"], json!({"netdev-id": "s0"}));
    assert_eq!(c.qom_get("/netdev/s0", "connected"), false);
    c.ok("netdev_del", json!({"id": "s0"}));

    // As a server: one peer at a time, and the socket goes with netdev_del.
    let served = dir.path("served.socket");
    c.ok(
        "netdev_add",
        json!({"type": "stream", "id": "s1", "server": true,
               "addr": {"type": "unix", "path": served}}),
    );
    let mut sub = c.cmd(
        r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "/netdev/s1", "notifier": "*"}}"#,
    );
    let sub = sub["return"]["subscription"].take();
    for round in 0..2 {
        let mut client = UnixStream::connect(&served).unwrap();
        let n = c.wait_notify_of(sub.as_str().unwrap());
        assert_eq!(n["data"]["notifier"], "peer-connected", "round {round}");
        client.write_all(&frame(b"hello")).unwrap();
        drop(client);
        let n = c.wait_notify_of(sub.as_str().unwrap());
        assert_eq!(n["data"]["notifier"], "peer-disconnected", "round {round}");
    }
    assert_eq!(c.qom_get("/netdev/s1", "rx-dropped"), 2);
    c.ok("netdev_del", json!({"id": "s1"}));
    assert!(!served.exists(), "the listening socket is removed");
}

#[test]
fn bad_netdev_requests_get_qemus_texts_and_change_nothing() {
    let dir = TempDir::new("net-bad");
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.session();
    let missing = dir.path("nobody.socket");
    let before = netdevs(&mut c);
    let mut cases = vec![
        (
            json!({"type": "bogus", "id": "n0"}),
            "Parameter 'type' does not accept value 'bogus'",
        ),
        (json!({"type": "tap"}), "Parameter 'id' is missing"),
        (
            json!({"type": "tap", "id": "9bad"}),
            "Parameter 'id' expects an identifier",
        ),
        (
            json!({"type": "tap", "id": "t0", "fd": "nofd"}),
            "File descriptor named 'nofd' has not been found",
        ),
        (
            json!({"type": "tap", "id": "t0", "extra": 1}),
            "Parameter 'extra' is unexpected",
        ),
        (
            json!({"type": "stream", "id": "s0"}),
            "Parameter 'addr' is missing",
        ),
        (
            json!({"type": "stream", "id": "s0", "addr": {"type": "unix"}}),
            "Parameter 'addr.path' is missing",
        ),
        (
            json!({"type": "stream", "id": "s0", "server": "yes", "addr": {"type": "unix", "path": "/x"}}),
            "Invalid parameter type for 'server', expected: boolean",
        ),
        // Where QEMU does something qomu does not, qomu says so.
        (
            json!({"type": "tap", "id": "t0", "script": "/etc/qemu-ifup"}),
            "tap: script=/etc/qemu-ifup: qomu runs no interface scripts",
        ),
        (
            json!({"type": "stream", "id": "s0", "addr": {"type": "inet", "host": "127.0.0.1"}}),
            "stream netdev: addr.type 'inet' is not supported",
        ),
        // QEMU 7.2 accepts a stream to nothing and leaves it in "connection error".
        (
            json!({"type": "stream", "id": "s0", "addr": {"type": "unix", "path": missing}}),
            "could not connect to",
        ),
    ];
    if std::path::Path::new("/dev/net/tun").exists() {
        cases.push((
            json!({"type": "tap", "id": "t0", "ifname": "lo"}),
            "could not configure /dev/net/tun (lo): Invalid argument",
        ));
    }
    for (args, text) in cases {
        let r = c.execute("netdev_add", args.clone());
        assert_eq!(r["error"]["class"], "GenericError", "{args}: {r}");
        let desc = r["error"]["desc"].as_str().unwrap();
        assert!(desc.starts_with(text), "{args}: {desc}");
    }
    let r = c.execute("netdev_del", json!({"id": "nope"}));
    assert_eq!(
        r["error"],
        json!({"class": "DeviceNotFound", "desc": "Device 'nope' not found"})
    );
    // A duplicate id, with the first one in place.
    let listener = UnixListener::bind(dir.path("dup.socket")).unwrap();
    let args = json!({"type": "stream", "id": "d", "addr": {"type": "unix", "path": dir.path("dup.socket")}});
    c.ok("netdev_add", args.clone());
    let r = c.execute("netdev_add", args);
    assert_eq!(r["error"]["desc"], "Duplicate ID 'd'");
    drop(listener);
    c.ok("netdev_del", json!({"id": "d"}));
    assert_eq!(netdevs(&mut c), before);
    // The schema has both commands and both events.
    let schema = c.ok("query-qmp-schema", json!({}));
    for name in [
        "netdev_add",
        "netdev_del",
        "NETDEV_STREAM_CONNECTED",
        "NETDEV_STREAM_DISCONNECTED",
    ] {
        assert!(
            schema.as_array().unwrap().iter().any(|e| e["name"] == name),
            "{name} not in query-qmp-schema"
        );
    }
}

#[test]
fn netdevs_from_the_command_line_and_over_dbus() {
    require_dbus!();
    let dir = TempDir::new("net-cli");
    let served = dir.path("cli.socket");
    let bus = SessionBus::start();
    let spec = format!(
        "stream,id=cli0,server=on,addr.type=unix,addr.path={}",
        served.display()
    );
    let q = bus.qomu(&["-S", "--netdev", &spec]);
    let mut qmp = q.session();
    assert_eq!(netdevs(&mut qmp), ["cli0"]);
    assert_eq!(qmp.qom_get("/netdev/cli0", "server"), true);
    assert!(served.exists());

    // Over D-Bus: the machine's NetdevAdd and NetdevDel; the netdev is an object there.
    let c = bus.client();
    let peer_socket = dir.path("dbus-peer.socket");
    let listener = UnixListener::bind(&peer_socket).unwrap();
    let props: HashMap<&str, Variant<'_>> =
        HashMap::from([("path", Variant::from(peer_socket.to_str().unwrap()))]);
    let opts: HashMap<&str, Variant<'_>> = HashMap::from([
        ("id", Variant::from("db0")),
        ("properties", Variant::from(props)),
    ]);
    c.ok(MACHINE, MACHINE_IFACE, "NetdevAdd", &("stream", opts));
    let (_peer, _) = listener.accept().unwrap();
    let path = "/org/qomu/VM1/netdev/db0";
    wait_until("connected over D-Bus", || {
        bool::try_from(c.get(path, "org.qomu.Type.Stream", "Connected")).unwrap()
    });
    assert_eq!(
        u64::try_from(c.get(path, "org.qomu.Type.Netdev", "RxDropped")).unwrap(),
        0
    );
    let e = c.err(
        MACHINE,
        MACHINE_IFACE,
        "NetdevAdd",
        &(
            "bogus",
            HashMap::<&str, Variant<'_>>::from([("id", Variant::from("x"))]),
        ),
    );
    assert_eq!(e.name, "org.freedesktop.DBus.Error.InvalidArgs", "{e:?}");

    // A NIC on it; SetLink and QueryRxFilter are the machine's methods too.
    qmp.ok(
        "device_add",
        json!({"driver": "virtio-net-pci", "id": "dnic", "netdev": "db0"}),
    );
    c.ok(MACHINE, MACHINE_IFACE, "SetLink", &("db0", false));
    assert_eq!(qmp.qom_get("dnic", "link"), false);
    assert!(!bool::try_from(c.get(path, "org.qomu.Type.Netdev", "Link")).unwrap());
    let reply = c.ok(
        MACHINE,
        MACHINE_IFACE,
        "QueryRxFilter",
        &(HashMap::<&str, Variant<'_>>::from([(
            "name",
            Variant::from("dnic"),
        )]),),
    );
    let infos: Vec<zbus::OwnedVariant> = reply.body().deserialize().expect("av");
    assert_eq!(infos.len(), 1);
    let info: HashMap<String, zbus::OwnedVariant> =
        infos[0].try_clone().unwrap().try_into().expect("a{sv}");
    assert_eq!(
        String::try_from(info["main-mac"].try_clone().unwrap()).unwrap(),
        "52:54:00:12:34:56"
    );
    assert!(bool::try_from(info["promiscuous"].try_clone().unwrap()).unwrap());
    let e = c.err(
        MACHINE,
        MACHINE_IFACE,
        "QueryRxFilter",
        &(HashMap::<&str, Variant<'_>>::from([(
            "name",
            Variant::from("db0"),
        )]),),
    );
    assert!(e.message.contains("net client(db0) isn't a NIC"), "{e:?}");
    // A second NIC on the same netdev: busy.
    let opts: HashMap<&str, Variant<'_>> = HashMap::from([
        ("id", Variant::from("dnic2")),
        (
            "properties",
            Variant::from(HashMap::from([("netdev", Variant::from("db0"))])),
        ),
    ]);
    let e = c.err(
        MACHINE,
        MACHINE_IFACE,
        "DeviceAdd",
        &("virtio-net-pci", opts),
    );
    assert_eq!(e.name, "org.qomu.Error.Busy", "{e:?}");
    qmp.ok("device_del", json!({"id": "dnic"}));
    c.ok(MACHINE, MACHINE_IFACE, "NetdevDel", &("db0",));
    assert_eq!(netdevs(&mut qmp), ["cli0"]);

    // A bad --netdev stops qomu before anything runs, saying why.
    let out = qomu_tests::qomu_command()
        .args(["-S", "--dbus", "none", "--netdev", "bogus,id=x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("there is no netdev type 'bogus'"), "{said}");
}

/// Sends `text` over the QMP socket with `fd` attached (SCM_RIGHTS), as libvirt does.
fn send_with_fd(c: &mut QmpRaw, text: &str, fd: std::os::fd::RawFd) {
    use std::os::fd::AsRawFd;
    let mut iov = libc::iovec {
        iov_base: text.as_ptr() as *mut libc::c_void,
        iov_len: text.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr, pointed at live buffers; one control message with one int.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
        let n = libc::sendmsg(c.stream.as_raw_fd(), &msg, 0);
        assert_eq!(n, text.len() as isize, "sendmsg");
    }
}

/// A tap opened here, as a management daemon opens one before handing it over.
fn open_tap(name: &str) -> std::fs::File {
    open_tap_with(name, libc::IFF_VNET_HDR)
}

/// Opens (creating) the tap `name` with `IFF_TAP | IFF_NO_PI | extra`.
fn open_tap_with(name: &str, extra: libc::c_int) -> std::fs::File {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | extra) as libc::c_int as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF on an open tun file with an ifreq-shaped struct.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(r, 0, "TUNSETIFF {name}");
    file
}

#[test]
fn a_tap_handed_over_with_getfd_becomes_a_netdev_and_is_closed_with_it() {
    if !can_make_taps() {
        return;
    }
    use std::os::fd::AsRawFd;
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.session();
    // getfd names what came with it; nothing came, a bad name, closefd of nothing.
    let r = c.execute("getfd", json!({"fdname": "x"}));
    assert_eq!(
        r["error"]["desc"],
        "No file descriptor supplied via SCM_RIGHTS"
    );
    let null = std::fs::File::open("/dev/null").unwrap();
    send_with_fd(
        &mut c,
        r#"{"execute": "getfd", "arguments": {"fdname": "1st"}}"#,
        null.as_raw_fd(),
    );
    assert_eq!(
        c.reply()["error"]["desc"],
        "Parameter 'fdname' expects a name not starting with a digit"
    );
    send_with_fd(
        &mut c,
        r#"{"execute": "getfd", "arguments": {"fdname": "nul"}}"#,
        null.as_raw_fd(),
    );
    assert_eq!(c.reply(), json!({"return": {}}));
    c.ok("closefd", json!({"fdname": "nul"}));
    let r = c.execute("closefd", json!({"fdname": "nul"}));
    assert_eq!(r["error"]["desc"], "File descriptor named 'nul' not found");
    // A descriptor that is no tap: refused, and gone from the table.
    send_with_fd(
        &mut c,
        r#"{"execute": "getfd", "arguments": {"fdname": "bad"}}"#,
        null.as_raw_fd(),
    );
    assert_eq!(c.reply(), json!({"return": {}}));
    let r = c.execute(
        "netdev_add",
        json!({"type": "tap", "id": "t0", "fd": "bad"}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_owned();
    // QEMU's text, with the descriptor's number in qomu.
    assert!(
        desc.starts_with("Unable to query TUNGETIFF on FD ")
            && desc.ends_with(": Inappropriate ioctl for device"),
        "{r}"
    );
    let r = c.execute("closefd", json!({"fdname": "bad"}));
    assert!(r.get("error").is_some(), "{r}");
    // A real tap, opened here: the netdev uses it, under its name.
    let name = format!("qf{}", std::process::id() % 100_000);
    let tap = open_tap(&name);
    send_with_fd(
        &mut c,
        r#"{"execute": "getfd", "arguments": {"fdname": "tapfd"}}"#,
        tap.as_raw_fd(),
    );
    assert_eq!(c.reply(), json!({"return": {}}));
    drop(tap); // qomu holds its own copy now
    let r = c.execute(
        "netdev_add",
        json!({"type": "tap", "id": "t1", "fd": "tapfd", "ifname": "x"}),
    );
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("invalid with fd="),
        "{r}"
    );
    c.ok(
        "netdev_add",
        json!({"type": "tap", "id": "t1", "fd": "tapfd"}),
    );
    assert_eq!(c.qom_get("/netdev/t1", "ifname"), name.as_str());
    assert!(ip(&["link", "show", &name]), "the tap is there");
    // Used once: the name is gone from the table.
    let r = c.execute(
        "netdev_add",
        json!({"type": "tap", "id": "t2", "fd": "tapfd"}),
    );
    assert_eq!(
        r["error"]["desc"],
        "File descriptor named 'tapfd' has not been found"
    );
    c.ok("netdev_del", json!({"id": "t1"}));
    wait_until("the tap closed with its netdev", || {
        !ip(&["link", "show", &name])
    });
}

/// The driver guest's serial path in these tests.
const SERIAL: &str = "/machine/unattached/serial0";

/// The next console line containing `text`; a failed step of the guest fails the test.
fn guest_line(c: &mut QmpRaw, text: &str) -> String {
    loop {
        let line = c.wait_notify("line", SERIAL);
        let line = line["line"].as_str().unwrap_or_default().to_owned();
        assert!(!line.contains("failed at step"), "the guest failed: {line}");
        if line.contains(text) {
            return line;
        }
    }
}

/// A UDP listener at 10.0.2.2:5555 inside `ns` that answers the first datagram with
/// "reply: " and the datagram, then ends (or ends after 60 s with nothing). Returns once
/// it is bound.
fn udp_responder(ns: &Netns) -> std::process::Child {
    let script = "import socket, sys\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.bind(('10.0.2.2', 5555))\n\
print('bound', flush=True)\n\
s.settimeout(60)\n\
data, peer = s.recvfrom(2048)\n\
s.sendto(b'reply: ' + data, peer)\n";
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 in the namespace");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("the responder's first line");
    assert_eq!(line.trim(), "bound");
    child
}

/// The driver guest on a virtio-net-pci over a real tap moved into a namespace of the
/// test's, 10.0.2.2 there: its ARP request, ICMP echo and UDP datagram reach the namespace
/// and the answers reach the guest; the filter the driver set shows in query-rx-filter
/// (NIC_RX_FILTER_CHANGED once); `set_link` down (by the NIC's id) and up (by the
/// netdev's) is seen by the guest; the NIC's and the netdev's counters match the traffic.
#[test]
fn the_driver_guest_reaches_a_namespace_through_a_tap_and_sees_its_link() {
    qomu_tests::require_kvm!();
    if !can_make_taps() {
        return;
    }
    let ns = Netns::new("nic");
    let tap = format!("qn{}", std::process::id() % 1_000_000);
    let mut q = Qomu::spawn_with(
        &[
            "-S",
            "--kernel",
            &qomu_guests::path("virtio").display().to_string(),
            "--append",
            "netlink=1",
            "--device",
            "isa-debug-exit",
            "--netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "--device",
            "virtio-net-pci,id=nic0,netdev=n0",
            "--serial",
            "stdio",
        ],
        |cmd| {
            cmd.stdout(std::process::Stdio::null());
        },
    );
    assert!(
        ip(&["link", "set", &tap, "netns", &ns.0]),
        "tap into {}",
        ns.0
    );
    assert!(ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.0.2.2/24",
        "dev",
        &tap
    ]));
    assert!(ip(&["-n", &ns.0, "link", "set", &tap, "up"]));
    let mut responder = udp_responder(&ns);
    let mut c = q.session();
    assert_eq!(c.qom_get("/netdev/n0", "nic"), "/machine/peripheral/nic0");
    assert_eq!(c.qom_get("nic0", "mac"), "52:54:00:12:34:56");
    let before = c.ok("query-rx-filter", json!({"name": "nic0"}));
    assert_eq!(before[0]["promiscuous"], true, "{before}");
    c.ok(
        "__org.qomu_subscribe",
        json!({"path": SERIAL, "notifier": "line"}),
    );
    c.ok("cont", json!({}));

    assert!(guest_line(&mut c, "virtio-net: mac ").ends_with("52:54:00:12:34:56 link up"));
    guest_line(&mut c, "virtio-net: promiscuous mode off");
    let changed = c.wait_event("NIC_RX_FILTER_CHANGED");
    assert_eq!(
        changed["data"],
        json!({"name": "nic0", "path": "/machine/peripheral/nic0"})
    );
    // A second change before anyone asked: no second event (QEMU's rule). Everything the
    // device emitted before the guest's next line has been read by now.
    guest_line(&mut c, "virtio-net: all-multicast on");
    assert_eq!(c.queued_events("NIC_RX_FILTER_CHANGED"), 0);
    guest_line(&mut c, "virtio-net: arp reply: 10.0.2.2 is at ");
    guest_line(&mut c, "virtio-net: echo reply from 10.0.2.2");
    let udp = guest_line(&mut c, "virtio-net: udp reply: ");
    assert!(udp.ends_with("reply: hello from the qomu guest"), "{udp}");
    assert!(guest_line(&mut c, "virtio-net: sent ").ends_with("sent 3 frames"));
    let _ = responder.wait();

    // The filter as the driver left it: promiscuous off, the NIC's own MAC.
    let filter = c.ok("query-rx-filter", json!({}));
    assert_eq!(filter.as_array().map(Vec::len), Some(1), "{filter}");
    let f = &filter[0];
    assert_eq!(f["name"], "nic0");
    assert_eq!(f["promiscuous"], false);
    assert_eq!(f["main-mac"], "52:54:00:12:34:56");
    assert_eq!(f["unicast"], "normal");
    assert_eq!(f["multicast"], "all");
    assert_eq!(f["vlan"], "all");
    assert_eq!(f["vlan-table"].as_array().map(Vec::len), Some(4096));

    guest_line(&mut c, "virtio-net: watching the link");
    // Exactly what the guest sent went out; what it took in came from the namespace.
    assert_eq!(c.qom_get("nic0", "tx-packets"), 3);
    assert_eq!(c.qom_get("/netdev/n0", "tx-packets"), 3);
    assert_eq!(c.qom_get("nic0", "tx-dropped"), 0);
    let rx = c.qom_get("nic0", "rx-packets").as_u64().unwrap();
    assert!(rx >= 3, "rx-packets {rx}");
    assert_eq!(c.qom_get("/netdev/n0", "rx-packets"), rx);
    // 42-byte ARP, 14+20+8+10 ICMP, 14+20+8+25 UDP.
    assert_eq!(c.qom_get("nic0", "tx-bytes"), 42 + 52 + 67);
    c.ok("set_link", json!({"name": "nic0", "up": false}));
    guest_line(&mut c, "virtio-net: link down");
    assert_eq!(c.qom_get("/netdev/n0", "link"), false);
    c.ok("set_link", json!({"name": "n0", "up": true}));
    guest_line(&mut c, "virtio-net: link up");
    assert_eq!(c.qom_get("nic0", "link"), true);
    // query-rx-filter re-armed the event: the next change sends it again.
    guest_line(&mut c, "virtio-net: all-multicast off");
    c.wait_event("NIC_RX_FILTER_CHANGED");
    guest_line(&mut c, "virtio-net: ok");

    assert_eq!(q.wait_exit(std::time::Duration::from_secs(60)), Some(1));
}

/// NIC mistakes get QEMU's texts and change nothing; a netdev deleted under its NIC
/// forces the NIC's link down and frees its id at once, as in QEMU.
#[test]
fn nic_requests_get_qemus_texts_and_netdev_del_forces_the_link_down() {
    let dir = TempDir::new("nic-bad");
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.session();
    let socket = dir.path("peer.socket");
    let listener = UnixListener::bind(&socket).unwrap();
    let stream =
        |id: &str| json!({"type": "stream", "id": id, "addr": {"type": "unix", "path": socket}});
    c.ok("netdev_add", stream("n0"));
    c.ok(
        "device_add",
        json!({"driver": "virtio-net-pci", "id": "nic0", "netdev": "n0"}),
    );
    let tree = c.tree();
    for (args, class, text) in [
        (
            json!({"driver": "virtio-net-pci", "id": "nic1", "netdev": "n0"}),
            "GenericError",
            "Property 'virtio-net-device.netdev' can't take value 'n0', it's in use",
        ),
        (
            json!({"driver": "virtio-net-pci", "id": "nic1", "netdev": "nosuch"}),
            "GenericError",
            "Property 'virtio-net-device.netdev' can't find value 'nosuch'",
        ),
        (
            json!({"driver": "virtio-net-pci", "id": "nic1", "mac": "zz"}),
            "GenericError",
            "Property 'virtio-net-device.mac' doesn't take value 'zz'",
        ),
        (
            json!({"driver": "virtio-net-pci", "id": "nic1", "rx_queue_size": 100}),
            "GenericError",
            "Invalid rx_queue_size (= 100), must be a power of 2 between 256 and 1024.",
        ),
        (
            json!({"driver": "virtio-net-pci", "id": "nic1", "rx_queue_size": 2048}),
            "GenericError",
            "Invalid rx_queue_size (= 2048), must be a power of 2 between 256 and 1024.",
        ),
        (
            json!({"driver": "virtio-net-pci", "id": "nic1", "tx_queue_size": 100}),
            "GenericError",
            "Invalid tx_queue_size (= 100), must be a power of 2 between 256 and 1024",
        ),
    ] {
        let r = c.execute("device_add", args.clone());
        assert_eq!(r["error"]["class"], class, "{args}: {r}");
        assert_eq!(r["error"]["desc"], text, "{args}");
    }
    for (command, args, class, text) in [
        (
            "set_link",
            json!({"name": "nope", "up": false}),
            "DeviceNotFound",
            "Device 'nope' not found",
        ),
        (
            "query-rx-filter",
            json!({"name": "n0"}),
            "GenericError",
            "net client(n0) isn't a NIC",
        ),
        (
            "query-rx-filter",
            json!({"name": "nope"}),
            "GenericError",
            "invalid net client name: nope",
        ),
        (
            "set_link",
            json!({"name": "nic0", "up": "yes"}),
            "GenericError",
            "Invalid parameter type for 'up', expected: boolean",
        ),
    ] {
        let r = c.execute(command, args.clone());
        assert_eq!(r["error"]["class"], class, "{command} {args}: {r}");
        assert_eq!(r["error"]["desc"], text, "{command} {args}");
    }
    assert_eq!(c.tree(), tree, "nothing changed");
    // QEMU's default MACs count up per NIC; one without a netdev is allowed. Queue sizes
    // as asked (the control queue is QEMU's 64).
    c.ok(
        "device_add",
        json!({"driver": "virtio-net-pci", "id": "nic1", "rx_queue_size": 1024, "tx_queue_size": 512}),
    );
    assert_eq!(c.qom_get("nic1", "queue-sizes"), json!([1024, 512, 64]));
    assert_eq!(c.qom_get("nic0", "queue-sizes"), json!([256, 256, 64]));
    assert_eq!(c.qom_get("nic0", "mac"), "52:54:00:12:34:56");
    assert_eq!(c.qom_get("nic1", "mac"), "52:54:00:12:34:57");
    // Before a driver runs, QEMU's filter: promiscuous, every VLAN.
    let f = c.ok("query-rx-filter", json!({"name": "nic1"}));
    assert_eq!(f[0]["promiscuous"], true);
    assert_eq!(f[0]["main-mac"], "52:54:00:12:34:57");
    assert_eq!(f[0]["broadcast-allowed"], false);

    // netdev_del under the NIC: accepted, the NIC stays with its link down, the id is free.
    assert_eq!(c.qom_get("nic0", "link"), true);
    c.ok("netdev_del", json!({"id": "n0"}));
    assert_eq!(c.qom_get("nic0", "link"), false);
    assert!(
        c.children("/machine/peripheral")
            .contains(&"nic0".to_owned())
    );
    c.ok("netdev_add", stream("n0"));
    c.ok("netdev_del", json!({"id": "n0"}));
    drop(listener);
}

/// `migrate` to a file and its end; the final query-migrate.
fn save_to(c: &mut QmpRaw, file: &std::path::Path) -> serde_json::Value {
    c.ok(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let mut info = serde_json::Value::Null;
    wait_until("the save to end", || {
        info = c.ok("query-migrate", json!({}));
        matches!(info["status"].as_str(), Some("completed" | "failed"))
    });
    info
}

/// A NIC saved while its driver runs (the driver guest waiting for a link change) and
/// restored in another qomu goes on: the filter the driver set and the link are kept,
/// and the restored guest sees `set_link` down and up.
#[test]
fn a_nic_saved_and_restored_keeps_its_filter_and_link() {
    qomu_tests::require_kvm!();
    if !can_make_taps() {
        return;
    }
    let dir = TempDir::new("nic-snap");
    let ns = Netns::new("nicsnap");
    let tap = format!("qs{}", std::process::id() % 1_000_000);
    let file = dir.path("vm.snap");
    let args = |incoming: Option<&std::path::Path>| {
        let mut a: Vec<String> = [
            "-S",
            "--kernel",
            &qomu_guests::path("virtio").display().to_string(),
            "--append",
            "netlink=1",
            "--device",
            "isa-debug-exit",
            "--netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "--device",
            "virtio-net-pci,id=nic0,netdev=n0,mac=52:54:00:ab:cd:ef",
            "--serial",
            "stdio",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(f) = incoming {
            a.extend(["--incoming".into(), format!("file:{}", f.display())]);
        }
        a
    };
    let spawn = |a: &[String]| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Qomu::spawn_with(&a, |cmd| {
            cmd.stdout(std::process::Stdio::null());
        })
    };
    let mut first = spawn(&args(None));
    assert!(ip(&["link", "set", &tap, "netns", &ns.0]));
    assert!(ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.0.2.2/24",
        "dev",
        &tap
    ]));
    assert!(ip(&["-n", &ns.0, "link", "set", &tap, "up"]));
    let mut responder = udp_responder(&ns);
    let mut c = first.session();
    c.ok(
        "__org.qomu_subscribe",
        json!({"path": SERIAL, "notifier": "line"}),
    );
    c.ok("cont", json!({}));
    guest_line(&mut c, "virtio-net: udp reply: ");
    guest_line(&mut c, "virtio-net: watching the link");
    let _ = responder.wait();
    c.ok("stop", json!({}));
    let info = save_to(&mut c, &file);
    assert_eq!(info["status"], "completed", "{info}");
    drop(c);
    let _ = first.child.kill();
    first.wait_exit(std::time::Duration::from_secs(10));

    let mut second = spawn(&args(Some(&file)));
    let mut c = second.session();
    assert_eq!(c.ok("query-status", json!({}))["status"], "paused");
    let f = c.ok("query-rx-filter", json!({"name": "nic0"}));
    assert_eq!(f[0]["promiscuous"], false, "the driver's filter came back");
    assert_eq!(f[0]["main-mac"], "52:54:00:ab:cd:ef");
    assert_eq!(c.qom_get("nic0", "link"), true);
    c.ok(
        "__org.qomu_subscribe",
        json!({"path": SERIAL, "notifier": "line"}),
    );
    c.ok("set_link", json!({"name": "nic0", "up": false}));
    c.ok("cont", json!({}));
    guest_line(&mut c, "virtio-net: link down");
    c.ok("set_link", json!({"name": "nic0", "up": true}));
    guest_line(&mut c, "virtio-net: link up");
    guest_line(&mut c, "virtio-net: ok");
    assert_eq!(
        second.wait_exit(std::time::Duration::from_secs(60)),
        Some(1)
    );
}

/// A NIC hot-plugged into a running guest, on a tap netdev added meanwhile and moved into
/// the test's namespace: the guest's driver brings it up and its traffic reaches the
/// namespace; `device_del` (the guest ejects it) and `netdev_del` leave the tree and the
/// namespace as they were.
#[test]
fn a_hot_plugged_nic_carries_traffic_and_leaves_with_its_netdev() {
    qomu_tests::require_kvm!();
    if !can_make_taps() {
        return;
    }
    let ns = Netns::new("nichot");
    let tap = format!("qh{}", std::process::id() % 1_000_000);
    let mut q = Qomu::spawn_with(
        &[
            "-S",
            "--kernel",
            &qomu_guests::path("virtio").display().to_string(),
            "--append",
            // A second eject that never comes keeps the guest running to the end.
            "min=0 hotplug=2",
            "--device",
            "isa-debug-exit",
            "--serial",
            "stdio",
        ],
        |cmd| {
            cmd.stdout(std::process::Stdio::null());
        },
    );
    let mut c = q.session();
    c.ok(
        "__org.qomu_subscribe",
        json!({"path": SERIAL, "notifier": "line"}),
    );
    c.ok("cont", json!({}));
    guest_line(&mut c, "hotplug: ready");
    let tree = c.tree();
    c.ok(
        "netdev_add",
        json!({"type": "tap", "id": "hn0", "ifname": tap, "script": "no", "downscript": "no"}),
    );
    assert!(ip(&["link", "set", &tap, "netns", &ns.0]));
    assert!(ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.0.2.2/24",
        "dev",
        &tap
    ]));
    assert!(ip(&["-n", &ns.0, "link", "set", &tap, "up"]));
    let mut responder = udp_responder(&ns);
    c.ok(
        "device_add",
        json!({"driver": "virtio-net-pci", "id": "hnic", "netdev": "hn0"}),
    );
    guest_line(&mut c, "hotplug: slot ");
    guest_line(&mut c, "virtio-net: echo reply from 10.0.2.2");
    assert!(guest_line(&mut c, "virtio-net: udp reply: ").ends_with("hello from the qomu guest"));
    guest_line(&mut c, "virtio-net: ok");
    let _ = responder.wait();
    assert_eq!(c.qom_get("hnic", "tx-packets"), 3);
    c.ok("device_del", json!({"id": "hnic"}));
    c.wait_event("DEVICE_DELETED");
    c.ok("netdev_del", json!({"id": "hn0"}));
    assert_eq!(c.tree(), tree, "the tree as before the plug");
    assert!(
        !ip(&["-n", &ns.0, "link", "show", &tap]),
        "the tap went with its netdev"
    );
    guest_line(&mut c, "hotplug: ejecting slot ");
    c.ok("quit", json!({}));
    assert_eq!(q.wait_exit(std::time::Duration::from_secs(60)), Some(0));
}

/// A peer for a stream netdev made of a tap: every frame the netdev sends (length,
/// frame) goes out of `tap` into its namespace, every frame from there comes back in the
/// framing. Runs until `stop`, or 60 s; returns the frames it carried each way.
fn stream_to_tap(
    listener: UnixListener,
    tap: std::fs::File,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().expect("the netdev connects");
        let (mut to_tap, mut to_netdev) = (0, 0);
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 70000];
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !stop.load(std::sync::atomic::Ordering::Acquire) && std::time::Instant::now() < end {
            let mut fds = [
                libc::pollfd {
                    fd: socket.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: tap.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds and their count.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) } <= 0 {
                continue;
            }
            if fds[0].revents != 0 {
                let n = socket.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&buf[..n]);
                while pending.len() >= 4 {
                    let len = u32::from_be_bytes(pending[..4].try_into().unwrap()) as usize;
                    if pending.len() < 4 + len {
                        break;
                    }
                    let _ = (&tap).write_all(&pending[4..4 + len]);
                    pending.drain(..4 + len);
                    to_tap += 1;
                }
            }
            if fds[1].revents != 0 {
                let n = (&tap).read(&mut buf).unwrap_or(0);
                if n > 0 {
                    socket.write_all(&frame(&buf[..n])).expect("to the netdev");
                    to_netdev += 1;
                }
            }
        }
        (to_tap, to_netdev)
    })
}

/// The driver guest over a stream netdev (QEMU's framing, no vnet header) to a peer the
/// test runs, which carries the frames to and from a tap in the test's namespace: the
/// same ARP, ICMP and UDP exchange as over a tap, and no checksum or segmentation
/// offload offered (a stream peer has no headers, QEMU's rule).
#[test]
fn the_driver_guest_reaches_a_namespace_over_a_stream_netdev() {
    qomu_tests::require_kvm!();
    if !can_make_taps() {
        return;
    }
    let dir = TempDir::new("nic-stream");
    let ns = Netns::new("nicstream");
    let name = format!("qb{}", std::process::id() % 1_000_000);
    let tap = open_tap_with(&name, 0);
    assert!(ip(&["link", "set", &name, "netns", &ns.0]));
    assert!(ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.0.2.2/24",
        "dev",
        &name
    ]));
    assert!(ip(&["-n", &ns.0, "link", "set", &name, "up"]));
    let socket = dir.path("peer.socket");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peer = stream_to_tap(UnixListener::bind(&socket).unwrap(), tap, stop.clone());
    let mut responder = udp_responder(&ns);
    let mut q = Qomu::spawn_with(
        &[
            "-S",
            "--kernel",
            &qomu_guests::path("virtio").display().to_string(),
            "--append",
            "netlink=1",
            "--device",
            "isa-debug-exit",
            "--netdev",
            &format!("stream,id=s0,addr.type=unix,addr.path={}", socket.display()),
            "--device",
            "virtio-net-pci,id=nic0,netdev=s0",
            "--serial",
            "stdio",
        ],
        |cmd| {
            cmd.stdout(std::process::Stdio::null());
        },
    );
    let mut c = q.session();
    let offered = c.qom_get("nic0", "host-features").as_u64().unwrap();
    assert_eq!(
        offered & 0b11,
        0,
        "no CSUM, GUEST_CSUM over a stream: {offered:#x}"
    );
    assert_ne!(offered & (1 << 15), 0, "MRG_RXBUF: {offered:#x}");
    c.ok(
        "__org.qomu_subscribe",
        json!({"path": SERIAL, "notifier": "line"}),
    );
    c.ok("cont", json!({}));
    guest_line(&mut c, "virtio-net: arp reply: 10.0.2.2 is at ");
    guest_line(&mut c, "virtio-net: echo reply from 10.0.2.2");
    assert!(
        guest_line(&mut c, "virtio-net: udp reply: ").ends_with("reply: hello from the qomu guest")
    );
    // While the guest waits for a link change, it is still there to be asked.
    guest_line(&mut c, "virtio-net: watching the link");
    let _ = responder.wait();
    assert_eq!(c.qom_get("/netdev/s0", "tx-packets"), 3);
    c.ok("set_link", json!({"name": "s0", "up": false}));
    guest_line(&mut c, "virtio-net: link down");
    c.ok("set_link", json!({"name": "s0", "up": true}));
    guest_line(&mut c, "virtio-net: ok");
    assert_eq!(q.wait_exit(std::time::Duration::from_secs(60)), Some(1));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (to_tap, to_netdev) = peer.join().unwrap();
    assert_eq!(
        to_tap, 3,
        "the guest's three frames went through the stream"
    );
    assert!(to_netdev >= 3, "{to_netdev} frames back");
}

/// examples/netns-nic.py, unchanged, against a running driver guest: it makes its
/// namespace, a tap netdev there and a NIC, the guest's datagram reaches its responder and
/// the answer the guest, and it takes the NIC, the netdev and the namespace away again.
#[test]
fn the_netns_nic_example_gives_a_guest_a_card_uses_it_and_takes_it_away() {
    qomu_tests::require_kvm!();
    if !can_make_taps() || !qomu_tests::python_modules_present(&[("qemu.qmp", "qemu.qmp")]) {
        return;
    }
    let mut q = Qomu::spawn_with(
        &[
            "-S",
            "--kernel",
            &qomu_guests::path("virtio").display().to_string(),
            "--append",
            "min=0 hotplug=2",
            "--serial",
            "stdio",
        ],
        |cmd| {
            cmd.stdout(std::process::Stdio::null());
        },
    );
    let mut c = q.session();
    c.ok(
        "__org.qomu_subscribe",
        json!({"path": SERIAL, "notifier": "line"}),
    );
    c.ok("cont", json!({}));
    guest_line(&mut c, "hotplug: ready");
    let tree = c.tree();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/netns-nic.py");
    let namespace = format!("qomu-ex-{}", std::process::id());
    let out = Command::new("python3")
        .arg(script)
        .arg(&q.qmp)
        .args(["--id", "exnic", "--netns", &namespace, "--timeout", "30"])
        .output()
        .expect("run the example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the example failed:\n{text}");
    eprintln!("{text}");
    for line in [
        "netdev exnic-net: tap ",
        "exnic (52:54:00:12:34:56): the guest's driver took it after",
        "datagram from 10.0.2.15: 'hello from the qomu guest', answered",
        "/machine/peripheral/exnic: tx-packets 3",
        "/netdev/exnic-net: tx-packets 3",
        "exnic and exnic-net gone after",
    ] {
        assert!(text.contains(line), "no '{line}' in:\n{text}");
    }
    guest_line(
        &mut c,
        "virtio-net: udp reply: reply: hello from the qomu guest",
    );
    assert_eq!(c.tree(), tree, "the tree as before");
    assert!(
        !ip(&["netns", "pids", &namespace]),
        "the example deleted its namespace"
    );
    c.ok("quit", json!({}));
    assert_eq!(q.wait_exit(std::time::Duration::from_secs(60)), Some(0));
}

/// A tap opened by the test handed over on the command line (`--netdev tap,fd=N`, a
/// descriptor qomu inherits, as libvirt starts QEMU) and over D-Bus (`NetdevAdd` with the
/// descriptor as an `h` in its properties): each becomes a netdev under the tap's name and
/// closes with `netdev_del` (the tap goes, nobody else holds it). A number qomu did not
/// inherit stops it, saying so; a name over D-Bus is refused.
#[test]
fn taps_handed_over_on_the_command_line_and_over_dbus() {
    require_dbus!();
    if !can_make_taps() {
        return;
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let cli_tap = format!("qc{}", std::process::id() % 100_000);
    let tap = open_tap(&cli_tap);
    let raw = tap.as_raw_fd();
    let bus = SessionBus::start();
    let q = Qomu::spawn_with(
        &["-S", "--netdev", "tap,id=c0,fd=10", "--dbus", "session"],
        |cmd| {
            cmd.env("DBUS_SESSION_BUS_ADDRESS", &bus.address);
            // SAFETY: dup2 between two descriptors, in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(raw, 10) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    drop(tap);
    bus.wait_for_name(NAME);
    let mut c = q.session();
    assert_eq!(c.qom_get("/netdev/c0", "ifname"), cli_tap.as_str());
    c.ok("netdev_del", json!({"id": "c0"}));
    assert!(
        !ip(&["link", "show", &cli_tap]),
        "the tap closed with its netdev"
    );

    let dbus_tap = format!("qd{}", std::process::id() % 100_000);
    let tap = open_tap(&dbus_tap);
    let d = bus.client();
    let props: HashMap<&str, Variant<'_>> =
        HashMap::from([("fd", Variant::from(zbus::Fd::from(&tap)))]);
    let opts: HashMap<&str, Variant<'_>> = HashMap::from([
        ("id", Variant::from("d0")),
        ("properties", Variant::from(props)),
    ]);
    d.ok(MACHINE, MACHINE_IFACE, "NetdevAdd", &("tap", opts));
    drop(tap);
    assert_eq!(c.qom_get("/netdev/d0", "ifname"), dbus_tap.as_str());
    d.ok(MACHINE, MACHINE_IFACE, "NetdevDel", &("d0",));
    assert!(
        !ip(&["link", "show", &dbus_tap]),
        "the tap closed with its netdev"
    );
    // A name is no descriptor over D-Bus.
    let props: HashMap<&str, Variant<'_>> = HashMap::from([("fd", Variant::from("3"))]);
    let opts: HashMap<&str, Variant<'_>> = HashMap::from([
        ("id", Variant::from("d1")),
        ("properties", Variant::from(props)),
    ]);
    let e = d.err(MACHINE, MACHINE_IFACE, "NetdevAdd", &("tap", opts));
    assert!(
        e.message
            .contains("File descriptor named '3' has not been found"),
        "{e:?}"
    );
    assert!(netdevs(&mut c).is_empty());

    // A number qomu did not inherit.
    let out = qomu_tests::qomu_command()
        .args(["-S", "--dbus", "none", "--netdev", "tap,id=x,fd=57"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("qomu was not started with descriptor 57 open"),
        "{said}"
    );
}

/// The driver guest's NIC driven over D-Bus: the netdev and the NIC made with `NetdevAdd`
/// and `DeviceAdd` on a private bus, the guest started with `Cont`; its ARP, ICMP and UDP
/// reach the test's namespace; the counters read as D-Bus properties match its three
/// frames; `SetLink` down is seen by the guest; `NetdevDel` of the netdev in use keeps the
/// link down (the NIC stays, the tap goes); `SetLink` up on the NIC is seen again.
#[test]
fn the_driver_guests_nic_driven_over_dbus() {
    require_dbus!();
    qomu_tests::require_kvm!();
    if !can_make_taps() {
        return;
    }
    let ns = Netns::new("nicdbus");
    let tap = format!("qv{}", std::process::id() % 1_000_000);
    let bus = SessionBus::start();
    let guest = qomu_guests::path("virtio").display().to_string();
    let q = Qomu::spawn_with(
        &[
            "-S",
            "--kernel",
            &guest,
            "--append",
            "netlink=1",
            "--device",
            "isa-debug-exit",
            "--serial",
            "stdio",
            "--dbus",
            "session",
        ],
        |cmd| {
            cmd.env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
                .stdout(std::process::Stdio::null());
        },
    );
    bus.wait_for_name(NAME);
    let d = bus.client();
    let props: HashMap<&str, Variant<'_>> = HashMap::from([
        ("ifname", Variant::from(tap.as_str())),
        ("script", Variant::from("no")),
    ]);
    let opts: HashMap<&str, Variant<'_>> = HashMap::from([
        ("id", Variant::from("n0")),
        ("properties", Variant::from(props)),
    ]);
    d.ok(MACHINE, MACHINE_IFACE, "NetdevAdd", &("tap", opts));
    let props: HashMap<&str, Variant<'_>> = HashMap::from([("netdev", Variant::from("n0"))]);
    let opts: HashMap<&str, Variant<'_>> = HashMap::from([
        ("id", Variant::from("nic0")),
        ("properties", Variant::from(props)),
    ]);
    d.ok(
        MACHINE,
        MACHINE_IFACE,
        "DeviceAdd",
        &("virtio-net-pci", opts),
    );
    assert!(ip(&["link", "set", &tap, "netns", &ns.0]));
    assert!(ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.0.2.2/24",
        "dev",
        &tap
    ]));
    assert!(ip(&["-n", &ns.0, "link", "set", &tap, "up"]));
    let mut responder = udp_responder(&ns);
    let mut c = q.session();
    c.ok(
        "__org.qomu_subscribe",
        json!({"path": SERIAL, "notifier": "line"}),
    );
    d.ok(MACHINE, MACHINE_IFACE, "Cont", &());
    guest_line(&mut c, "virtio-net: echo reply from 10.0.2.2");
    assert!(guest_line(&mut c, "virtio-net: udp reply: ").ends_with("hello from the qomu guest"));
    guest_line(&mut c, "virtio-net: watching the link");
    let _ = responder.wait();
    let nic = "/org/qomu/VM1/machine/peripheral/nic0";
    let netdev = "/org/qomu/VM1/netdev/n0";
    let get_u64 = |path: &str, iface: &str, p: &str| u64::try_from(d.get(path, iface, p)).unwrap();
    assert_eq!(get_u64(nic, "org.qomu.Type.VirtioNetPci", "TxPackets"), 3);
    assert_eq!(get_u64(netdev, "org.qomu.Type.Netdev", "TxPackets"), 3);
    assert_eq!(
        get_u64(nic, "org.qomu.Type.VirtioNetPci", "RxPackets"),
        get_u64(netdev, "org.qomu.Type.Netdev", "RxPackets")
    );
    d.ok(MACHINE, MACHINE_IFACE, "SetLink", &("nic0", false));
    guest_line(&mut c, "virtio-net: link down");
    // The netdev goes while the NIC uses it: the link stays down, the tap closes.
    d.ok(MACHINE, MACHINE_IFACE, "NetdevDel", &("n0",));
    assert!(!bool::try_from(d.get(nic, "org.qomu.Type.VirtioNetPci", "Link")).unwrap());
    assert!(netdevs(&mut c).is_empty());
    assert!(!ip(&["-n", &ns.0, "link", "show", &tap]), "the tap closed");
    d.ok(MACHINE, MACHINE_IFACE, "SetLink", &("nic0", true));
    guest_line(&mut c, "virtio-net: link up");
    guest_line(&mut c, "virtio-net: ok");
}

/// QEMU's self-announcement: `announce-self` (and every incoming migration) sends each NIC's
/// RARP request out of its netdev, `rounds` times: here to a stream peer of the test's,
/// which reads them in the framing.
#[test]
fn announce_self_sends_each_nics_rarp_out_of_its_netdev() {
    let dir = TempDir::new("nic-announce");
    let socket = dir.path("peer.socket");
    let listener = UnixListener::bind(&socket).unwrap();
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.session();
    let p = c.ok("query-migrate-parameters", json!({}));
    assert_eq!(
        (
            p["announce-initial"].clone(),
            p["announce-max"].clone(),
            p["announce-rounds"].clone(),
            p["announce-step"].clone()
        ),
        (json!(50), json!(550), json!(5), json!(100)),
        "QEMU's defaults"
    );
    c.ok(
        "netdev_add",
        json!({"type": "stream", "id": "n0", "addr": {"type": "unix", "path": socket}}),
    );
    let (mut peer, _) = listener.accept().unwrap();
    c.ok(
        "device_add",
        json!({"driver": "virtio-net-pci", "id": "nic0", "netdev": "n0", "mac": "52:54:00:aa:bb:cc"}),
    );
    c.ok(
        "announce-self",
        json!({"initial": 10, "max": 50, "rounds": 3, "step": 10}),
    );
    peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mac = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
    for round in 0..3 {
        let mut len = [0u8; 4];
        std::io::Read::read_exact(&mut peer, &mut len)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        std::io::Read::read_exact(&mut peer, &mut f).unwrap();
        assert_eq!(f.len(), 60, "round {round}");
        assert_eq!(f[..6], [0xff; 6]);
        assert_eq!(f[6..12], mac);
        assert_eq!(f[12..14], [0x80, 0x35], "RARP");
        assert_eq!(f[20..22], [0, 3], "a reverse request");
        assert_eq!(f[22..28], mac);
    }
    assert_eq!(
        c.qom_get("/netdev/n0", "tx-packets"),
        0,
        "the guest sent nothing"
    );
}
