//! The machine: one KVM VM, its board devices, its run state, and `/machine` in the tree.
//! This file holds what the machine is made of and how it is built; what it does is in
//! its own files: run states and transitions (lifecycle.rs), creating the VM and loading
//! the guest (launch.rs), devices clients add and remove (peripherals.rs), reading the
//! guest (inspection.rs), what devices see of it (platform.rs), snapshot and restore
//! (migration.rs).
//!
//! # Threads and locks
//!
//! - Front ends call the machine's actions on their own threads; each action takes the
//!   machine lock (`Machine::state`) for the whole transition.
//! - What clients poll (the run state, the exit status, the error, the vCPUs' threads) is
//!   also published in `Machine::published` (status.rs) at every change, and read from
//!   there: a save or a restore holds the machine lock throughout, and `query-status` must
//!   not wait for it.
//! - `Machine::configuration` is held while the set of devices changes (`device_add`,
//!   `device_del`, a guest's eject) and by a save for as long as it runs, so a save sees one
//!   set of devices. It is taken before the machine lock, never after.
//! - vCPU threads never take the machine lock. What they cannot handle themselves (a
//!   device asking for a reset, a KVM internal error) they send to the machine's control
//!   thread, which acts on it like an action would. Device I/O runs on the devices' own
//!   threads, which take no machine lock either.
//! - Lock order: the machine lock, then a vCPU's control lock, then its fd lock. Qom
//!   notifiers may be emitted with the machine lock held (emitting takes no lock a front
//!   end holds while calling into the machine); type code of other objects is never called
//!   with it held.

use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use devices::ged::Ged;
use devices::pci::PciBus;
use devices::pci::hotplug::Hotplug;
use devices::{Bus, IrqLine, MachineRequest, PlatformRef, ShutdownCause};
use parking_lot::{Condvar, Mutex};
use qom::{Notifier, ObjectRef, Tree, Value};

use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::launch::Launched;
use crate::layout::{ECAM_BASE, PCI_MMIO_SIZE, PCI_MMIO_START};
use crate::qom_types;
use crate::runstate::RunState;
use crate::stats::Stats;
use crate::status::Published;
use crate::vcpu::{VcpuEvent, install_kick_handler};
use crate::vm::IoEvents;

/// The type of `/machine`.
pub const MACHINE_TYPE: &str = "qomu-x86-machine";

/// The `/machine` notifiers, QEMU's lifecycle events.
pub(crate) struct Notifiers {
    pub(crate) migration: Notifier,
    pub(crate) migration_pass: Notifier,
    pub(crate) stop: Notifier,
    pub(crate) resume: Notifier,
    pub(crate) reset: Notifier,
    pub(crate) shutdown: Notifier,
    pub(crate) powerdown: Notifier,
    pub(crate) device_deleted: Notifier,
}

/// What the machine lock guards.
pub(crate) struct State {
    pub(crate) run: RunState,
    pub(crate) launched: Option<Launched>,
    /// Set when the VMM should end, with its exit status.
    pub(crate) exit_status: Option<i32>,
}

/// A virtual machine and its object tree.
pub struct Machine {
    pub(crate) tree: Tree,
    pub(crate) object: ObjectRef,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) pci: Arc<PciBus>,
    /// The last (or current) migration, for query-migrate.
    pub(crate) migration: Mutex<crate::migration::Info>,
    /// Guest RAM once launched, for devices doing DMA (which must not take the machine
    /// lock).
    pub(crate) memory: OnceLock<GuestMemoryMmap>,
    /// KVM's ioeventfds once launched, for devices registering from vCPU threads.
    pub(crate) ioevents: OnceLock<IoEvents>,
    /// Held while deciding whether the demo guest gets its exit port (at its first start).
    pub(crate) demo_exit: Mutex<()>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) irq_lines: Mutex<Vec<Arc<IrqLine>>>,
    pub(crate) state: Mutex<State>,
    /// What clients poll, readable without the machine lock (status.rs).
    pub(crate) published: Published,
    pub(crate) changed: Condvar,
    pub(crate) events: Sender<VcpuEvent>,
    pub(crate) notifiers: Notifiers,
    pub(crate) ged: OnceLock<Arc<Ged>>,
    pub(crate) hotplug: OnceLock<Arc<Hotplug>>,
    /// Held while the set of devices changes (`device_add`, `device_del`, an eject) and by a
    /// save throughout; taken before the machine lock. Two unplug requests cannot both pass
    /// the check, no GED event shows the guest a request whose events have not gone out
    /// yet, and a save sees one set of devices.
    pub(crate) configuration: Mutex<()>,
    pub(crate) anon_devices: AtomicU64,
    /// `--incoming defer`: waiting for `migrate-incoming` (whether the guest then runs), or
    /// `Some(None)` once it came.
    pub(crate) deferred_incoming: Mutex<Option<Option<bool>>>,
    /// `migrate-set-parameters`' values.
    pub(crate) migration_params: Mutex<crate::migration::Params>,
    /// The `events` migration capability, as a client set it.
    pub(crate) events_capability: std::sync::atomic::AtomicBool,
    /// `migrate_cancel` asked the migration under way to stop.
    pub(crate) cancel_migration: std::sync::atomic::AtomicBool,
}

impl Machine {
    /// Builds the tree with `/machine` and the board devices for `config`, in `prelaunch`.
    /// Nothing runs until [`Machine::cont`].
    ///
    /// # Errors
    /// A bad configuration value, or a device of `config.devices` that cannot be created.
    pub fn new(config: &MachineConfig) -> Result<Arc<Machine>> {
        install_kick_handler().map_err(|source| Error::Host {
            what: "the vCPU kick signal handler",
            source,
        })?;
        let (events, receiver) = mpsc::channel();
        let mut failure = None;
        let mmio = Arc::new(Bus::new("mmio"));
        let pci = PciBus::new(mmio.clone(), (PCI_MMIO_START, PCI_MMIO_SIZE));
        let machine = Arc::new_cyclic(|weak: &Weak<Machine>| {
            let (tree, object, notifiers) = match build_tree(weak) {
                Ok(parts) => parts,
                Err(e) => {
                    failure = Some(e);
                    let tree = Tree::new();
                    let object = tree.root();
                    let n = object.notifier(qom::CHILD_ADDED).ok();
                    let n = n.unwrap_or_else(|| unreachable!("every object has child-added"));
                    let notifiers = Notifiers {
                        stop: n.clone(),
                        resume: n.clone(),
                        reset: n.clone(),
                        shutdown: n.clone(),
                        powerdown: n.clone(),
                        migration: n.clone(),
                        migration_pass: n.clone(),
                        device_deleted: n,
                    };
                    (tree, object, notifiers)
                }
            };
            Machine {
                tree,
                object,
                pio: Arc::new(Bus::new("pio")),
                migration: Mutex::new(crate::migration::Info::default()),
                mmio,
                pci,
                memory: OnceLock::new(),
                ioevents: OnceLock::new(),
                demo_exit: Mutex::new(()),
                stats: Arc::new(Stats::default()),
                irq_lines: Mutex::new(Vec::new()),
                state: Mutex::new(State {
                    run: RunState::Prelaunch,
                    launched: None,
                    exit_status: None,
                }),
                published: Published::default(),
                changed: Condvar::new(),
                events,
                notifiers,
                ged: OnceLock::new(),
                hotplug: OnceLock::new(),
                configuration: Mutex::new(()),
                anon_devices: AtomicU64::new(0),
                deferred_incoming: Mutex::new(None),
                migration_params: Mutex::new(crate::migration::Params::default()),
                events_capability: std::sync::atomic::AtomicBool::new(false),
                cancel_migration: std::sync::atomic::AtomicBool::new(false),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        spawn_control_thread(Arc::downgrade(&machine), receiver)?;
        machine.publish_state(RunState::Prelaunch, false);
        machine.configure(config)?;
        Ok(machine)
    }

    /// Applies the configuration: `/machine` properties, board devices, `--device`s.
    fn configure(&self, config: &MachineConfig) -> Result<()> {
        let o = &self.object;
        o.set("memory-size", Value::UInt(config.memory))?;
        o.set("cpus", Value::UInt(config.cpus.into()))?;
        if let Some(k) = &config.kernel {
            o.set("kernel", Value::Str(k.display().to_string()))?;
        }
        if let Some(i) = &config.initrd {
            o.set("initrd", Value::Str(i.display().to_string()))?;
        }
        o.set("append", Value::Str(config.append.clone()))?;
        if let Some(n) = &config.name {
            o.set("name", Value::Str(n.clone()))?;
        }
        o.set("no-shutdown", Value::Bool(config.no_shutdown))?;

        let board = "/machine/unattached";
        let text = |v: &str| Value::Str(v.to_owned());
        self.tree.create(
            board,
            "serial0",
            devices::serial::TYPE,
            vec![("backend".into(), text(&config.serial))],
        )?;
        self.tree
            .create(board, "i8042", devices::i8042::TYPE, vec![])?;
        self.tree.create(
            board,
            "rtc",
            devices::rtc::TYPE,
            vec![("base".into(), text(&config.rtc_base))],
        )?;
        self.tree
            .create(board, "post", devices::port80::TYPE, vec![])?;
        self.tree
            .create(board, "acpi-pm", devices::acpi_pm::TYPE, vec![])?;
        let ged = self.tree.create(board, "ged", devices::ged::TYPE, vec![])?;
        if let Some(g) = ged.instance::<Ged>() {
            let _ = self.ged.set(g);
        }
        self.tree.create(
            board,
            "pci-host",
            devices::pci::HOST_TYPE,
            vec![("ecam-base".into(), Value::UInt(ECAM_BASE))],
        )?;
        let hotplug =
            self.tree
                .create(board, "pci-hotplug", devices::pci::hotplug::TYPE, vec![])?;
        if let Some(h) = hotplug.instance::<Hotplug>() {
            let _ = self.hotplug.set(h);
        }
        for spec in &config.netdevs {
            self.netdev_from_spec(spec)?;
        }
        for spec in &config.objects {
            let class = self.tree.types().get(&spec.driver)?;
            let id = spec.id.as_deref().ok_or(Error::MissingId)?;
            self.tree
                .add_user_object(&spec.driver, id, spec_properties(&class, spec)?)?;
        }
        for spec in &config.devices {
            let class = self
                .tree
                .types()
                .get(&spec.driver)
                .map_err(|_| Error::NotADeviceType {
                    driver: spec.driver.clone(),
                })?;
            self.add_device(
                &spec.driver,
                spec.id.as_deref(),
                spec_properties(&class, spec)?,
            )?;
        }
        Ok(())
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// `/machine`.
    pub fn object(&self) -> &ObjectRef {
        &self.object
    }

    /// The run state (never waits for a transition, a save or a restore under way).
    pub fn run_state(&self) -> RunState {
        self.published.run()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The last internal error, if the machine stopped on one.
    pub fn error(&self) -> Option<String> {
        self.published.error().map(|e| e.to_string())
    }

    /// The exit status, once the VMM should end.
    pub fn exit_status(&self) -> Option<i32> {
        self.published.exit_status()
    }

    /// Blocks until the VMM should end; returns its exit status.
    pub fn wait_for_exit(&self) -> i32 {
        let mut st = self.state.lock();
        loop {
            if let Some(status) = st.exit_status {
                return status;
            }
            self.changed.wait(&mut st);
        }
    }

    /// As [`Machine::wait_for_exit`], giving up after `timeout`.
    pub fn wait_for_exit_timeout(&self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while st.exit_status.is_none() {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        st.exit_status
    }

    /// Waits until the run state is `state` (or the VMM should end); true if reached.
    pub fn wait_for_state(&self, state: RunState, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while st.run != state {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return false;
            }
        }
        true
    }

    /// Acts on what a vCPU (or a device on it) asked for, on the control thread.
    fn handle(&self, event: VcpuEvent) {
        match event {
            VcpuEvent::InternalError { cpu, reason } => self.internal_error(cpu, &reason),
            VcpuEvent::Request(MachineRequest::Reset(cause)) => {
                let _ = self.reset(cause);
            }
            VcpuEvent::Request(MachineRequest::Shutdown(cause)) => self.shutdown(cause, None),
            VcpuEvent::Request(MachineRequest::Exit(status)) => {
                self.shutdown(ShutdownCause::GuestShutdown, Some(status))
            }
            VcpuEvent::Request(MachineRequest::EjectPciSlot { slot, removal }) => {
                self.eject(slot, removal)
            }
        }
    }
}

/// The properties of a command-line spec (`--device`, `--object`), as `class` takes them.
pub(crate) fn spec_properties(
    class: &qom::Class,
    spec: &crate::config::DeviceSpec,
) -> Result<Vec<(String, Value)>> {
    Ok(class.coerce_all(
        spec.props
            .iter()
            .map(|(key, text)| (key.clone(), Value::Str(text.clone()))),
    )?)
}

/// An empty event payload.
pub(crate) fn empty() -> Value {
    Value::map::<&str>([])
}

fn spawn_control_thread(machine: Weak<Machine>, events: Receiver<VcpuEvent>) -> Result<()> {
    sandbox::spawn(sandbox::Class::Control, "qomu-control".into(), move || {
        while let Ok(event) = events.recv() {
            match machine.upgrade() {
                Some(m) => m.handle(event),
                None => return,
            }
        }
    })
    .map(drop)
    .map_err(|source| Error::Host {
        what: "the machine's control thread",
        source,
    })
}

fn build_tree(weak: &Weak<Machine>) -> Result<(Tree, ObjectRef, Notifiers)> {
    let builder = Tree::builder();
    let platform: PlatformRef = weak.clone();
    devices::register_types(&builder, &platform)?;
    qom_types::register(&builder, weak)?;
    let tree = builder.machine_type(MACHINE_TYPE).build()?;
    tree.create("/", "netdev", qom::CONTAINER, Vec::new())?;
    tree.create(
        "/machine",
        "migration",
        qom_types::MIGRATION_TYPE,
        Vec::new(),
    )?;
    let object = tree.lookup("/machine")?;
    let n = |name: &str| object.notifier(name);
    let notifiers = Notifiers {
        stop: n("STOP")?,
        resume: n("RESUME")?,
        reset: n("RESET")?,
        shutdown: n("SHUTDOWN")?,
        powerdown: n("POWERDOWN")?,
        migration: n("MIGRATION")?,
        migration_pass: n("MIGRATION_PASS")?,
        device_deleted: n("DEVICE_DELETED")?,
    };
    Ok((tree, object, notifiers))
}
