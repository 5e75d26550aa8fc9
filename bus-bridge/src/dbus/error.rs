//! D-Bus errors: the one function that turns a [`qom::Error`] into a D-Bus error name and
//! text, and the error replies the bridge sends.

use qom::{Error, Fault};

/// An error reply: a D-Bus error name and a sentence for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbusError {
    pub name: &'static str,
    pub message: String,
}

pub const UNKNOWN_OBJECT: &str = "org.freedesktop.DBus.Error.UnknownObject";
pub const UNKNOWN_INTERFACE: &str = "org.freedesktop.DBus.Error.UnknownInterface";
pub const UNKNOWN_METHOD: &str = "org.freedesktop.DBus.Error.UnknownMethod";
pub const UNKNOWN_PROPERTY: &str = "org.freedesktop.DBus.Error.UnknownProperty";
pub const PROPERTY_READ_ONLY: &str = "org.freedesktop.DBus.Error.PropertyReadOnly";
pub const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
pub const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
pub const FAILED: &str = "org.freedesktop.DBus.Error.Failed";
pub const NOT_SUPPORTED: &str = "org.freedesktop.DBus.Error.NotSupported";
/// A property written in a phase its policy does not allow.
pub const WRONG_PHASE: &str = "org.qomu.Error.WrongPhase";
/// `Delete` on an object clients may not delete, or one with children.
pub const NOT_DELETABLE: &str = "org.qomu.Error.NotDeletable";
/// The request is valid but the VM's state refuses it.
pub const INVALID_STATE: &str = "org.qomu.Error.InvalidState";
/// The operation was tried and failed.
pub const QOMU_FAILED: &str = "org.qomu.Error.Failed";
/// No such device type, or one clients may not add (now).
pub const NOT_PLUGGABLE: &str = "org.qomu.Error.NotPluggable";
/// A device with the id exists.
pub const DUPLICATE_ID: &str = "org.qomu.Error.DuplicateId";
/// No such bus, or one the device cannot go on.
pub const NO_SUCH_BUS: &str = "org.qomu.Error.NoSuchBus";
/// The slot asked for is taken, or every slot is.
pub const SLOT_UNAVAILABLE: &str = "org.qomu.Error.SlotUnavailable";
/// The device cannot be unplugged.
pub const NOT_UNPLUGGABLE: &str = "org.qomu.Error.NotUnpluggable";
/// Something under way (an unplug, a migration) must end first.
pub const BUSY: &str = "org.qomu.Error.Busy";
/// A file could not be opened or written.
pub const IO_ERROR: &str = "org.qomu.Error.IoError";

impl DbusError {
    pub fn new(name: &'static str, message: impl Into<String>) -> Self {
        DbusError {
            name,
            message: message.into(),
        }
    }
    pub fn invalid_args(message: impl Into<String>) -> Self {
        DbusError::new(INVALID_ARGS, message)
    }
    pub fn unknown_object(path: &str) -> Self {
        DbusError::new(UNKNOWN_OBJECT, format!("Unknown object '{path}'"))
    }
    pub fn unknown_interface(iface: &str, path: &str) -> Self {
        DbusError::new(
            UNKNOWN_INTERFACE,
            format!("Unknown interface '{iface}' at '{path}'"),
        )
    }
    pub fn unknown_method(iface: &str, member: &str) -> Self {
        DbusError::new(
            UNKNOWN_METHOD,
            format!("Unknown method '{member}' of interface '{iface}'"),
        )
    }
    pub fn unknown_property(iface: &str, property: &str) -> Self {
        DbusError::new(
            UNKNOWN_PROPERTY,
            format!("Unknown property '{property}' of interface '{iface}'"),
        )
    }
    pub fn read_only(iface: &str, property: &str) -> Self {
        DbusError::new(
            PROPERTY_READ_ONLY,
            format!("Property '{property}' of interface '{iface}' is read-only"),
        )
    }
    /// A call whose body has the wrong D-Bus type.
    pub fn wrong_signature(what: &str, expected: &str, got: &str) -> Self {
        DbusError::invalid_args(format!("{what} takes ({expected}), got ({got})"))
    }
    pub fn failed(message: impl Into<String>) -> Self {
        DbusError::new(QOMU_FAILED, message)
    }
}

/// The D-Bus form of a qom error. `expected` is the D-Bus type of the value involved,
/// when there is one: a refused value's error names what would have been accepted.
pub fn from_qom(err: &Error, expected: Option<&str>) -> DbusError {
    let text = err.to_string();
    let with_signature = || match expected {
        Some(sig) => format!("{text} (D-Bus type '{sig}')"),
        None => text.clone(),
    };
    match err {
        Error::NotFound { .. } => DbusError::new(UNKNOWN_OBJECT, text),
        Error::PropertyNotFound { .. } => DbusError::new(UNKNOWN_PROPERTY, text),
        Error::ActionNotFound { .. } => DbusError::new(UNKNOWN_METHOD, text),
        Error::ReadOnly { .. } => DbusError::new(PROPERTY_READ_ONLY, text),
        Error::WrongPhase { .. } => DbusError::new(WRONG_PHASE, text),
        Error::WrongType { .. }
        | Error::OutOfRange { .. }
        | Error::InvalidEnum { .. }
        | Error::LinkTypeMismatch { .. } => DbusError::invalid_args(with_signature()),
        Error::Ambiguous { .. }
        | Error::TypeNotFound { .. }
        | Error::NotUserCreatable { .. }
        | Error::AbstractType { .. }
        | Error::MissingArgument { .. }
        | Error::UnexpectedArgument { .. }
        | Error::DuplicateName { .. }
        | Error::InvalidName { .. }
        | Error::NotASubscription { .. }
        | Error::NoFilterField { .. }
        | Error::NotANotifier { .. } => DbusError::invalid_args(text),
        Error::NotDeletable { .. } | Error::HasChildren { .. } => {
            DbusError::new(NOT_DELETABLE, text)
        }
        Error::NotOwner { .. } | Error::NotAdoptable { .. } => DbusError::new(ACCESS_DENIED, text),
        Error::InvalidState(_) | Error::SubscriberClosed | Error::NeedsSubscriber { .. } => {
            DbusError::new(INVALID_STATE, text)
        }
        Error::InvalidType { .. } | Error::Failed(_) => DbusError::new(QOMU_FAILED, text),
        Error::Operation(op) => DbusError::new(fault_name(&op.fault), text),
    }
}

/// The D-Bus error name of a failed operation (its text is the failing layer's sentence).
fn fault_name(fault: &Fault) -> &'static str {
    match fault {
        Fault::NotADeviceType { .. }
        | Fault::AbstractDeviceType { .. }
        | Fault::NotPluggable { .. } => NOT_PLUGGABLE,
        Fault::DuplicateId { .. } | Fault::DuplicateNetdevId { .. } => DUPLICATE_ID,
        Fault::BusNotFound { .. } | Fault::WrongBus { .. } => NO_SUCH_BUS,
        Fault::SlotInUse { .. } | Fault::BusFull { .. } => SLOT_UNAVAILABLE,
        Fault::NotUnpluggable { .. } => NOT_UNPLUGGABLE,
        Fault::UnplugPending { .. }
        | Fault::ValueInUse { .. }
        | Fault::Migrating { .. }
        | Fault::MigrationRunning => BUSY,
        Fault::OpenFailed { .. } | Fault::WriteFailed { .. } => IO_ERROR,
        Fault::InvalidId { .. }
        | Fault::MissingId
        | Fault::NotANetdevType { .. }
        | Fault::BadValue { .. }
        | Fault::ValueNotFound { .. }
        | Fault::PropertyNotSet { .. }
        | Fault::TooLong { .. }
        | Fault::BadAddress { .. }
        | Fault::BadMigrationUri
        | Fault::DowntimeLimit
        | Fault::NotAnEnumValue { .. }
        | Fault::NoSuchCpu { .. } => INVALID_ARGS,
        Fault::WrongState | Fault::NoDeferredIncoming => INVALID_STATE,
        _ => QOMU_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qom::{Kind, PhasePolicy};

    #[test]
    fn mapping() {
        let e = from_qom(&Error::NotFound { path: "/x".into() }, None);
        assert_eq!(e.name, UNKNOWN_OBJECT);
        let e = from_qom(
            &Error::WrongPhase {
                path: "/machine".into(),
                typename: "m".into(),
                property: "cpus".into(),
                policy: PhasePolicy::Prelaunch,
                current: "the guest is running".into(),
            },
            None,
        );
        assert_eq!(e.name, WRONG_PHASE);
        assert!(e.message.contains("'cpus'"), "{}", e.message);
        let range = Kind::uint8()
            .check("irq", qom::Value::UInt(300))
            .unwrap_err();
        let e = from_qom(&range, Some("y"));
        assert_eq!(e.name, INVALID_ARGS);
        assert!(e.message.ends_with("(D-Bus type 'y')"), "{}", e.message);
        let e = from_qom(
            &Error::NotOwner {
                path: "/subscriptions/1".into(),
                owner: ":1.4".into(),
            },
            None,
        );
        assert_eq!(e.name, ACCESS_DENIED);
    }

    #[test]
    fn failed_operations_get_qomus_names_and_the_layers_own_words() {
        let op = |fault| {
            Error::Operation(qom::Operation::new(
                fault,
                std::io::Error::other("a device with id 'taken' exists already"),
            ))
        };
        let e = from_qom(&op(Fault::DuplicateId { id: "taken".into() }), None);
        assert_eq!(e.name, DUPLICATE_ID);
        assert_eq!(e.message, "a device with id 'taken' exists already");
        for (fault, name) in [
            (Fault::NotPluggable { driver: "x".into() }, NOT_PLUGGABLE),
            (Fault::BusNotFound { bus: "b".into() }, NO_SUCH_BUS),
            (Fault::BusFull { driver: "x".into() }, SLOT_UNAVAILABLE),
            (
                Fault::NotUnpluggable {
                    typename: "t".into(),
                },
                NOT_UNPLUGGABLE,
            ),
            (Fault::MigrationRunning, BUSY),
            (
                Fault::OpenFailed {
                    path: "p".into(),
                    reason: "r".into(),
                },
                IO_ERROR,
            ),
            (Fault::MissingId, INVALID_ARGS),
            (Fault::WrongState, INVALID_STATE),
            (Fault::Failed, QOMU_FAILED),
        ] {
            assert_eq!(from_qom(&op(fault.clone()), None).name, name, "{fault:?}");
        }
    }
}
