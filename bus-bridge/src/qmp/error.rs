//! QMP errors: the one function that turns a [`qom::Error`] into a QEMU error class and
//! text, as QEMU words it for the same situation.

use qom::{Error, Fault, PhasePolicy};

/// An error response: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

pub const GENERIC_ERROR: &str = "GenericError";
pub const COMMAND_NOT_FOUND: &str = "CommandNotFound";
pub const DEVICE_NOT_FOUND: &str = "DeviceNotFound";

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: GENERIC_ERROR,
            desc: desc.into(),
        }
    }

    pub fn device_not_found(what: &str) -> Self {
        QmpError {
            class: DEVICE_NOT_FOUND,
            desc: format!("Device '{what}' not found"),
        }
    }

    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: COMMAND_NOT_FOUND,
            desc: desc.into(),
        }
    }
}

/// Which command family an error comes from: QEMU words the same failure differently in
/// different commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// qom-get, qom-set: any path failure is `DeviceNotFound` (QEMU ignores ambiguity).
    Lookup,
    /// qom-list, qom-list-get: an ambiguous path is a `GenericError`.
    List,
    /// qom-list-properties: an unknown type is `Class '...' not found`.
    ClassQuery,
    /// object-add.
    ObjectAdd,
    /// object-del.
    ObjectDel,
    /// Everything else.
    Other,
}

/// The QMP form of a qom error.
pub fn from_qom(err: &Error, ctx: Context) -> QmpError {
    use Context::*;
    let generic = QmpError::generic;
    match err {
        Error::NotFound { path } => match ctx {
            ObjectDel => generic(format!("object '{path}' not found")),
            _ => QmpError::device_not_found(path),
        },
        Error::Ambiguous { path } => match ctx {
            List => generic(format!("Path '{path}' is ambiguous")),
            _ => QmpError::device_not_found(path),
        },
        Error::PropertyNotFound { typename, property } => {
            generic(format!("Property '{typename}.{property}' not found"))
        }
        Error::TypeNotFound { typename } => match ctx {
            ObjectAdd => generic(format!("invalid object type: {typename}")),
            ClassQuery => QmpError {
                class: DEVICE_NOT_FOUND,
                desc: format!("Class '{typename}' not found"),
            },
            _ => QmpError::device_not_found(typename),
        },
        Error::NotUserCreatable { typename } => generic(format!(
            "object type '{typename}' isn't supported by object-add"
        )),
        Error::AbstractType { typename } => {
            generic(format!("object type '{typename}' is abstract"))
        }
        Error::WrongType {
            name, json_type, ..
        } => generic(format!(
            "Invalid parameter type for '{name}', expected: {json_type}"
        )),
        Error::OutOfRange {
            name,
            type_name,
            full_range: true,
            ..
        } => generic(format!("Parameter '{name}' expects {type_name}")),
        Error::OutOfRange { name, min, max, .. } => generic(format!(
            "Parameter '{name}' expects an integer between {min} and {max}"
        )),
        Error::InvalidEnum { name, value, .. } => generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        )),
        Error::ReadOnly {
            typename, property, ..
        } => generic(format!("Property '{typename}.{property}' is not writable")),
        Error::WrongPhase {
            path,
            typename,
            property,
            policy: PhasePolicy::BeforeRealize,
            ..
        } => {
            let name = path.rsplit('/').next().unwrap_or(path);
            generic(format!(
                "Attempt to set property '{property}' on device '{name}' (type '{typename}') after it was realized"
            ))
        }
        Error::MissingArgument { argument, .. } => {
            generic(format!("Parameter '{argument}' is missing"))
        }
        Error::UnexpectedArgument { argument, .. } => {
            generic(format!("Parameter '{argument}' is unexpected"))
        }
        Error::InvalidName { .. } if matches!(ctx, ObjectAdd) => {
            generic("Parameter 'id' expects an identifier".into())
        }
        Error::DuplicateName { name, .. } if matches!(ctx, ObjectAdd) => generic(format!(
            "attempt to add duplicate property '{name}' to object (type 'container')"
        )),
        Error::NotDeletable { path } | Error::HasChildren { path, .. }
            if matches!(ctx, ObjectDel) =>
        {
            let id = path.rsplit('/').next().unwrap_or(path);
            generic(format!("object '{id}' is in use, can not be deleted"))
        }
        Error::Operation(op) => {
            generic(qemu_text(&op.fault).unwrap_or_else(|| op.source.to_string()))
        }
        Error::Failed(text) | Error::InvalidState(text) => generic(text.clone()),
        other => generic(other.to_string()),
    }
}

/// QEMU's text for a failed operation, where QEMU has one for the same mistake; otherwise
/// the failing layer's own sentence is the text.
fn qemu_text(fault: &Fault) -> Option<String> {
    Some(match fault {
        Fault::NotADeviceType { driver } => format!("'{driver}' is not a valid device model name"),
        Fault::AbstractDeviceType { .. } => {
            "Parameter 'driver' expects a non-abstract device type".into()
        }
        Fault::NotPluggable { .. } => "Parameter 'driver' expects a pluggable device type".into(),
        Fault::InvalidId { .. } => "Parameter 'id' expects an identifier".into(),
        Fault::MissingId => "Parameter 'id' is missing".into(),
        Fault::DuplicateId { id } => format!("Duplicate device ID '{id}'"),
        Fault::NotANetdevType { typename } => {
            format!("Parameter 'type' does not accept value '{typename}'")
        }
        Fault::DuplicateNetdevId { id } => format!("Duplicate ID '{id}'"),
        Fault::BusNotFound { bus } => format!("Bus '{bus}' not found"),
        Fault::WrongBus { driver, bus_kind } => {
            format!("Device '{driver}' can't go on {bus_kind} bus")
        }
        Fault::SlotInUse { slot, driver, by } => {
            format!("PCI: slot {slot} function 0 not available for {driver}, in use by {by}")
        }
        Fault::BusFull { driver } => {
            format!("PCI: no slot/function available for {driver}, all in use or reserved")
        }
        Fault::BadValue {
            typename,
            property,
            value,
        } => format!("Property '{typename}.{property}' doesn't take value '{value}'"),
        Fault::ValueInUse {
            typename,
            property,
            value,
        } => format!("Property '{typename}.{property}' can't take value '{value}', it's in use"),
        Fault::ValueNotFound {
            typename,
            property,
            value,
        } => format!("Property '{typename}.{property}' can't find value '{value}'"),
        Fault::PropertyNotSet { typename, property } => {
            format!("{typename}: {property} property not set")
        }
        Fault::TooLong {
            typename,
            property,
            max,
        } => format!("Property '{typename}.{property}' takes at most {max} bytes"),
        Fault::NotUnpluggable { typename } => {
            format!("Device '{typename}' does not support hotplugging")
        }
        Fault::UnplugPending { id } => format!("Device {id} is already in the process of unplug"),
        Fault::Migrating { command } => format!("{command} not allowed while migrating"),
        Fault::MigrationRunning => "There's a migration process in progress".into(),
        Fault::BadMigrationUri => "Parameter 'uri' expects a valid migration protocol".into(),
        Fault::NoDeferredIncoming => "'-incoming' was not specified on the command line".into(),
        Fault::DowntimeLimit => {
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
                .into()
        }
        Fault::NotAnEnumValue { parameter, value } => {
            format!("Parameter '{parameter}' does not accept value '{value}'")
        }
        Fault::OpenFailed { path, reason } => format!("Could not open '{path}': {reason}"),
        Fault::WriteFailed { path, reason } => format!("Error writing '{path}': {reason}"),
        Fault::BadAddress {
            addr,
            size: Some(size),
        } => format!("Invalid addr {addr:#018x}/size {size} specified"),
        Fault::BadAddress { addr, size: None } => format!("Invalid addr {addr:#018x} specified"),
        Fault::NoSuchCpu { index } => format!("CPU {index} not found"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_errors_depend_on_the_command() {
        let amb = Error::Ambiguous {
            path: "serial".into(),
        };
        assert_eq!(
            from_qom(&amb, Context::Lookup),
            QmpError::device_not_found("serial")
        );
        assert_eq!(
            from_qom(&amb, Context::List).desc,
            "Path 'serial' is ambiguous"
        );
        let nf = Error::NotFound { path: "/x".into() };
        assert_eq!(from_qom(&nf, Context::List).class, DEVICE_NOT_FOUND);
        assert_eq!(
            from_qom(&nf, Context::ObjectDel).desc,
            "object '/x' not found"
        );
    }

    #[test]
    fn value_errors_read_like_qemus_visitor() {
        let e = Error::WrongType {
            name: "val".into(),
            expected: "an integer".into(),
            got: "string".into(),
            json_type: "integer",
        };
        assert_eq!(
            from_qom(&e, Context::Other).desc,
            "Invalid parameter type for 'val', expected: integer"
        );
        let e = Error::OutOfRange {
            name: "irq".into(),
            value: "300".into(),
            min: "0".into(),
            max: "255".into(),
            type_name: "uint8",
            full_range: true,
        };
        assert_eq!(
            from_qom(&e, Context::Other).desc,
            "Parameter 'irq' expects uint8"
        );
        let e = Error::WrongPhase {
            path: "/machine/peripheral/com2".into(),
            typename: "isa-serial".into(),
            property: "iobase".into(),
            policy: PhasePolicy::BeforeRealize,
            current: String::new(),
        };
        assert_eq!(
            from_qom(&e, Context::Lookup).desc,
            "Attempt to set property 'iobase' on device 'com2' (type 'isa-serial') after it was realized"
        );
    }

    #[test]
    fn failed_operations_read_as_qemus_texts_or_the_layers_own() {
        let op = |fault| {
            Error::Operation(qom::Operation::new(
                fault,
                std::io::Error::other("qomu's own words"),
            ))
        };
        for (fault, text) in [
            (
                Fault::DuplicateId { id: "d".into() },
                "Duplicate device ID 'd'",
            ),
            (
                Fault::SlotInUse {
                    slot: 3,
                    driver: "virtio-rng-pci".into(),
                    by: "virtio-rng-pci,id=r".into(),
                },
                "PCI: slot 3 function 0 not available for virtio-rng-pci, in use by virtio-rng-pci,id=r",
            ),
            (
                Fault::BadAddress {
                    addr: 0xf000_0000,
                    size: Some(16),
                },
                "Invalid addr 0x00000000f0000000/size 16 specified",
            ),
            (
                Fault::Migrating {
                    command: "device_add".into(),
                },
                "device_add not allowed while migrating",
            ),
            (Fault::WrongState, "qomu's own words"),
            (Fault::Failed, "qomu's own words"),
        ] {
            let e = from_qom(&op(fault), Context::Other);
            assert_eq!((e.class, e.desc.as_str()), (GENERIC_ERROR, text));
        }
    }
}
