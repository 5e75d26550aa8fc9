//! The bridge between one qom tree and its D-Bus connections: it answers every method call
//! that reaches a connection (Peer, Introspectable, Properties, ObjectManager, the tree's own
//! interfaces) by decoding it, calling the tree, and encoding the reply.
//!
//! zbus's `ObjectServer` is never used: its interfaces are fixed per Rust type, and the
//! tree's are only known at run time. Calls are read from the connection's message stream
//! and dispatched here instead (shared/notes/zbus.md has the measurements behind this).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use qom::{
    Args, ObjectRef, SUBSCRIPTION, SubscribeOptions, Subscriber, Target, Tree, Value,
    subscription_of,
};
use zbus::message::{Flags, Header};
use zbus::wire::{Array, Signature, Str, Structure};
use zbus::{Connection, Message, ObjectPath, Variant};

use super::encode::{ManagedObjects, ObjectInterfaces};
use super::error::{self, DbusError, from_qom};
use super::lanes::{Lanes, Work};
use super::names;
use super::schema::{
    self, INTROSPECTABLE, OBJECT_MANAGER, OBJECT1, PEER, PROPERTIES, ROOT1, SUBSCRIPTION1, Schema,
    TypeIface,
};
use super::values::{Codec, TypeMismatch, signature};

pub(crate) const BUS_PATH: &str = "/org/freedesktop/DBus";
const BUS_NAME: &str = "org.freedesktop.DBus";

/// Owner label of the bridge's own subscriptions (object lifecycle and property changes).
pub const BRIDGE_OWNER: &str = "dbus-bridge";

/// Properties of a fixed interface, by D-Bus name.
pub type Props = Vec<(&'static str, Variant<'static>)>;

/// Where a call came from: the bus (the caller is the sender's unique name) or a
/// peer-to-peer connection (the caller is the connection's label, `p2p:N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerKind {
    Bus,
    P2p(String),
}

/// A connection the tree is served on.
#[derive(Clone)]
pub struct Peer {
    pub conn: Connection,
    pub kind: PeerKind,
}

/// The shared state of the D-Bus front end.
pub struct Bridge {
    pub tree: Tree,
    pub codec: Codec,
    pub schema: Schema,
    /// Receives the bridge's own events and those of every D-Bus client's subscriptions
    /// (owner label: the client's unique name, or `p2p:N`).
    pub events: Subscriber,
    /// Every connection served; signals for everyone go to each.
    pub peers: Mutex<Vec<Peer>>,
    /// The executor the bridge runs on (for timers).
    pub runtime: zruntime::SharedRuntime,
    /// Actions (and subscriptions for another owner) under way, not yet answered.
    in_flight: AtomicUsize,
    /// Each caller's queue of calls (lanes.rs).
    pub lanes: Lanes,
    /// Events drained and not yet all sent as signals (events.rs).
    pub signals_in_flight: AtomicBool,
    /// The interfaces announced for each live subscription object (see events.rs).
    pub signal_ifaces: Mutex<HashMap<String, Vec<String>>>,
    /// Subscriptions whose events go out as `org.qomu.Subscription1.Event` (the `envelope`
    /// option), by qom path.
    pub envelopes: Mutex<std::collections::HashSet<String>>,
    machine_id: String,
}

/// What a method call turns into.
pub enum Outcome {
    Reply(Message),
    Error(DbusError),
    /// A subscription for another connection (the `owner` option): the bus is asked who
    /// that is first, so it runs off the connection's message loop.
    Delegated {
        caller: String,
        request: SubscribeRequest,
    },
    /// An action: it may take a while, so it runs off the bridge's thread.
    Action {
        object: ObjectRef,
        iface: Arc<TypeIface>,
        method: usize,
        args: Args,
    },
}

impl From<DbusError> for Outcome {
    fn from(e: DbusError) -> Self {
        Outcome::Error(e)
    }
}

/// The object a path names.
enum Node {
    /// A path above the root (`/`, `/org`, `/org/qomu`): only introspectable; holds the
    /// next segment towards the root.
    Above(String),
    Object(ObjectRef),
}

/// A call's arguments, decoded against the signature its method takes.
struct CallArgs<'m> {
    body: zbus::message::Body,
    member: &'m str,
}

impl<'m> CallArgs<'m> {
    fn of(msg: &Message, member: &'m str) -> Self {
        CallArgs {
            body: msg.body(),
            member,
        }
    }

    /// The D-Bus type of the arguments given.
    fn given(&self) -> String {
        self.body.signature().to_string_no_parens()
    }

    /// The arguments as `T`, whose D-Bus type is `want`.
    fn get<'s, T>(&'s self, want: &str) -> Result<T, DbusError>
    where
        T: serde::Deserialize<'s> + zbus::wire::Type,
    {
        self.body
            .deserialize()
            .map_err(|_| DbusError::wrong_signature(self.member, want, &self.given()))
    }
}

fn build_failed(e: zbus::Error) -> DbusError {
    DbusError::failed(format!("cannot encode the reply: {e}"))
}

fn str_variant(s: &str) -> Variant<'static> {
    Variant::Str(Str::from(s.to_owned()))
}

impl Bridge {
    /// A bridge for `tree`, with its objects under `root`.
    ///
    /// # Errors
    /// The tree refuses the bridge's own subscriptions.
    pub fn new(tree: Tree, root: &str, runtime: zruntime::SharedRuntime) -> qom::Result<Arc<Self>> {
        let events = tree.subscriber(BRIDGE_OWNER);
        // Every object's lifecycle and notifying properties, for ObjectManager and
        // PropertiesChanged. The queues are as long as allowed: an event lost here is a
        // signal a client never sees.
        let opts = SubscribeOptions {
            queue_limit: Some(qom::MAX_QUEUE_LIMIT.into()),
            ..SubscribeOptions::default()
        };
        for notifier in [qom::CHILD_ADDED, qom::CHILD_REMOVED, qom::PROPERTY_CHANGED] {
            events.subscribe(Target::Type(qom::OBJECT.into()), notifier, opts.clone())?;
        }
        let machine_id = std::fs::read_to_string("/etc/machine-id")
            .or_else(|_| std::fs::read_to_string("/var/lib/dbus/machine-id"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Ok(Arc::new(Bridge {
            tree,
            codec: Codec::new(root),
            schema: Schema::default(),
            events,
            peers: Mutex::new(Vec::new()),
            runtime,
            in_flight: AtomicUsize::new(0),
            lanes: Lanes::default(),
            signals_in_flight: AtomicBool::new(false),
            signal_ifaces: Mutex::new(HashMap::new()),
            envelopes: Mutex::new(std::collections::HashSet::new()),
            machine_id,
        }))
    }

    /// Whether calls are queued or under way (actions included), or signals are being
    /// built and sent.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
            || self.lanes.busy()
            || self.signals_in_flight.load(Ordering::Acquire)
    }

    pub fn root(&self) -> &str {
        self.codec.root()
    }

    /// The D-Bus path of a qom path.
    pub fn object_path(&self, qom_path: &str) -> ObjectPath<'static> {
        ObjectPath::from_string_unchecked(names::object_path(self.root(), qom_path))
    }

    fn node(&self, path: &str) -> Result<Node, DbusError> {
        if let Some(qom_path) = names::qom_path(self.root(), path) {
            // Only the canonical path of a live object names it (no links, no partial paths).
            if let Ok(obj) = self.tree.lookup(&qom_path)
                && obj.path() == qom_path
            {
                return Ok(Node::Object(obj));
            }
        } else if let Some(next) = self.above_root_child(path) {
            return Ok(Node::Above(next));
        }
        Err(DbusError::unknown_object(path))
    }

    /// The caller's owner label.
    pub fn caller(peer: &Peer, hdr: &Header<'_>) -> String {
        match &peer.kind {
            PeerKind::P2p(label) => label.clone(),
            PeerKind::Bus => hdr
                .sender()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
        }
    }

    /// Answers one method call, in its caller's lane (lanes.rs): decodes it and calls the
    /// tree on the blocking pool, then sends the reply from the executor. An action is
    /// called on the pool on its own and answered when it returns, so the lane goes on.
    pub async fn answer(self: &Arc<Self>, peer: &Peer, msg: Message) {
        let hdr = msg.header();
        let wants_reply = !hdr.primary().flags().contains(Flags::NO_REPLY_EXPECTED);
        let outcome = {
            let (bridge, peer, msg) = (self.clone(), peer.clone(), msg.clone());
            zruntime::unblock(move || bridge.dispatch(&peer, &msg, &msg.header())).await
        };
        let reply = match outcome {
            Outcome::Reply(reply) => Ok(reply),
            Outcome::Error(e) => Err(e),
            Outcome::Delegated { caller, request } => {
                let bridge = self.clone();
                let conn = peer.conn.clone();
                self.in_flight.fetch_add(1, Ordering::AcqRel);
                zruntime::spawn(async move {
                    let hdr = msg.header();
                    let full = request.full;
                    let reply = bridge
                        .delegated_subscribe(&conn, &caller, request)
                        .await
                        .and_then(|made| bridge.subscribed_reply(&hdr, &made, full));
                    if wants_reply {
                        send_reply(&conn, &hdr, reply).await;
                    }
                    bridge.in_flight.fetch_sub(1, Ordering::AcqRel);
                })
                .detach();
                return;
            }
            Outcome::Action {
                object,
                iface,
                method,
                args,
            } => {
                let bridge = self.clone();
                let conn = peer.conn.clone();
                self.in_flight.fetch_add(1, Ordering::AcqRel);
                zruntime::spawn(async move {
                    let hdr = msg.header();
                    let name = iface.methods[method].qom.clone();
                    let result = zruntime::unblock(move || {
                        let result = object.call(&name, args.clone());
                        // Descriptors the message carried that the call did not take.
                        for (_, v) in args.iter() {
                            qom::handover::discard_in(v);
                        }
                        result
                    })
                    .await;
                    let reply = bridge.action_reply(&hdr, &iface, method, result);
                    if wants_reply {
                        send_reply(&conn, &hdr, reply).await;
                    }
                    bridge.in_flight.fetch_sub(1, Ordering::AcqRel);
                })
                .detach();
                return;
            }
        };
        if wants_reply {
            send_reply(&peer.conn, &hdr, reply).await;
        }
    }

    fn dispatch(self: &Arc<Self>, peer: &Peer, msg: &Message, hdr: &Header<'_>) -> Outcome {
        let (Some(path), Some(member)) = (hdr.path(), hdr.member()) else {
            return DbusError::invalid_args("a method call needs a path and a member").into();
        };
        let (path, member) = (path.as_str(), member.as_str());
        if let PeerKind::P2p(label) = &peer.kind
            && path == BUS_PATH
        {
            return self.p2p_bus_facade(label, hdr, member, msg);
        }
        let node = match self.node(path) {
            Ok(node) => node,
            Err(e) => return e.into(),
        };
        let iface = match hdr.interface() {
            Some(i) => i.as_str().to_owned(),
            None => match self.interface_of_member(&node, member) {
                Some(i) => i,
                None => return DbusError::unknown_method("(none)", member).into(),
            },
        };
        let ret = Message::method_return(hdr);
        let reply = |r: zbus::Result<Message>| match r {
            Ok(m) => Outcome::Reply(m),
            Err(e) => Outcome::Error(build_failed(e)),
        };
        let obj = match (&node, iface.as_str()) {
            (_, PEER) => {
                return match member {
                    "Ping" => reply(ret.build(&())),
                    "GetMachineId" => reply(ret.build(&self.machine_id.as_str())),
                    _ => DbusError::unknown_method(&iface, member).into(),
                };
            }
            (_, INTROSPECTABLE) if member == "Introspect" => {
                return reply(ret.build(&self.introspect(&node).as_str()));
            }
            (Node::Object(obj), _) => obj,
            (Node::Above(_), PROPERTIES) => {
                // Nodes above the root have no properties.
                return match member {
                    "GetAll" => reply(ret.build(&BTreeMap::<String, Variant<'_>>::new())),
                    _ => DbusError::unknown_interface(&iface, path).into(),
                };
            }
            (Node::Above(_), _) => return DbusError::unknown_interface(&iface, path).into(),
        };
        let args = CallArgs::of(msg, member);
        let result: Result<Message, DbusError> = match (iface.as_str(), member) {
            (PROPERTIES, "Get") => {
                let (i, p): (&str, &str) = match args.get("ss") {
                    Ok(v) => v,
                    Err(e) => return e.into(),
                };
                self.get_property(obj, i, p)
                    .and_then(|v| ret.build(&v).map_err(build_failed))
            }
            (PROPERTIES, "GetAll") => {
                let (i,): (&str,) = match args.get("s") {
                    Ok(v) => v,
                    Err(e) => return e.into(),
                };
                self.get_all(obj, i)
                    .and_then(|v| ret.build(&v).map_err(build_failed))
            }
            (PROPERTIES, "Set") => {
                let (i, p, v): (&str, &str, Variant<'_>) = match args.get("ssv") {
                    Ok(v) => v,
                    Err(e) => return e.into(),
                };
                self.set_property(obj, i, p, &v)
                    .and_then(|()| ret.build(&()).map_err(build_failed))
            }
            (PROPERTIES, _) => Err(DbusError::unknown_method(&iface, member)),
            (OBJECT_MANAGER, "GetManagedObjects") if obj.path() == "/" => ret
                .build(&ManagedObjects { bridge: self })
                .map_err(build_failed),
            (OBJECT1, "Subscribe" | "SubscribeWithOptions" | "SubscribeFull") => {
                return self.subscribe(peer, hdr, Some(obj), msg);
            }
            (ROOT1, "SubscribeType" | "SubscribeTypeWithOptions" | "SubscribeTypeFull")
                if obj.path() == "/" =>
            {
                return self.subscribe(peer, hdr, None, msg);
            }
            (OBJECT1, _) => self.object1(peer, hdr, obj, member, msg),
            (ROOT1, _) if obj.path() == "/" => self.root1(peer, hdr, member, msg),
            (i, m) if i.starts_with(schema::TYPE_PREFIX) => {
                return self.prepare_action(obj, i, m, msg, path);
            }
            _ => Err(DbusError::unknown_interface(&iface, path)),
        };
        match result {
            Ok(m) => Outcome::Reply(m),
            Err(e) => Outcome::Error(e),
        }
    }

    /// On a peer-to-peer connection, the few `org.freedesktop.DBus` methods that tools
    /// expecting a bus call first (`gdbus --address`, `busctl --address`): the peer
    /// plays a bus on which it alone owns its name.
    fn p2p_bus_facade(
        &self,
        label: &str,
        hdr: &Header<'_>,
        member: &str,
        msg: &Message,
    ) -> Outcome {
        const SELF: &str = ":1.0";
        let body = msg.body();
        let ret = Message::method_return(hdr);
        let names = [BUS_NAME, SELF];
        let result = match member {
            // The client's name: its label's number.
            "Hello" => ret.build(&format!(":1.{}", label.trim_start_matches("p2p:"))),
            "AddMatch" | "RemoveMatch" => ret.build(&()),
            "ListNames" => ret.build(&names.to_vec()),
            "ListActivatableNames" => ret.build(&Vec::<&str>::new()),
            "GetId" => ret.build(&self.machine_id.as_str()),
            "NameHasOwner" | "GetNameOwner" => {
                let Ok((name,)) = body.deserialize::<(&str,)>() else {
                    return DbusError::wrong_signature(
                        member,
                        "s",
                        &body.signature().to_string_no_parens(),
                    )
                    .into();
                };
                let known = names.contains(&name) || name.starts_with("org.qomu.");
                if member == "NameHasOwner" {
                    ret.build(&known)
                } else if known {
                    ret.build(&SELF)
                } else {
                    return DbusError::new(
                        "org.freedesktop.DBus.Error.NameHasNoOwner",
                        format!("Could not get owner of name '{name}': no such name"),
                    )
                    .into();
                }
            }
            _ => {
                return DbusError::new(
                    error::NOT_SUPPORTED,
                    format!("'{member}' is not available on a peer-to-peer connection"),
                )
                .into();
            }
        };
        match result {
            Ok(m) => Outcome::Reply(m),
            Err(e) => Outcome::Error(build_failed(e)),
        }
    }

    /// The interface of a call that names none: the first of the object's interfaces with
    /// a method of that name, standard ones first.
    fn interface_of_member(&self, node: &Node, member: &str) -> Option<String> {
        let standard = match member {
            "Ping" | "GetMachineId" => Some(PEER),
            "Introspect" => Some(INTROSPECTABLE),
            "Get" | "GetAll" | "Set" => Some(PROPERTIES),
            "GetManagedObjects" => Some(OBJECT_MANAGER),
            "ListProperties"
            | "GetProperty"
            | "SetProperty"
            | "Subscribe"
            | "SubscribeWithOptions"
            | "SubscribeFull"
            | "Delete" => Some(OBJECT1),
            "SubscribeType"
            | "SubscribeTypeWithOptions"
            | "SubscribeTypeFull"
            | "ListTypes"
            | "AddObject"
            | "Adopt"
            | "Unsubscribe" => Some(ROOT1),
            _ => None,
        };
        if let Some(s) = standard {
            return Some(s.to_owned());
        }
        let Node::Object(obj) = node else {
            return None;
        };
        self.schema
            .class_ifaces(&self.tree, obj.class())
            .iter()
            .find(|t| t.method(member).is_some())
            .map(|t| t.name.clone())
    }

    /// The type interface `name` if `obj` has it.
    fn object_iface(&self, obj: &ObjectRef, name: &str) -> Option<Arc<TypeIface>> {
        self.schema
            .class_ifaces(&self.tree, obj.class())
            .iter()
            .find(|t| t.name == name)
            .cloned()
    }

    // ---- Introspection and ObjectManager ----

    fn introspect(&self, node: &Node) -> String {
        let mut xml = String::with_capacity(4096);
        xml.push_str(schema::XML_HEADER);
        xml.push_str("<node>\n");
        xml.push_str(schema::STANDARD_XML);
        let mut children: Vec<String> = Vec::new();
        match node {
            Node::Above(next) => children.push(next.clone()),
            Node::Object(obj) => {
                xml.push_str(schema::OBJECT1_XML);
                if obj.path() == "/" {
                    xml.push_str(schema::ROOT1_XML);
                    xml.push_str(schema::OBJECT_MANAGER_XML);
                }
                for t in self.schema.class_ifaces(&self.tree, obj.class()).iter() {
                    xml.push_str(&t.xml);
                }
                if let Some(t) = self.subscription_signal_iface(obj) {
                    xml.push_str(&t.signals_xml);
                }
                if obj.class().implements(SUBSCRIPTION) {
                    xml.push_str(schema::SUBSCRIPTION1_XML);
                }
                for child in obj.children() {
                    let mut segment = String::new();
                    names::escape_segment(child.name(), &mut segment);
                    children.push(segment);
                }
            }
        }
        children.sort();
        for c in children {
            let _ = writeln!(xml, "  <node name=\"{c}\"/>");
        }
        xml.push_str("</node>\n");
        xml
    }

    /// For a path above the root, the next segment towards it.
    fn above_root_child(&self, path: &str) -> Option<String> {
        let rest = if path == "/" {
            self.root().strip_prefix('/')?
        } else {
            self.root().strip_prefix(path)?.strip_prefix('/')?
        };
        rest.split('/').next().map(str::to_owned)
    }

    /// For a subscription object: the type interface whose signal it emits.
    pub fn subscription_signal_iface(&self, obj: &ObjectRef) -> Option<Arc<TypeIface>> {
        if !obj.class().implements(SUBSCRIPTION) {
            return None;
        }
        let sub = subscription_of(obj).ok()?;
        let class = match sub.scope() {
            qom::Scope::Object => self.tree.lookup(sub.target()).ok()?.class().clone(),
            qom::Scope::Type => self.tree.types().get(sub.target()).ok()?,
            // Events of any type below the root: no one interface declares them all.
            qom::Scope::Subtree => return None,
        };
        let declared_by = class
            .notifiers()
            .iter()
            .find(|d| d.item.name() == sub.notifier())?
            .declared_by
            .clone();
        self.schema.type_iface(&self.tree, &declared_by).ok()
    }

    /// The interface names of an object of `typename` (what InterfacesRemoved lists).
    pub fn interface_names(&self, typename: &str) -> Vec<String> {
        let mut out = vec![OBJECT1.to_owned()];
        if let Ok(class) = self.tree.types().get(typename) {
            out.extend(
                self.schema
                    .class_ifaces(&self.tree, &class)
                    .iter()
                    .map(|t| t.name.clone()),
            );
            if class.implements(SUBSCRIPTION) {
                out.push(SUBSCRIPTION1.to_owned());
            }
        }
        out
    }

    // ---- Properties ----

    pub fn object1_props(&self, obj: &ObjectRef) -> Props {
        vec![
            ("QomPath", str_variant(obj.path())),
            ("Type", str_variant(obj.type_name())),
        ]
    }

    pub fn type_props(&self, obj: &ObjectRef, t: &TypeIface) -> BTreeMap<String, Variant<'static>> {
        t.props
            .iter()
            .filter_map(|p| {
                let v = obj.get(&p.qom).ok()?;
                Some((p.dbus.clone(), self.codec.to_variant(&p.kind, &v)?))
            })
            .collect()
    }

    fn get_property(
        &self,
        obj: &ObjectRef,
        iface: &str,
        prop: &str,
    ) -> Result<Variant<'static>, DbusError> {
        let unknown = || DbusError::unknown_property(iface, prop);
        match iface {
            OBJECT1 => find(self.object1_props(obj), prop).ok_or_else(unknown),
            ROOT1 if obj.path() == "/" => find(root1_props(), prop).ok_or_else(unknown),
            _ => {
                let t = self
                    .object_iface(obj, iface)
                    .ok_or_else(|| DbusError::unknown_interface(iface, obj.path()))?;
                let p = t.prop(prop).ok_or_else(unknown)?;
                let value = obj.get(&p.qom).map_err(|e| from_qom(&e, None))?;
                self.codec.to_variant(&p.kind, &value).ok_or_else(|| {
                    DbusError::failed(format!(
                        "property '{}' of '{}' has a value that does not fit its type",
                        p.qom,
                        obj.path()
                    ))
                })
            }
        }
    }

    fn get_all(
        &self,
        obj: &ObjectRef,
        iface: &str,
    ) -> Result<BTreeMap<String, Variant<'static>>, DbusError> {
        match iface {
            // Every interface's properties at once.
            "" => {
                let mut all = BTreeMap::new();
                ObjectInterfaces::new(self, obj.clone()).for_each(|_, props| {
                    all.extend(props.map(|(k, v)| (k.to_owned(), v)));
                });
                Ok(all)
            }
            OBJECT1 => Ok(owned(self.object1_props(obj))),
            ROOT1 if obj.path() == "/" => Ok(owned(root1_props())),
            PEER | INTROSPECTABLE | PROPERTIES => Ok(BTreeMap::new()),
            OBJECT_MANAGER if obj.path() == "/" => Ok(BTreeMap::new()),
            SUBSCRIPTION1 if obj.class().implements(SUBSCRIPTION) => Ok(BTreeMap::new()),
            _ => match self.object_iface(obj, iface) {
                Some(t) => Ok(self.type_props(obj, &t)),
                None if self
                    .subscription_signal_iface(obj)
                    .is_some_and(|t| t.name == iface) =>
                {
                    Ok(BTreeMap::new())
                }
                None => Err(DbusError::unknown_interface(iface, obj.path())),
            },
        }
    }

    fn set_property(
        &self,
        obj: &ObjectRef,
        iface: &str,
        prop: &str,
        value: &Variant<'_>,
    ) -> Result<(), DbusError> {
        let fixed = match iface {
            OBJECT1 => Some(self.object1_props(obj)),
            ROOT1 if obj.path() == "/" => Some(root1_props()),
            _ => None,
        };
        if let Some(props) = fixed {
            return Err(if props.iter().any(|(k, _)| *k == prop) {
                DbusError::read_only(iface, prop)
            } else {
                DbusError::unknown_property(iface, prop)
            });
        }
        let t = self
            .object_iface(obj, iface)
            .ok_or_else(|| DbusError::unknown_interface(iface, obj.path()))?;
        let p = t
            .prop(prop)
            .ok_or_else(|| DbusError::unknown_property(iface, prop))?;
        if !p.writable {
            return Err(DbusError::read_only(iface, prop));
        }
        let sig = signature(&p.kind).to_string();
        let value = self.codec.from_variant(&p.kind, value).map_err(|m| {
            mismatch_error(&format!("Property '{prop}' of interface '{iface}'"), &m)
        })?;
        obj.set(&p.qom, value).map_err(|e| from_qom(&e, Some(&sig)))
    }

    // ---- org.qomu.Object1 ----

    fn object1(
        &self,
        peer: &Peer,
        hdr: &Header<'_>,
        obj: &ObjectRef,
        member: &str,
        msg: &Message,
    ) -> Result<Message, DbusError> {
        let args = CallArgs::of(msg, member);
        let ret = Message::method_return(hdr);
        match member {
            "ListProperties" => {
                let list: Vec<(String, String, String, String, bool)> = obj
                    .list_properties()
                    .into_iter()
                    .map(|p| {
                        (
                            p.name,
                            p.type_name,
                            p.description.unwrap_or_default(),
                            p.policy.name().to_owned(),
                            p.notifying,
                        )
                    })
                    .collect();
                ret.build(&list).map_err(build_failed)
            }
            "GetProperty" => {
                let (name,): (&str,) = args.get("s")?;
                let value = self
                    .events
                    .get_for(&Self::caller(peer, hdr), obj.path(), name)
                    .map_err(|e| from_qom(&e, None))?;
                let v = match obj.class().property(name) {
                    Some(p) => self.codec.to_variant(p.kind(), &value),
                    None => Some(self.codec.any_to_variant(&value)),
                }
                .ok_or_else(|| {
                    DbusError::failed(format!(
                        "property '{name}' has a value that does not fit its type"
                    ))
                })?;
                ret.build(&v).map_err(build_failed)
            }
            "SetProperty" => {
                let (name, value): (&str, Variant<'_>) = args.get("sv")?;
                let p = obj.class().property(name).ok_or_else(|| {
                    from_qom(
                        &qom::Error::PropertyNotFound {
                            typename: obj.type_name().to_owned(),
                            property: name.to_owned(),
                        },
                        None,
                    )
                })?;
                let sig = signature(p.kind()).to_string();
                let value = self
                    .codec
                    .from_variant(p.kind(), &value)
                    .map_err(|m| mismatch_error(&format!("Property '{name}'"), &m))?;
                obj.set(name, value).map_err(|e| from_qom(&e, Some(&sig)))?;
                ret.build(&()).map_err(build_failed)
            }
            "Delete" => {
                args.get::<()>("")?;
                if obj.class().implements(SUBSCRIPTION) {
                    self.events
                        .unsubscribe_for(&Self::caller(peer, hdr), obj.path())
                } else {
                    self.tree.delete(obj.path())
                }
                .map_err(|e| from_qom(&e, None))?;
                ret.build(&()).map_err(build_failed)
            }
            _ => Err(DbusError::unknown_method(OBJECT1, member)),
        }
    }

    // ---- subscribing ----

    /// `Object1.Subscribe[WithOptions]` on `object`, or, without one,
    /// `Root1.SubscribeType[WithOptions]`.
    fn subscribe(
        &self,
        peer: &Peer,
        hdr: &Header<'_>,
        object: Option<&ObjectRef>,
        msg: &Message,
    ) -> Outcome {
        match subscribe_args(&self.codec, object, hdr, msg) {
            Ok(request) => self.subscribe_request(peer, hdr, request),
            Err(e) => e.into(),
        }
    }

    /// Subscribes for the caller, or hands a request for another owner to
    /// [`Bridge::delegated_subscribe`].
    fn subscribe_request(
        &self,
        peer: &Peer,
        hdr: &Header<'_>,
        request: SubscribeRequest,
    ) -> Outcome {
        let caller = Self::caller(peer, hdr);
        if request.owner.is_some() {
            if peer.kind != PeerKind::Bus {
                return DbusError::invalid_args(
                    "option 'owner' names a connection on the bus; a peer-to-peer connection has none",
                )
                .into();
            }
            return Outcome::Delegated { caller, request };
        }
        let (full, envelope) = (request.full, request.envelope);
        let result = self
            .events
            .subscribe_for(&caller, request.target, &request.notifier, request.opts)
            .map_err(|e| from_qom(&e, None))
            .and_then(|made| {
                if envelope {
                    self.envelopes.lock().insert(made.path.clone());
                }
                self.subscribed_reply(hdr, &made, full)
            });
        match result {
            Ok(m) => Outcome::Reply(m),
            Err(e) => Outcome::Error(e),
        }
    }

    /// A subscription owned by another connection of the caller's user (the `owner`
    /// option): it delivers to that connection and dies with it, so a one-shot tool
    /// (`busctl call`) can subscribe for a listener that stays (`gdbus monitor`).
    async fn delegated_subscribe(
        self: &Arc<Self>,
        conn: &Connection,
        caller: &str,
        request: SubscribeRequest,
    ) -> Result<qom::Subscribed, DbusError> {
        let envelope = request.envelope;
        let name = request.owner.unwrap_or_default();
        let gone = || {
            DbusError::new(
                "org.freedesktop.DBus.Error.NameHasNoOwner",
                format!("subscription owner '{name}' is not on the bus"),
            )
        };
        let ask = |member: &'static str, arg: String| async move {
            conn.call_method(Some(BUS_NAME), BUS_PATH, Some(BUS_NAME), member, &(arg,))
                .await
        };
        let owner: String = if name.starts_with(':') {
            name.clone()
        } else {
            ask("GetNameOwner", name.clone())
                .await
                .ok()
                .and_then(|m| m.body().deserialize::<String>().ok())
                .ok_or_else(gone)?
        };
        let uid = |reply: zbus::Result<Message>| {
            reply.ok().and_then(|m| m.body().deserialize::<u32>().ok())
        };
        let owner_uid = uid(ask("GetConnectionUnixUser", owner.clone()).await).ok_or_else(gone)?;
        let caller_uid = uid(ask("GetConnectionUnixUser", caller.to_owned()).await);
        if caller_uid != Some(owner_uid) {
            return Err(DbusError::new(
                error::ACCESS_DENIED,
                format!("subscription owner '{name}' is another user's connection"),
            ));
        }
        let path = {
            let (bridge, owner) = (self.clone(), owner.clone());
            zruntime::unblock(move || {
                bridge
                    .events
                    .subscribe_for(&owner, request.target, &request.notifier, request.opts)
            })
            .await
            .map_err(|e| from_qom(&e, None))?
        };
        // Had the owner left before the subscription existed, its NameOwnerChanged found
        // nothing to drop: ask again now that it exists.
        let still_there = ask("NameHasOwner", owner.clone())
            .await
            .ok()
            .and_then(|m| m.body().deserialize::<bool>().ok());
        if still_there != Some(true) {
            self.enqueue(owner, Work::Left);
            return Err(gone());
        }
        if envelope {
            self.envelopes.lock().insert(path.path.clone());
        }
        Ok(path)
    }

    /// The reply to a subscribe call: the subscription's path, and for the `...Full`
    /// methods its details (the adoption token, with `linger`).
    fn subscribed_reply(
        &self,
        hdr: &Header<'_>,
        made: &qom::Subscribed,
        full: bool,
    ) -> Result<Message, DbusError> {
        let path = self.object_path(&made.path);
        let ret = Message::method_return(hdr);
        if full {
            let mut details: BTreeMap<&str, Variant<'_>> = BTreeMap::new();
            if let Some(token) = &made.token {
                details.insert("token", Variant::from(token.as_str()));
            }
            ret.build(&(path, details))
        } else {
            ret.build(&path)
        }
        .map_err(build_failed)
    }

    // ---- org.qomu.Root1 ----

    fn root1(
        &self,
        peer: &Peer,
        hdr: &Header<'_>,
        member: &str,
        msg: &Message,
    ) -> Result<Message, DbusError> {
        let args = CallArgs::of(msg, member);
        let ret = Message::method_return(hdr);
        match member {
            "Adopt" => {
                let (path, token): (ObjectPath<'_>, &str) = args.get("os")?;
                let qom_path = names::qom_path(self.root(), path.as_str())
                    .ok_or_else(|| DbusError::unknown_object(path.as_str()))?;
                self.events
                    .adopt_for(&Self::caller(peer, hdr), &qom_path, token)
                    .map_err(|e| from_qom(&e, None))?;
                ret.build(&()).map_err(build_failed)
            }
            "Unsubscribe" => {
                let (path,): (ObjectPath<'_>,) = args.get("o")?;
                let qom_path = names::qom_path(self.root(), path.as_str())
                    .ok_or_else(|| DbusError::unknown_object(path.as_str()))?;
                self.events
                    .unsubscribe_for(&Self::caller(peer, hdr), &qom_path)
                    .map_err(|e| from_qom(&e, None))?;
                ret.build(&()).map_err(build_failed)
            }
            "ListTypes" => {
                let (implements, include_abstract): (&str, bool) = args.get("sb")?;
                let implements = Some(implements).filter(|s| !s.is_empty());
                let list: Vec<(String, String, bool)> = self
                    .tree
                    .list_types(implements, include_abstract)
                    .into_iter()
                    .map(|t| (t.name, t.parent.unwrap_or_default(), t.is_abstract))
                    .collect();
                ret.build(&list).map_err(build_failed)
            }
            "AddObject" => {
                let (typename, id, props): (&str, &str, Options<'_>) = args.get("ssa{sv}")?;
                let class = self
                    .tree
                    .types()
                    .get(typename)
                    .map_err(|e| from_qom(&e, None))?;
                let mut properties = Vec::new();
                for (key, value) in props {
                    let kind = class
                        .property(key)
                        .map(|p| p.kind().clone())
                        .ok_or_else(|| {
                            from_qom(
                                &qom::Error::PropertyNotFound {
                                    typename: typename.to_owned(),
                                    property: key.to_owned(),
                                },
                                None,
                            )
                        })?;
                    let v = self
                        .codec
                        .from_variant(&kind, &value)
                        .map_err(|m| mismatch_error(&format!("Property '{key}'"), &m))?;
                    properties.push((key.to_owned(), v));
                }
                let obj = self
                    .tree
                    .add_user_object(typename, id, properties)
                    .map_err(|e| from_qom(&e, None))?;
                ret.build(&self.object_path(obj.path()))
                    .map_err(build_failed)
            }
            _ => Err(DbusError::unknown_method(ROOT1, member)),
        }
    }

    // ---- Type interfaces: actions ----

    fn prepare_action(
        &self,
        obj: &ObjectRef,
        iface: &str,
        member: &str,
        msg: &Message,
        path: &str,
    ) -> Outcome {
        let Some(t) = self.object_iface(obj, iface) else {
            return DbusError::unknown_interface(iface, path).into();
        };
        let Some(index) = t.methods.iter().position(|m| m.dbus == member) else {
            return DbusError::unknown_method(iface, member).into();
        };
        let m = &t.methods[index];
        let body = msg.body();
        let want = m.in_signature();
        let got = body.signature().to_string_no_parens();
        if want != got {
            return DbusError::wrong_signature(&format!("{iface}.{member}"), &want, &got).into();
        }
        let mut args = Args::new();
        if !want.is_empty() {
            let fields = match body.deserialize::<Structure<'_>>() {
                Ok(s) => s.into_fields(),
                Err(e) => return DbusError::invalid_args(e.to_string()).into(),
            };
            let mut fields = fields.into_iter();
            for f in &m.required {
                let Some(v) = fields.next() else {
                    return DbusError::wrong_signature(member, &want, &got).into();
                };
                match self.codec.from_variant(&f.kind, &v) {
                    Ok(value) => {
                        args.insert(f.name.clone(), value);
                    }
                    Err(e) => {
                        return mismatch_error(&format!("Argument '{}'", f.name), &e).into();
                    }
                }
            }
            if !m.optional.is_empty() {
                let Some(Variant::Dict(options)) = fields.next() else {
                    return DbusError::wrong_signature(member, &want, &got).into();
                };
                for (key, value) in options.iter() {
                    let Variant::Str(key) = key else {
                        return DbusError::wrong_signature(member, &want, &got).into();
                    };
                    let Some(f) = m.optional.iter().find(|f| f.name == key.as_str()) else {
                        let known: Vec<&str> = m.optional.iter().map(|f| f.name.as_str()).collect();
                        return DbusError::invalid_args(format!(
                            "{member} has no option '{}'; it takes {}",
                            key.as_str(),
                            known.join(", ")
                        ))
                        .into();
                    };
                    match self.codec.from_variant(&f.kind, value) {
                        Ok(value) => {
                            args.insert(f.name.clone(), value);
                        }
                        Err(e) => {
                            return mismatch_error(&format!("Option '{}'", f.name), &e).into();
                        }
                    }
                }
            }
        }
        Outcome::Action {
            object: obj.clone(),
            iface: t,
            method: index,
            args,
        }
    }

    fn action_reply(
        &self,
        hdr: &Header<'_>,
        iface: &TypeIface,
        method: usize,
        result: qom::Result<Option<Value>>,
    ) -> Result<Message, DbusError> {
        let m = &iface.methods[method];
        let value = result.map_err(|e| from_qom(&e, None))?;
        let ret = Message::method_return(hdr);
        match (&m.result, value) {
            (None, _) => ret.build(&()),
            (Some(kind), Some(v)) => match self.codec.to_variant(kind, &v) {
                Some(v) => ret.build(
                    &Structure::builder()
                        .append_field(v)
                        .build()
                        .map_err(build_failed)?,
                ),
                None => {
                    return Err(DbusError::failed(format!(
                        "'{}' returned a value that does not fit its declared type",
                        m.qom
                    )));
                }
            },
            (Some(kind), None) => {
                // Declared a result but gave none: an empty value of the declared type.
                let empty = match signature(kind) {
                    Signature::Array(child) => Variant::Array(Array::new(child.signature())),
                    _ => {
                        return Err(DbusError::failed(format!("'{}' returned nothing", m.qom)));
                    }
                };
                ret.build(
                    &Structure::builder()
                        .append_field(empty)
                        .build()
                        .map_err(build_failed)?,
                )
            }
        }
        .map_err(build_failed)
    }
}

pub fn root1_props() -> Props {
    vec![("Version", str_variant(env!("CARGO_PKG_VERSION")))]
}

fn find(props: Props, name: &str) -> Option<Variant<'static>> {
    props.into_iter().find(|(k, _)| *k == name).map(|(_, v)| v)
}

fn owned(props: Props) -> BTreeMap<String, Variant<'static>> {
    props.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn mismatch_error(what: &str, m: &TypeMismatch) -> DbusError {
    DbusError::invalid_args(format!(
        "{what} takes D-Bus type '{}', got '{}'",
        m.expected, m.got
    ))
}

/// An `a{sv}` argument.
type Options<'a> = BTreeMap<&'a str, Variant<'a>>;

/// A subscription asked for over D-Bus.
pub struct SubscribeRequest {
    target: Target,
    notifier: String,
    opts: SubscribeOptions,
    /// Another connection to own it (the `owner` option).
    owner: Option<String>,
    /// Its events as `org.qomu.Subscription1.Event`, with their sequence numbers.
    envelope: bool,
    /// Asked with a `...Full` method: the reply carries the details too.
    full: bool,
}

/// The arguments of a subscribe call: `(s notifier[, a{sv} options])` on `object`, or
/// `(s type, s notifier[, a{sv} options])` without one.
fn subscribe_args(
    codec: &Codec,
    object: Option<&ObjectRef>,
    hdr: &Header<'_>,
    msg: &Message,
) -> Result<SubscribeRequest, DbusError> {
    let member = hdr.member().map_or("", |m| m.as_str());
    let args = CallArgs::of(msg, member);
    let full = member.ends_with("Full");
    let with_options = full || member.ends_with("WithOptions");
    let (target, notifier, options) = match (object, with_options) {
        (Some(o), false) => {
            let (n,): (&str,) = args.get("s")?;
            (Target::Object(o.path().to_owned()), n, None)
        }
        (Some(o), true) => {
            let (n, opts): (&str, Options<'_>) = args.get("sa{sv}")?;
            (Target::Object(o.path().to_owned()), n, Some(opts))
        }
        (None, false) => {
            let (t, n): (&str, &str) = args.get("ss")?;
            (Target::Type(t.to_owned()), n, None)
        }
        (None, true) => {
            let (t, n, opts): (&str, &str, Options<'_>) = args.get("ssa{sv}")?;
            (Target::Type(t.to_owned()), n, Some(opts))
        }
    };
    let mut request = SubscribeRequest {
        target,
        notifier: notifier.to_owned(),
        opts: SubscribeOptions::default(),
        owner: None,
        envelope: false,
        full,
    };
    if let Some(o) = options {
        subscribe_options(codec, &o, &mut request)?;
    }
    if request.opts.linger_s.is_some() && !full {
        // Its token is what adopts it, and only the ...Full methods return it.
        return Err(DbusError::invalid_args(format!(
            "option 'linger' needs {}, which returns the subscription's adoption token",
            if matches!(request.target, Target::Type(_)) {
                "SubscribeTypeFull"
            } else {
                "SubscribeFull"
            }
        )));
    }
    Ok(request)
}

/// An unsigned integer option, of any D-Bus integer type.
fn unsigned_option(key: &str, v: &Variant<'_>) -> Result<u64, DbusError> {
    Ok(match v {
        Variant::U8(n) => (*n).into(),
        Variant::U16(n) => (*n).into(),
        Variant::U32(n) => (*n).into(),
        Variant::U64(n) => *n,
        Variant::I32(n) if *n >= 0 => (*n).unsigned_abs().into(),
        Variant::I64(n) if *n >= 0 => n.unsigned_abs(),
        _ => {
            return Err(DbusError::invalid_args(format!(
                "option '{key}' takes an unsigned integer"
            )));
        }
    })
}

/// `queue-limit`, `min-interval-ms`, `linger` (any unsigned integer type), `coalesce`,
/// `subtree`, `envelope` (`b`), `filter` (`a{sv}`) and `owner` (`s`, a bus name).
fn subscribe_options(
    codec: &Codec,
    options: &Options<'_>,
    request: &mut SubscribeRequest,
) -> Result<(), DbusError> {
    for (&key, value) in options {
        let value = match value {
            Variant::Variant(inner) => inner.as_ref(),
            v => v,
        };
        match (key, value) {
            ("coalesce", Variant::Bool(b)) => request.opts.coalesce = *b,
            ("envelope", Variant::Bool(b)) => request.envelope = *b,
            ("subtree", Variant::Bool(b)) => {
                if *b {
                    request.target = match std::mem::replace(
                        &mut request.target,
                        Target::Object(String::new()),
                    ) {
                        Target::Object(p) | Target::Subtree(p) => Target::Subtree(p),
                        Target::Type(_) => {
                            return Err(DbusError::invalid_args(
                                "option 'subtree' goes with an object's Subscribe, not SubscribeType",
                            ));
                        }
                    };
                }
            }
            ("owner", Variant::Str(name)) => request.owner = Some(name.as_str().to_owned()),
            ("queue-limit", v) => request.opts.queue_limit = Some(unsigned_option(key, v)?),
            ("min-interval-ms", v) => {
                request.opts.min_interval_ms = Some(unsigned_option(key, v)?);
            }
            ("linger", v) => request.opts.linger_s = Some(unsigned_option(key, v)?),
            ("filter", v @ Variant::Dict(_)) => {
                let Some(Value::Map(fields)) = codec.any_from_variant(v) else {
                    return Err(DbusError::invalid_args(
                        "option 'filter' takes a{sv} with values qomu can compare",
                    ));
                };
                request.opts.filter.extend(fields);
            }
            (k, _) => {
                return Err(DbusError::invalid_args(format!(
                    "unknown or mistyped subscription option '{k}'; options are queue-limit (u), coalesce (b), \
                     subtree (b), filter (a{{sv}}), min-interval-ms (u), linger (u), envelope (b) and owner (s)"
                )));
            }
        }
    }
    Ok(())
}

/// Sends a method's reply or error reply.
pub async fn send_reply(conn: &Connection, hdr: &Header<'_>, reply: Result<Message, DbusError>) {
    let msg = match reply {
        Ok(m) => Ok(m),
        Err(e) => Message::error(hdr, e.name).build(&(e.message.as_str(),)),
    };
    match msg {
        Ok(m) => {
            if let Err(e) = conn.send(&m).await {
                tracing::debug!("D-Bus: cannot send a reply: {e}");
            }
        }
        Err(e) => tracing::warn!("D-Bus: cannot build a reply: {e}"),
    }
}
