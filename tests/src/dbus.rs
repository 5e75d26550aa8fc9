//! D-Bus test helpers: a private session bus started with `dbus-run-session`, a `qomu`
//! serving on it, `busctl`/`gdbus` runs against it, and a zbus client with blocking calls
//! and signal waits.

use std::io::{BufRead, BufReader};
use std::num::NonZeroUsize;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use zbus::message::Type as MessageType;
use zbus::wire::DynamicType;
use zbus::{Connection, MatchRule, Message, MessageStream, OwnedVariant};

use crate::{Qomu, patience};

/// The bus name qomu owns by default.
pub const NAME: &str = "org.qomu.VM1";
/// The object path of the qom root.
pub const ROOT: &str = "/org/qomu/VM1";
pub const OBJECT1: &str = "org.qomu.Object1";
pub const ROOT1: &str = "org.qomu.Root1";
pub const MACHINE: &str = "/org/qomu/VM1/machine";
pub const MACHINE_IFACE: &str = "org.qomu.Type.QomuX86Machine";
pub const SERIAL0: &str = "/org/qomu/VM1/machine/unattached/serial0";
pub const SERIAL_IFACE: &str = "org.qomu.Type.IsaSerial";

/// A private session bus: `dbus-run-session` running a process that lives until this is
/// dropped.
pub struct SessionBus {
    child: Child,
    pub address: String,
}

impl SessionBus {
    pub fn start() -> SessionBus {
        let mut child = Command::new("dbus-run-session")
            .args([
                "--",
                "sh",
                "-c",
                "echo \"$DBUS_SESSION_BUS_ADDRESS\"; exec cat",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-run-session (package dbus) must be installed");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("bus address");
        let address = line.trim().to_owned();
        assert!(address.starts_with("unix:"), "bad bus address {address:?}");
        SessionBus { child, address }
    }

    /// `qomu ARGS --dbus session` on this bus; returns once it owns its name.
    pub fn qomu(&self, args: &[&str]) -> Qomu {
        let mut all = args.to_vec();
        if !all.contains(&"--dbus") {
            all.extend(["--dbus", "session"]);
        }
        let q = Qomu::spawn_with_env(&all, &[("DBUS_SESSION_BUS_ADDRESS", &self.address)]);
        let name = all
            .iter()
            .position(|a| *a == "--dbus-name")
            .map_or(NAME, |i| all[i + 1]);
        self.wait_for_name(name);
        q
    }

    /// Waits until someone owns `name`.
    pub fn wait_for_name(&self, name: &str) {
        let c = self.client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let owned = c
                .call_to(
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "NameHasOwner",
                    &(name,),
                )
                .ok()
                .and_then(|m| m.body().deserialize::<bool>().ok());
            if owned == Some(true) {
                return;
            }
            assert!(Instant::now() < deadline, "nobody took {name} on the bus");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new client connection.
    pub fn client(&self) -> Client {
        Client::connect(&self.address)
    }

    /// Runs `busctl --user ARGS` on this bus.
    pub fn busctl(&self, args: &[&str]) -> Output {
        self.tool("busctl", &["--user"], args)
    }

    /// Runs `gdbus ARGS` on this bus (pass `--session` where gdbus wants a bus).
    pub fn gdbus(&self, args: &[&str]) -> Output {
        self.tool("gdbus", &[], args)
    }

    fn tool(&self, tool: &str, first: &[&str], args: &[&str]) -> Output {
        Command::new(tool)
            .args(first)
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"))
    }
}

impl Drop for SessionBus {
    fn drop(&mut self) {
        // Closing `cat`'s stdin ends it, and dbus-run-session stops the bus.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stdout of a tool that must have succeeded.
pub fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A D-Bus error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub name: String,
    pub message: String,
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    zbus::block_on(f)
}

/// A zbus client connection with blocking calls.
pub struct Client {
    pub conn: Connection,
}

impl Client {
    /// Connects to a bus.
    pub fn connect(address: &str) -> Client {
        let conn = block_on(zbus::connection::Builder::address(address).build())
            .expect("connect to the bus");
        Client { conn }
    }

    /// Connects peer-to-peer to qomu's `--dbus-p2p` socket.
    pub fn connect_p2p(socket: &std::path::Path) -> Client {
        let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect p2p");
        let conn = block_on(zbus::connection::Builder::unix_stream(stream).p2p().build())
            .expect("p2p handshake");
        Client { conn }
    }

    /// This connection's unique name on the bus.
    pub fn unique_name(&self) -> String {
        self.conn
            .unique_name()
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default()
    }

    /// Calls a method of qomu (`org.qomu.VM1`, or the peer on a p2p connection).
    pub fn call<B>(
        &self,
        path: &str,
        iface: &str,
        member: &str,
        body: &B,
    ) -> Result<Message, CallError>
    where
        B: serde::Serialize + DynamicType,
    {
        let dest = if self.conn.unique_name().is_some() {
            Some(NAME)
        } else {
            None
        };
        self.call_inner(dest, path, iface, member, body)
    }

    /// Calls a method of any destination.
    pub fn call_to<B>(
        &self,
        dest: &str,
        path: &str,
        iface: &str,
        member: &str,
        body: &B,
    ) -> Result<Message, CallError>
    where
        B: serde::Serialize + DynamicType,
    {
        self.call_inner(Some(dest), path, iface, member, body)
    }

    fn call_inner<B>(
        &self,
        dest: Option<&str>,
        path: &str,
        iface: &str,
        member: &str,
        body: &B,
    ) -> Result<Message, CallError>
    where
        B: serde::Serialize + DynamicType,
    {
        let call = self.conn.call_method(dest, path, Some(iface), member, body);
        match block_on(async {
            let rt = zruntime::SharedRuntime::current().expect("runtime");
            rt.timeout(patience(), call).await
        }) {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(zbus::Error::MethodError(name, message, _))) => Err(CallError {
                name: name.as_str().to_owned(),
                message: message.unwrap_or_default(),
            }),
            Ok(Err(zbus::Error::FDO(e))) => {
                use zbus::DBusError;
                Err(CallError {
                    name: e.name().as_str().to_owned(),
                    message: e.description().unwrap_or_default().to_owned(),
                })
            }
            Ok(Err(e)) => panic!("{iface}.{member} at {path}: {e}"),
            Err(_) => panic!(
                "{iface}.{member} at {path}: no reply within {:?}",
                patience()
            ),
        }
    }

    /// A call that must succeed.
    pub fn ok<B>(&self, path: &str, iface: &str, member: &str, body: &B) -> Message
    where
        B: serde::Serialize + DynamicType,
    {
        self.call(path, iface, member, body)
            .unwrap_or_else(|e| panic!("{iface}.{member} at {path}: {e:?}"))
    }

    /// A call that must fail; its error.
    pub fn err<B>(&self, path: &str, iface: &str, member: &str, body: &B) -> CallError
    where
        B: serde::Serialize + DynamicType,
    {
        match self.call(path, iface, member, body) {
            Ok(m) => panic!(
                "{iface}.{member} at {path} succeeded: {:?}",
                m.body().signature()
            ),
            Err(e) => e,
        }
    }

    /// `Properties.Get`.
    pub fn get(&self, path: &str, iface: &str, property: &str) -> OwnedVariant {
        self.ok(
            path,
            "org.freedesktop.DBus.Properties",
            "Get",
            &(iface, property),
        )
        .body()
        .deserialize::<OwnedVariant>()
        .expect("a variant")
    }

    /// `Properties.Set`.
    pub fn set(
        &self,
        path: &str,
        iface: &str,
        property: &str,
        value: zbus::Variant<'_>,
    ) -> Result<(), CallError> {
        self.call(
            path,
            "org.freedesktop.DBus.Properties",
            "Set",
            &(iface, property, value),
        )
        .map(|_| ())
    }

    /// `Object1.Subscribe`: the subscription's object path.
    pub fn subscribe(&self, path: &str, notifier: &str) -> String {
        let m = self.ok(path, OBJECT1, "Subscribe", &(notifier,));
        m.body()
            .deserialize::<zbus::ObjectPath<'_>>()
            .expect("an object path")
            .as_str()
            .to_owned()
    }

    /// Starts receiving the signals that match `rule` (a match rule string; on a p2p
    /// connection, every signal is received and `rule` only filters locally).
    pub fn listen(&self, rule: &str) -> Signals {
        let rule = MatchRule::try_from(rule).expect("match rule");
        let stream = block_on(MessageStream::for_match_rule(
            rule,
            &self.conn,
            NonZeroUsize::new(65536),
        ))
        .expect("add match");
        Signals { stream }
    }
}

/// Signals received on a client connection.
pub struct Signals {
    stream: MessageStream,
}

impl Signals {
    /// The next signal, or `None` after `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<Message> {
        use futures_util::StreamExt;
        block_on(async {
            let rt = zruntime::SharedRuntime::current().expect("runtime");
            loop {
                match rt.timeout(timeout, self.stream.next()).await {
                    Ok(Some(Ok(m))) if m.message_type() == MessageType::Signal => return Some(m),
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return None,
                }
            }
        })
    }

    /// The first signal `pred` accepts (others are dropped); panics after [`patience`].
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + patience();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(m) if pred(&m) => return m,
                Some(_) => {}
                None => panic!("no {what} within {:?}", patience()),
            }
        }
    }

    /// Every signal that arrives within `window`.
    pub fn collect(&mut self, window: Duration) -> Vec<Message> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(m) = self.next(deadline.saturating_duration_since(Instant::now())) {
            out.push(m);
        }
        out
    }
}

/// `member` of a signal.
pub fn member(m: &Message) -> String {
    m.header()
        .member()
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default()
}

/// The object path a signal came from.
pub fn path(m: &Message) -> String {
    m.header()
        .path()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default()
}
