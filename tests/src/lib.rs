//! Helpers of qomu's end-to-end tests: KVM availability, machines booting the test guests,
//! and waiting for their console lines and events; `qomu` processes with QMP and D-Bus
//! clients ([`dbus`]).

pub mod dbus;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machine::{Machine, MachineConfig};
use qom::{SubscribeOptions, Subscriber, Target, Value};

/// How long a test waits for a guest before failing: 60 s (guests are slow where KVM
/// emulates ring 0, and CI machines are shared), or `QOMU_TEST_PATIENCE` seconds where a
/// run is known to be slower (the Linux boot test under nested, emulated virtualization:
/// `scripts/linux-check-nested`).
pub fn patience() -> Duration {
    static PATIENCE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *PATIENCE.get_or_init(|| {
        let secs = std::env::var("QOMU_TEST_PATIENCE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        Duration::from_secs(secs)
    })
}

/// How many of the last console lines a failed wait shows.
const RECENT_LINES: usize = 40;

/// Whether a test that cannot find what it needs must fail rather than skip: under CI
/// (`CI` set, and not to `false` or `0`) or with `QOMU_REQUIRE_KVM=1`.
pub fn skips_are_failures() -> bool {
    let set =
        |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CI") || set("QOMU_REQUIRE_KVM")
}

/// The name of the running test (the test harness names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned()
}

/// The running test cannot run here, because of `why`: it prints `SKIPPED <test>: <why>`
/// and the caller returns; under CI or with `QOMU_REQUIRE_KVM=1` it fails instead, so a
/// skip never hides a failure there.
pub fn skip(why: &str) {
    use std::io::Write;
    let test = test_name();
    assert!(
        !skips_are_failures(),
        "{test} cannot run: {why} (a failure, not a skip, under CI or with QOMU_REQUIRE_KVM=1)"
    );
    // Straight to the process's stderr, past the test harness's capture: a skip shows in
    // every run's output, not only with --nocapture.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The running test does not run on this host because `why`, and test `twin` runs it
/// elsewhere in the same suite: it prints `SKIPPED <test>: <why>; <twin> runs it` and
/// the caller returns, under CI too. The one such case: the native Linux tests on a host
/// without hardware virtualization, which their nested twin runs on an emulated host.
pub fn skip_run_by_twin(why: &str, twin: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {}: {why}; {twin} runs it",
        test_name()
    );
}

/// Whether `/dev/kvm` can be used (it opens and answers KVM's first ioctl); when it
/// cannot, the test skips ([`skip`]).
pub fn kvm_usable() -> bool {
    let why = match kvm_ioctls::Kvm::new() {
        Ok(kvm) if kvm.get_api_version() >= 0 => return true,
        Ok(_) => "it does not answer KVM_GET_API_VERSION".to_owned(),
        Err(e) => e.to_string(),
    };
    skip(&format!("/dev/kvm is not usable here ({why})"));
    false
}

/// Skips the calling test ([`skip`]) when KVM is not usable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_usable() {
            return;
        }
    };
}

/// Whether every program of `programs` (each with the Debian package that has it) runs
/// here; when one does not, the test skips ([`skip`]), naming it and its package.
pub fn tools_present(programs: &[(&str, &str)]) -> bool {
    for (program, package) in programs {
        // `--version` is enough to find it; whether it succeeds does not matter.
        if std::process::Command::new(program)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_err()
        {
            skip(&format!(
                "`{program}` is not installed (Debian package {package}; scripts/test installs it)"
            ));
            return false;
        }
    }
    true
}

/// Whether Python 3 can import every module of `modules` (each with its PyPI package);
/// when it cannot, the test skips ([`skip`]).
pub fn python_modules_present(modules: &[(&str, &str)]) -> bool {
    for (module, package) in modules {
        let found = std::process::Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            skip(&format!(
                "Python 3 cannot import {module} (PyPI package {package}; scripts/test installs it)"
            ));
            return false;
        }
    }
    true
}

/// The programs the D-Bus tests run, with their Debian packages.
pub const DBUS_TOOLS: &[(&str, &str)] = &[
    ("dbus-run-session", "dbus"),
    ("dbus-daemon", "dbus"),
    ("busctl", "systemd"),
    ("gdbus", "libglib2.0-bin"),
];

/// Skips the calling test ([`skip`]) unless the D-Bus tools ([`DBUS_TOOLS`]) run here.
#[macro_export]
macro_rules! require_dbus {
    () => {
        if !$crate::tools_present($crate::DBUS_TOOLS) {
            return;
        }
    };
}

/// Skips the calling test ([`skip`]) unless every `(program, Debian package)` runs here.
#[macro_export]
macro_rules! require_tools {
    ($($program:literal from $package:literal),+ $(,)?) => {
        if !$crate::tools_present(&[$(($program, $package)),+]) {
            return;
        }
    };
}

/// Whether the CPU has hardware virtualization (vmx or svm), as a Linux guest needs.
pub fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
}

/// A machine booting one of the test guests, with its console and `/machine` events
/// subscribed to from the start.
pub struct TestVm {
    pub machine: Arc<Machine>,
    pub client: Subscriber,
    lines: VecDeque<String>,
    /// The last [`RECENT_LINES`] console lines, consumed or not, for failure messages.
    recent: VecDeque<String>,
    events: VecDeque<(String, Value)>,
}

impl TestVm {
    /// A machine in prelaunch booting guest `name` with command line `append`, a debug-exit
    /// port, and `extra` devices.
    pub fn new(name: &str, append: &str) -> TestVm {
        Self::with_config(MachineConfig {
            devices: vec!["isa-debug-exit".parse().expect("device spec")],
            ..MachineConfig::with_kernel(qomu_guests::path(name), append)
        })
    }

    pub fn with_config(config: MachineConfig) -> TestVm {
        let machine = Machine::new(&config).expect("machine");
        let client = machine.tree().subscriber("test");
        client
            .subscribe(
                Target::Type("isa-serial".into()),
                "line",
                SubscribeOptions {
                    queue_limit: Some(100_000),
                    ..SubscribeOptions::default()
                },
            )
            .expect("line");
        for n in ["STOP", "RESUME", "RESET", "SHUTDOWN", "POWERDOWN"] {
            client
                .subscribe(
                    Target::Object("/machine".into()),
                    n,
                    SubscribeOptions::default(),
                )
                .expect("event");
        }
        TestVm {
            machine,
            client,
            lines: VecDeque::new(),
            recent: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Starts the guest.
    pub fn start(&self) -> &Self {
        self.machine.cont().expect("cont");
        self
    }

    fn pump(&mut self, wait: Duration) {
        self.client.wait(wait);
        for d in self.client.drain() {
            let e = &d.event;
            if &*e.notifier == "line" {
                let line = e
                    .data
                    .field("line")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if self.recent.len() == RECENT_LINES {
                    self.recent.pop_front();
                }
                self.recent.push_back(line.clone());
                self.lines.push_back(line);
            } else {
                self.events
                    .push_back((e.notifier.to_string(), e.data.clone()));
            }
        }
    }

    /// Waits for a console line containing `text` (consuming lines up to it).
    pub fn wait_line(&mut self, text: &str) -> String {
        self.try_wait_line(text).unwrap_or_else(|| {
            panic!(
                "no console line containing {text:?} within {:?}; the console's last lines:\n{}",
                patience(),
                self.recent_lines()
            )
        })
    }

    /// [`TestVm::wait_line`], None when the line did not come within the patience.
    pub fn try_wait_line(&mut self, text: &str) -> Option<String> {
        let deadline = Instant::now() + patience();
        loop {
            while let Some(line) = self.lines.pop_front() {
                if line.contains(text) {
                    return Some(line);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            self.pump(Duration::from_millis(50));
        }
    }

    /// Waits for the next `/machine` event named `name`; returns its data.
    pub fn wait_event(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + patience();
        loop {
            if let Some(i) = self.events.iter().position(|(n, _)| n == name) {
                return self
                    .events
                    .remove(i)
                    .map(|(_, d)| d)
                    .unwrap_or(Value::Bool(false));
            }
            assert!(
                Instant::now() < deadline,
                "no {name} event within {:?}; the console's last lines:\n{}",
                patience(),
                self.recent_lines()
            );
            self.pump(Duration::from_millis(50));
        }
    }

    /// The console's last lines (at most 40), consumed or not, joined for a failure message.
    pub fn recent_lines(&self) -> String {
        Vec::from(self.recent.clone()).join("\n")
    }

    /// Every console line and event received so far (lines are not consumed).
    pub fn lines_so_far(&mut self) -> Vec<String> {
        self.pump(Duration::ZERO);
        self.lines.iter().cloned().collect()
    }

    /// Events received so far, by name, in order (consumed).
    pub fn take_events(&mut self) -> Vec<String> {
        self.pump(Duration::ZERO);
        self.events.drain(..).map(|(n, _)| n).collect()
    }

    /// Waits for the VMM to end; returns the exit status.
    pub fn wait_exit(&self) -> i32 {
        self.machine
            .wait_for_exit_timeout(patience())
            .unwrap_or_else(|| panic!("the guest did not end within {:?}", patience()))
    }

    pub fn get(&self, path: &str, property: &str) -> Value {
        self.machine
            .tree()
            .get(path, property)
            .unwrap_or_else(|e| panic!("{path}.{property}: {e}"))
    }
}

/// The `qomu` binary of this build, built first if it is missing or older than the
/// sources. `cargo test` builds a package's binary only for that package's own
/// integration tests, and qomu's are in this crate: so `cargo test --workspace` may not
/// build it at all, and `cargo test -p qomu-tests` would run a stale one. Once per test
/// process, this runs the cargo that built the tests (`cargo build -p qomu --bin
/// qomu`, a no-op when it is up to date). Where no cargo is at hand (the Linux check's
/// emulated host) an existing binary is used as it is.
pub fn qomu_binary() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_qomu).clone()
}

fn build_qomu() -> std::path::PathBuf {
    // Given (the emulated host of scripts/linux-check-nested has no cargo).
    if let Some(bin) = std::env::var_os("QOMU_BINARY") {
        return std::path::PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/qomu
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target directory");
    let bin = profile_dir.join("qomu");
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = profile_dir.file_name().and_then(|n| n.to_str());
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "qomu",
            "--bin",
            "qomu",
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile == Some("release") {
        build.arg("--release");
    }
    match build.status() {
        Ok(status) => assert!(status.success(), "building qomu failed: {status}"),
        Err(e) => eprintln!("cannot run cargo ({e}); using {} as it is", bin.display()),
    }
    assert!(bin.is_file(), "{} is missing", bin.display());
    bin
}

/// A `qomu` command for a test: [`qomu_binary`], allowed by the sandbox (`--sandbox-path`)
/// the tests' scratch directory (where they make the images, sockets and snapshots they
/// hand qomu once it runs) and the test guests (kernels set over QMP or D-Bus in
/// prelaunch are opened at `cont`). A test that is about the sandbox's paths starts
/// [`qomu_binary`] itself.
pub fn qomu_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(qomu_binary());
    cmd.args(sandbox_path_args());
    cmd
}

/// The `--sandbox-path` arguments of [`qomu_command`], for a test that builds a command
/// line as text.
pub fn sandbox_path_args() -> Vec<String> {
    let guests = qomu_guests::path("hello");
    let guests = guests.parent().unwrap_or(&guests);
    vec![
        "--sandbox-path".into(),
        std::env::temp_dir().display().to_string(),
        "--sandbox-path".into(),
        format!("{},access=ro", guests.display()),
    ]
}

/// A child process killed when the test ends, passed or not (a failing assertion must not
/// leave it running, or holding the test's output open).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private temporary directory, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("qomu-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `qomu` process with a QMP socket, killed on drop.
pub struct Qomu {
    pub child: std::process::Child,
    pub dir: TempDir,
    pub qmp: std::path::PathBuf,
}

impl Qomu {
    /// Starts `qomu ARGS --qmp unix:<dir>/qmp.sock` (with `--serial none` and `--dbus none`
    /// unless ARGS chooses) and waits for the socket.
    pub fn spawn(args: &[&str]) -> Qomu {
        Self::spawn_with_env(args, &[])
    }

    /// As [`Qomu::spawn`], with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Qomu {
        Self::spawn_with(args, |cmd| {
            cmd.envs(env.iter().copied());
        })
    }

    /// As [`Qomu::spawn`], with the command adjusted by `setup` before it starts.
    pub fn spawn_with(args: &[&str], setup: impl FnOnce(&mut std::process::Command)) -> Qomu {
        let dir = TempDir::new("proc");
        let qmp = dir.path("qmp.sock");
        let mut cmd = qomu_command();
        cmd.args(args)
            .arg("--qmp")
            .arg(format!("unix:{}", qmp.display()));
        if !args.contains(&"--serial") {
            cmd.args(["--serial", "none"]);
        }
        // QMP tests need no bus; D-Bus tests say which one.
        if !args.contains(&"--dbus") {
            cmd.args(["--dbus", "none"]);
        }
        cmd.stdin(std::process::Stdio::null());
        setup(&mut cmd);
        let child = cmd.spawn().expect("spawn qomu");
        let q = Qomu { child, dir, qmp };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !q.qmp.exists() {
            assert!(
                Instant::now() < deadline,
                "qomu did not create its QMP socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        q
    }

    /// Waits for the process to end; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A raw client connection (greeting read).
    pub fn connect(&self) -> QmpRaw {
        QmpRaw::connect(&self.qmp)
    }

    /// A connection that has negotiated capabilities.
    pub fn session(&self) -> QmpRaw {
        let mut c = self.connect();
        c.negotiate();
        c
    }
}

impl Drop for Qomu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms until it holds; panics with `what` after 60 s.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw QMP client: exact bytes in, exact lines out.
pub struct QmpRaw {
    pub stream: std::os::unix::net::UnixStream,
    buf: Vec<u8>,
    /// Events read while waiting for replies.
    pub events: VecDeque<serde_json::Value>,
    pub greeting: serde_json::Value,
}

impl QmpRaw {
    pub fn connect(path: &std::path::Path) -> QmpRaw {
        let stream = std::os::unix::net::UnixStream::connect(path).expect("connect to QMP");
        stream.set_read_timeout(Some(patience())).expect("timeout");
        let mut c = QmpRaw {
            stream,
            buf: Vec::new(),
            events: VecDeque::new(),
            greeting: serde_json::Value::Null,
        };
        c.greeting = c.read_message();
        c
    }

    pub fn send(&mut self, text: &str) {
        use std::io::Write;
        self.stream.write_all(text.as_bytes()).expect("send");
    }

    /// The next line, without its CRLF; panics if a line does not end in CRLF.
    pub fn read_line(&mut self) -> String {
        use std::io::Read;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return String::from_utf8(line).expect("QMP output is ASCII");
            }
            let mut chunk = [0u8; 65536];
            // A signal to this process (a child exiting, say) can cut a read short with
            // EINTR; that is not the connection's doing, so it is read again.
            let n = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("read from QMP"),
            };
            assert!(n > 0, "qomu closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn read_message(&mut self) -> serde_json::Value {
        let line = self.read_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Reads until a reply (return or error), keeping events aside.
    pub fn reply(&mut self) -> serde_json::Value {
        loop {
            let m = self.read_message();
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else {
                return m;
            }
        }
    }

    /// Sends a command (`{"execute": ...}` text) and returns its reply.
    pub fn cmd(&mut self, text: &str) -> serde_json::Value {
        self.send(text);
        self.reply()
    }

    /// As [`QmpRaw::cmd`], but `None` if the connection is gone instead of panicking.
    pub fn try_cmd(&mut self, text: &str) -> Option<serde_json::Value> {
        use std::io::{Read, Write};
        self.stream.write_all(text.as_bytes()).ok()?;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                let m: serde_json::Value = serde_json::from_slice(&line).ok()?;
                if m.get("event").is_some() {
                    self.events.push_back(m);
                    continue;
                }
                return Some(m);
            }
            let mut chunk = [0u8; 65536];
            let n = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.ok().filter(|&n| n > 0)?,
            };
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn negotiate(&mut self) {
        let r = self.cmd(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(r, serde_json::json!({"return": {}}));
    }

    /// The next subscription event (`__org.qomu_NOTIFY`) of `notifier` from `path`; its
    /// `data` member (others stay queued).
    pub fn wait_notify(&mut self, notifier: &str, path: &str) -> serde_json::Value {
        self.wait_notify_event(notifier, path)["data"]["data"].clone()
    }

    /// As [`QmpRaw::wait_notify`], the whole event (with its `timestamp`).
    pub fn wait_notify_event(&mut self, notifier: &str, path: &str) -> serde_json::Value {
        self.wait_for(&format!("{notifier} of {path}"), |e| {
            e["event"] == "__org.qomu_NOTIFY"
                && e["data"]["notifier"] == notifier
                && e["data"]["path"] == path
        })
    }

    /// Runs `command` with `arguments`; its reply, return or error.
    pub fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        self.cmd(&serde_json::json!({"execute": command, "arguments": arguments}).to_string())
    }

    /// Runs a command that must succeed; what it returned.
    pub fn ok(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let r = self.execute(command, arguments.clone());
        assert!(r.get("return").is_some(), "{command} {arguments}: {r}");
        r["return"].clone()
    }

    /// `qom-get`, which must succeed.
    pub fn qom_get(&mut self, path: &str, property: &str) -> serde_json::Value {
        self.ok(
            "qom-get",
            serde_json::json!({"path": path, "property": property}),
        )
    }

    /// The names of `path`'s children (its `child<>` properties), as qom-list gives them.
    pub fn children(&mut self, path: &str) -> Vec<String> {
        self.ok("qom-list", serde_json::json!({"path": path}))
            .as_array()
            .expect("qom-list")
            .iter()
            .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
            .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The next `__org.qomu_NOTIFY` event of subscription `sub`, whole (others stay queued).
    pub fn wait_notify_of(&mut self, sub: &str) -> serde_json::Value {
        self.wait_for(&format!("an event of {sub}"), |e| {
            e["event"] == "__org.qomu_NOTIFY" && e["data"]["subscription"] == sub
        })
    }

    /// Every qom path below `/`, walked with qom-list along `child<>` properties.
    pub fn tree(&mut self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut todo = vec!["/".to_owned()];
        while let Some(path) = todo.pop() {
            let r = self.cmd(&format!(
                r#"{{"execute": "qom-list", "arguments": {{"path": "{path}"}}}}"#
            ));
            // A child listed a moment ago may be gone (a subscription ending with its
            // connection): it is not in the tree, so not in the walk.
            if r["error"]["class"] == "DeviceNotFound" && path != "/" {
                out.remove(&path);
                continue;
            }
            for p in r["return"].as_array().expect("qom-list") {
                if p["type"].as_str().is_some_and(|t| t.starts_with("child<")) {
                    let name = p["name"].as_str().unwrap();
                    let child = if path == "/" {
                        format!("/{name}")
                    } else {
                        format!("{path}/{name}")
                    };
                    todo.push(child.clone());
                    out.insert(child);
                }
            }
        }
        out
    }

    /// How many events named `name` were read and are queued (everything sent before the
    /// last message read has been).
    pub fn queued_events(&self, name: &str) -> usize {
        self.events.iter().filter(|e| e["event"] == name).count()
    }

    /// The next event named `name` (others stay queued).
    pub fn wait_event(&mut self, name: &str) -> serde_json::Value {
        self.wait_for(name, |e| e["event"] == name)
    }

    /// The first event, queued or next to come, that `wanted` accepts (others stay
    /// queued); `what` names it if a reply comes instead.
    fn wait_for(
        &mut self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            if let Some(i) = self.events.iter().position(&wanted) {
                return self.events.remove(i).unwrap_or_default();
            }
            let m = self.read_message();
            assert!(
                m.get("event").is_some(),
                "unexpected reply while waiting for {what}: {m}"
            );
            self.events.push_back(m);
        }
    }
}
