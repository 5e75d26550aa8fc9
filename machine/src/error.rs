//! The machine's errors: one enum, each variant a sentence in qomu's words with the facts
//! and the source behind it (KVM's, the loader's, the host's), and the [`qom::Fault`]
//! front ends are told (QMP words it as QEMU does; docs/object-model.md, "Errors").

use std::path::PathBuf;

use qom::Fault;

use crate::boot::BootError;
use crate::runstate::RunState;
use crate::snapshot::FormatError;
use crate::vm::VmError;

/// What a machine operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A thread the machine needs could not be started, or a signal handler installed.
    #[error("cannot start {what}: {source}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// KVM refused, or guest memory could not be made.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest (kernel, initrd, command line) cannot be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The ACPI tables cannot be built or written.
    #[error("cannot build the ACPI tables: {0}")]
    Acpi(String),
    /// A transition the run-state table does not have.
    #[error("the machine cannot go from '{from}' to '{to}'")]
    Transition { from: RunState, to: RunState },
    /// The guest cannot run again before a reset.
    #[error(
        "the machine is in '{state}' and cannot go to 'running': reset it first (system_reset)"
    )]
    NeedsReset { state: RunState },
    /// Only a started machine has this (`what`: "its memory does not exist").
    #[error("the machine has not started yet: {what}")]
    NotStarted { what: &'static str },
    /// Only a running or paused machine can be saved.
    #[error("the machine is in '{state}': only a running or paused machine can be saved")]
    NotSaveable { state: RunState },
    /// A snapshot loads only into a machine that has not started.
    #[error(
        "the machine is in '{state}': a snapshot loads only into a machine that has not started"
    )]
    NotRestorable { state: RunState },
    /// A reset failed to reload the guest (the machine stops in internal-error).
    #[error("reset failed: {0}")]
    Reset(Box<Error>),
    /// `driver` names no device type.
    #[error("there is no device type '{driver}'")]
    NotADeviceType { driver: String },
    #[error("'{driver}' is an abstract device type: name one of its subtypes")]
    AbstractDeviceType { driver: String },
    /// Clients may not add the device type (or not while the machine runs).
    #[error("{driver} cannot be added {}", if *.running { "to a running machine" } else { "by clients" })]
    NotPluggable { driver: String, running: bool },
    #[error("'{id}' is not an id: a letter, then letters, digits, '-', '.' or '_'")]
    InvalidId { id: String },
    #[error("an object needs an id")]
    MissingId,
    #[error("a device with id '{id}' exists already")]
    DuplicateId { id: String },
    #[error("there is no netdev type '{typename}'; the types are tap and stream")]
    NotANetdevType { typename: String },
    #[error("a netdev with id '{id}' exists already")]
    DuplicateNetdevId { id: String },
    /// query-rx-filter of a netdev (QEMU's words).
    #[error("net client({name}) isn't a NIC")]
    NotANic { name: String },
    /// query-rx-filter of nothing (QEMU's words).
    #[error("invalid net client name: {name}")]
    NoNetClient { name: String },
    #[error("--netdev {option}: {why}")]
    BadNetdevOption { option: String, why: &'static str },
    #[error("there is no bus '{bus}'; PCI devices go on pci.0")]
    BusNotFound { bus: String },
    #[error("{driver} is not a PCI device and cannot go on the PCI bus")]
    NotOnPci { driver: String },
    #[error("{typename} cannot be unplugged{}", if *.running { " from a running machine" } else { "" })]
    NotUnpluggable { typename: String, running: bool },
    #[error("the machine has no PCI hotplug controller")]
    NoHotplugController,
    /// The command must wait for a save or a restore to end.
    #[error("{command} cannot run while the machine is being saved or restored")]
    Migrating { command: String },
    #[error("a snapshot or migration is under way already")]
    MigrationRunning,
    #[error(
        "'{uri}' is not a migration URI qomu takes: file:PATH, unix:PATH, tcp:HOST:PORT, exec:COMMAND or fd:NAME"
    )]
    BadUri { uri: String },
    #[error("this qomu was not started with --incoming defer")]
    NotDeferred,
    #[error(
        "exec: migration runs a command, which the sandbox forbids: pass a descriptor instead (getfd, then fd:NAME), or run qomu with --sandbox off"
    )]
    SpawnForbidden,
    #[error("downtime-limit takes 0 to 2000000 ms")]
    DowntimeLimit,
    #[error("there is no migration capability '{name}'")]
    UnknownCapability { name: String },
    #[error("qomu does not do the migration capability '{name}'; only 'events' can be set")]
    UnsupportedCapability { name: String },
    #[error("the incoming migration has been started already")]
    IncomingStarted,
    #[error("file: needs a path (file:PATH)")]
    NoPath,
    /// A guest address range that is not all memory.
    #[error("guest memory has no {}", match .size { Some(s) => format!("{s} bytes at {:#x}", .addr), None => format!("address {:#x}", .addr) })]
    BadAddress { addr: u64, size: Option<u64> },
    #[error("there is no vCPU {index}")]
    NoSuchCpu { index: u32 },
    #[error("cannot open '{path}': {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write '{path}': {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot file that cannot be read (damaged, of another version).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A snapshot of another machine, or a section that does not load.
    #[error("{0}")]
    Snapshot(String),
    /// A dbus-vmstate helper failed.
    #[error("{0}")]
    Helper(String),
    /// A device refused.
    #[error(transparent)]
    Device(#[from] devices::Error),
    /// A tree operation refused (a property, a path): passed on as it is.
    #[error(transparent)]
    Tree(#[from] qom::Error),
}

/// Result alias of the machine.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// What front ends are told.
    pub fn fault(&self) -> Fault {
        match self {
            Error::NotADeviceType { driver } => Fault::NotADeviceType {
                driver: driver.clone(),
            },
            Error::AbstractDeviceType { driver } => Fault::AbstractDeviceType {
                driver: driver.clone(),
            },
            Error::NotPluggable { driver, .. } => Fault::NotPluggable {
                driver: driver.clone(),
            },
            Error::InvalidId { id } => Fault::InvalidId { id: id.clone() },
            Error::MissingId => Fault::MissingId,
            Error::DuplicateId { id } => Fault::DuplicateId { id: id.clone() },
            Error::NotANetdevType { typename } => Fault::NotANetdevType {
                typename: typename.clone(),
            },
            Error::DuplicateNetdevId { id } => Fault::DuplicateNetdevId { id: id.clone() },
            Error::BusNotFound { bus } => Fault::BusNotFound { bus: bus.clone() },
            Error::NotOnPci { driver } => Fault::WrongBus {
                driver: driver.clone(),
                bus_kind: "PCI".into(),
            },
            Error::NotUnpluggable { typename, .. } => Fault::NotUnpluggable {
                typename: typename.clone(),
            },
            Error::Migrating { command } => Fault::Migrating {
                command: command.clone(),
            },
            Error::MigrationRunning => Fault::MigrationRunning,
            Error::BadUri { .. } => Fault::BadMigrationUri,
            Error::NotDeferred => Fault::NoDeferredIncoming,
            Error::DowntimeLimit => Fault::DowntimeLimit,
            Error::UnknownCapability { name } => Fault::NotAnEnumValue {
                parameter: "capability".into(),
                value: name.clone(),
            },
            Error::BadAddress { addr, size } => Fault::BadAddress {
                addr: *addr,
                size: *size,
            },
            Error::NoSuchCpu { index } => Fault::NoSuchCpu { index: *index },
            Error::Open { path, source } => Fault::OpenFailed {
                path: path.display().to_string(),
                reason: source.to_string(),
            },
            Error::Write { path, source } => Fault::WriteFailed {
                path: path.display().to_string(),
                reason: source.to_string(),
            },
            Error::Device(e) => e.fault(),
            Error::Transition { .. }
            | Error::NeedsReset { .. }
            | Error::NotStarted { .. }
            | Error::NotSaveable { .. }
            | Error::NotRestorable { .. } => Fault::WrongState,
            _ => Fault::Failed,
        }
    }
}

impl From<Error> for qom::Error {
    fn from(e: Error) -> qom::Error {
        match e {
            Error::Tree(e) => e,
            e => qom::Error::Operation(qom::Operation::new(e.fault(), e)),
        }
    }
}
