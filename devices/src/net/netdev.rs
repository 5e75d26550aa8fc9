//! The netdev types: host backends as objects at `/netdev/<id>`, each with a thread of its
//! own (`net-<id>`) that serves the backend, and counters.
//!
//! - `netdev` (abstract): `rx-packets`, `rx-bytes`, `rx-dropped`, `tx-packets`,
//!   `tx-bytes`, `tx-dropped`, `errors`;
//! - `tap`: `ifname`, and QEMU's `script`, `downscript`, `vhost`, `vnet_hdr`, `fd` where
//!   they mean something here (see [`check_tap_options`]);
//! - `stream`: `server`, `path` (a unix socket), `connected`; notifiers `peer-connected`
//!   and `peer-disconnected` (and the machine's NETDEV_STREAM_CONNECTED/DISCONNECTED).
//!
//! No NIC takes frames yet: what a backend receives is counted as `rx-dropped`, as QEMU
//! drops frames for a netdev without a peer.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use qom::{
    Field, Kind, Notifier, NotifierDecl, ObjectRef, PhasePolicy, Property, TypedInfo, Value,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::NetError;
use super::stream::{FrameReader, Peer};
use super::tap::{Tap, VNET_HDR_LEN};
use crate::device::get_string;

pub const NETDEV: &str = "netdev";
pub const TAP: &str = "tap";
pub const STREAM: &str = "stream";

/// A backend's counters.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub errors: AtomicU64,
}

impl NetCounters {
    /// A frame from the host that nothing took.
    fn dropped_rx(&self) {
        self.rx_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The instance of a netdev object.
pub struct Netdev {
    counters: Arc<NetCounters>,
    /// tap: the interface asked for, then the one the kernel gave.
    ifname: Mutex<String>,
    connected: Arc<AtomicBool>,
    worker: Mutex<Option<Worker>>,
}

impl Netdev {
    fn new() -> Netdev {
        Netdev {
            counters: Arc::default(),
            ifname: Mutex::new(String::new()),
            connected: Arc::default(),
            worker: Mutex::new(None),
        }
    }

    pub fn counters(&self) -> &Arc<NetCounters> {
        &self.counters
    }

    fn stop(&self) {
        if let Some(w) = self.worker.lock().take() {
            let _ = w.stop.write(1);
            let _ = w.thread.join();
        }
    }
}

struct Worker {
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

fn start_worker(
    o: &ObjectRef,
    dev: &Netdev,
    body: impl FnOnce(&EventFd) + Send + 'static,
) -> crate::Result<()> {
    let io = |source| crate::Error::IoThread {
        path: o.path().to_owned(),
        source,
    };
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io)?);
    let thread = std::thread::Builder::new()
        .name(format!("net-{}", o.name()))
        .spawn({
            let stop = stop.clone();
            move || body(&stop)
        })
        .map_err(io)?;
    *dev.worker.lock() = Some(Worker { stop, thread });
    Ok(())
}

/// Waits until `fd` is readable or the stop eventfd fires; false when stopping.
fn wait_readable(fd: RawFd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds, their count, and no timeout.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return r > 0 && fds[1].revents == 0;
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
            |d| Value::UInt(d.counters.rx_packets.load(Ordering::Relaxed)),
        )
        .getter(counter("rx-bytes", "Bytes of those frames"), |d| {
            Value::UInt(d.counters.rx_bytes.load(Ordering::Relaxed))
        })
        .getter(
            counter(
                "rx-dropped",
                "Frames from the host nothing took (no NIC, or no room)",
            ),
            |d| Value::UInt(d.counters.rx_dropped.load(Ordering::Relaxed)),
        )
        .getter(
            counter("tx-packets", "Frames the NIC sent to the host"),
            |d| Value::UInt(d.counters.tx_packets.load(Ordering::Relaxed)),
        )
        .getter(counter("tx-bytes", "Bytes of those frames"), |d| {
            Value::UInt(d.counters.tx_bytes.load(Ordering::Relaxed))
        })
        .getter(counter("tx-dropped", "Frames the host did not take"), |d| {
            Value::UInt(d.counters.tx_dropped.load(Ordering::Relaxed))
        })
        .getter(
            counter("errors", "Reads and writes the host refused"),
            |d| Value::UInt(d.counters.errors.load(Ordering::Relaxed)),
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
            let counters = dev.counters.clone();
            Ok(start_worker(o, dev, move |stop| {
                serve_tap(&tap, &counters, stop)
            })?)
        })
        .unrealize(|dev, _| dev.stop())
        .build()
}

/// Reads what the host sends until stopped; with no NIC, every frame is dropped.
fn serve_tap(tap: &Tap, counters: &NetCounters, stop: &EventFd) {
    let mut header = [0u8; VNET_HDR_LEN];
    let mut frame = vec![0u8; 65536];
    while wait_readable(tap.as_raw_fd(), stop) {
        loop {
            let mut bufs = [IoSliceMut::new(&mut header), IoSliceMut::new(&mut frame)];
            match tap.read_frame(&mut bufs) {
                Ok(_) => counters.dropped_rx(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
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

/// Tells the netdev's subscribers, and the machine's (QEMU's events), of the link.
struct StreamEvents {
    id: String,
    path: String,
    connected: Arc<AtomicBool>,
    own: (Notifier, Notifier),
    machine: (Option<Notifier>, Option<Notifier>),
}

impl StreamEvents {
    fn new(o: &ObjectRef, dev: &Netdev, path: &str) -> qom::Result<StreamEvents> {
        Ok(StreamEvents {
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
            let events = StreamEvents::new(o, dev, &path)?;
            let counters = dev.counters.clone();
            if o.get("server")?.as_bool() == Some(true) {
                // A socket left by an earlier run goes first, as QEMU does; any other
                // file there is kept, and the bind fails.
                if std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(&path);
                }
                let listener = UnixListener::bind(&path).map_err(|source| {
                    crate::Error::Net(NetError::Bind {
                        path: path.clone(),
                        source,
                    })
                })?;
                let bound = PathBuf::from(&path);
                let started = start_worker(o, dev, move |stop| {
                    serve_listener(&listener, &events, &counters, stop);
                    let _ = std::fs::remove_file(&bound);
                });
                if started.is_err() {
                    let _ = std::fs::remove_file(&path);
                }
                return Ok(started?);
            }
            let stream = UnixStream::connect(&path).map_err(|source| {
                crate::Error::Net(NetError::Connect {
                    path: path.clone(),
                    source,
                })
            })?;
            stream
                .set_nonblocking(true)
                .map_err(|source| crate::Error::Net(NetError::Connect { path, source }))?;
            Ok(start_worker(o, dev, move |stop| {
                events.changed(true);
                serve_stream(stream, &counters, stop);
                events.changed(false);
            })?)
        })
        .unrealize(|dev, _| dev.stop())
        .build()
}

/// Reads frames from a connected peer until it goes or the netdev is stopped; with no
/// NIC, every frame is dropped. True when the peer went (false: stopped).
fn serve_stream(mut stream: UnixStream, counters: &NetCounters, stop: &EventFd) -> bool {
    let mut reader = FrameReader::new();
    while wait_readable(stream.as_raw_fd(), stop) {
        match reader.read_from(&mut stream, |_| counters.dropped_rx()) {
            Ok(Peer::Open) => {}
            Ok(Peer::Closed) => return true,
            Err(e) => {
                tracing::warn!("netdev stream: giving the peer up: {e}");
                counters.errors.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
    }
    false
}

/// Serves one peer at a time until stopped.
fn serve_listener(
    listener: &UnixListener,
    events: &StreamEvents,
    counters: &NetCounters,
    stop: &EventFd,
) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while wait_readable(listener.as_raw_fd(), stop) {
        let Ok((peer, _)) = listener.accept() else {
            continue;
        };
        if peer.set_nonblocking(true).is_err() {
            continue;
        }
        events.changed(true);
        let gone = serve_stream(peer, counters, stop);
        events.changed(false);
        if !gone {
            return;
        }
    }
}
