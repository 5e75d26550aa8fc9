//! Running the bridge: its thread, its bus connection and its peer-to-peer sockets.
//!
//! One thread runs a zruntime executor: the bus connection's message loop, one loop per
//! peer-to-peer connection, the event pump, and every send. It never calls the tree: each
//! method call goes to its caller's lane (lanes.rs), whose tree work runs on zruntime's
//! blocking pool, so a call that waits (an action, or a getter behind a long operation)
//! holds up no other caller, and `Peer.Ping` answers whatever the tree is doing.
//!
//! Method calls and bus signals are read from one stream per connection, in the order the
//! bus sent them, and a client's departure (`NameOwnerChanged`) goes into its lane behind
//! its calls: a client's `Subscribe` is always handled before the departure that drops its
//! subscriptions, so no subscription outlives its owner.

use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::select;
use qom::Tree;
use zbus::message::Type as MessageType;
use zbus::{Connection, Guid, Message, MessageStream, connection};
use zruntime::net::unix::UnixListener;
use zruntime::{Event, Shared, SharedRuntime, Task};

use super::bridge::{BUS_PATH, Bridge, Peer, PeerKind};
use super::lanes::Work;
use super::names::DEFAULT_ROOT;

/// The bus to serve the tree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusAddress {
    /// `DBUS_SESSION_BUS_ADDRESS`.
    Session,
    /// The system bus (needs the policy file of docs/dbus.md).
    System,
    /// A bus at this D-Bus address (`unix:path=...`).
    Address(String),
}

impl std::fmt::Display for BusAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusAddress::Session => f.write_str("the session bus"),
            BusAddress::System => f.write_str("the system bus"),
            BusAddress::Address(a) => write!(f, "the bus at {a}"),
        }
    }
}

/// What the bridge serves, and where.
#[derive(Debug, Clone)]
pub struct DbusConfig {
    /// The bus, or none for peer-to-peer only.
    pub bus: Option<BusAddress>,
    /// The well-known name to own on the bus (`org.qomu.VM1`).
    pub name: String,
    /// Unix sockets for peer-to-peer clients.
    pub p2p: Vec<crate::socket::Listen>,
}

impl Default for DbusConfig {
    fn default() -> Self {
        DbusConfig {
            bus: Some(BusAddress::Session),
            name: "org.qomu.VM1".into(),
            p2p: Vec::new(),
        }
    }
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to {bus}: {reason}")]
    Connect { bus: BusAddress, reason: String },
    #[error("cannot own the name '{name}' on {bus}: {reason}")]
    Name {
        name: String,
        bus: BusAddress,
        reason: String,
    },
    #[error("cannot listen on {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
    #[error("cannot start the D-Bus bridge: {0}")]
    Internal(String),
}

/// Most peer-to-peer clients at once; more are closed right after accepting.
pub const MAX_PEERS: usize = 256;
/// How long shutdown waits for calls in flight and pending events.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// A peer-to-peer client must finish the D-Bus handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct Shutdown {
    requested: AtomicBool,
    event: Event,
}

/// A running D-Bus bridge.
pub struct DbusBridge {
    shutdown: Arc<Shutdown>,
    thread: Option<sandbox::Thread<()>>,
    unique_name: Option<String>,
    p2p: Vec<PathBuf>,
}

/// What the bridge thread reports once it serves.
struct Started {
    unique_name: Option<String>,
}

impl DbusBridge {
    /// Connects to the bus, owns the name, listens on the peer-to-peer sockets, and serves
    /// `tree` on all of them until [`DbusBridge::shutdown`].
    ///
    /// # Errors
    /// The bus cannot be reached, the name is owned by someone else, or a socket cannot be
    /// bound.
    pub fn start(tree: Tree, config: DbusConfig) -> Result<DbusBridge, StartError> {
        let shutdown = Arc::new(Shutdown {
            requested: AtomicBool::new(false),
            event: Event::new(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let p2p = config.p2p.iter().map(|s| s.path.clone()).collect();
        let stop = shutdown.clone();
        let thread = sandbox::spawn(sandbox::Class::Dbus, "qomu-dbus".into(), move || {
            let runtime = match SharedRuntime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(StartError::Internal(e.to_string())));
                    return;
                }
            };
            runtime.block_on(run(runtime.clone(), tree, config, stop, ready_tx));
        })
        .map_err(|e| StartError::Internal(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(started)) => Ok(DbusBridge {
                shutdown,
                thread: Some(thread),
                unique_name: started.unique_name,
                p2p,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(StartError::Internal("the bridge thread ended".into()))
            }
        }
    }

    /// The bridge's unique name on the bus, if it is on one.
    pub fn unique_name(&self) -> Option<&str> {
        self.unique_name.as_deref()
    }

    /// Stops serving: closes every connection, destroys every subscription made over
    /// D-Bus, and removes the peer-to-peer sockets.
    pub fn shutdown(&mut self) {
        self.shutdown.requested.store(true, Ordering::Release);
        self.shutdown.event.notify(usize::MAX);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for path in self.p2p.drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for DbusBridge {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn run(
    runtime: SharedRuntime,
    tree: Tree,
    config: DbusConfig,
    shutdown: Arc<Shutdown>,
    ready: std::sync::mpsc::Sender<Result<Started, StartError>>,
) {
    let stop = shutdown.event.listen();
    let rt = runtime.clone();
    let bridge = match zruntime::unblock(move || Bridge::new(tree, DEFAULT_ROOT, rt)).await {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(StartError::Internal(e.to_string())));
            return;
        }
    };
    let bus = match &config.bus {
        Some(address) => match connect_bus(address, &config.name).await {
            Ok((conn, stream)) => Some((conn, stream)),
            Err(e) => {
                let _ = ready.send(Err(e));
                close_events(&bridge).await;
                return;
            }
        },
        None => None,
    };
    let mut listeners = Vec::new();
    for socket in &config.p2p {
        let path = &socket.path;
        let listener =
            crate::socket::bind(socket).and_then(|l| UnixListener::<Shared>::from_std(&runtime, l));
        match listener {
            Ok(l) => listeners.push(l),
            Err(e) => {
                let _ = ready.send(Err(StartError::Listen {
                    path: path.clone(),
                    reason: e.to_string(),
                }));
                close_events(&bridge).await;
                return;
            }
        }
    }
    let unique_name = bus
        .as_ref()
        .and_then(|(c, _)| c.unique_name().map(|n| n.as_str().to_owned()));
    let _ = ready.send(Ok(Started { unique_name }));

    let serve_bus = {
        let bridge = bridge.clone();
        async move {
            if let Some((conn, stream)) = bus {
                let peer = Peer {
                    conn,
                    kind: PeerKind::Bus,
                };
                bridge.peers.lock().push(peer.clone());
                serve(&bridge, &peer, stream).await;
                tracing::warn!(
                    "D-Bus: the bus connection closed; serving peer-to-peer clients only"
                );
                forget_peer(&bridge, &peer).await;
            }
            std::future::pending::<()>().await;
        }
    };
    let accept = {
        let bridge = bridge.clone();
        let runtime = runtime.clone();
        async move {
            let next_label = AtomicU64::new(1);
            let mut peers: Vec<Task<(), Shared>> = Vec::new();
            let accepts: Vec<_> = listeners.iter().map(|l| Box::pin(accept_one(l))).collect();
            if accepts.is_empty() {
                return std::future::pending::<()>().await;
            }
            let mut accepts = accepts;
            loop {
                let (stream, index, _) = futures_util::future::select_all(accepts.iter_mut()).await;
                accepts[index] = Box::pin(accept_one(&listeners[index]));
                let Some(stream) = stream else { continue };
                peers.retain(|t| !t.is_finished());
                if peers.len() >= MAX_PEERS {
                    tracing::warn!(
                        "D-Bus: {MAX_PEERS} peer-to-peer clients connected; refusing another"
                    );
                    continue;
                }
                let label = format!("p2p:{}", next_label.fetch_add(1, Ordering::Relaxed));
                peers.push(runtime.spawn(
                    "dbus-p2p-peer",
                    serve_p2p(bridge.clone(), runtime.clone(), stream, label),
                ));
            }
        }
    };
    let pump = bridge.clone().pump_events();
    let mut work = pin!(async {
        futures_util::future::join3(serve_bus, accept, pump).await;
    });
    if !shutdown.requested.load(Ordering::Acquire) {
        let _ = select(pin!(stop), work.as_mut()).await;
        // Let calls in flight reply (`Quit` is one) and pending events go out, for at most
        // SHUTDOWN_GRACE, still serving meanwhile.
        let settled = async {
            while bridge.busy() || bridge.events.has_pending() {
                runtime.sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = runtime
            .timeout(SHUTDOWN_GRACE, select(pin!(settled), work.as_mut()))
            .await;
    }
    close_events(&bridge).await;
    let peers: Vec<Peer> = std::mem::take(&mut *bridge.peers.lock());
    for peer in peers {
        let _ = peer.conn.close().await;
    }
}

/// Closes the bridge's subscriber, which destroys every subscription made over D-Bus: tree
/// work, so on the blocking pool.
async fn close_events(bridge: &Arc<Bridge>) {
    let b = bridge.clone();
    zruntime::unblock(move || b.events.close()).await;
}

async fn accept_one(listener: &UnixListener<Shared>) -> Option<std::os::unix::net::UnixStream> {
    match listener.accept().await {
        Ok((stream, _)) => Some(stream.into_std()),
        Err(e) => {
            tracing::warn!("D-Bus: accept failed: {e}");
            // Back off: an error such as EMFILE repeats at once.
            if let Ok(rt) = SharedRuntime::current() {
                rt.sleep(Duration::from_millis(100)).await;
            }
            None
        }
    }
}

/// Connects, reads the bus's messages in one stream, and owns `name`.
async fn connect_bus(
    address: &BusAddress,
    name: &str,
) -> Result<(Connection, MessageStream), StartError> {
    let builder = match address {
        BusAddress::Session => connection::Builder::session(),
        BusAddress::System => connection::Builder::system(),
        BusAddress::Address(a) => connection::Builder::address(a.as_str()),
    };
    let connect_error = |e: zbus::Error| StartError::Connect {
        bus: address.clone(),
        reason: e.to_string(),
    };
    let conn = builder.build().await.map_err(connect_error)?;
    // The stream exists before the name is owned, so no call to the name is missed.
    let stream = MessageStream::from(&conn);
    let rule = "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged',path='/org/freedesktop/DBus'";
    bus_call(&conn, "AddMatch", &(rule,))
        .await
        .map_err(connect_error)?;
    const DO_NOT_QUEUE: u32 = 4;
    const PRIMARY_OWNER: u32 = 1;
    const ALREADY_OWNER: u32 = 4;
    let name_error = |reason: String| StartError::Name {
        name: name.to_owned(),
        bus: address.clone(),
        reason,
    };
    let reply = bus_call(&conn, "RequestName", &(name, DO_NOT_QUEUE))
        .await
        .map_err(|e| name_error(e.to_string()))?;
    match reply.body().deserialize::<u32>() {
        Ok(PRIMARY_OWNER | ALREADY_OWNER) => Ok((conn, stream)),
        Ok(_) => Err(name_error(
            "another process owns it (use --dbus-name to choose another)".into(),
        )),
        Err(e) => Err(name_error(e.to_string())),
    }
}

async fn bus_call<B>(conn: &Connection, member: &str, body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus"),
        member,
        body,
    )
    .await
}

/// Reads a connection's messages until it closes: method calls go to their callers'
/// lanes; on the bus, a client that leaves has its subscriptions dropped behind its calls.
async fn serve(bridge: &Arc<Bridge>, peer: &Peer, mut stream: MessageStream) {
    while let Some(msg) = stream.next().await {
        take(bridge, peer, msg);
    }
}

/// One message read from `peer`'s connection.
fn take(bridge: &Arc<Bridge>, peer: &Peer, msg: zbus::Result<Message>) {
    let msg = match msg {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!("D-Bus: bad message: {e}");
            return;
        }
    };
    match msg.message_type() {
        MessageType::MethodCall => {
            let caller = Bridge::caller(peer, &msg.header());
            bridge.enqueue(
                caller,
                Work::Call {
                    peer: peer.clone(),
                    msg,
                },
            );
        }
        MessageType::Signal if peer.kind == PeerKind::Bus => name_owner_changed(bridge, &msg),
        _ => {}
    }
}

/// Whether `msg` is a call of the bus's `Hello`, which a client that takes the
/// connection for a bus sends first.
fn is_hello(msg: &Message) -> bool {
    let hdr = msg.header();
    msg.message_type() == MessageType::MethodCall
        && hdr.path().is_some_and(|p| p.as_str() == BUS_PATH)
        && hdr.member().is_some_and(|m| m.as_str() == "Hello")
}

fn name_owner_changed(bridge: &Arc<Bridge>, msg: &Message) {
    let hdr = msg.header();
    if hdr.member().map(|m| m.as_str()) != Some("NameOwnerChanged")
        || hdr.sender().map(|s| s.as_str()) != Some("org.freedesktop.DBus")
    {
        return;
    }
    if let Ok((name, _old, new)) = msg.body().deserialize::<(&str, &str, &str)>()
        && name.starts_with(':')
        && new.is_empty()
    {
        bridge.enqueue(name.to_owned(), Work::Left);
    }
}

async fn serve_p2p(
    bridge: Arc<Bridge>,
    runtime: SharedRuntime,
    stream: std::os::unix::net::UnixStream,
    label: String,
) {
    let handshake = connection::Builder::unix_stream(stream)
        .server(Guid::generate())
        .p2p()
        .build_message_stream();
    let stream = match runtime.timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!("D-Bus: {label}: handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("D-Bus: {label}: no handshake in {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let peer = Peer {
        conn: Connection::from(&stream),
        kind: PeerKind::P2p(label),
    };
    // The peer hears the tree's signals from its first message on, and a first `Hello`
    // is answered before it does: busctl and gdbus with `--address` take the connection
    // for a bus, and sd-bus fails it (EIO) when the first message it gets is not Hello's
    // reply, as a signal sent meanwhile would be. A client hears nothing before it has
    // said anything, as a bus client hears nothing before its AddMatch.
    let mut stream = stream;
    if let Some(first) = stream.next().await {
        match first {
            Ok(msg) if is_hello(&msg) => {
                bridge.answer(&peer, msg).await;
                bridge.peers.lock().push(peer.clone());
            }
            other => {
                bridge.peers.lock().push(peer.clone());
                take(&bridge, &peer, other);
            }
        }
        serve(&bridge, &peer, stream).await;
    }
    forget_peer(&bridge, &peer).await;
}

/// A connection closed: stop sending to it, and drop its clients' subscriptions.
async fn forget_peer(bridge: &Arc<Bridge>, peer: &Peer) {
    bridge
        .peers
        .lock()
        .retain(|p| !(p.kind == peer.kind && p.conn.unique_name() == peer.conn.unique_name()));
    let owners = match &peer.kind {
        PeerKind::P2p(label) => vec![label.clone()],
        PeerKind::Bus => {
            let b = bridge.clone();
            zruntime::unblock(move || bus_owners(&b)).await
        }
    };
    for owner in owners {
        bridge.enqueue(owner, Work::Left);
    }
}

/// The bus clients that own subscriptions.
fn bus_owners(bridge: &Bridge) -> Vec<String> {
    let mut owners: Vec<String> = bridge
        .events
        .subscriptions()
        .iter()
        .filter_map(|p| bridge.tree.get(p, "owner").ok())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .filter(|o| o.starts_with(':'))
        .collect();
    owners.sort();
    owners.dedup();
    owners
}
