//! The devices' errors: one enum, each variant a sentence in qomu's words with the facts
//! and the host error behind it, and the [`qom::Fault`] front ends are told (QMP words it
//! as QEMU does; docs/object-model.md, "Errors").

use qom::Fault;

/// What a device operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bus range that is empty or wraps around.
    #[error("{bus} range {base:#x}+{len:#x} is empty or wraps around")]
    EmptyRange {
        bus: &'static str,
        base: u64,
        len: u64,
    },
    /// A bus range another device claimed.
    #[error(
        "{bus} range {base:#x}-{last:#x} overlaps {other_base:#x}-{other_last:#x} of '{owner}'"
    )]
    RangeTaken {
        bus: &'static str,
        base: u64,
        last: u64,
        other_base: u64,
        other_last: u64,
        owner: String,
    },
    /// An interrupt line past the IOAPIC's pins.
    #[error("interrupt {gsi} does not exist (the IOAPIC has {pins} pins)")]
    NoSuchInterrupt { gsi: u32, pins: u32 },
    /// An eventfd, irqfd or ioeventfd the host refused.
    #[error("cannot {what}: {source}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The machine went away (it is shutting down).
    #[error("the machine is shutting down")]
    MachineGone,
    /// A file a device was given cannot be opened.
    #[error("cannot open '{path}': {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// An image that is not a regular file.
    #[error("cannot use '{path}': not a regular file")]
    NotAFile { path: String },
    /// A property the device needs was left empty.
    #[error("{typename} needs its '{property}' property set")]
    PropertyNotSet {
        typename: String,
        property: &'static str,
    },
    /// A text property longer than the device takes.
    #[error("{typename}'s '{property}' takes at most {max} bytes")]
    TooLong {
        typename: String,
        property: &'static str,
        max: usize,
    },
    /// A property value the device does not take.
    #[error("{typename}'s '{property}' does not take '{value}': {why}")]
    BadValue {
        typename: String,
        property: &'static str,
        value: String,
        why: &'static str,
    },
    /// A link to an object of the wrong kind.
    #[error("'{path}' is not {what}")]
    NotA { path: String, what: &'static str },
    /// Two serial ports asked for the terminal.
    #[error("another serial port already uses stdio")]
    StdioTaken,
    /// The PCI slot asked for is taken.
    #[error("PCI slot {slot} is taken by {by}; {driver} cannot go there")]
    SlotInUse {
        slot: u8,
        driver: String,
        by: String,
    },
    /// A function other than 0 (qomu's devices are single-function).
    #[error(
        "PCI: function {function} of slot {slot} is not available: qomu's devices are single-function"
    )]
    FunctionUnavailable { slot: u8, function: u8 },
    /// Every PCI slot is taken.
    #[error("every PCI slot is taken; there is none for {driver}")]
    BusFull { driver: String },
    /// The device is not on the PCI bus (a bug: saved or loaded while unplugged).
    #[error("{path} is not on the PCI bus")]
    NotPlugged { path: String },
    /// A snapshot of a device in another slot.
    #[error("{path} was in PCI slot {saved} when saved and is in slot {here} here")]
    MovedSlot { path: String, saved: u8, here: u8 },
    /// An unplug of the device in this slot is under way already.
    #[error("the device in slot {slot} ({id}) is being unplugged already")]
    UnplugPending { slot: u8, id: String },
    /// The device is not on the root bus, so it cannot be hot-unplugged.
    #[error("{path} is not on a hotplug slot")]
    NotHotpluggable { path: String },
    /// A device's state in a snapshot that cannot be encoded or decoded.
    #[error("{path}: its saved state does not fit ({why})")]
    State { path: String, why: String },
    /// The device cannot start serving its queues (its I/O thread, its eventfds).
    #[error("{path}: cannot start its I/O thread: {source}")]
    IoThread {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The device is not realized, so it has nothing to do this with.
    #[error("{path} is not realized")]
    NotRealized { path: String },
    /// A NIC's netdev is used by another NIC.
    #[error("{typename}'s netdev '{id}' is used by {nic}")]
    NetdevInUse {
        typename: String,
        id: String,
        nic: String,
    },
    /// A NIC's netdev does not exist.
    #[error("{typename}'s netdev '{id}' does not exist (netdev_add it first)")]
    NoSuchNetdev { typename: String, id: String },
    /// A network backend cannot be opened or does not take an option.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

/// Result alias of the devices.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// What front ends are told.
    pub fn fault(&self) -> Fault {
        match self {
            Error::Open { path, source } => Fault::OpenFailed {
                path: path.clone(),
                reason: source.to_string(),
            },
            Error::NotAFile { path } => Fault::OpenFailed {
                path: path.clone(),
                reason: "not a regular file".into(),
            },
            Error::PropertyNotSet { typename, property } => Fault::PropertyNotSet {
                typename: typename.clone(),
                property: (*property).into(),
            },
            Error::TooLong {
                typename,
                property,
                max,
            } => Fault::TooLong {
                typename: typename.clone(),
                property: (*property).into(),
                max: *max,
            },
            Error::BadValue {
                typename,
                property,
                value,
                ..
            } => Fault::BadValue {
                typename: typename.clone(),
                property: (*property).into(),
                value: value.clone(),
            },
            Error::SlotInUse { slot, driver, by } => Fault::SlotInUse {
                slot: *slot,
                driver: driver.clone(),
                by: by.clone(),
            },
            Error::BusFull { driver } => Fault::BusFull {
                driver: driver.clone(),
            },
            Error::UnplugPending { id, .. } => Fault::UnplugPending { id: id.clone() },
            Error::NetdevInUse { typename, id, .. } => Fault::ValueInUse {
                typename: typename.clone(),
                property: "netdev".into(),
                value: id.clone(),
            },
            Error::NoSuchNetdev { typename, id } => Fault::ValueNotFound {
                typename: typename.clone(),
                property: "netdev".into(),
                value: id.clone(),
            },
            Error::NotRealized { .. } | Error::MachineGone => Fault::WrongState,
            _ => Fault::Failed,
        }
    }
}

impl From<Error> for qom::Error {
    fn from(e: Error) -> qom::Error {
        qom::Error::Operation(qom::Operation::new(e.fault(), e))
    }
}
