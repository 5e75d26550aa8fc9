//! The netdev types: host backends as objects at `/netdev/<id>`, each with a thread of its
//! own (`net-<id>`) that serves the backend, and counters.
//!
//! - `netdev` (abstract): `rx-packets`, `rx-bytes`, `rx-dropped`, `tx-packets`,
//!   `tx-bytes`, `tx-dropped`, `errors`, `link` (notifying; QMP's `set_link`) and `nic`
//!   (the NIC it serves);
//! - `tap`: `ifname`, and QEMU's `script`, `downscript`, `vhost`, `vnet_hdr`, `fd` where
//!   they mean something here (see [`check_tap_options`]);
//! - `stream`: `server`, `path` (a unix socket), `connected`; notifiers `peer-connected`
//!   and `peer-disconnected` (and the machine's NETDEV_STREAM_CONNECTED/DISCONNECTED).
//!
//! The backend itself is behind the netdev's [`Port`], which a NIC takes while its driver
//! runs; until then what the host sends is dropped and counted as `rx-dropped`.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use qom::{
    Field, Kind, Notifier, NotifierDecl, ObjectRef, PhasePolicy, Property, TypedInfo, Value,
};

use super::NetError;
use super::backend::{NetBackend, StreamBackend, StreamEvents};
use super::port::{NetCounters, Port, Side};
use super::tap::Tap;
use crate::device::get_string;

pub const NETDEV: &str = "netdev";
pub const TAP: &str = "tap";
pub const STREAM: &str = "stream";

/// The instance of a netdev object.
pub struct Netdev {
    counters: Arc<NetCounters>,
    /// tap: the interface asked for, then the one the kernel gave.
    ifname: Mutex<String>,
    connected: Arc<AtomicBool>,
    /// The link asked for before the netdev was opened.
    initial_link: AtomicBool,
    port: Mutex<Option<Arc<Port>>>,
}

impl Netdev {
    fn new() -> Netdev {
        Netdev {
            counters: Arc::default(),
            ifname: Mutex::new(String::new()),
            connected: Arc::default(),
            initial_link: AtomicBool::new(true),
            port: Mutex::new(None),
        }
    }

    pub fn counters(&self) -> &Arc<NetCounters> {
        &self.counters
    }

    /// The port a NIC takes (once realized).
    /// A counter, read once no frame is between the backend and its count.
    fn count(&self, field: fn(&NetCounters) -> &std::sync::atomic::AtomicU64) -> Value {
        if let Some(port) = self.port() {
            port.settle();
        }
        Value::UInt(field(&self.counters).load(Ordering::Relaxed))
    }

    pub fn port(&self) -> Option<Arc<Port>> {
        self.port.lock().clone()
    }

    /// Starts serving `backend` on the netdev's thread.
    fn open(&self, o: &ObjectRef, backend: Box<dyn NetBackend>) -> crate::Result<()> {
        let port = Port::new(o.name(), self.counters.clone(), backend).map_err(|source| {
            crate::Error::IoThread {
                path: o.path().to_owned(),
                source,
            }
        })?;
        port.link().set(
            self.initial_link.load(Ordering::Acquire),
            Some(Side::Netdev),
        );
        // The link property notifies whoever changes it, the NIC's side included.
        let weak = o.downgrade();
        port.link().watch(
            Side::Netdev,
            Some(Box::new(move |up, own| {
                if let Some(o) = weak.upgrade().filter(|_| !own) {
                    o.notify_property_changed("link", &Value::Bool(up));
                }
            })),
        );
        *self.port.lock() = Some(port);
        Ok(())
    }

    /// The netdev goes: its backend closes, a NIC using it sees the link go down.
    fn close(&self) {
        if let Some(port) = self.port.lock().take() {
            port.close();
        }
    }
}

fn counter(name: &str, description: &str) -> Property {
    Property::new(name, Kind::uint64()).description(description)
}

pub(crate) fn register_base() -> qom::TypeInfo {
    TypedInfo::<Netdev>::abstract_type(NETDEV, "object")
        .description("A host network backend, at /netdev/<id>")
        .getter(
            counter("rx-packets", "Frames from the host taken by the NIC"),
            |d| d.count(|c| &c.rx_packets),
        )
        .getter(counter("rx-bytes", "Bytes of those frames"), |d| {
            d.count(|c| &c.rx_bytes)
        })
        .getter(
            counter(
                "rx-dropped",
                "Frames from the host nothing took (no NIC, or no room)",
            ),
            |d| d.count(|c| &c.rx_dropped),
        )
        .getter(
            counter("tx-packets", "Frames the NIC sent to the host"),
            |d| d.count(|c| &c.tx_packets),
        )
        .getter(counter("tx-bytes", "Bytes of those frames"), |d| {
            d.count(|c| &c.tx_bytes)
        })
        .getter(counter("tx-dropped", "Frames the host did not take"), |d| {
            d.count(|c| &c.tx_dropped)
        })
        .getter(
            counter("errors", "Reads and writes the host refused"),
            |d| d.count(|c| &c.errors),
        )
        .accessor(
            Property::new("link", Kind::Bool)
                .policy(PhasePolicy::Always)
                .notifying()
                .description(
                    "Whether the link is up (QMP's set_link on the netdev or its NIC sets both; \
                     down: frames either way are dropped)",
                ),
            |d, _| {
                Ok(Value::Bool(match d.port() {
                    Some(p) => p.link().is_up(),
                    None => d.initial_link.load(Ordering::Acquire),
                }))
            },
            |d, _, v| {
                let up = v.as_bool().unwrap_or(true);
                match d.port() {
                    Some(p) => {
                        p.link().set(up, Some(Side::Netdev));
                    }
                    None => d.initial_link.store(up, Ordering::Release),
                }
                Ok(())
            },
        )
        .getter(
            Property::new("nic", Kind::Str)
                .description("The NIC this netdev serves (its path; empty: none)"),
            |d| Value::Str(d.port().and_then(|p| p.nic()).unwrap_or_default()),
        )
        .build()
}

/// QEMU's tap options that mean something else here, refused with why (nothing is opened):
/// qomu runs no ifup/ifdown scripts, has no vhost-net, and keeps vnet headers on; a file
/// descriptor comes by name from QMP's `getfd` (the front end turns the name into a
/// handover token), not from the command line or D-Bus.
///
/// # Errors
/// [`crate::Error::Net`] naming the option, or a property that cannot be read.
pub fn check_tap_options(o: &ObjectRef) -> qom::Result<()> {
    let refuse = |why: String| qom::Error::from(crate::Error::Net(NetError::Unsupported(why)));
    for script in ["script", "downscript"] {
        let v = get_string(o, script)?;
        if !v.is_empty() && v != "no" {
            return Err(refuse(format!(
                "tap: {script}={v}: qomu runs no interface scripts; configure the tap beforehand or \
                 after, and give {script}=no or leave it out"
            )));
        }
    }
    if o.get("vhost")?.as_bool() == Some(true) {
        let why = if std::path::Path::new("/dev/vhost-net").exists() {
            "qomu has no vhost-net support yet"
        } else {
            "there is no /dev/vhost-net"
        };
        return Err(refuse(format!("tap: vhost=on: {why}")));
    }
    if o.get("vnet_hdr")?.as_bool() == Some(false) {
        return Err(refuse(
            "tap: vnet_hdr=off: qomu's taps always carry virtio-net headers".into(),
        ));
    }
    let fd = get_string(o, "fd")?;
    if !fd.is_empty() && !fd.starts_with(qom::handover::TOKEN_PREFIX) {
        // A name the front end did not turn into a descriptor (the command line, D-Bus).
        return Err(refuse(format!(
            "File descriptor named '{fd}' has not been found"
        )));
    }
    Ok(())
}

pub(crate) fn register_tap() -> qom::TypeInfo {
    TypedInfo::<Netdev>::new(TAP, NETDEV)
        .constructor(|_| Ok(Netdev::new()))
        .description("A kernel tap device (needs CAP_NET_ADMIN, or a tap made for this user)")
        .accessor(
            Property::new("ifname", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description("The tap's name: opened, or created; empty: the kernel picks one"),
            |d, _| Ok(Value::Str(d.ifname.lock().clone())),
            |d, _, v| {
                *d.ifname.lock() = v.as_str().unwrap_or_default().to_owned();
                Ok(())
            },
        )
        .property(
            Property::new("script", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description("QEMU's ifup script: only 'no' (qomu runs none)"),
        )
        .property(
            Property::new("downscript", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description("QEMU's ifdown script: only 'no' (qomu runs none)"),
        )
        .property(
            Property::new("vhost", Kind::Bool)
                .policy(PhasePolicy::BeforeRealize)
                .description("vhost-net: refused (not supported)"),
        )
        .property(
            Property::new("vnet_hdr", Kind::Bool)
                .default(true)
                .policy(PhasePolicy::BeforeRealize)
                .description("virtio-net headers on the tap: always on"),
        )
        .property(
            Property::new("fd", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description("An open tap: over QMP, the name getfd gave it"),
        )
        .realize(|dev, o| {
            check_tap_options(o)?;
            let fd = get_string(o, "fd")?;
            let tap = if fd.is_empty() {
                Tap::open(&dev.ifname.lock().clone())
            } else {
                let handed = qom::handover::take(&fd).ok_or_else(|| {
                    qom::Error::from(crate::Error::Net(NetError::Unsupported(
                        "the file descriptor handed over was taken already".into(),
                    )))
                })?;
                Tap::from_fd(handed)
            }
            .map_err(crate::Error::Net)?;
            *dev.ifname.lock() = tap.ifname().to_owned();
            Ok(dev.open(o, Box::new(tap))?)
        })
        .unrealize(|dev, _| dev.close())
        .build()
}

fn addr_payload(name: &str) -> Kind {
    Kind::structure(
        name,
        vec![Field::new("addr", Kind::Str, "The unix socket's path")],
    )
}

/// The machine's notifier `name` (NETDEV_STREAM_*), where there is a machine.
fn machine_notifier(o: &ObjectRef, name: &str) -> Option<Notifier> {
    o.tree().lookup("/machine").ok()?.notifier(name).ok()
}

/// Tells the netdev's subscribers, and the machine's (QEMU's events), of the peer.
struct StreamNotifiers {
    id: String,
    path: String,
    connected: Arc<AtomicBool>,
    own: (Notifier, Notifier),
    machine: (Option<Notifier>, Option<Notifier>),
}

impl StreamNotifiers {
    fn new(o: &ObjectRef, dev: &Netdev, path: &str) -> qom::Result<StreamNotifiers> {
        Ok(StreamNotifiers {
            id: o.name().to_owned(),
            path: path.to_owned(),
            connected: dev.connected.clone(),
            own: (
                o.notifier("peer-connected")?,
                o.notifier("peer-disconnected")?,
            ),
            machine: (
                machine_notifier(o, "NETDEV_STREAM_CONNECTED"),
                machine_notifier(o, "NETDEV_STREAM_DISCONNECTED"),
            ),
        })
    }
}

impl StreamEvents for StreamNotifiers {
    fn changed(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        let (own, machine) = if up {
            (&self.own.0, &self.machine.0)
        } else {
            (&self.own.1, &self.machine.1)
        };
        own.emit(|| Value::map([("addr", Value::Str(self.path.clone()))]));
        if let Some(n) = machine {
            n.emit(|| {
                let mut fields = vec![("netdev-id", Value::Str(self.id.clone()))];
                if up {
                    fields.push((
                        "addr",
                        Value::map([
                            ("type", Value::Str("unix".into())),
                            ("path", Value::Str(self.path.clone())),
                        ]),
                    ));
                }
                Value::map(fields)
            });
        }
    }
}

pub(crate) fn register_stream() -> qom::TypeInfo {
    TypedInfo::<Netdev>::new(STREAM, NETDEV)
        .constructor(|_| Ok(Netdev::new()))
        .description("QEMU's stream netdev on a unix socket (passt -s SOCKET; no root needed)")
        .property(
            Property::new("server", Kind::Bool)
                .policy(PhasePolicy::BeforeRealize)
                .description("Listen on the path (one peer at a time) instead of connecting"),
        )
        .property(
            Property::new("path", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description("The unix socket"),
        )
        .getter(
            Property::new("connected", Kind::Bool).description("Whether a peer is connected"),
            |d| Value::Bool(d.connected.load(Ordering::Acquire)),
        )
        .notifier(
            NotifierDecl::new("peer-connected", addr_payload("StreamConnected"))
                .description("A peer connected"),
        )
        .notifier(
            NotifierDecl::new("peer-disconnected", addr_payload("StreamDisconnected"))
                .description("The peer went away"),
        )
        .realize(|dev, o| {
            let path = get_string(o, "path")?;
            if path.is_empty() {
                return Err(crate::Error::PropertyNotSet {
                    typename: STREAM.into(),
                    property: "path",
                }
                .into());
            }
            let events = Arc::new(StreamNotifiers::new(o, dev, &path)?);
            if o.get("server")?.as_bool() == Some(true) {
                // A socket left by an earlier run goes first, as QEMU does; any other
                // file there is kept, and the bind fails.
                if std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(&path);
                }
                let bind = |source| {
                    crate::Error::Net(NetError::Bind {
                        path: path.clone(),
                        source,
                    })
                };
                let listener = UnixListener::bind(&path).map_err(bind)?;
                listener.set_nonblocking(true).map_err(bind)?;
                let opened = dev.open(o, Box::new(StreamBackend::server(listener, events)));
                if opened.is_err() {
                    let _ = std::fs::remove_file(&path);
                }
                return Ok(opened?);
            }
            let connect = |source| {
                crate::Error::Net(NetError::Connect {
                    path: path.clone(),
                    source,
                })
            };
            let stream = UnixStream::connect(&path).map_err(connect)?;
            stream.set_nonblocking(true).map_err(connect)?;
            Ok(dev.open(o, Box::new(StreamBackend::client(stream, events)))?)
        })
        .unrealize(|dev, o| {
            dev.close();
            // A server's socket goes with it.
            if o.get("server").ok().and_then(|v| v.as_bool()) == Some(true)
                && let Ok(path) = get_string(o, "path")
            {
                let _ = std::fs::remove_file(path);
            }
        })
        .build()
}
