//! The one error type of the object model.
//!
//! Every front end maps it to its own error form in exactly one function (QMP classes and
//! texts, D-Bus error names), so each variant carries the structured facts a front end needs
//! rather than a preformatted sentence.

use std::sync::Arc;

use crate::kind::Kind;
use crate::property::PhasePolicy;

/// What went wrong in an operation of the machine or of a device, as facts: each front end
/// words it in its own way (QMP as QEMU does for the same mistake, D-Bus with an error name
/// of its own), while the layer that failed says it in its own words through the error's
/// source ([`Operation`]). The machine's and the devices' error types map onto these.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// `driver` names no device type.
    NotADeviceType { driver: String },
    /// The device type is abstract.
    AbstractDeviceType { driver: String },
    /// Clients may not add the device type (at all, or while the machine runs).
    NotPluggable { driver: String },
    /// A device or object id that is not an identifier.
    InvalidId { id: String },
    /// An object that needs an id was given none.
    MissingId,
    /// A device with this id exists.
    DuplicateId { id: String },
    /// `type` names no netdev type.
    NotANetdevType { typename: String },
    /// A netdev with this id exists.
    DuplicateNetdevId { id: String },
    /// No bus of this name.
    BusNotFound { bus: String },
    /// The device cannot go on a bus of this kind (`PCI`).
    WrongBus { driver: String, bus_kind: String },
    /// The slot is taken, by the device named `by` (QEMU's `TYPE,id=ID`).
    SlotInUse {
        slot: u8,
        driver: String,
        by: String,
    },
    /// Every slot of the bus is taken.
    BusFull { driver: String },
    /// The device does not take this value for the property.
    BadValue {
        typename: String,
        property: String,
        value: String,
    },
    /// The object a property names is taken by another (a netdev another NIC uses).
    ValueInUse {
        typename: String,
        property: String,
        value: String,
    },
    /// The object a property names does not exist.
    ValueNotFound {
        typename: String,
        property: String,
        value: String,
    },
    /// A property the device needs was not set.
    PropertyNotSet { typename: String, property: String },
    /// A text property's value is longer than the device takes.
    TooLong {
        typename: String,
        property: String,
        max: usize,
    },
    /// The device cannot be unplugged (a board device, or not while the machine runs).
    NotUnpluggable { typename: String },
    /// An unplug of this device is under way already.
    UnplugPending { id: String },
    /// The command cannot run while a migration or snapshot is under way.
    Migrating { command: String },
    /// A migration or snapshot is under way already.
    MigrationRunning,
    /// Not a migration URI.
    BadMigrationUri,
    /// `migrate-incoming` without `--incoming defer`.
    NoDeferredIncoming,
    /// A `downtime-limit` out of range.
    DowntimeLimit,
    /// A parameter given a value its enumeration does not have.
    NotAnEnumValue { parameter: String, value: String },
    /// A file cannot be opened; `reason` is the host's.
    OpenFailed { path: String, reason: String },
    /// A file cannot be written; `reason` is the host's.
    WriteFailed { path: String, reason: String },
    /// A guest address (range) that is not in guest memory.
    BadAddress { addr: u64, size: Option<u64> },
    /// No vCPU of this index.
    NoSuchCpu { index: u32 },
    /// The request is valid, but not in the current state of the machine or device.
    WrongState,
    /// The operation was tried and failed.
    Failed,
}

/// A failed operation of the machine or of a device: what a front end needs to know
/// ([`Fault`]), and the layer's own typed error, whose sentence is the error's text.
#[derive(Debug, Clone)]
pub struct Operation {
    pub fault: Fault,
    pub source: Arc<dyn std::error::Error + Send + Sync>,
}

impl Operation {
    /// The failure `source`, which front ends see as `fault`.
    pub fn new(fault: Fault, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Operation {
            fault,
            source: Arc::new(source),
        }
    }
}

impl PartialEq for Operation {
    fn eq(&self, other: &Self) -> bool {
        self.fault == other.fault && self.source.to_string() == other.source.to_string()
    }
}

impl Eq for Operation {}

/// Errors of tree operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No object at this path.
    #[error("no object at path '{path}'")]
    NotFound { path: String },
    /// A partial path matched more than one object.
    #[error("path '{path}' is ambiguous")]
    Ambiguous { path: String },
    /// The object has no property (or notifier) of this name.
    #[error("property '{typename}.{property}' not found")]
    PropertyNotFound { typename: String, property: String },
    /// No type of this name is registered.
    #[error("type '{typename}' not found")]
    TypeNotFound { typename: String },
    /// A type cannot be registered (duplicate name, unknown parent, ...).
    #[error("cannot register type '{typename}': {reason}")]
    InvalidType { typename: String, reason: String },
    /// The type does not implement `user-creatable`, so clients cannot create it.
    #[error("type '{typename}' cannot be created by clients")]
    NotUserCreatable { typename: String },
    /// An abstract type was asked to make an object.
    #[error("type '{typename}' is abstract and cannot be instantiated")]
    AbstractType { typename: String },
    /// A value does not have the kind the property or argument declares. `json_type` is
    /// the JSON type expected (`boolean`, `integer`, `string`, `array`, `object`), as QMP
    /// reports it.
    #[error("'{name}' expects {expected}, got {got}")]
    WrongType {
        name: String,
        expected: String,
        got: String,
        json_type: &'static str,
    },
    /// An integer is outside the declared range. `type_name` is the kind's name (`uint8`)
    /// and `full_range` says whether the range is that type's whole range.
    #[error("'{name}' must be between {min} and {max}, got {value}")]
    OutOfRange {
        name: String,
        value: String,
        min: String,
        max: String,
        type_name: &'static str,
        full_range: bool,
    },
    /// A string is not one of an enum's values.
    #[error("'{name}' must be one of {allowed}, got '{value}'")]
    InvalidEnum {
        name: String,
        value: String,
        allowed: String,
    },
    /// A read-only property was written.
    #[error("property '{property}' of '{path}' is read-only")]
    ReadOnly {
        path: String,
        typename: String,
        property: String,
    },
    /// A property was written in a phase its policy does not allow.
    #[error("property '{property}' of '{path}' can only be set {}; {current}", policy.describe_when())]
    WrongPhase {
        path: String,
        typename: String,
        property: String,
        policy: PhasePolicy,
        current: String,
    },
    /// The object's type has no action of this name.
    #[error("'{typename}' has no action '{action}'")]
    ActionNotFound { typename: String, action: String },
    /// A required argument is missing.
    #[error("parameter '{argument}' is missing")]
    MissingArgument { action: String, argument: String },
    /// An argument the action does not declare was given.
    #[error("parameter '{argument}' is unexpected")]
    UnexpectedArgument { action: String, argument: String },
    /// A child of this name already exists.
    #[error("'{path}' already has a property or child named '{name}'")]
    DuplicateName { path: String, name: String },
    /// A name cannot be used for an object.
    #[error("'{name}' is not a valid object name: {reason}")]
    InvalidName { name: String, reason: String },
    /// The object cannot be deleted while it has children.
    #[error("'{path}' has children (such as '{child}'); delete them first")]
    HasChildren { path: String, child: String },
    /// The object cannot be deleted by a client.
    #[error("'{path}' cannot be deleted")]
    NotDeletable { path: String },
    /// A link target has the wrong type.
    #[error("link '{property}' needs an object of type '{expected}', '{target}' is '{actual}'")]
    LinkTypeMismatch {
        property: String,
        expected: String,
        target: String,
        actual: String,
    },
    /// A subscription belongs to another client.
    #[error("subscription '{path}' belongs to '{owner}'")]
    NotOwner { path: String, owner: String },
    /// Reading a notifier property subscribes, which needs a subscriber to own the result.
    #[error("reading notifier '{property}' subscribes to it and needs a client connection")]
    NeedsSubscriber { property: String },
    /// The subscriber (its connection) is closed.
    #[error("the subscriber is closed")]
    SubscriberClosed,
    /// The named property is not a notifier, so it cannot be subscribed to.
    #[error("property '{typename}.{property}' is not a notifier")]
    NotANotifier { typename: String, property: String },
    /// The object is not a subscription.
    #[error("'{path}' is not a subscription")]
    NotASubscription { path: String },
    /// A subscription filter names a field no payload it could match has (or, for `*` and
    /// subtree subscriptions, none of the notifiers it could match has).
    #[error(
        "notifier '{notifier}' has no payload field '{field}' to filter on (its fields: {fields})"
    )]
    NoFilterField {
        notifier: String,
        field: String,
        fields: String,
    },
    /// A subscription is not waiting for adoption, or the token given is not its own.
    #[error(
        "subscription '{path}' cannot be adopted: it is not waiting for a new owner, or the token does not match"
    )]
    NotAdoptable { path: String },
    /// An operation of the machine or of a device failed: see [`Operation`].
    #[error("{}", .0.source)]
    Operation(Operation),
    /// An action or accessor of the owning type failed for its own reason.
    #[error("{0}")]
    Failed(String),
    /// The request is valid but not in the current state of the object.
    #[error("{0}")]
    InvalidState(String),
}

impl Error {
    /// A failure reported by type code, with the text the user should see.
    pub fn failed(reason: impl Into<String>) -> Self {
        Error::Failed(reason.into())
    }

    /// What front ends are told of a failed operation, if this is one.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            Error::Operation(op) => Some(&op.fault),
            _ => None,
        }
    }

    /// A wrong-type error for a value checked against `kind`.
    pub(crate) fn wrong_type(name: &str, kind: &Kind, got: &str) -> Self {
        Error::WrongType {
            name: name.to_owned(),
            expected: kind.describe(),
            got: got.to_owned(),
            json_type: kind.json_type(),
        }
    }
}

/// Result alias of the object model.
pub type Result<T> = std::result::Result<T, Error>;
