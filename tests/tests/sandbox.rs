//! The sandbox against real qomu processes (docs/security.md): every thread class dies
//! with SIGSYS on a forbidden call under `--sandbox on`, naming it, and goes on under
//! `log`; every thread of a running qomu is filtered after a hotplug, a QMP client, a
//! D-Bus client and a migration have started theirs; `--run-as` drops to an unprivileged
//! user who can boot, hot-plug and snapshot inside what the VM was given and nowhere else;
//! `exec:` migration is refused.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qomu_tests::{KillOnDrop, QmpRaw, TempDir, qomu_binary, require_kvm, skip};
use serde_json::json;

/// Every class, with what makes a thread of it start.
const CLASSES: &[&str] = &[
    "main",
    "spawner",
    "control",
    "signals",
    "vcpu",
    "device-io",
    "serial-input",
    "qmp-listener",
    "qmp-client",
    "dbus",
    "migration",
    "timer",
];

/// qomu with a thread of every class: the demo guest running (vCPU), a stream netdev
/// listening (its idle reader is a device I/O thread), the serial port on stdin, QMP and a
/// peer-to-peer D-Bus socket.
fn start(dir: &TempDir, mode: &str, forbidden: Option<&str>) -> (KillOnDrop, PathBuf, PathBuf) {
    let qmp = dir.path("qmp.sock");
    let log = dir.path("stderr");
    let mut cmd = Command::new(qomu_binary());
    cmd.args(["--sandbox", mode, "--serial", "stdio", "--dbus", "none"])
        .arg("--qmp")
        .arg(format!("unix:{}", qmp.display()))
        .arg("--dbus-p2p")
        .arg(format!("unix:{}", dir.path("p2p.sock").display()))
        .arg("--netdev")
        .arg(format!(
            "stream,id=n0,server=on,addr.type=unix,addr.path={}",
            dir.path("net.sock").display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .env_remove("QOMU_SANDBOX")
        .env_remove("QOMU_TEST_FORBIDDEN_SYSCALL");
    if let Some(class) = forbidden {
        cmd.env("QOMU_TEST_FORBIDDEN_SYSCALL", class);
    }
    // SAFETY: setrlimit in the child before exec, async-signal-safe: no core file for the
    // deaths this test causes.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    (KillOnDrop(cmd.spawn().expect("spawn qomu")), qmp, log)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            eprintln!("gave up waiting for {what}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn session(qmp: &Path) -> QmpRaw {
    assert!(wait_for("the QMP socket", Duration::from_secs(20), || qmp.exists()));
    let mut c = QmpRaw::connect(qmp);
    c.negotiate();
    c
}

/// Makes a thread of `class` start where the start-up does not.
fn provoke(class: &str, qmp: &Path) {
    match class {
        "qmp-client" => {
            assert!(wait_for("the QMP socket", Duration::from_secs(20), || qmp.exists()));
            let _ = std::os::unix::net::UnixStream::connect(qmp);
        }
        "migration" => {
            // Not waiting for the reply: under `on` qomu may be gone before it is sent.
            let mut c = session(qmp);
            c.send(r#"{"execute": "announce-self"}"#);
            std::thread::sleep(Duration::from_millis(200));
        }
        "timer" => {
            // A lingering subscription whose owner leaves: qom's timer ends it later.
            let mut c = session(qmp);
            c.ok(
                "__org.qomu_subscribe",
                json!({"path": "/machine", "notifier": "*", "linger": 30}),
            );
        }
        _ => {}
    }
}

#[test]
fn every_thread_class_dies_on_a_forbidden_call_under_on_and_goes_on_under_log() {
    require_kvm!();
    for class in CLASSES {
        let dir = TempDir::new("sbx-class");
        let (mut qomu, qmp, log) = start(&dir, "on", Some(class));
        provoke(class, &qmp);
        let status = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = qomu.0.try_wait().unwrap() {
                    break status;
                }
                assert!(Instant::now() < deadline, "{class}: qomu did not die");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let said = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{class}: {status:?}\n{said}"
        );
        assert!(
            said.contains("forbidden system call syslog (103")
                && said.contains(&format!("class {class}); stopping qomu (--sandbox on)")),
            "{class}: {said}"
        );

        let dir = TempDir::new("sbx-class-log");
        let (mut qomu, qmp, log) = start(&dir, "log", Some(class));
        provoke(class, &qmp);
        let reported = format!("class {class}); let through (--sandbox log)");
        assert!(
            wait_for("the report", Duration::from_secs(30), || {
                std::fs::read_to_string(&log).is_ok_and(|s| s.contains(&reported))
            }),
            "{class}: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        let mut c = session(&qmp);
        assert_eq!(
            c.ok("query-status", json!({}))["status"],
            "running",
            "{class}"
        );
        assert!(qomu.0.try_wait().unwrap().is_none(), "{class}");
    }
}

/// `Seccomp:`, `NoNewPrivs:` and the name of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        found.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    found
}

fn known_thread(name: &str) -> bool {
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    // KVM's NX huge-page recovery worker is a kernel thread of the VM's process (it
    // shows the process's seccomp state, and runs no qomu code).
    name == "kvm-nx-lpage-re"
        || numbered("vcpu")
        || numbered("qmp")
        || name.starts_with("io-")
        || name.starts_with("qomu-spawn-")
        || name.starts_with("net-")
        || name.starts_with("zruntime")
        || [
            "qomu",
            "qomu-control",
            "qomu-signals",
            "qomu-spawner",
            "qmp-accept",
            "qmp-events",
            "qomu-dbus",
            "qomu-migrate",
            "qom-timer",
            "serial-stdin",
        ]
        .contains(&name)
}

#[test]
fn every_thread_is_filtered_after_a_hotplug_a_qmp_client_a_dbus_client_and_a_migration() {
    require_kvm!();
    if !qomu_tests::tools_present(&[("gdbus", "libglib2.0-bin")]) {
        return;
    }
    let dir = TempDir::new("sbx-threads");
    let (mut qomu, qmp, log) = start(&dir, "on", None);
    let pid = qomu.0.id();
    let mut c = session(&qmp);
    c.ok(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "rng0"}),
    );
    let p2p = dir.path("p2p.sock");
    let ping = Command::new("gdbus")
        .args(["call", "--address"])
        .arg(format!("unix:path={}", p2p.display()))
        .args(["--dest", "org.qomu.VM1", "--object-path", "/"])
        .args(["--method", "org.freedesktop.DBus.Peer.Ping"])
        .output()
        .unwrap();
    assert!(ping.status.success(), "{ping:?}");
    // A destination that accepts and never reads: the migration thread stays, blocked.
    let mig = dir.path("mig.sock");
    let listener = std::os::unix::net::UnixListener::bind(&mig).unwrap();
    c.ok("migrate", json!({"uri": format!("unix:{}", mig.display())}));
    let (_peer, _) = listener.accept().unwrap();
    assert!(wait_for(
        "the migration thread",
        Duration::from_secs(10),
        || { threads(pid).iter().any(|(name, ..)| name == "qomu-migrate") }
    ));
    let found = threads(pid);
    for wanted in [
        "vcpu0",
        "qmp-accept",
        "qomu-dbus",
        "qomu-migrate",
        "net-n0",
        "qomu-spawner",
    ] {
        assert!(
            found.iter().any(|(n, ..)| n == wanted),
            "{wanted} in {found:?}"
        );
    }
    assert!(
        found
            .iter()
            .any(|(n, ..)| n.starts_with("qmp") && n != "qmp-accept"),
        "{found:?}"
    );
    for (name, seccomp, nnp) in &found {
        assert_eq!(seccomp, "2", "{name}: {found:?}");
        assert_eq!(nnp, "1", "{name}: {found:?}");
        assert!(known_thread(name), "an unknown thread {name}: {found:?}");
    }
    c.ok("migrate_cancel", json!({}));
    assert!(
        qomu.0.try_wait().unwrap().is_none(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn exec_migration_is_refused_under_the_sandbox_and_nothing_changes() {
    require_kvm!();
    let dir = TempDir::new("sbx-exec");
    let (_qomu, qmp, _) = start(&dir, "on", None);
    let mut c = session(&qmp);
    let r = c.execute(
        "migrate",
        json!({"uri": format!("exec:touch {}", dir.path("ran").display())}),
    );
    let text = r["error"]["desc"].as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains("exec: migration runs a command, which the sandbox forbids"),
        "{r}"
    );
    assert_eq!(c.ok("query-status", json!({}))["status"], "running");
    assert!(c.ok("query-migrate", json!({})).get("status").is_none());
    assert!(!dir.path("ran").exists());
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: chown with a valid path.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, gid) }, 0);
}

/// Debian's `nobody` and `nogroup`.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

/// The VM's own directory in `dir`, `vm`, made and given to `nobody:nogroup`.
fn vm_dir(dir: &TempDir) -> PathBuf {
    let own = dir.path("vm");
    std::fs::create_dir(&own).unwrap();
    chown(&own, NOBODY, NOGROUP);
    own
}

/// qomu under `--run-as nobody:nogroup`, the default sandbox, no console or bus, limited
/// to the VM's directory `own`.
fn as_nobody(own: &Path) -> Command {
    let mut cmd = Command::new(qomu_binary());
    cmd.args([
        "--run-as",
        "nobody:nogroup",
        "--serial",
        "none",
        "--dbus",
        "none",
    ])
    .arg("--sandbox-path")
    .arg(own)
    .stdin(Stdio::null())
    .env_remove("QOMU_SANDBOX");
    cmd
}

/// What `/proc/PID/status` says of a field.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
fn run_as_an_unprivileged_user_boots_hotplugs_and_snapshots_inside_its_paths_only() {
    require_kvm!();
    if !is_root() {
        skip("--run-as needs root to drop from");
        return;
    }
    let dir = TempDir::new("sbx-runas");
    // The VM's own directory, the user's: its sockets, its disk, its snapshots.
    let own = vm_dir(&dir);
    let disk = own.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    chown(&disk, NOBODY, NOGROUP);
    // Somewhere the user could write to were it not for Landlock.
    let other = dir.path("other");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&other).unwrap().permissions(),
        0o777,
    );
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let other_disk = other.join("disk.img");
    std::fs::write(&other_disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(
        &other_disk,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();

    let qmp = own.join("qmp.sock");
    let log = dir.path("stderr");
    let mut cmd = as_nobody(&own);
    cmd.arg("--qmp")
        .arg(format!("unix:{}", qmp.display()))
        .stderr(std::fs::File::create(&log).unwrap());
    let qomu: Child = cmd.spawn().unwrap();
    let qomu = KillOnDrop(qomu);
    let pid = qomu.0.id();
    let mut c = session(&qmp);
    assert_eq!(c.ok("query-status", json!({}))["status"], "running");
    assert_eq!(status_field(pid, "Uid:"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Gid:"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Groups:"), "");
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    // SAFETY: stat of a valid path into a local buffer.
    let owner = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&qmp).unwrap();
        (m.uid(), m.mode() & 0o777)
    };
    assert_eq!(owner, (NOBODY, 0o600), "the QMP socket is the user's, 0600");

    c.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "disk0", "file": disk.to_str().unwrap()}),
    );
    let refused = c.execute(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "disk1", "file": other_disk.to_str().unwrap()}),
    );
    assert!(
        refused["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("Permission denied")),
        "{refused}"
    );
    // Refused at once (the file is opened before the migration starts) or failed with
    // the reason, as the target is found to be unwritable.
    let outside = other.join("vm.snap");
    let r = c.execute(
        "migrate",
        json!({"uri": format!("file:{}", outside.display())}),
    );
    let reason = match r["error"]["desc"].as_str() {
        Some(desc) => desc.to_owned(),
        None => {
            assert!(wait_for(
                "the refused snapshot",
                Duration::from_secs(30),
                || { c.ok("query-migrate", json!({}))["status"] == "failed" }
            ));
            c.ok("query-migrate", json!({}))["error-desc"].to_string()
        }
    };
    assert!(reason.contains("Permission denied"), "{reason}");
    assert!(!outside.exists() && !other.join("vm.snap.partial").exists());
    assert_eq!(c.ok("query-status", json!({}))["status"], "running");
    let snap = own.join("vm.snap");
    c.ok(
        "migrate",
        json!({"uri": format!("file:{}", snap.display())}),
    );
    assert!(wait_for("the snapshot", Duration::from_secs(60), || {
        c.ok("query-migrate", json!({}))["status"] == "completed"
    }));
    assert!(snap.is_file());

    assert!(
        c.children("/machine/peripheral")
            .contains(&"disk0".to_owned())
    );
    let _ = std::fs::read_to_string(&log);
}

/// The end of a qomu that started its own dbus-daemon (`--dbus auto`, no session bus): on
/// SIGTERM it stops and reaps the daemon under the main thread's filter and exits 0.
#[test]
fn a_qomu_with_a_private_bus_ends_cleanly_on_sigterm() {
    if !qomu_tests::tools_present(&[("dbus-daemon", "dbus")]) {
        return;
    }
    let dir = TempDir::new("sbx-term");
    let qmp = dir.path("qmp.sock");
    let log = dir.path("stderr");
    let child = Command::new(qomu_binary())
        .args(["-S", "--serial", "none"])
        .arg("--qmp")
        .arg(format!("unix:{}", qmp.display()))
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("QOMU_SANDBOX")
        .env("XDG_RUNTIME_DIR", &dir.0)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut qomu = KillOnDrop(child);
    let mut c = session(&qmp);
    assert_eq!(c.ok("query-status", json!({}))["status"], "prelaunch");
    // SAFETY: kill with the pid of a child this test owns.
    assert_eq!(unsafe { libc::kill(qomu.0.id() as i32, libc::SIGTERM) }, 0);
    let status = qomu.0.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}\n{said}");
    assert!(!said.contains("forbidden system call"), "{said}");
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("qomu-dbus-"))
        .collect();
    assert!(
        left.is_empty(),
        "the private bus's directory is left: {left:?}"
    );
}

/// What a client running as `uid:gid` (no other groups) gets from the QMP socket at
/// `path`: the greeting's first line, or the error connecting.
fn connect_as(uid: u32, gid: u32, path: &Path) -> Result<String, String> {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            // Debian's, which any user may run (a pyenv's under /root is root's alone).
            "/usr/bin/python3",
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             try:\n    s.connect(sys.argv[1])\n\
             except OSError as e:\n    print(e.strerror); sys.exit(1)\n\
             print(s.makefile().readline().strip())",
        ])
        .arg(path)
        .output()
        .expect("setpriv (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match out.status.success() {
        true => Ok(text),
        false => Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))),
    }
}

/// `--qmp unix:PATH,group=G`: under `--run-as nobody:nogroup` the socket appears as
/// nobody's, group nogroup, mode 0660; another user in that group gets the greeting, the
/// same user in another group is refused, as is the group on a socket without `group=`.
/// A group nobody is not in, or one that does not exist, stops qomu before it starts,
/// saying so.
#[test]
fn a_group_socket_lets_its_group_in_and_no_one_else() {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        skip("--run-as needs root to drop from");
        return;
    }
    // Another user (Debian's `daemon`), in nogroup or in its own group.
    const OTHER: u32 = 1;
    let dir = TempDir::new("sbx-group");
    let own = vm_dir(&dir);
    let shared = own.join("shared.sock");
    let private = own.join("private.sock");
    let qomu = as_nobody(&own)
        .arg("-S")
        .arg("--qmp")
        .arg(format!(
            "unix:{},server=on,wait=off,group=nogroup",
            shared.display()
        ))
        .arg("--qmp")
        .arg(format!("unix:{}", private.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _qomu = KillOnDrop(qomu);
    assert!(wait_for("the sockets", Duration::from_secs(20), || {
        shared.exists() && private.exists()
    }));
    let meta = std::fs::metadata(&shared).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (NOBODY, NOGROUP, 0o660)
    );
    let greeting = connect_as(OTHER, NOGROUP, &shared).expect("the group's member gets in");
    assert!(greeting.starts_with(r#"{"QMP":"#), "{greeting}");
    let refused = connect_as(OTHER, OTHER, &shared).unwrap_err();
    assert!(refused.contains("Permission denied"), "{refused}");
    let refused = connect_as(OTHER, NOGROUP, &private).unwrap_err();
    assert!(refused.contains("Permission denied"), "{refused}");

    // A group nobody is not in: stopped with the reason, no socket left.
    let refused_sock = own.join("refused.sock");
    let out = as_nobody(&own)
        .arg("-S")
        .arg("--qmp")
        .arg(format!("unix:{},group=daemon", refused_sock.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot give it to group 1") && stderr.contains("Operation not permitted"),
        "{stderr}"
    );
    assert!(!refused_sock.exists());
    assert_eq!(
        std::fs::read_dir(&own).unwrap().count(),
        2,
        "only the two sockets of the running qomu"
    );

    let out = Command::new(qomu_binary())
        .args(["-S", "--serial", "none", "--dbus", "none", "--qmp"])
        .arg(format!(
            "unix:{},group=no-such-group-here",
            dir.path("x.sock").display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no group 'no-such-group-here'"), "{stderr}");
    assert!(!dir.path("x.sock").exists());
}
