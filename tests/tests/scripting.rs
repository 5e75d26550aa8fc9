//! The scripts the original proposals promised, run unchanged against a real qomu:
//! examples/configure.py (a VM configured from an INI file over D-Bus) and
//! examples/dump-on-line.py and .sh (registers and RAM saved when the console says so),
//! and examples/watch-peripherals.py (everything under /machine/peripheral, across a
//! restart of the script).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use qomu_tests::dbus::SessionBus;
use qomu_tests::{
    QmpRaw, Qomu, TempDir, python_modules_present, qomu_binary, require_dbus, require_kvm,
    wait_until,
};
use serde_json::{Value as Json, json};

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn guest(name: &str) -> String {
    qomu_guests::path(name).display().to_string()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An INI file for configure.py: the hello guest with 96 MiB, 3 vCPUs and a command line,
/// a virtio-rng and a virtio-blk; `extra` goes at the end of [machine].
fn ini(dir: &TempDir, name: &str, extra: &str) -> PathBuf {
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
    let path = dir.path(name);
    std::fs::write(
        &path,
        format!(
            "# a test VM\n\
             [machine]\n\
             memory-size = 96M\n\
             cpus = 3\n\
             kernel = {}\n\
             append = exit=0 greeting=configured\n\
             name = configured-vm\n\
             {extra}\n\
             \n\
             [device rng0]\n\
             driver = virtio-rng-pci\n\
             \n\
             [device disk0]\n\
             driver = virtio-blk-pci\n\
             file = {}\n\
             serial = INI-0001\n",
            guest("hello"),
            disk.display()
        ),
    )
    .unwrap();
    path
}

fn configure(bus: &SessionBus, file: &Path, extra: &[&str]) -> Output {
    Command::new("python3")
        .arg(example("configure.py"))
        .arg(file)
        .args(["--bus", &bus.address, "--timeout", "20"])
        .args(extra)
        .output()
        .expect("run configure.py")
}

fn dbus_modules() -> bool {
    python_modules_present(&[("dbus_next", "dbus-next")])
}

#[test]
fn configure_py_boots_the_guest_the_ini_file_describes() {
    require_kvm!();
    require_dbus!();
    if !dbus_modules() {
        return;
    }
    let dir = TempDir::new("configure");
    let console = dir.path("console");
    let bus = SessionBus::start();
    // No configuration at all: everything comes from the file. Without isa-debug-exit the
    // guest halts after its report, and the machine (and its tree) stays.
    let mut q = bus.qomu(&["-S", "--serial", &format!("file:{}", console.display())]);
    let mut c = q.connect();
    c.negotiate();
    let file = ini(&dir, "vm.ini", "");
    // And a NIC on a stream netdev listening in the test's directory (no peer, no root).
    let mut with_nic = std::fs::read_to_string(&file).unwrap();
    with_nic.push_str(&format!(
        "\n[netdev net0]\ntype = stream\nserver = true\npath = {}\n\n\
         [device nic0]\ndriver = virtio-net-pci\nnetdev = net0\nmac = 52:54:00:12:34:99\n",
        dir.path("net0.sock").display()
    ));
    std::fs::write(&file, with_nic).unwrap();
    let out = configure(&bus, &file, &[]);
    let said = text(&out);
    assert!(out.status.success(), "configure.py failed:\n{said}");
    for line in [
        "machine memory-size = 100663296",
        "machine cpus = 3",
        "machine append = 'exit=0 greeting=configured'",
        "device rng0: virtio-rng-pci at /org/qomu/VM1/machine/peripheral/rng0",
        "device disk0: virtio-blk-pci at /org/qomu/VM1/machine/peripheral/disk0",
        "netdev net0: stream at /org/qomu/VM1/netdev/net0",
        "device nic0: virtio-net-pci at /org/qomu/VM1/machine/peripheral/nic0",
        "started",
    ] {
        assert!(said.contains(line), "no '{line}' in:\n{said}");
    }
    // The guest's own report: what it found is what the file said.
    wait_until("the guest's report", || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("exiting with code 0")
    });
    let guest_said = std::fs::read_to_string(&console).unwrap();
    for line in [
        "cmdline: exit=0 greeting=configured",
        "ram: 95 MiB",
        "cpus: 3",
    ] {
        assert!(guest_said.contains(line), "no '{line}' in:\n{guest_said}");
    }
    assert_eq!(c.qom_get("/machine", "name"), json!("configured-vm"));
    assert_eq!(c.children("/machine/peripheral"), ["disk0", "nic0", "rng0"]);
    assert_eq!(
        c.qom_get("/machine/peripheral/disk0", "serial"),
        json!("INI-0001")
    );
    assert_eq!(c.children("/netdev"), ["net0"]);
    assert_eq!(
        c.qom_get("/machine/peripheral/nic0", "mac"),
        json!("52:54:00:12:34:99")
    );
    assert_eq!(
        c.qom_get("/machine/peripheral/nic0", "netdev"),
        json!("net0")
    );
    c.cmd(r#"{"execute": "quit"}"#);
    q.wait_exit(Duration::from_secs(10));
}

#[test]
fn configure_py_reports_a_broken_file_by_line_and_changes_nothing() {
    require_kvm!();
    require_dbus!();
    if !dbus_modules() {
        return;
    }
    let dir = TempDir::new("configure-bad");
    let bus = SessionBus::start();
    let q = bus.qomu(&["-S", "--serial", "none"]);
    let mut c = q.connect();
    c.negotiate();
    let before = c.tree();
    // A netdev the NIC after it needs: made, then taken away again when the NIC is refused.
    let netdev_then_bad_nic = format!(
        "[netdev n9]\ntype = stream\nserver = true\npath = {}\n\
         [device nic9]\ndriver = virtio-net-pci\nnetdev = n9\nmac = 52:54:00:zz:34:56",
        dir.path("n9.sock").display()
    );
    // Each broken line is line 8 of [machine] (after name), or the section there.
    for (extra, line, error) in [
        (
            "colour = blue",
            8,
            "colour = blue: org.freedesktop.DBus.Error.UnknownProperty: property 'qomu-x86-machine.colour' not found",
        ),
        (
            "cpus = two",
            8,
            "cpus = two: org.freedesktop.DBus.Error.InvalidArgs: Property 'cpus' takes D-Bus type 'y', got 's'",
        ),
        (
            "cpus = 0",
            8,
            "cpus = 0: org.freedesktop.DBus.Error.InvalidArgs: 'cpus' must be between 1 and 255, got 0 (D-Bus type 'y')",
        ),
        (
            "[device rng1]\ndriver = virtio-rng-pci\nbus = isa.0",
            8,
            "[device rng1] driver = virtio-rng-pci: org.qomu.Error.",
        ),
        (
            "[device late]\ndriver = isa-serial\niobase = 0x2f8\nirq = 99",
            8,
            "[device late] driver = isa-serial: org.freedesktop.DBus.Error.InvalidArgs: ",
        ),
        (
            "[netdev n8]\ntype = bogus",
            8,
            "[netdev n8] type = bogus: org.freedesktop.DBus.Error.InvalidArgs: there is no netdev type 'bogus'",
        ),
        (
            netdev_then_bad_nic.as_str(),
            12,
            "[device nic9] driver = virtio-net-pci: org.",
        ),
    ] {
        let file = ini(&dir, "bad.ini", extra);
        let out = configure(&bus, &file, &[]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{extra}:\n{said}");
        let want = format!("{}:{line}: {error}", file.display());
        assert!(said.contains(&want), "{extra}: no '{want}' in:\n{said}");
        assert!(
            said.contains("nothing changed; the VM stays in prelaunch"),
            "{said}"
        );
        // Everything set before the bad line was undone, and the guest never ran.
        assert_eq!(
            c.cmd(r#"{"execute": "query-status"}"#)["return"]["status"],
            "prelaunch"
        );
        assert_eq!(c.qom_get("/machine", "memory-size"), json!(256 << 20));
        assert_eq!(c.qom_get("/machine", "cpus"), json!(1));
        assert_eq!(c.qom_get("/machine", "append"), json!(""));
        assert!(c.children("/machine/peripheral").is_empty(), "{extra}");
        assert!(c.children("/netdev").is_empty(), "{extra}");
        assert_eq!(c.tree(), before, "{extra}");
    }
}

#[test]
fn configure_py_can_start_qomu_itself() {
    require_kvm!();
    require_dbus!();
    if !dbus_modules() {
        return;
    }
    let dir = TempDir::new("configure-start");
    let console = dir.path("console");
    let bus = SessionBus::start();
    let file = ini(&dir, "vm.ini", "");
    let command = format!(
        "{} --device isa-debug-exit --serial file:{}",
        qomu_binary().display(),
        console.display()
    );
    let out = configure(&bus, &file, &["--start", &command]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the guest's report", || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("cpus: 3")
    });
}

/// A qomu running the spin guest with its RAM pattern, paused until the script is ready.
fn pattern_vm() -> Qomu {
    Qomu::spawn(&[
        "-S",
        "--kernel",
        &guest("spin"),
        "--append",
        "pattern=1 iters=100000000 step=10000000",
        "--device",
        "isa-debug-exit",
    ])
}

/// Reads the script's first line, `watching ...`: it has subscribed, the guest may run.
fn watching(script: &mut std::process::Child) -> String {
    let line = first_line(script);
    assert!(line.starts_with("watching "), "the script said: {line:?}");
    line
}

/// The first line a script prints, read byte by byte so that the rest stays in the pipe.
fn first_line(script: &mut std::process::Child) -> String {
    use std::io::Read;
    let stdout = script.stdout.as_mut().expect("piped stdout");
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        match stdout.read(&mut byte) {
            Ok(1) => {}
            // A child of this process exiting can interrupt the read; it is not the end.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => break,
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Runs the spin guest once the dump script has subscribed, and waits for the script to
/// end: what it said, having seen the guest's pattern line and succeeded.
fn caught_the_line(mut script: std::process::Child, c: &mut QmpRaw) -> String {
    let first = watching(&mut script);
    c.cmd(r#"{"execute": "cont"}"#);
    let out = script.wait_with_output().unwrap();
    let said = first + &text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("line: spin guest: pattern at 0x300000"),
        "{said}"
    );
    said
}

fn holds_the_pattern(file: &Path) {
    let ram = std::fs::read(file).expect("the RAM dump");
    assert_eq!(ram.len(), 4096);
    for (i, b) in ram.iter().enumerate() {
        assert_eq!(*b, (i * 13 + 7) as u8, "byte {i} of the dump");
    }
}

#[test]
fn dump_on_line_py_stops_the_guest_at_the_line_and_saves_registers_and_ram() {
    require_kvm!();
    if !python_modules_present(&[("qemu.qmp", "qemu.qmp")]) {
        return;
    }
    // The stop time is qomu's own time stamps, but the script's reaction is in it, and the
    // other tests of this file share the machine's two cores: a run over 10 ms is run again
    // (three at most), and the best must be within 10 ms.
    let mut attempt = 0;
    let (dir, mut q, mut c, ms) = loop {
        attempt += 1;
        let dir = TempDir::new("dump-py");
        let q = pattern_vm();
        let mut c = q.connect();
        c.negotiate();
        let out_prefix = dir.path("dump");
        let script = Command::new("python3")
            .arg(example("dump-on-line.py"))
            .arg(&q.qmp)
            .arg("pattern at 0x[0-9a-f]+")
            .args(["--addr", "0x300000", "--size", "4096", "--timeout", "60"])
            .arg("--out")
            .arg(&out_prefix)
            .args(["--then", "stay"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run dump-on-line.py");
        let said = caught_the_line(script, &mut c);
        let ms: f64 = said
            .lines()
            .find_map(|l| {
                l.strip_prefix("stopped ")?
                    .strip_suffix(" ms after the line")
            })
            .unwrap_or_else(|| panic!("no stop time in:\n{said}"))
            .parse()
            .unwrap();
        eprintln!("dump-on-line.py stopped the guest {ms:.2} ms after the line (run {attempt})");
        if ms < 10.0 || attempt == 3 {
            break (dir, q, c, ms);
        }
    };
    assert!(
        ms < 10.0,
        "stopped {ms} ms after the line, in the best of 3 runs"
    );
    holds_the_pattern(&dir.path("dump.ram"));
    let regs = std::fs::read_to_string(dir.path("dump.regs")).unwrap();
    assert!(
        regs.contains("CPU#0") && regs.contains("RIP=0000000000"),
        "{regs}"
    );
    let cpus: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.path("dump.cpus")).unwrap()).unwrap();
    assert_eq!(cpus[0]["qom-path"], "/machine/unattached/cpu[0]");
    let r = c.cmd(r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info registers 7"}}"#);
    assert_eq!(r, json!({"return": "Error: invalid vcpu '7'\r\n"}));
    // `stay`: the guest is still stopped where it was caught.
    assert_eq!(
        c.cmd(r#"{"execute": "query-status"}"#)["return"]["status"],
        "paused"
    );
    c.cmd(r#"{"execute": "quit"}"#);
    q.wait_exit(Duration::from_secs(10));
}

#[test]
fn dump_on_line_sh_does_the_same_over_dbus() {
    require_kvm!();
    require_dbus!();
    let dir = TempDir::new("dump-sh");
    let bus = SessionBus::start();
    let mut q = bus.qomu(&[
        "-S",
        "--kernel",
        &guest("spin"),
        "--append",
        "pattern=1 iters=100000000 step=10000000",
        "--device",
        "isa-debug-exit",
    ]);
    let mut c = q.connect();
    c.negotiate();
    let out_prefix = dir.path("dump");
    let script = Command::new("bash")
        .arg(example("dump-on-line.sh"))
        .args(["pattern at 0x[0-9a-f]+", "0x300000", "4096"])
        .arg(&out_prefix)
        .arg("quit")
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .env("QOMU_TIMEOUT", "60")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run dump-on-line.sh");
    let said = caught_the_line(script, &mut c);
    let line = said
        .lines()
        .find(|l| l.starts_with("stopped "))
        .unwrap_or_default();
    eprintln!("dump-on-line.sh: {line}");
    holds_the_pattern(&dir.path("dump.ram"));
    let regs: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.path("dump.regs")).unwrap()).unwrap();
    let registers = &regs["data"][0][0]["data"]["registers"]["data"];
    assert!(
        registers["rip"]["data"].as_u64().unwrap() > 0x100000,
        "{regs}"
    );
    // `quit`: qomu ended.
    assert!(q.wait_exit(Duration::from_secs(10)).is_some(), "{said}");
}

/// Runs watch-peripherals.py until it has printed `count` events; returns what it said.
fn watch_peripherals(q: &Qomu, state: &Path, count: u32) -> std::process::Child {
    Command::new("python3")
        .arg(example("watch-peripherals.py"))
        .arg(&q.qmp)
        .arg("--state")
        .arg(state)
        .args(["--linger", "60", "--timeout", "60"])
        .args(["--count", &count.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run watch-peripherals.py")
}

fn plug(c: &mut QmpRaw, id: &str, iobase: u16, irq: u8) {
    let r = c.cmd(
        &json!({"execute": "device_add",
                "arguments": {"driver": "isa-serial", "id": id, "iobase": iobase, "irq": irq}})
        .to_string(),
    );
    assert_eq!(r, json!({"return": {}}), "device_add {id}");
}

#[test]
fn watch_peripherals_py_follows_a_hotplug_and_loses_nothing_across_its_restart() {
    if !python_modules_present(&[("qemu.qmp", "qemu.qmp")]) {
        return;
    }
    let dir = TempDir::new("watch-py");
    let state = dir.path("watch.state");
    // No guest is needed: ISA UARTs plug and unplug at once while the VM is stopped.
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.connect();
    c.negotiate();

    // First run: it subscribes, sees two plugs, and ends, leaving the subscription.
    let mut script = watch_peripherals(&q, &state, 2);
    let first = first_line(&mut script);
    assert!(
        first.starts_with("watching everything under /machine/peripheral"),
        "{first}"
    );
    plug(&mut c, "com2", 0x2f8, 3);
    plug(&mut c, "com3", 0x3e8, 5);
    let out = script.wait_with_output().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{first}{said}");
    assert!(
        said.contains(r#"seq 1 /machine/peripheral child-added {"child": "/machine/peripheral/com2", "type": "isa-serial"}"#),
        "{said}"
    );
    assert!(
        said.contains("seq 2 /machine/peripheral child-added"),
        "{said}"
    );
    let saved: Json = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let sub = saved["subscription"].as_str().unwrap().to_owned();
    assert_eq!(c.qom_get(&sub, "lingering"), json!(true));

    // Meanwhile, with nobody watching: an unplug and a plug.
    let r = c.cmd(r#"{"execute": "device_del", "arguments": {"id": "com2"}}"#);
    assert_eq!(r, json!({"return": {}}));
    c.wait_event("DEVICE_DELETED");
    plug(&mut c, "com4", 0x2e8, 6);

    // Second run: it adopts the subscription and gets both, numbered on, with no gap.
    let mut script = watch_peripherals(&q, &state, 2);
    let first = first_line(&mut script);
    assert_eq!(first, format!("adopted {sub}: what it queued follows\n"));
    let out = script.wait_with_output().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines[0].starts_with("seq 3 /machine/peripheral child-removed")
            && lines[0].contains("/machine/peripheral/com2"),
        "{said}"
    );
    assert!(
        lines[1].starts_with("seq 4 /machine/peripheral child-added")
            && lines[1].contains("/machine/peripheral/com4"),
        "{said}"
    );
    assert!(!said.contains("gap"), "{said}");
    assert_eq!(c.qom_get(&sub, "dropped"), json!(0));
}
