//! Events to signals: the bridge's own subscriptions become ObjectManager's
//! InterfacesAdded/InterfacesRemoved and Properties' PropertiesChanged, for every
//! connection; a client's subscription becomes the notifier's typed signal, sent from the
//! subscription's object path to that client only, or, for a subscription made with
//! `envelope`, `org.qomu.Subscription1.Event` with the event's sequence number.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use qom::{Delivery, Value};
use zbus::wire::Structure;
use zbus::{Message, Variant};

use super::bridge::{BRIDGE_OWNER, Bridge, Peer, PeerKind};
use super::encode::{InterfacesAdded, ObjectInterfaces};
use super::lanes::Work;
use super::schema::{OBJECT_MANAGER, PROPERTIES, SUBSCRIPTION1, SignalArgs};

/// How long a connection may take to accept a signal.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A signal built and ready to go.
enum Outgoing {
    /// To every connection (ObjectManager's and Properties' signals).
    Everyone(Message),
    /// To the connection of one subscription's owner (its unique name or `p2p:N`).
    Owner { owner: Arc<str>, msg: Message },
}

impl Bridge {
    /// Forwards events until the subscriber is closed. Signals are built on the blocking
    /// pool, as they read the tree (InterfacesAdded carries every property of the new
    /// object), and sent from the executor in the order of the events.
    pub async fn pump_events(self: Arc<Self>) {
        loop {
            self.events.ready().await;
            // From the drain to the last send the events are neither pending nor sent:
            // shutdown waits for this flag too, so that the last signals (Quit's
            // Shutdown) still go out.
            self.signals_in_flight.store(true, Ordering::Release);
            let bridge = self.clone();
            let Some(outgoing) = zruntime::unblock(move || bridge.build_signals()).await else {
                // Ready with nothing pending: the subscriber was closed.
                self.signals_in_flight.store(false, Ordering::Release);
                return;
            };
            for o in outgoing {
                match o {
                    Outgoing::Everyone(msg) => self.broadcast(&msg).await,
                    Outgoing::Owner { owner, msg } => self.send_to_owner(&owner, &msg).await,
                }
            }
            self.signals_in_flight.store(false, Ordering::Release);
        }
    }

    /// The signals for every pending event; `None` once the subscriber is closed.
    fn build_signals(&self) -> Option<Vec<Outgoing>> {
        let deliveries = self.events.drain();
        if deliveries.is_empty() {
            return None;
        }
        Some(
            deliveries
                .iter()
                .filter_map(|d| self.signal_of(d))
                .collect(),
        )
    }

    fn signal_of(&self, d: &Delivery) -> Option<Outgoing> {
        let event = &d.event;
        if &*d.owner != BRIDGE_OWNER {
            // On the bus, a subscriber's signal is addressed to it.
            let destination = d.owner.starts_with(':').then_some(&*d.owner);
            let msg = if self.envelopes.lock().contains(&*d.subscription) {
                self.envelope_signal(d, destination)
            } else {
                self.owner_signal(d, destination)
            };
            let Some(msg) = msg else {
                tracing::debug!(
                    "D-Bus: event {} of {} does not fit its declared payload; not sent",
                    event.notifier,
                    event.source
                );
                return None;
            };
            return Some(Outgoing::Owner {
                owner: d.owner.clone(),
                msg,
            });
        }
        let msg = match &*event.notifier {
            qom::CHILD_ADDED => self.interfaces_added(&event.data),
            qom::CHILD_REMOVED => self.interfaces_removed(&event.data),
            qom::PROPERTY_CHANGED => {
                self.properties_changed(&event.source, &event.source_type, &event.data)
            }
            _ => None,
        };
        msg.map(Outgoing::Everyone)
    }

    fn interfaces_added(&self, data: &Value) -> Option<Message> {
        let child = data.field("child")?.as_str()?;
        // Gone again already: its child-removed follows, and nobody saw it.
        let obj = self.tree.lookup(child).ok()?;
        if obj.path() != child {
            return None;
        }
        let interfaces = ObjectInterfaces::new(self, obj);
        if interfaces.has_signals_only() {
            // A subscription's extra interface cannot be told from its type once it is
            // gone: remember it for InterfacesRemoved.
            self.signal_ifaces
                .lock()
                .insert(child.to_owned(), interfaces.names());
        }
        let body = InterfacesAdded {
            path: self.object_path(child),
            interfaces,
        };
        signal(self.root(), OBJECT_MANAGER, "InterfacesAdded", &body)
    }

    fn interfaces_removed(&self, data: &Value) -> Option<Message> {
        let child = data.field("child")?.as_str()?;
        let typename = data.field("type")?.as_str()?;
        self.envelopes.lock().remove(child);
        let names = match self.signal_ifaces.lock().remove(child) {
            Some(names) => names,
            None => self.interface_names(typename),
        };
        let body = (self.object_path(child), names);
        signal(self.root(), OBJECT_MANAGER, "InterfacesRemoved", &body)
    }

    fn properties_changed(&self, source: &str, source_type: &str, data: &Value) -> Option<Message> {
        let property = data.field("property")?.as_str()?;
        let value = data.field("value")?;
        let class = self.tree.types().get(source_type).ok()?;
        let declared_by = class
            .properties()
            .iter()
            .find(|d| d.item.name() == property)?
            .declared_by
            .clone();
        let t = self.schema.type_iface(&self.tree, &declared_by).ok()?;
        let p = t.prop_by_qom(property)?;
        let mut changed = BTreeMap::new();
        let mut invalidated = Vec::new();
        match self.codec.to_variant(&p.kind, value) {
            Some(v) => {
                changed.insert(p.dbus.as_str(), v);
            }
            None => invalidated.push(p.dbus.as_str()),
        }
        let body = (t.name.as_str(), changed, invalidated);
        signal(
            self.object_path(source).as_str(),
            PROPERTIES,
            "PropertiesChanged",
            &body,
        )
    }

    /// A client's event: the notifier's signal from the subscription's path, to the client.
    async fn send_to_owner(self: &Arc<Self>, owner: &str, msg: &Message) {
        let peer = self
            .peers
            .lock()
            .iter()
            .find(|p| match &p.kind {
                PeerKind::P2p(label) => label == owner,
                PeerKind::Bus => owner.starts_with(':'),
            })
            .cloned();
        // The owner's connection is gone; its subscriptions go with it.
        let Some(peer) = peer else { return };
        self.send_event(&peer, msg).await;
    }

    fn owner_signal(&self, d: &Delivery, destination: Option<&str>) -> Option<Message> {
        let event = &d.event;
        let class = self.tree.types().get(&event.source_type).ok()?;
        let declared_by = class
            .notifiers()
            .iter()
            .find(|n| *n.item.name() == *event.notifier)?
            .declared_by
            .clone();
        let t = self.schema.type_iface(&self.tree, &declared_by).ok()?;
        let s = t.signal_by_qom(&event.notifier)?;
        let mut body =
            Structure::builder().append_field(Variant::ObjectPath(self.object_path(&event.source)));
        match &s.args {
            SignalArgs::Fields(fields) => {
                for f in fields {
                    let v = event.data.field(&f.name)?;
                    body = body.append_field(self.codec.to_variant(&f.kind, v)?);
                }
            }
            SignalArgs::Whole(kind) => {
                body = body.append_field(self.codec.to_variant(kind, &event.data)?);
            }
        }
        let body = body.build().ok()?;
        let path = self.object_path(&d.subscription);
        let mut builder = Message::signal(path.as_str(), t.name.as_str(), s.dbus.as_str());
        if let Some(destination) = destination {
            builder = builder.destination(destination);
        }
        match builder.build(&body) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("D-Bus: cannot build signal {}.{}: {e}", t.name, s.dbus);
                None
            }
        }
    }

    /// An `envelope` subscription's event: `Event(o source, s notifier, t sequence, a{sv}
    /// data)` from the subscription's path; a payload that is not a structure is the
    /// `value` member of `data`.
    fn envelope_signal(&self, d: &Delivery, destination: Option<&str>) -> Option<Message> {
        let event = &d.event;
        let wrapped;
        let fields = match &event.data {
            map @ Value::Map(_) => map,
            other => {
                wrapped = Value::map([("value", other.clone())]);
                &wrapped
            }
        };
        // A structure's fields go in as their own types: the map as `a{sv}`.
        let body = Structure::builder()
            .append_field(Variant::ObjectPath(self.object_path(&event.source)))
            .append_field(Variant::from(&*event.notifier))
            .append_field(Variant::U64(d.sequence))
            .append_field(self.codec.any_to_variant(fields))
            .build()
            .ok()?;
        let path = self.object_path(&d.subscription);
        let mut builder = Message::signal(path.as_str(), SUBSCRIPTION1, "Event");
        if let Some(destination) = destination {
            builder = builder.destination(destination);
        }
        match builder.build(&body) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("D-Bus: cannot build signal {SUBSCRIPTION1}.Event: {e}");
                None
            }
        }
    }

    /// Sends a signal on every connection.
    pub async fn broadcast(self: &Arc<Self>, msg: &Message) {
        let peers = self.peers.lock().clone();
        for peer in peers {
            self.send_event(&peer, msg).await;
        }
    }

    /// Sends a signal on one connection. Events for every client go out one after the
    /// other, so a peer-to-peer client that stops reading would hold up all the others:
    /// after [`SEND_TIMEOUT`] it is disconnected, as a bus disconnects a client whose
    /// queue overflows. (The bus itself always reads.)
    async fn send_event(self: &Arc<Self>, peer: &Peer, msg: &Message) {
        match self
            .runtime
            .timeout(SEND_TIMEOUT, peer.conn.send(msg))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("D-Bus: cannot send a signal: {e}"),
            Err(_) => {
                let PeerKind::P2p(label) = &peer.kind else {
                    tracing::warn!("D-Bus: the bus took no message for {SEND_TIMEOUT:?}");
                    return;
                };
                tracing::warn!(
                    "D-Bus: {label} read nothing for {SEND_TIMEOUT:?}; disconnecting it"
                );
                self.peers.lock().retain(|p| p.kind != peer.kind);
                self.enqueue(label.clone(), Work::Left);
                let _ = self
                    .runtime
                    .timeout(SEND_TIMEOUT, peer.conn.clone().close())
                    .await;
            }
        }
    }
}

fn signal<B>(path: &str, iface: &str, member: &str, body: &B) -> Option<Message>
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    match Message::signal(path, iface, member).build(body) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!("D-Bus: cannot build signal {iface}.{member} from {path}: {e}");
            None
        }
    }
}
