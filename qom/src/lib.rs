//! `qom`: qomu's object model.
//!
//! The whole device model of qomu is one live tree of objects addressed by path, in the
//! spirit of QEMU's QOM. Everything else in qomu is a client of this crate: devices and the
//! machine declare types and create objects; the QMP and D-Bus front ends translate requests
//! into the few operations of [`Tree`]. This crate does no I/O and knows nothing of KVM.
//!
//! - **Types** ([`TypeInfo`], registered in a [`TypeRegistry`]) declare a parent,
//!   interfaces, properties ([`Property`], with a [`Kind`], a default and a [`PhasePolicy`]),
//!   actions ([`Action`]) and notifiers ([`NotifierDecl`]).
//! - **Objects** live in an arena with generational keys; `child<>` edges own, `link<>`
//!   edges are re-checked on use. Paths resolve as QEMU's do, partial paths included.
//! - **Notifiers** emit [`Event`]s without blocking and, with nobody listening, without
//!   allocating. A [`Subscriber`] subscribes per object or per type; every subscription is
//!   itself an object at `/subscriptions/<N>`.
//!
//! See `tree.rs` for the lock order.
//!
//! ```
//! use qom::{Action, Field, Kind, NotifierDecl, Property, SubscribeOptions, Target, Tree, TypeInfo, Value};
//!
//! let builder = Tree::builder();
//! builder.register(
//!     TypeInfo::new("lamp", "object")
//!         .implements("user-creatable")
//!         .property(Property::new("watts", Kind::uint_range(1, 100)).default(40u32).notifying())
//!         .notifier(NotifierDecl::new("toggled", Kind::structure("Toggled", vec![Field::new("on", Kind::Bool, "")])))
//!         .action(Action::new("toggle", |obj, _args| {
//!             obj.notifier("toggled")?.emit(|| Value::map([("on", Value::Bool(true))]));
//!             Ok(None)
//!         })),
//! )?;
//! let tree = builder.build()?;
//! tree.create("/objects", "lamp0", "lamp", vec![])?;
//!
//! let client = tree.subscriber("example");
//! let sub = client.subscribe(Target::Type("lamp".into()), "toggled", SubscribeOptions::default())?;
//! assert_eq!(sub, "/subscriptions/1");
//! tree.call("lamp0", "toggle", Default::default())?; // a partial path
//! let events = client.drain();
//! assert_eq!(events[0].event.source.as_ref(), "/objects/lamp0");
//!
//! let err = tree.set("/objects/lamp0", "watts", Value::UInt(500)).unwrap_err();
//! assert_eq!(err.to_string(), "'watts' must be between 1 and 100, got 500");
//! # Ok::<(), qom::Error>(())
//! ```

mod action;
mod builtin;
mod error;
pub mod handover;
mod kind;
mod notifier;
mod object;
pub mod path;
mod property;
mod subscription;
mod tree;
mod typed;
mod types;
mod value;

pub use action::{Action, Args, Handler};
pub use builtin::{
    CHILD_ADDED, CHILD_REMOVED, CONTAINER, INTERFACE, MACHINE, NONE_MACHINE, OBJECT,
    PROPERTY_CHANGED, SUBSCRIPTION, USER_CREATABLE,
};
pub use error::{Error, Fault, Operation, Result};
pub use kind::{EnumKind, Field, IntKind, Kind, StructKind, UIntKind};
pub use notifier::{Event, Notifier, NotifierDecl};
pub use object::{Instance, ObjectRef, PropertyList, WeakObjectRef};
pub use property::{Getter, PhasePolicy, Property, PropertyInfo, PropertyRole, Setter, Validator};
pub use subscription::{
    ALL, Counters, DEFAULT_QUEUE_LIMIT, Delivery, MAX_LINGER_S, MAX_MIN_INTERVAL_MS,
    MAX_QUEUE_LIMIT, Ready, Scope, SubscribeOptions, Subscribed, Subscriber, Subscription, Target,
    subscription_of,
};
pub use tree::{ObjectKey, Tree, TreeBuilder};
pub use typed::{TypedInfo, instance_of};
pub use types::{
    Class, Constructor, Declared, LoadState, RealizeHook, SaveState, StateHooks, TypeInfo,
    TypeRegistry, TypeSummary, UnrealizeHook,
};
pub use value::{Fields, Name, Value};
