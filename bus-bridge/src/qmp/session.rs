//! One QMP connection's protocol state: the greeting, capabilities negotiation, QEMU's
//! dispatch checks, and events. Transport-free: the server feeds it bytes and writes what
//! it returns, and the tests and the fuzz test drive it directly.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use parking_lot::RwLock;
use qom::{Delivery, SubscribeOptions, Subscriber, Target, Tree};
use serde_json::{Map, Value as Json, json};

use super::args::{self, Args};
use super::commands::{self, Reply};
use super::error::QmpError;
use super::json::{self, Streamer};

/// The QEMU version qomu's QMP is compatible with (query-version, the greeting).
pub const QEMU_VERSION: (u64, u64, u64) = (10, 1, 0);

/// The events every negotiated QMP client receives, as QEMU broadcasts them: notifiers of
/// `/machine` with the same names. MIGRATION goes out whether or not a client turned on
/// QEMU's `events` migration capability (qomu has no capabilities to set; QMP clients
/// ignore events they do not know).
pub const LIFECYCLE_EVENTS: [&str; 11] = [
    "STOP",
    "RESUME",
    "RESET",
    "SHUTDOWN",
    "POWERDOWN",
    "DEVICE_DELETED",
    "MIGRATION",
    "MIGRATION_PASS",
    "NETDEV_STREAM_CONNECTED",
    "NETDEV_STREAM_DISCONNECTED",
    "NIC_RX_FILTER_CHANGED",
];

/// The downstream event name of subscription deliveries.
pub const NOTIFY_EVENT: &str = "__org.qomu_NOTIFY";

/// The greeting line.
pub fn greeting() -> String {
    let (major, minor, micro) = QEMU_VERSION;
    json::write(&json!({
        "QMP": {
            "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package()},
            "capabilities": []
        }
    }))
}

/// qomu's identity in `package`.
pub fn package() -> String {
    format!("qomu {}", env!("CARGO_PKG_VERSION"))
}

/// Turns one connection's subscription deliveries into QMP event lines. Shared by the
/// session (which subscribes) and the server's event writer.
pub struct EventSink {
    subscriber: Subscriber,
    /// Paths of the implicit lifecycle subscriptions: delivered under QEMU's event names.
    lifecycle: RwLock<HashSet<Arc<str>>>,
}

impl EventSink {
    pub fn subscriber(&self) -> &Subscriber {
        &self.subscriber
    }

    /// Takes every waiting event, formatted as QMP event lines (without CRLF).
    pub fn drain(&self) -> Vec<String> {
        let deliveries = self.subscriber.drain();
        let lifecycle = self.lifecycle.read();
        deliveries
            .iter()
            .map(|d| self.format(d, &lifecycle))
            .collect()
    }

    fn format(&self, d: &Delivery, lifecycle: &HashSet<Arc<str>>) -> String {
        let e = &d.event;
        let since = e.time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut event = Map::new();
        event.insert(
            "timestamp".into(),
            json!({"seconds": since.as_secs(), "microseconds": since.subsec_micros()}),
        );
        let data = args::to_json(&e.data);
        if lifecycle.contains(&d.subscription) {
            event.insert("event".into(), Json::String(e.notifier.to_string()));
            if data.as_object().is_some_and(|m| !m.is_empty()) {
                event.insert("data".into(), data);
            }
        } else {
            event.insert("event".into(), Json::String(NOTIFY_EVENT.into()));
            event.insert(
                "data".into(),
                json!({"subscription": &*d.subscription, "sequence": d.sequence, "path": &*e.source, "notifier": &*e.notifier, "data": data}),
            );
        }
        json::write(&Json::Object(event))
    }

    /// Ends the connection's subscriptions.
    pub fn close(&self) {
        self.subscriber.close();
    }
}

/// One connection's state.
pub struct Session {
    pub(crate) tree: Tree,
    pub(crate) events: Arc<EventSink>,
    negotiated: bool,
    streamer: Streamer,
    /// The descriptors that came with the client's last message (SCM_RIGHTS), for `getfd`.
    pub(crate) received: Vec<std::os::fd::OwnedFd>,
    /// This connection's named descriptors (`getfd`), as QEMU keeps them per monitor.
    pub(crate) fds: HashMap<String, std::os::fd::OwnedFd>,
}

impl Session {
    /// A session for connection number `id` (its subscriptions' owner is `qmp:<id>`).
    pub fn new(tree: Tree, id: u64) -> Session {
        let subscriber = tree.subscriber(&format!("qmp:{id}"));
        Session {
            tree,
            events: Arc::new(EventSink {
                subscriber,
                lifecycle: RwLock::new(HashSet::new()),
            }),
            negotiated: false,
            streamer: Streamer::new(),
            received: Vec::new(),
            fds: HashMap::new(),
        }
    }

    /// Descriptors that came with the client's latest bytes; they replace any still unnamed
    /// (QEMU keeps the last one a message brought).
    pub fn received_fds(&mut self, fds: Vec<std::os::fd::OwnedFd>) {
        if !fds.is_empty() {
            self.received = fds;
        }
    }

    pub fn event_sink(&self) -> Arc<EventSink> {
        self.events.clone()
    }

    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Feeds input bytes; returns the response lines (without CRLF) they produce.
    pub fn feed(&mut self, data: &[u8]) -> Vec<String> {
        let messages = self.streamer.feed(data);
        messages
            .into_iter()
            .map(|m| match m {
                Ok(request) => self.handle(request),
                Err(desc) => error_response(&QmpError::generic(desc), None),
            })
            .collect()
    }

    /// Events waiting for this client, formatted; none before negotiation (QEMU drops them).
    pub fn drain_events(&self) -> Vec<String> {
        let lines = self.events.drain();
        if self.negotiated { lines } else { Vec::new() }
    }

    /// Answers one parsed message.
    pub fn handle(&mut self, request: Json) -> String {
        let Json::Object(request) = request else {
            return error_response(&QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = request.get("id").cloned();
        match self.dispatch(&request) {
            Ok(Reply::Value(value)) => {
                let mut rsp = Map::new();
                rsp.insert("return".into(), value);
                if let Some(id) = id {
                    rsp.insert("id".into(), id);
                }
                json::write(&Json::Object(rsp))
            }
            Ok(Reply::Text(text)) => {
                let mut rsp = String::with_capacity(text.len() + 32);
                rsp.push_str("{\"return\": ");
                rsp.push_str(&text);
                if let Some(id) = id {
                    rsp.push_str(", \"id\": ");
                    json::write_into(&id, &mut rsp);
                }
                rsp.push('}');
                rsp
            }
            Err(e) => error_response(&e, id),
        }
    }

    /// QEMU's `qmp_dispatch()`.
    fn dispatch(&mut self, request: &Map<String, Json>) -> Result<Reply, QmpError> {
        let mut exec_key: Option<&str> = None;
        for (key, value) in request {
            match key.as_str() {
                "execute" => {
                    if !value.is_string() {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{key}' must be a string"
                        )));
                    }
                    if let Some(other) = exec_key {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{key}' clashes with '{other}'"
                        )));
                    }
                    exec_key = Some(key);
                }
                "arguments" if !value.is_object() => {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
                "arguments" | "id" => {}
                _ => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' is unexpected"
                    )));
                }
            }
        }
        let Some(exec_key) = exec_key else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        let name = request[exec_key].as_str().unwrap_or_default();
        let empty = Map::new();
        let args = request
            .get("arguments")
            .and_then(Json::as_object)
            .unwrap_or(&empty);

        if !self.negotiated {
            if name != "qmp_capabilities" {
                return Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            return self.negotiate(args).map(Reply::Value);
        }
        if name == "qmp_capabilities" {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        match commands::find(&self.tree, name) {
            Some(handler) => commands::run(self, handler, args),
            None => Err(QmpError::command_not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }

    /// `qmp_capabilities`: leave negotiation mode; from now on the client gets events.
    fn negotiate(&mut self, args: &Args) -> Result<Json, QmpError> {
        args::check(
            args,
            &[args::ArgSpec::optional(
                "enable",
                args::ArgType::List(Box::new(args::ArgType::Str)),
            )],
            false,
        )?;
        if let Some(Json::Array(caps)) = args.get("enable") {
            for (i, cap) in caps.iter().enumerate() {
                let cap = cap.as_str().unwrap_or_default();
                if cap != "oob" {
                    return Err(QmpError::generic(format!(
                        "Parameter 'enable[{i}]' does not accept value '{cap}'"
                    )));
                }
            }
            if !caps.is_empty() {
                let names: Vec<&str> = caps.iter().filter_map(Json::as_str).collect();
                return Err(QmpError::generic(format!(
                    "Capability {} not available",
                    names.join(", ")
                )));
            }
        }
        self.negotiated = true;
        let machine = self.tree.lookup("/machine").ok();
        let mut lifecycle = self.events.lifecycle.write();
        for name in LIFECYCLE_EVENTS {
            if machine
                .as_ref()
                .is_some_and(|m| m.class().notifier(name).is_some())
                && let Ok(path) = self.events.subscriber.subscribe(
                    Target::Object("/machine".into()),
                    name,
                    SubscribeOptions::default(),
                )
            {
                lifecycle.insert(path.into());
            }
        }
        Ok(json!({}))
    }

    /// The paths of this client's lifecycle subscriptions.
    pub fn lifecycle_subscriptions(&self) -> Vec<String> {
        self.events
            .lifecycle
            .read()
            .iter()
            .map(|p| p.to_string())
            .collect()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.events.close();
    }
}

fn error_response(e: &QmpError, id: Option<Json>) -> String {
    let mut rsp = Map::new();
    rsp.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
    if let Some(id) = id {
        rsp.insert("id".into(), id);
    }
    json::write(&Json::Object(rsp))
}
