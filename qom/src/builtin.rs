//! The object model's own types: `object` (with the implicit `type` property and the
//! `property-changed`, `child-added`, `child-removed` notifiers every object has),
//! `interface`, `user-creatable`, `container`, `machine`, `none-machine` and `subscription`.

use crate::error::{Error, Result};
use crate::kind::{Field, Kind};
use crate::notifier::NotifierDecl;
use crate::object::{ObjectCore, ObjectRef};
use crate::property::{PhasePolicy, Property};
use crate::subscription::{Counters, MAX_QUEUE_LIMIT, Subscription, subscription_of};
use crate::types::{TypeInfo, TypeRegistry};
use crate::value::Value;

/// The root of every object type.
pub const OBJECT: &str = "object";
/// The root of every interface.
pub const INTERFACE: &str = "interface";
/// Types clients may create with `object-add` implement this interface.
pub const USER_CREATABLE: &str = "user-creatable";
pub const CONTAINER: &str = "container";
/// The abstract machine type; `/machine` is of a type deriving from it.
pub const MACHINE: &str = "machine";
/// A machine with nothing in it (QEMU's `-M none`).
pub const NONE_MACHINE: &str = "none-machine";
pub const SUBSCRIPTION: &str = "subscription";

/// Implicit notifier: a notifying property changed. Payload `{property, value}`.
pub const PROPERTY_CHANGED: &str = "property-changed";
/// Implicit notifier: a child was added. Payload `{child, type}`.
pub const CHILD_ADDED: &str = "child-added";
/// Implicit notifier: a child was removed. Payload `{child, type}`.
pub const CHILD_REMOVED: &str = "child-removed";

// Every object type derives from `object`, whose notifiers come first.
const PROPERTY_CHANGED_INDEX: u16 = 0;
const CHILD_ADDED_INDEX: u16 = 1;
const CHILD_REMOVED_INDEX: u16 = 2;

pub(crate) fn register_types(types: &TypeRegistry) {
    let child_event = || {
        Kind::structure(
            "ChildEvent",
            vec![
                Field::new("child", Kind::Path, "Path of the child"),
                Field::new("type", Kind::Str, "Type of the child"),
            ],
        )
    };
    let object = TypeInfo::root(OBJECT)
        .description("The base of every object type")
        .property(
            Property::new("type", Kind::Str)
                .description("The object's type")
                .getter(|o| Ok(Value::Str(o.type_name().to_owned()))),
        )
        .notifier(
            NotifierDecl::new(
                PROPERTY_CHANGED,
                Kind::structure(
                    "PropertyChanged",
                    vec![
                        Field::new("property", Kind::Str, "Name of the property"),
                        Field::new("value", Kind::Any, "Its new value"),
                    ],
                ),
            )
            .description("A notifying property of the object changed"),
        )
        .notifier(
            NotifierDecl::new(CHILD_ADDED, child_event()).description("A child object was added"),
        )
        .notifier(
            NotifierDecl::new(CHILD_REMOVED, child_event())
                .description("A child object was removed"),
        );

    let infos = [
        object,
        TypeInfo::root(INTERFACE)
            .interface_root()
            .description("The base of every interface"),
        TypeInfo::interface(USER_CREATABLE, INTERFACE)
            .description("Objects clients may create with object-add"),
        TypeInfo::new(CONTAINER, OBJECT).description("A container of other objects"),
        TypeInfo::new(MACHINE, OBJECT)
            .abstract_type()
            .description("The base of machine types"),
        TypeInfo::new(NONE_MACHINE, MACHINE).description("An empty machine"),
        subscription_type(),
    ];
    for info in infos {
        let name = info.name().to_owned();
        let registered = types.register(info);
        debug_assert!(registered.is_ok(), "built-in type {name}: {registered:?}");
    }
}

fn subscription_type() -> TypeInfo {
    fn sub(o: &ObjectRef) -> Result<std::sync::Arc<Subscription>> {
        subscription_of(o)
    }
    fn counter(name: &str, description: &str, read: fn(Counters) -> u64) -> Property {
        Property::new(name, Kind::uint64())
            .description(description)
            .getter(move |o| Ok(Value::UInt(read(sub(o)?.counters()))))
    }
    let text = |name: &str, description: &str, read: fn(&Subscription) -> &str| {
        Property::new(name, Kind::Str)
            .description(description)
            .getter(move |o| Ok(Value::Str(read(&*sub(o)?).to_owned())))
    };
    TypeInfo::new(SUBSCRIPTION, OBJECT)
        .internal()
        .deletable(true)
        .description("A subscription to a notifier; delete it to unsubscribe")
        .property(text(
            "target",
            "Path of the object (or of the subtree's root), or name of the type, subscribed to",
            Subscription::target,
        ))
        .property(
            Property::new(
                "scope",
                Kind::enumeration("SubscriptionScope", &["object", "type", "subtree"]),
            )
            .description("One object, every object of a type, or an object and everything below it")
            .getter(|o| Ok(Value::Enum(sub(o)?.scope().name().to_owned()))),
        )
        .property(text(
            "notifier",
            "The notifier subscribed to, or * for every notifier",
            Subscription::notifier,
        ))
        .property(
            Property::new("owner", Kind::Str)
                .description(
                    "The client that owns the subscription (the last one, while it lingers)",
                )
                .getter(|o| Ok(Value::Str(sub(o)?.owner().to_string()))),
        )
        .property(
            Property::new("filter", Kind::Any)
                .description("Payload fields an event must have, with their values")
                .getter(|o| {
                    Ok(Value::Map(
                        sub(o)?
                            .filter()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.clone()))
                            .collect(),
                    ))
                }),
        )
        .property(
            Property::new("min-interval-ms", Kind::uint64())
                .description(
                    "Rate limit: at most one event per source this often, the newest waiting \
                     out the interval (0: none)",
                )
                .getter(|o| {
                    let ms = sub(o)?.min_interval().map_or(0, |d| d.as_millis() as u64);
                    Ok(Value::UInt(ms))
                }),
        )
        .property(
            Property::new("linger", Kind::uint64())
                .description(
                    "Seconds the subscription outlives its owner's connection, to be adopted \
                     (0: it ends with it)",
                )
                .getter(|o| Ok(Value::UInt(sub(o)?.linger().map_or(0, |d| d.as_secs())))),
        )
        .property(
            Property::new("lingering", Kind::Bool)
                .description("Its owner is gone and it waits to be adopted")
                .getter(|o| Ok(Value::Bool(sub(o)?.is_lingering()))),
        )
        .property(counter("matched", "Events that matched so far", |c| {
            c.matched
        }))
        .property(counter("delivered", "Events handed to the owner", |c| {
            c.delivered
        }))
        .property(counter(
            "dropped",
            "Events lost: the queue was full, or the subscription or its subscriber ended",
            |c| c.dropped,
        ))
        .property(counter("pending", "Events waiting for delivery", |c| {
            c.pending
        }))
        .property(counter(
            "coalesced",
            "Events that gave way to a newer one from the same source (coalesce, or the \
             rate limit)",
            |c| c.coalesced,
        ))
        .property(
            Property::new("queue-limit", Kind::uint_range(1, MAX_QUEUE_LIMIT.into()))
                .description("Most events waiting for delivery; more are dropped")
                .getter(|o| Ok(Value::UInt(sub(o)?.queue_limit().into())))
                .setter(|o, v| {
                    let limit = v
                        .as_u64()
                        .and_then(|l| u32::try_from(l).ok())
                        .ok_or_else(|| Error::failed("bad queue limit"))?;
                    sub(o)?.set_queue_limit(limit);
                    Ok(())
                })
                .policy(PhasePolicy::Always),
        )
        .property(
            Property::new("coalesce", Kind::Bool)
                .description("Keep only the newest pending event per source object")
                .getter(|o| Ok(Value::Bool(sub(o)?.coalesce())))
                .setter(|o, v| {
                    sub(o)?.set_coalesce(v.as_bool().unwrap_or(false));
                    Ok(())
                }),
        )
        .unrealize(|o| {
            if let Ok(s) = sub(o) {
                o.tree().detach_subscription(&s);
            }
        })
}

pub(crate) fn emit_property_changed(core: &ObjectCore, property: &str, value: &Value) {
    let name = &core.class.notifiers()[usize::from(PROPERTY_CHANGED_INDEX)]
        .item
        .name;
    core.events.emit(PROPERTY_CHANGED_INDEX, name, || {
        Value::map([
            ("property", Value::Str(property.to_owned())),
            ("value", value.clone()),
        ])
    });
}

pub(crate) fn emit_child_event(parent: &ObjectCore, notifier: &str, child: &ObjectCore) {
    let index = if notifier == CHILD_ADDED {
        CHILD_ADDED_INDEX
    } else {
        CHILD_REMOVED_INDEX
    };
    let name = &parent.class.notifiers()[usize::from(index)].item.name;
    parent.events.emit(index, name, || {
        Value::map([
            ("child", Value::Path(child.path().to_string())),
            ("type", Value::Str(child.class.name().to_owned())),
        ])
    });
}
