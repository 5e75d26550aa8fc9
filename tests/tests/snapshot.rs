//! Snapshot and restore end to end: the counter guest (virtio.c with `counter=N`) counts in
//! RAM and on a virtio-blk disk; a snapshot taken on the way, restored in a new process
//! after the first is killed, must continue the count with nothing lost. Helpers' state
//! travels through dbus-vmstate; damaged or foreign files are refused untouched.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qomu_tests::dbus::SessionBus;
use qomu_tests::{
    KillOnDrop, QmpRaw, Qomu, TempDir, python_modules_present, require_dbus, require_kvm,
};
use serde_json::{Value as Json, json};

const COUNT: u64 = 3000;

fn guest() -> String {
    qomu_guests::path("virtio").display().to_string()
}

/// The machine every test here uses: the counter guest and its disk.
fn machine_args(dir: &TempDir, console: &Path, extra: &[&str]) -> Vec<String> {
    counter_machine(dir, console, &format!("counter={COUNT} spin=2000"), extra)
}

/// The counter guest with command line `append`, and its disk.
fn counter_machine(dir: &TempDir, console: &Path, append: &str, extra: &[&str]) -> Vec<String> {
    let disk = dir.path("disk.img");
    if !disk.exists() {
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    }
    let mut args: Vec<String> = [
        "--kernel",
        &guest(),
        "--append",
        append,
        "-m",
        "64M",
        "--device",
        "isa-debug-exit",
        "--device",
        &format!("virtio-blk-pci,id=disk,file={},addr=4", disk.display()),
        "--serial",
        &format!("file:{}", console.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn spawn(args: &[String]) -> Qomu {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Qomu::spawn(&args)
}

fn wait_console(path: &Path, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = std::fs::read_to_string(path).unwrap_or_default();
        if out.contains(text) {
            return out;
        }
        assert!(Instant::now() < deadline, "no '{text}' in:\n{out}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(c: &mut QmpRaw) -> String {
    c.cmd(r#"{"execute": "query-status"}"#)["return"]["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Runs `migrate` and waits for its end; the final query-migrate.
fn migrate(c: &mut QmpRaw, file: &Path) -> Json {
    let r = c.cmd(
        &json!({"execute": "migrate", "arguments": {"uri": format!("file:{}", file.display())}})
            .to_string(),
    );
    assert_eq!(r, json!({"return": {}}));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = c.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
        if matches!(info["status"].as_str(), Some("completed" | "failed")) {
            return info;
        }
        assert!(Instant::now() < deadline, "migration never ended: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The counts the guest printed.
fn counts(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.trim_end().strip_prefix("counter: ")?.parse().ok())
        .collect()
}

fn snapshot_kill_restore(paused: bool) {
    let dir = TempDir::new(if paused {
        "snap-paused"
    } else {
        "snap-running"
    });
    let (console1, console2, file) = (dir.path("c1"), dir.path("c2"), dir.path("vm.snap"));
    let mut first = spawn(&machine_args(&dir, &console1, &[]));
    let mut c = first.connect();
    c.negotiate();
    wait_console(&console1, "counter: 300");
    if paused {
        c.cmd(r#"{"execute": "stop"}"#);
    }
    let info = migrate(&mut c, &file);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info["ram"]["total"].as_u64().unwrap() > 64 << 20, "{info}");
    let statuses: Vec<Json> = (0..3)
        .map(|_| c.wait_event("MIGRATION")["data"]["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        [json!("setup"), json!("active"), json!("completed")]
    );
    // As QEMU's: the saved machine stays stopped, in postmigrate.
    assert_eq!(status(&mut c), "postmigrate");
    let saved_at = *counts(&std::fs::read_to_string(&console1).unwrap())
        .last()
        .unwrap();
    first.child.kill().unwrap();
    first.wait_exit(Duration::from_secs(10));

    let mut args = machine_args(&dir, &console2, &[]);
    args.extend(["--incoming".into(), format!("file:{}", file.display())]);
    let mut second = spawn(&args);
    let mut c = second.connect();
    c.negotiate();
    if paused {
        assert_eq!(status(&mut c), "paused");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            std::fs::read_to_string(&console2).unwrap_or_default(),
            "",
            "a guest saved paused must not run before cont"
        );
        c.cmd(r#"{"execute": "cont"}"#);
    }
    assert_eq!(
        second.wait_exit(Duration::from_secs(120)),
        Some(1),
        "the guest's verdict (0: every count agreed): {}",
        std::fs::read_to_string(&console2).unwrap_or_default()
    );
    let out = std::fs::read_to_string(&console2).unwrap();
    assert!(
        !out.contains("counter: start"),
        "the guest started over:\n{out}"
    );
    assert!(out.contains(&format!("counter: done {COUNT}")), "{out}");
    let after = counts(&out);
    assert!(
        after
            .first()
            .is_some_and(|&n| n > saved_at && n <= saved_at + 200),
        "the restored guest went on from {saved_at}: {after:?}"
    );
}

/// A disk property of the machine in `c`.
fn disk(c: &mut QmpRaw, property: &str) -> Json {
    c.cmd(
        &json!({"execute": "qom-get", "arguments": {"path": "disk", "property": property}})
            .to_string(),
    )["return"]
        .clone()
}

#[test]
fn a_snapshot_under_continuous_disk_io_keeps_every_request_whole() {
    require_kvm!();
    let dir = TempDir::new("snap-io");
    let (console1, console2, file) = (dir.path("c1"), dir.path("c2"), dir.path("vm.snap"));
    // No pause between the counter's steps: a disk request follows another all the time.
    let append = "counter=500 spin=0";
    let mut first = spawn(&counter_machine(&dir, &console1, append, &[]));
    let mut c = first.connect();
    c.negotiate();
    wait_console(&console1, "counter: 100");
    // The next request takes 300 ms on the host; save while it is being served.
    let r = c.cmd(r#"{"execute": "qom-set", "arguments": {"path": "disk", "property": "x-delay-ms", "value": 300}}"#);
    assert_eq!(r, json!({"return": {}}));
    // A request in flight may still be one started before the delay was set: the one to
    // save under is a request that stays in flight while nothing completes for a while.
    let bytes = |c: &mut QmpRaw| {
        disk(c, "read-bytes").as_u64().unwrap() + disk(c, "written-bytes").as_u64().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        assert!(
            Instant::now() < deadline,
            "no delayed request ever in flight"
        );
        if disk(&mut c, "in-flight") != json!(1) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let before = bytes(&mut c);
        std::thread::sleep(Duration::from_millis(30));
        if disk(&mut c, "in-flight") == json!(1) && bytes(&mut c) == before {
            break before;
        }
    };
    let info = migrate(&mut c, &file);
    assert_eq!(info["status"], "completed", "{info}");
    // The request in flight was finished before the state was read, not cut off.
    assert_eq!(disk(&mut c, "in-flight"), json!(0));
    let after = bytes(&mut c);
    assert_eq!(
        after,
        served + 512,
        "exactly the request in flight completed"
    );
    let saved_at = *counts(&std::fs::read_to_string(&console1).unwrap())
        .last()
        .unwrap();
    first.child.kill().unwrap();
    first.wait_exit(Duration::from_secs(10));

    let mut args = counter_machine(&dir, &console2, append, &[]);
    args.extend(["--incoming".into(), format!("file:{}", file.display())]);
    let mut second = spawn(&args);
    assert_eq!(
        second.wait_exit(Duration::from_secs(120)),
        Some(1),
        "the guest's verdict (0: every count agreed, RAM and disk): {}",
        std::fs::read_to_string(&console2).unwrap_or_default()
    );
    let out = std::fs::read_to_string(&console2).unwrap();
    assert!(!out.contains("counter: start"), "started over:\n{out}");
    assert!(out.contains("counter: done 500"), "{out}");
    assert!(
        counts(&out).first().is_some_and(|&n| n > saved_at),
        "the restored guest went on from {saved_at}: {out}"
    );
}

#[test]
fn a_running_guest_saved_then_killed_continues_in_a_new_process() {
    require_kvm!();
    snapshot_kill_restore(false);
}

#[test]
fn a_guest_saved_paused_comes_back_paused_and_continues_on_cont() {
    require_kvm!();
    snapshot_kill_restore(true);
}

fn incoming(args: &[String], file: &Path) -> (i32, String) {
    let out = qomu_tests::qomu_command()
        .args(args)
        .args(["--dbus", "none", "--incoming"])
        .arg(format!("file:{}", file.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn damaged_foreign_or_wrong_version_files_are_refused_untouched() {
    require_kvm!();
    let dir = TempDir::new("snap-bad");
    let console = dir.path("console");
    let file = dir.path("vm.snap");
    let mut q = spawn(&machine_args(&dir, &console, &[]));
    let mut c = q.connect();
    c.negotiate();
    wait_console(&console, "counter: start");
    c.cmd(r#"{"execute": "stop"}"#);
    assert_eq!(migrate(&mut c, &file)["status"], "completed");
    drop(c);
    q.child.kill().unwrap();
    let good = std::fs::read(&file).unwrap();
    let args = machine_args(&dir, &dir.path("console2"), &[]);
    // The good file loads (and the check below is meaningful).
    {
        let mut a = args.clone();
        a.extend([
            "-S".into(),
            "--incoming".into(),
            format!("file:{}", file.display()),
        ]);
        let mut q = spawn(&a);
        let mut c = q.connect();
        c.negotiate();
        assert_eq!(status(&mut c), "paused");
        q.child.kill().unwrap();
    }
    let config_end = 16 + 2 + 6 + 8;
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let mut corrupted = good.clone();
    // A byte inside the config section's payload.
    corrupted[config_end + 5] ^= 0x20;
    let state_at = good
        .windows(14)
        .position(|w| w == b"state:/machine")
        .unwrap();
    let mut corrupted_state = good.clone();
    corrupted_state[state_at + 200] ^= 0x01;
    let mut version = good.clone();
    version[8] = 2;
    let cases: Vec<(&str, Vec<u8>, Vec<String>, &str)> = vec![
        ("truncated", truncated, args.clone(), "is truncated"),
        ("corrupted", corrupted, args.clone(), "fails its checksum"),
        (
            "corrupted-state",
            corrupted_state,
            args.clone(),
            "fails its checksum",
        ),
        (
            "version",
            version,
            args.clone(),
            "format version 2; this qomu reads version 1",
        ),
        (
            "memory",
            good.clone(),
            args.iter()
                .map(|a| {
                    if a == "64M" {
                        "128M".to_owned()
                    } else {
                        a.clone()
                    }
                })
                .collect(),
            "the snapshot is of a machine with 64 MiB of memory; this one has 128 MiB",
        ),
        (
            "devices",
            good.clone(),
            drop_disk(&args),
            "/machine/peripheral/disk (virtio-blk-pci), which this machine does not",
        ),
    ];
    for (name, bytes, args, want) in cases {
        let path = dir.path(&format!("{name}.snap"));
        std::fs::write(&path, &bytes).unwrap();
        let (code, err) = incoming(&args, &path);
        assert_ne!(code, 0, "{name}: qomu started from a bad file");
        assert!(err.contains(want), "{name}: wanted '{want}' in: {err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}: file changed");
    }
    let (code, err) = incoming(&args, &dir.path("missing.snap"));
    assert_ne!(code, 0);
    assert!(err.contains("No such file"), "{err}");
}

/// The machine arguments without the disk.
fn drop_disk(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--device" && args[i + 1].starts_with("virtio-blk-pci") {
            i += 2;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

#[test]
fn bad_migrate_requests_are_refused_and_the_guest_keeps_running() {
    require_kvm!();
    let dir = TempDir::new("snap-refused");
    let console = dir.path("console");
    let q = spawn(&machine_args(&dir, &console, &["-S"]));
    let mut c = q.connect();
    c.negotiate();
    let desc = |r: &Json| r["error"]["desc"].as_str().unwrap_or_default().to_owned();
    let r = c.cmd(r#"{"execute": "migrate", "arguments": {"uri": "file:/tmp/x"}}"#);
    assert!(desc(&r).contains("only a running or paused machine"), "{r}");
    c.cmd(r#"{"execute": "cont"}"#);
    wait_console(&console, "counter: start");
    for (uri, want) in [
        (
            "rdma:localhost:4444",
            "Parameter 'uri' expects a valid migration protocol",
        ),
        (
            "nonsense",
            "Parameter 'uri' expects a valid migration protocol",
        ),
        ("file:", "needs a path"),
    ] {
        let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string());
        assert!(desc(&r).contains(want), "{uri}: {r}");
    }
    // Nobody listens there: accepted, then failed, as QEMU's; the guest runs on.
    let info = migrate_to(&mut c, &format!("tcp:127.0.0.1:{}", free_port()));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error-desc"]
            .as_str()
            .is_some_and(|e| e.starts_with("Failed to connect to '127.0.0.1:")
                && e.ends_with("Connection refused")),
        "{info}"
    );
    assert_eq!(status(&mut c), "running");
    let r = c.cmd(r#"{"execute": "migrate", "arguments": {"uri": 5}}"#);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // A file that cannot be written: the save fails, the guest runs on, nothing is left.
    let target = dir.path("no-such-dir").join("vm.snap");
    let info = migrate(&mut c, &target);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap()
            .contains("No such file"),
        "{info}"
    );
    assert_eq!(status(&mut c), "running");
    assert!(!target.exists() && !dir.path("no-such-dir").exists());
    let before = counts(&std::fs::read_to_string(&console).unwrap()).len();
    wait_console(&console, &format!("counter: {}", (before as u64 + 2) * 100));
}

/// `vmstate-helper.py` on `bus`, with `args`; waits until it has queued for the name.
fn helper(bus: &SessionBus, args: &[&str]) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/vmstate-helper.py")
        .canonicalize()
        .unwrap();
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--address", &bus.address])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines
            .next()
            .expect("the helper ended before it was ready")
            .unwrap();
        if line.starts_with("ready") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    child
}

#[test]
fn helper_state_saved_with_the_vm_is_loaded_into_the_new_helper() {
    require_kvm!();
    require_dbus!();
    if !python_modules_present(&[("dbus_next", "dbus-next")]) {
        return;
    }
    let bus = SessionBus::start();
    let dir = TempDir::new("snap-helper");
    let (state1, state2) = (dir.path("state1"), dir.path("state2"));
    // dbus-vmstate's addr is a device-spec value: its commas are doubled.
    let object = format!(
        "dbus-vmstate,id=dv,addr={},id-list=counter",
        bus.address.replace(',', ",,")
    );
    let h1 = KillOnDrop(helper(
        &bus,
        &[
            "--id",
            "counter",
            "--count",
            "41",
            "--note",
            "saved",
            "--state-file",
            state1.to_str().unwrap(),
        ],
    ));
    let args = machine_args(&dir, &dir.path("c1"), &["--object", &object]);
    let mut q = spawn(&args);
    let mut c = q.connect();
    c.negotiate();
    let file = dir.path("vm.snap");
    let info = migrate(&mut c, &file);
    assert_eq!(info["status"], "completed", "{info}");
    let saved = std::fs::read_to_string(&state1).unwrap();
    q.child.kill().unwrap();
    drop(h1);

    let h2 = KillOnDrop(helper(
        &bus,
        &["--id", "counter", "--state-file", state2.to_str().unwrap()],
    ));
    assert_ne!(std::fs::read_to_string(&state2).unwrap(), saved);
    let mut args = machine_args(&dir, &dir.path("c2"), &["--object", &object, "-S"]);
    args.extend(["--incoming".into(), format!("file:{}", file.display())]);
    let _q2 = spawn(&args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&state2).unwrap_or_default() != saved {
        assert!(
            Instant::now() < deadline,
            "the new helper never got {saved}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(saved, r#"{"count": 41, "note": "saved"}"#);
    drop(h2);
}

#[test]
fn missing_unexpected_slow_or_oversized_helpers_fail_the_save_and_the_vm_runs_on() {
    require_kvm!();
    require_dbus!();
    if !python_modules_present(&[("dbus_next", "dbus-next")]) {
        return;
    }
    let bus = SessionBus::start();
    let dir = TempDir::new("snap-helper-bad");
    let object = |ids: &str| {
        format!(
            "dbus-vmstate,id=dv,addr={},id-list={},timeout-ms=1000",
            bus.address.replace(',', ",,"),
            ids.replace(',', ",,")
        )
    };
    let console = dir.path("console");
    let file = dir.path("vm.snap");
    let check = |args: Vec<String>, want: &str| {
        let q = spawn(&args);
        let mut c = q.connect();
        c.negotiate();
        wait_console(&console, "counter: start");
        let info = migrate(&mut c, &file);
        assert_eq!(info["status"], "failed", "{info}");
        let desc = info["error-desc"].as_str().unwrap().to_owned();
        assert!(desc.contains(want), "wanted '{want}' in '{desc}'");
        assert_eq!(status(&mut c), "running", "the guest runs on");
        assert!(!file.exists(), "a failed save leaves no file");
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(dir.path("disk.img"));
    };
    let _a = KillOnDrop(helper(&bus, &["--id", "a"]));
    // A helper the list names is missing; then one it does not name is there.
    check(
        machine_args(&dir, &console, &["--object", &object("a,b")]),
        "no helper with Id 'b' is on the bus",
    );
    let _b = KillOnDrop(helper(&bus, &["--id", "b", "--save-delay", "3"]));
    check(
        machine_args(&dir, &console, &["--object", &object("a")]),
        "which is not in id-list",
    );
    check(
        machine_args(&dir, &console, &["--object", &object("a,b")]),
        "Save on helper 'b' failed",
    );
    drop(_b);
    let _c = KillOnDrop(helper(&bus, &["--id", "c", "--pad", "1100000"]));
    check(
        machine_args(&dir, &console, &["--object", &object("a,c")]),
        "the limit is 1048576",
    );
}

/// Runs `migrate {uri}` and waits for its end; the final query-migrate.
fn migrate_to(c: &mut QmpRaw, uri: &str) -> Json {
    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string());
    assert_eq!(r, json!({"return": {}}), "migrate {uri}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = c.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
        if matches!(info["status"].as_str(), Some("completed" | "failed")) {
            return info;
        }
        assert!(Instant::now() < deadline, "migration never ended: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port on loopback nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The counter guest, running, sent from one qomu to another waiting with `incoming`
/// (`--incoming URI`, or `defer` then `migrate-incoming`): the destination goes on
/// counting where the source was, RAM and disk agreeing, without starting over; the
/// source ends in postmigrate.
fn migrate_between_processes(dir: &TempDir, uri: &str, defer: bool) {
    let (console1, console2) = (dir.path("c1"), dir.path("c2"));
    let mut args = machine_args(dir, &console2, &[]);
    args.extend([
        "--incoming".into(),
        if defer {
            "defer".into()
        } else {
            uri.to_owned()
        },
    ]);
    let mut second = spawn(&args);
    let mut d = second.connect();
    d.negotiate();
    assert_eq!(status(&mut d), "inmigrate");
    if defer {
        let r =
            d.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": uri}}).to_string());
        assert_eq!(r, json!({"return": {}}));
        let r =
            d.cmd(&json!({"execute": "migrate-incoming", "arguments": {"uri": uri}}).to_string());
        assert!(
            r["error"]["desc"].is_string(),
            "a second migrate-incoming: {r}"
        );
    }
    let mut first = spawn(&machine_args(dir, &console1, &[]));
    let mut c = first.connect();
    c.negotiate();
    wait_console(&console1, "counter: 300");
    let info = migrate_to(&mut c, uri);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(status(&mut c), "postmigrate");
    let saved_at = *counts(&std::fs::read_to_string(&console1).unwrap())
        .last()
        .unwrap();
    first.child.kill().unwrap();
    first.wait_exit(Duration::from_secs(10));
    // The source is done once it has sent everything; the destination may still load.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = d.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
        if done["status"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "on the destination: {done}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The last pass loaded with huge pages off (a 2 MiB fault stalls a switch-over); they
    // are asked for again once the guest runs.
    let flags = ram_flags(second.child.id(), 64 << 10);
    assert!(
        flags.contains(&"hg".to_owned()) && !flags.contains(&"nh".to_owned()),
        "the destination's guest RAM: {flags:?}"
    );
    assert_eq!(
        second.wait_exit(Duration::from_secs(120)),
        Some(1),
        "the guest's verdict (0: every count agreed): {}",
        std::fs::read_to_string(&console2).unwrap_or_default()
    );
    let out = std::fs::read_to_string(&console2).unwrap();
    assert!(
        !out.contains("counter: start"),
        "the guest started over:\n{out}"
    );
    assert!(out.contains(&format!("counter: done {COUNT}")), "{out}");
    assert!(
        counts(&out).first().is_some_and(|&n| n > saved_at),
        "the destination went on from {saved_at}: {out}"
    );
}

/// The `VmFlags` of process `pid`'s guest RAM: its mapping of `kib` KiB.
fn ram_flags(pid: u32, kib: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut size_matches = false;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            size_matches = size.trim().trim_end_matches("kB").trim().parse() == Ok(kib);
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && size_matches
        {
            return flags.split_whitespace().map(str::to_owned).collect();
        }
    }
    panic!("no mapping of {kib} KiB in /proc/{pid}/smaps");
}

#[test]
fn a_running_guest_migrates_to_another_qomu_over_unix() {
    require_kvm!();
    let dir = TempDir::new("mig-unix");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    migrate_between_processes(&dir, &uri, false);
}

#[test]
fn a_running_guest_migrates_to_another_qomu_over_tcp_with_migrate_incoming() {
    require_kvm!();
    let dir = TempDir::new("mig-tcp");
    migrate_between_processes(&dir, &format!("tcp:127.0.0.1:{}", free_port()), true);
}

#[test]
fn a_running_guest_migrates_through_exec_commands() {
    require_kvm!();
    let dir = TempDir::new("mig-exec");
    // The source's command writes the stream into a fifo the destination's command reads:
    // what `exec:ssh host qomu ...` does across hosts, on this one.
    let fifo = dir.path("mig.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (console1, console2) = (dir.path("c1"), dir.path("c2"));
    // A command would run under the filter of the thread that starts it: the sandbox
    // refuses exec:, as QEMU's spawn=deny does, and an exec: migration needs it off.
    let off = ["--sandbox", "off"];
    let mut args = machine_args(&dir, &console2, &off);
    args.extend(["--incoming".into(), format!("exec:cat {}", fifo.display())]);
    let mut second = spawn(&args);
    let mut first = spawn(&machine_args(&dir, &console1, &off));
    let mut c = first.connect();
    c.negotiate();
    wait_console(&console1, "counter: 300");
    let info = migrate_to(&mut c, &format!("exec:cat > {}", fifo.display()));
    assert_eq!(info["status"], "completed", "{info}");
    first.child.kill().unwrap();
    first.wait_exit(Duration::from_secs(10));
    assert_eq!(
        second.wait_exit(Duration::from_secs(120)),
        Some(1),
        "{}",
        std::fs::read_to_string(&console2).unwrap_or_default()
    );
    let out = std::fs::read_to_string(&console2).unwrap();
    assert!(
        !out.contains("counter: start") && out.contains(&format!("counter: done {COUNT}")),
        "{out}"
    );
}

/// A destination that dies in the middle of the RAM (a peer of the test's that takes
/// 64 KiB and closes), and one of another configuration (which refuses the stream and
/// ends with the reason): each time the source goes on running, counting, its tree as it
/// was; a migration to a real destination afterwards succeeds.
#[test]
fn a_failed_migration_leaves_the_source_running_and_a_second_one_succeeds() {
    require_kvm!();
    let dir = TempDir::new("mig-fault");
    let (console1, console2, console3) = (dir.path("c1"), dir.path("c2"), dir.path("c3"));
    let mut first = spawn(&machine_args(&dir, &console1, &[]));
    let mut c = first.connect();
    c.negotiate();
    wait_console(&console1, "counter: 200");
    let tree = c.tree();

    // 1. The peer goes after 64 KiB.
    let sock = dir.path("dying.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    });
    let info = migrate_to(&mut c, &format!("unix:{}", sock.display()));
    peer.join().unwrap();
    assert_eq!(info["status"], "failed", "{info}");
    // Depending on how much the socket's buffer took before the peer went: the writes
    // failed, or the destination's word that it loaded the first pass (or, for a guest
    // that fits one pass, everything) never came.
    assert!(
        info["error-desc"]
            .as_str()
            .is_some_and(|e| e.contains("the destination stopped taking the stream")
                || e.contains("the destination did not confirm it loaded pass 1")
                || e.contains("the destination did not confirm it loaded the stream")),
        "{info}"
    );
    assert_eq!(status(&mut c), "running");
    let before = counts(&std::fs::read_to_string(&console1).unwrap())
        .last()
        .copied();
    wait_console(
        &console1,
        &format!("counter: {}", before.unwrap_or(0) + 100),
    );

    // 2. A destination with another device: it says why and ends; the source goes on.
    let uri = format!("unix:{}", dir.path("other.sock").display());
    let mut args = machine_args(&dir, &console2, &["--device", "virtio-rng-pci,id=extra"]);
    args.extend(["--incoming".into(), uri.clone()]);
    let mut other = spawn(&args);
    let info = migrate_to(&mut c, &uri);
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(other.wait_exit(Duration::from_secs(30)), Some(1));
    assert_eq!(
        std::fs::read_to_string(&console2).unwrap_or_default(),
        "",
        "nothing ran there"
    );
    assert_eq!(status(&mut c), "running");
    assert_eq!(c.tree(), tree, "the source's tree as it was");

    // 3. A real destination: the migration succeeds and the count goes on there.
    let uri = format!("unix:{}", dir.path("good.sock").display());
    let mut args = machine_args(&dir, &console3, &[]);
    args.extend(["--incoming".into(), uri.clone()]);
    let mut second = spawn(&args);
    let info = migrate_to(&mut c, &uri);
    assert_eq!(info["status"], "completed", "{info}");
    first.child.kill().unwrap();
    first.wait_exit(Duration::from_secs(10));
    assert_eq!(
        second.wait_exit(Duration::from_secs(120)),
        Some(1),
        "{}",
        std::fs::read_to_string(&console3).unwrap_or_default()
    );
    let out = std::fs::read_to_string(&console3).unwrap();
    assert!(
        !out.contains("counter: start") && out.contains(&format!("counter: done {COUNT}")),
        "{out}"
    );
}

/// Mistakes with QEMU's texts, nothing started: a bad URI, migrate-incoming without
/// `--incoming defer`, a truncated stream at a destination (which ends saying so).
#[test]
fn migration_mistakes_get_qemus_texts_and_start_nothing() {
    let dir = TempDir::new("mig-bad");
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.session();
    for uri in ["bogus:x", "nothing", "tcp:host"] {
        let r = c.execute("migrate", json!({"uri": uri}));
        assert_eq!(
            r["error"]["desc"], "Parameter 'uri' expects a valid migration protocol",
            "{uri}: {r}"
        );
    }
    let r = c.execute("migrate-incoming", json!({"uri": "unix:/tmp/x"}));
    assert_eq!(
        r["error"]["desc"],
        "'-incoming' was not specified on the command line"
    );
    let r = c.execute("migrate", json!({"uri": "fd:nope"}));
    assert_eq!(
        r["error"]["desc"],
        "File descriptor named 'nope' has not been found"
    );

    // A stream cut short: the destination ends, saying where it broke.
    let sock = dir.path("cut.sock");
    let console = dir.path("c");
    let mut args = machine_args(&dir, &console, &[]);
    args.extend(["--incoming".into(), format!("unix:{}", sock.display())]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut dest = Qomu::spawn_with(&args, |cmd| {
        cmd.stderr(Stdio::piped());
    });
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"QOMUSNAP\x01\x00\x00\x00\x00\x00\x00\x00\x06\x00conf",
    )
    .unwrap();
    drop(s);
    assert_eq!(dest.wait_exit(Duration::from_secs(30)), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(dest.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(std::fs::read_to_string(&console).unwrap_or_default(), "");
}

/// The same operations over D-Bus: `MigrateIncoming` without `--incoming defer` is refused
/// (InvalidState), and with it accepted; `Migrate` with a bad URI is InvalidArgs.
#[test]
fn migrate_and_migrate_incoming_over_dbus() {
    use qomu_tests::dbus::{MACHINE, MACHINE_IFACE};
    use std::collections::HashMap;
    use zbus::Variant;
    require_dbus!();
    let dir = TempDir::new("mig-dbus");
    let bus = SessionBus::start();
    let q = bus.qomu(&["-S"]);
    let c = bus.client();
    // The migration as an object a client can watch.
    let migration = "/org/qomu/VM1/machine/migration";
    assert_eq!(
        String::try_from(c.get(migration, "org.qomu.Type.Migration", "Status")).unwrap(),
        "none"
    );
    let e = c.err(
        MACHINE,
        MACHINE_IFACE,
        "MigrateIncoming",
        &("unix:/tmp/nowhere",),
    );
    assert_eq!(e.name, "org.qomu.Error.InvalidState", "{e:?}");
    let none: HashMap<&str, Variant<'_>> = HashMap::new();
    let e = c.err(MACHINE, MACHINE_IFACE, "Migrate", &("bogus:x", none));
    assert_eq!(e.name, "org.freedesktop.DBus.Error.InvalidArgs", "{e:?}");
    drop(q);

    let sock = dir.path("d.sock");
    let q = bus.qomu(&["-S", "--incoming", "defer"]);
    let mut qmp = q.session();
    assert_eq!(status(&mut qmp), "inmigrate");
    c.ok(
        MACHINE,
        MACHINE_IFACE,
        "MigrateIncoming",
        &(format!("unix:{}", sock.display()),),
    );
    assert!(sock.exists(), "listening there");
}

/// A guest that keeps writing RAM (`dirty=256`: 1 MiB rewritten at every counter step)
/// migrated with `max-bandwidth` 16 MiB/s and a 10 ms `downtime-limit` it cannot meet:
/// pass after pass (MIGRATION_PASS, query-migrate's `expected-downtime` and
/// `dirty-sync-count`) while it runs on; raising the limit mid-migration lets it converge
/// and switch over. Every page it wrote arrived: its verdict checks each holds the last
/// count.
#[test]
fn a_guest_writing_ram_migrates_in_passes_and_converges_when_the_limit_allows() {
    require_kvm!();
    let dir = TempDir::new("mig-passes");
    let (console1, console2) = (dir.path("c1"), dir.path("c2"));
    let append = "counter=1500 spin=0 dirty=256";
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let mut args = counter_machine(&dir, &console2, append, &[]);
    args.extend(["--incoming".into(), uri.clone()]);
    let mut second = spawn(&args);
    let mut first = spawn(&counter_machine(&dir, &console1, append, &[]));
    let mut c = first.connect();
    c.negotiate();
    wait_console(&console1, "counter: 200");
    let r = c.cmd(r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 16777216, "downtime-limit": 10}}"#);
    assert_eq!(r, json!({"return": {}}));
    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string());
    assert_eq!(r, json!({"return": {}}));
    let mut passes = Vec::new();
    while passes.len() < 3 {
        c.wait_event("MIGRATION_PASS");
        passes.push(());
    }
    let info = c.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
    assert_eq!(info["status"], "active", "{info}");
    assert!(
        info["expected-downtime"].as_u64().is_some_and(|d| d > 10),
        "{info}"
    );
    // The same as /machine/migration's properties.
    assert_eq!(c.qom_get("/machine/migration", "status"), "active");
    assert!(c.qom_get("/machine/migration", "passes").as_u64().unwrap() >= 2);
    assert!(
        info["ram"]["dirty-sync-count"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{info}"
    );
    assert_eq!(
        status(&mut c),
        "running",
        "the guest runs while its RAM goes"
    );
    let r =
        c.cmd(r#"{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 2000}}"#);
    assert_eq!(r, json!({"return": {}}));
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        let info = c.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
        if matches!(info["status"].as_str(), Some("completed" | "failed")) {
            break info;
        }
        assert!(Instant::now() < deadline, "never converged: {info}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(c.qom_get("/machine/migration", "progress"), 100);
    let passes = info["ram"]["dirty-sync-count"].as_u64().unwrap();
    assert!(
        (3..30).contains(&passes),
        "converged after the limit rose: {info}"
    );
    assert!(info["downtime"].as_u64().is_some(), "{info}");
    first.child.kill().unwrap();
    first.wait_exit(Duration::from_secs(10));
    assert_eq!(
        second.wait_exit(Duration::from_secs(180)),
        Some(1),
        "the guest's verdict (0: every page and count agreed): {}",
        std::fs::read_to_string(&console2).unwrap_or_default()
    );
    let out = std::fs::read_to_string(&console2).unwrap();
    assert!(
        !out.contains("counter: start") && out.contains("counter: done 1500"),
        "{out}"
    );
}

/// `migrate_cancel` in the middle of the passes: `cancelled`, the guest runs on with
/// nothing lost (it finishes its count and verdict on the source), and the destination,
/// its stream cut short, ends saying so.
#[test]
fn migrate_cancel_mid_pass_leaves_the_guest_running_on_the_source() {
    require_kvm!();
    let dir = TempDir::new("mig-cancel");
    let (console1, console2) = (dir.path("c1"), dir.path("c2"));
    let append = "counter=1200 spin=0 dirty=256";
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let mut args = counter_machine(&dir, &console2, append, &[]);
    args.extend(["--incoming".into(), uri.clone()]);
    let mut second = spawn(&args);
    let mut first = spawn(&counter_machine(&dir, &console1, append, &[]));
    let mut c = first.connect();
    c.negotiate();
    // Cancelling nothing is fine, as in QEMU.
    assert_eq!(
        c.cmd(r#"{"execute": "migrate_cancel"}"#),
        json!({"return": {}})
    );
    wait_console(&console1, "counter: 100");
    let r = c.cmd(r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 16777216, "downtime-limit": 10}}"#);
    assert_eq!(r, json!({"return": {}}));
    let r = c.cmd(&json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string());
    assert_eq!(r, json!({"return": {}}));
    c.wait_event("MIGRATION_PASS");
    c.wait_event("MIGRATION_PASS");
    assert_eq!(
        c.cmd(r#"{"execute": "migrate_cancel"}"#),
        json!({"return": {}})
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = c.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
        if info["status"] == "cancelled" {
            break info;
        }
        assert!(Instant::now() < deadline, "not cancelled: {info}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(info["status"], "cancelled");
    assert_eq!(status(&mut c), "running");
    assert_eq!(
        second.wait_exit(Duration::from_secs(30)),
        Some(1),
        "the destination gave up"
    );
    assert_eq!(std::fs::read_to_string(&console2).unwrap_or_default(), "");
    assert_eq!(
        first.wait_exit(Duration::from_secs(180)),
        Some(1),
        "the source's guest finished well: {}",
        std::fs::read_to_string(&console1).unwrap_or_default()
    );
}

/// Parameters and capabilities as QEMU's, with its texts for its mistakes.
#[test]
fn migration_parameters_and_capabilities() {
    let q = Qomu::spawn(&["-S"]);
    let mut c = q.session();
    let p = c.ok("query-migrate-parameters", json!({}));
    assert_eq!(p["downtime-limit"], 300);
    assert_eq!(p["max-bandwidth"], 134217728);
    c.ok(
        "migrate-set-parameters",
        json!({"downtime-limit": 50, "max-bandwidth": 1048576}),
    );
    let p = c.ok("query-migrate-parameters", json!({}));
    assert_eq!(
        (p["downtime-limit"].clone(), p["max-bandwidth"].clone()),
        (json!(50), json!(1048576))
    );
    let r = c.execute("migrate-set-parameters", json!({"downtime-limit": 3000000}));
    assert_eq!(
        r["error"]["desc"],
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
    );
    assert_eq!(
        c.ok("query-migrate-parameters", json!({}))["downtime-limit"],
        50
    );
    let caps = c.ok("query-migrate-capabilities", json!({}));
    let state = |caps: &Json, name: &str| {
        caps.as_array()
            .unwrap()
            .iter()
            .find(|e| e["capability"] == name)
            .map(|e| e["state"].clone())
    };
    assert_eq!(state(&caps, "events"), Some(json!(false)));
    assert_eq!(state(&caps, "xbzrle"), Some(json!(false)));
    c.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    assert_eq!(
        state(&c.ok("query-migrate-capabilities", json!({})), "events"),
        Some(json!(true))
    );
    let r = c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "bogus", "state": true}]}),
    );
    assert_eq!(
        r["error"]["desc"],
        "Parameter 'capability' does not accept value 'bogus'"
    );
    let r = c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": false}, {"capability": "xbzrle", "state": true}]}),
    );
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("only 'events'"),
        "{r}"
    );
    assert_eq!(
        state(&c.ok("query-migrate-capabilities", json!({})), "events"),
        Some(json!(true)),
        "a refused request changes nothing"
    );
}

/// dbus-vmstate in a live migration: the source's helper saves at the switch-over (on the
/// source's bus), the destination's helper (on its own bus) loads that state before the
/// destination's guest goes on.
#[test]
fn a_helpers_state_travels_in_a_live_migration() {
    require_kvm!();
    require_dbus!();
    if !python_modules_present(&[("dbus_next", "dbus-next")]) {
        return;
    }
    let (bus1, bus2) = (SessionBus::start(), SessionBus::start());
    let dir = TempDir::new("mig-helper");
    let (state1, state2) = (dir.path("state1"), dir.path("state2"));
    let object = |bus: &SessionBus| {
        format!(
            "dbus-vmstate,id=dv,addr={},id-list=counter",
            bus.address.replace(',', ",,")
        )
    };
    let _h1 = KillOnDrop(helper(
        &bus1,
        &[
            "--id",
            "counter",
            "--count",
            "7",
            "--note",
            "live",
            "--state-file",
            state1.to_str().unwrap(),
        ],
    ));
    let _h2 = KillOnDrop(helper(
        &bus2,
        &["--id", "counter", "--state-file", state2.to_str().unwrap()],
    ));
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let mut args = machine_args(&dir, &dir.path("c2"), &["--object", &object(&bus2)]);
    args.extend(["--incoming".into(), uri.clone()]);
    let _second = spawn(&args);
    let mut first = spawn(&machine_args(
        &dir,
        &dir.path("c1"),
        &["--object", &object(&bus1)],
    ));
    let mut c = first.connect();
    c.negotiate();
    let info = migrate_to(&mut c, &uri);
    assert_eq!(info["status"], "completed", "{info}");
    let saved = std::fs::read_to_string(&state1).unwrap();
    assert_eq!(saved, r#"{"count": 7, "note": "live"}"#);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&state2).unwrap_or_default() != saved {
        assert!(
            Instant::now() < deadline,
            "the destination's helper never got {saved}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.child.kill().unwrap();
}

/// A NIC migrates live with its MAC and link: set down on the source, it is down at the
/// destination (no announcement goes while it is); up again there, `announce-self` sends
/// its RARP out of the destination's netdev (each side's NIC on a stream netdev to a peer
/// of the test's).
#[test]
fn a_nic_keeps_its_mac_and_link_across_a_live_migration() {
    require_kvm!();
    use std::os::unix::net::UnixListener;
    let dir = TempDir::new("mig-nic");
    let (console1, console2) = (dir.path("c1"), dir.path("c2"));
    let (peer1, peer2) = (dir.path("p1.socket"), dir.path("p2.socket"));
    let (l1, l2) = (
        UnixListener::bind(&peer1).unwrap(),
        UnixListener::bind(&peer2).unwrap(),
    );
    let nic = |peer: &Path| {
        [
            "--netdev".to_owned(),
            format!("stream,id=n0,addr.type=unix,addr.path={}", peer.display()),
            "--device".to_owned(),
            "virtio-net-pci,id=nic0,netdev=n0,mac=52:54:00:ab:cd:01".to_owned(),
        ]
    };
    let append = format!("counter={COUNT} spin=2000 nettraffic=0 min=2");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let extra2 = nic(&peer2);
    let mut args = counter_machine(
        &dir,
        &console2,
        &append,
        &extra2.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    args.extend(["--incoming".into(), uri.clone()]);
    let mut second = spawn(&args);
    let (mut p2, _) = l2.accept().unwrap();
    let extra1 = nic(&peer1);
    let mut first = spawn(&counter_machine(
        &dir,
        &console1,
        &append,
        &extra1.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let (_p1, _) = l1.accept().unwrap();
    let mut c = first.connect();
    c.negotiate();
    wait_console(&console1, "counter: 200");
    let r = c.cmd(r#"{"execute": "set_link", "arguments": {"name": "nic0", "up": false}}"#);
    assert_eq!(r, json!({"return": {}}));
    let info = migrate_to(&mut c, &uri);
    assert_eq!(info["status"], "completed", "{info}");
    first.child.kill().unwrap();
    let mut d = second.connect();
    d.negotiate();
    let get = |d: &mut QmpRaw, p: &str| {
        d.cmd(
            &json!({"execute": "qom-get", "arguments": {"path": "nic0", "property": p}})
                .to_string(),
        )["return"]
            .clone()
    };
    assert_eq!(
        get(&mut d, "link"),
        json!(false),
        "the link came down with it"
    );
    assert_eq!(get(&mut d, "mac-address"), json!("52:54:00:ab:cd:01"));
    // Link down: the announcement after the migration sent nothing.
    p2.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut len = [0u8; 4];
    assert!(
        std::io::Read::read_exact(&mut p2, &mut len).is_err(),
        "nothing while the link is down"
    );
    let r = d.cmd(r#"{"execute": "set_link", "arguments": {"name": "nic0", "up": true}}"#);
    assert_eq!(r, json!({"return": {}}));
    let r = d.cmd(r#"{"execute": "announce-self", "arguments": {"initial": 10, "rounds": 1}}"#);
    assert_eq!(r, json!({"return": {}}));
    p2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Read::read_exact(&mut p2, &mut len).unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    std::io::Read::read_exact(&mut p2, &mut f).unwrap();
    assert_eq!(
        f[6..12],
        [0x52, 0x54, 0, 0xab, 0xcd, 0x01],
        "the destination's NIC, its MAC"
    );
    assert_eq!(f[12..14], [0x80, 0x35]);
    assert_eq!(
        second.wait_exit(Duration::from_secs(120)),
        Some(1),
        "{}",
        std::fs::read_to_string(&console2).unwrap_or_default()
    );
}

/// Reads one section of a migration stream from `s`: its name and payload.
fn read_section(s: &mut impl std::io::Read) -> (String, Vec<u8>) {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut name = vec![0u8; u16::from_le_bytes(len).into()];
    s.read_exact(&mut name).unwrap();
    let mut size = [0u8; 8];
    s.read_exact(&mut size).unwrap();
    let mut payload = vec![0u8; u64::from_le_bytes(size) as usize];
    s.read_exact(&mut payload).unwrap();
    let mut crc = [0u8; 4];
    s.read_exact(&mut crc).unwrap();
    (String::from_utf8(name).unwrap(), payload)
}

/// The source stops its guest only once the destination has loaded every pass sent
/// (`pass-end:N`, answered `QOMUPASS`): a peer that holds its answer back for a second
/// finds the source's guest running and counting all that time; answered, the source
/// switches over (`switch-over`, then the last pass and the state); a peer that then goes
/// without its last word leaves the source running.
#[test]
fn the_source_stops_its_guest_only_once_the_destination_has_loaded_each_pass() {
    require_kvm!();
    let dir = TempDir::new("mig-pass-ack");
    let console = dir.path("c1");
    let first = spawn(&counter_machine(
        &dir,
        &console,
        "counter=1000000 spin=2000",
        &[],
    ));
    let mut c = first.connect();
    c.negotiate();
    wait_console(&console, "counter: 200");
    let sock = dir.path("peer.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut header = [0u8; 16];
        std::io::Read::read_exact(&mut s, &mut header).unwrap();
        assert_eq!(&header[..8], b"QOMUSNAP");
        let mut names = Vec::new();
        loop {
            let (name, _) = read_section(&mut s);
            names.push(name.clone());
            if name == "pass-end:1" {
                break;
            }
        }
        held_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        std::io::Write::write_all(&mut s, b"QOMUPASS").unwrap();
        // Later passes are answered at once.
        loop {
            let (name, _) = read_section(&mut s);
            names.push(name.clone());
            if name.starts_with("pass-end:") {
                std::io::Write::write_all(&mut s, b"QOMUPASS").unwrap();
            }
            if name == "end" {
                break;
            }
        }
        names
    });
    let r = c.cmd(
        &json!({"execute": "migrate", "arguments": {"uri": format!("unix:{}", sock.display())}})
            .to_string(),
    );
    assert_eq!(r, json!({"return": {}}));
    if held_rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let info = c.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
        panic!("the peer never held a pass: {info}");
    }
    let before = counts(&std::fs::read_to_string(&console).unwrap())
        .last()
        .copied()
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status(&mut c), "running", "while the pass is unanswered");
    let info = c.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
    assert_eq!(info["status"], "active", "{info}");
    wait_console(&console, &format!("counter: {}", before + 50));
    go_tx.send(()).unwrap();
    let names = peer.join().unwrap();
    let at = |n: &str| names.iter().position(|x| x == n);
    let (Some(pass_end), Some(switch), Some(run)) =
        (at("pass-end:1"), at("switch-over"), at("run"))
    else {
        panic!("sections: {names:?}");
    };
    assert!(pass_end < switch && switch < run, "sections: {names:?}");
    assert!(
        names[switch + 1..run].iter().any(|n| n.starts_with("cpu:")),
        "the last pass and the state follow the switch-over: {names:?}"
    );
    // The peer went without saying it loaded the stream: the source runs on.
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        let info = c.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
        if info["status"] != "active" {
            break info;
        }
        assert!(Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(status(&mut c), "running");
}
