//! `machine`: the KVM virtual machine, boot, ACPI, run states and snapshots. The `qomu`
//! command is the `qomu` crate, which adds the QMP and D-Bus front ends.
//!
//! [`Machine::new`] builds the object tree (`/machine` of type `qomu-x86-machine` with the
//! board devices under `/machine/unattached`) in `prelaunch`; [`Machine::cont`] creates the
//! VM, loads the guest and runs it. Everything a front end can do goes through `/machine`'s
//! qom actions and properties.
//!
//! ```no_run
//! use machine::{Machine, MachineConfig};
//!
//! let config = MachineConfig { serial: "stdio".into(), ..MachineConfig::default() };
//! let machine = Machine::new(&config)?; // the bundled demo guest
//! machine.cont()?;
//! std::process::exit(machine.wait_for_exit());
//! # Ok::<(), qom::Error>(())
//! ```

pub mod acpi;
pub mod boot;
pub mod config;
pub mod dbus_vmstate;
pub mod error;
mod inspection;
mod launch;
pub mod layout;
mod lifecycle;
mod machine;
mod migration;
pub mod migration_uri;
mod netdevs;
mod peripherals;
mod platform;
mod precopy;
mod qom_types;
pub mod runstate;
pub mod snapshot;
mod stats;
mod status;
mod vcpu;
mod vm;

pub use config::{DeviceSpec, MachineConfig};

/// Opens `/dev/kvm` now for the VM the first `cont` creates: call it before dropping
/// privileges or locking the sandbox down. A failure is reported at that `cont`.
pub fn preopen_kvm() {
    vm::Vm::preopen();
}
pub use devices::ShutdownCause;
pub use error::{Error, Result};
pub use machine::{MACHINE_TYPE, Machine};
pub use qom_types::CPU_TYPE;
pub use runstate::RunState;
