//! The system-bus policy shipped in data/dbus/org.qomu.VM1.conf, enforced by a real
//! dbus-daemon configured as the system bus is: root owns the name and may change things;
//! another user may browse and watch, and is refused the rest by the bus itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qomu_tests::dbus::{MACHINE, MACHINE_IFACE, NAME, stdout_ok};
use qomu_tests::{KillOnDrop, TempDir, qomu_binary};

/// The default policy of Debian's system.conf, which the shipped file punches holes in.
const SYSTEM_DEFAULT_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
"#;

struct SystemLikeBus {
    child: std::process::Child,
    address: String,
}

impl Drop for SystemLikeBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_bus(dir: &Path) -> SystemLikeBus {
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dbus/org.qomu.VM1.conf");
    let policy = policy.canonicalize().expect("data/dbus/org.qomu.VM1.conf");
    let config = dir.join("system-like.conf");
    std::fs::write(
        &config,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}/bus</listen>
  <auth>EXTERNAL</auth>
  {SYSTEM_DEFAULT_POLICY}
  <include>{}</include>
</busconfig>
"#,
            dir.display(),
            policy.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--nopidfile", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-daemon");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let address = line.trim().to_owned();
    assert!(
        address.starts_with("unix:"),
        "dbus-daemon refused the configuration with the shipped policy"
    );
    SystemLikeBus { child, address }
}

fn as_nobody(program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv")
}

fn busctl(address: &str, nobody: bool, args: &[&str]) -> Output {
    let addr = format!("--address={address}");
    let mut all = vec![addr.as_str()];
    all.extend(args);
    if nobody {
        as_nobody(Path::new("/usr/bin/busctl"), &all)
    } else {
        Command::new("busctl").args(&all).output().unwrap()
    }
}

#[test]
fn system_bus_policy_lets_root_drive_and_others_watch() {
    // SAFETY-free check of the effective uid: only root can start processes as another user.
    let is_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !is_root {
        qomu_tests::skip("only root can start processes as another user (nobody)");
        return;
    }
    qomu_tests::require_tools!("setpriv" from "util-linux", "dbus-daemon" from "dbus", "busctl" from "systemd");
    let dir = TempDir::new("dbus-policy");
    // `nobody` must reach the socket and run the binary.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bus = start_bus(&dir.0);
    let qomu: PathBuf = dir.path("qomu");
    std::fs::copy(qomu_binary(), &qomu).unwrap();

    // Another user may not own the name.
    let out = as_nobody(&qomu, &["-S", "--serial", "none", "--dbus", &bus.address]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot own the name 'org.qomu.VM1'"), "{err}");

    // root may.
    let mut vm = Command::new(&qomu);
    vm.args(qomu_tests::sandbox_path_args());
    let mut vm = vm
        .args(["-S", "--serial", "none", "--dbus", &bus.address])
        .stdin(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !busctl(&bus.address, false, &["status", NAME])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "qomu did not take its name");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Everyone may browse and watch.
    let get = ["get-property", NAME, MACHINE, MACHINE_IFACE, "Cpus"];
    assert_eq!(stdout_ok(&busctl(&bus.address, true, &get)).trim(), "y 1");
    assert!(stdout_ok(&busctl(&bus.address, true, &["tree", NAME])).contains(MACHINE));
    let sub = stdout_ok(&busctl(
        &bus.address,
        true,
        &[
            "call",
            NAME,
            MACHINE,
            "org.qomu.Object1",
            "Subscribe",
            "s",
            "STOP",
        ],
    ));
    assert!(sub.starts_with("o \"/org/qomu/VM1/subscriptions/"), "{sub}");

    // Only root may change anything: the bus refuses the others.
    let set = [
        "set-property",
        NAME,
        MACHINE,
        MACHINE_IFACE,
        "Cpus",
        "y",
        "2",
    ];
    let out = busctl(&bus.address, true, &set);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Access denied") || err.contains("AccessDenied"),
        "{err}"
    );
    let out = busctl(
        &bus.address,
        true,
        &["call", NAME, MACHINE, MACHINE_IFACE, "Quit"],
    );
    assert!(!out.status.success());
    assert_eq!(stdout_ok(&busctl(&bus.address, true, &get)).trim(), "y 1");
    stdout_ok(&busctl(&bus.address, false, &set));
    assert_eq!(stdout_ok(&busctl(&bus.address, false, &get)).trim(), "y 2");

    // A subscription made for another connection (the `owner` option) must be for one of
    // the caller's own user: neither user may aim events at the other's connections.
    let listener = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([
            "gdbus",
            "monitor",
            "--address",
            &bus.address,
            "--dest",
            NAME,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let pid = listener.0.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let nobody_name = loop {
        let list = stdout_ok(&busctl(
            &bus.address,
            false,
            &["list", "--unique", "--no-legend"],
        ));
        if let Some(name) = list.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            (f.next()? == pid).then(|| name.to_owned())
        }) {
            break name;
        }
        assert!(Instant::now() < deadline, "gdbus monitor did not connect");
        std::thread::sleep(Duration::from_millis(20));
    };
    // gdbus, not busctl: busctl prints only "Access denied" for AccessDenied errors.
    let for_owner = |nobody: bool, owner: &str| {
        let options = format!("{{'owner': <'{owner}'>}}");
        let args = [
            "call",
            "--address",
            &bus.address,
            "--dest",
            NAME,
            "--object-path",
            "/org/qomu/VM1",
            "--method",
            "org.qomu.Root1.SubscribeTypeWithOptions",
            "isa-serial",
            "line",
            &options,
        ];
        if nobody {
            as_nobody(Path::new("/usr/bin/gdbus"), &args)
        } else {
            Command::new("gdbus").args(args).output().unwrap()
        }
    };
    let out = for_owner(false, &nobody_name);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is another user's connection"), "{err}");
    // qomu's own connection is root's.
    let out = for_owner(true, NAME);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is another user's connection"), "{err}");
    // For its own connection, nobody may.
    let me = stdout_ok(&for_owner(true, &nobody_name));
    assert!(
        me.starts_with("(objectpath '/org/qomu/VM1/subscriptions/"),
        "{me}"
    );
    drop(listener);

    stdout_ok(&busctl(
        &bus.address,
        false,
        &["call", NAME, MACHINE, MACHINE_IFACE, "Quit"],
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = vm.0.try_wait() {
            assert!(status.success());
            break;
        }
        assert!(Instant::now() < deadline, "Quit did not end qomu");
        std::thread::sleep(Duration::from_millis(20));
    }
}
