//! The machine: one KVM VM, its board devices, its run state, and `/machine` in the tree.
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
//!   thread, which acts on it like an action would.
//! - Lock order: the machine lock, then a vCPU's control lock, then its fd lock. Qom
//!   notifiers may be emitted with the machine lock held (emitting takes no lock a front
//!   end holds while calling into the machine); type code of other objects is never called
//!   with it held.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use devices::ged::EVENT_PCI_HOTPLUG;
use devices::ged::{EVENT_POWER_BUTTON, Ged};
use devices::pci::PciBus;
use devices::pci::hotplug::Hotplug;
use devices::{
    Bus, DEVICE, IrqLine, MachineRequest, Platform, PlatformRef, ShutdownCause, USER_DEVICE,
};
use kvm_bindings::kvm_lapic_state;
use parking_lot::{Condvar, Mutex};
use qom::{Error, Notifier, ObjectRef, Result, Tree, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::acpi;
use crate::boot::{self, BootConfig, BootEntry, KernelSource};
use crate::config::MachineConfig;
use crate::layout::{ECAM_BASE, IOAPIC_PINS, PCI_MMIO_SIZE, PCI_MMIO_START};
use crate::qom_types;
use crate::runstate::{RunState, valid_transition};
use crate::stats::Stats;
use crate::status::{Published, VcpuThread};
use crate::vcpu::{ExitContext, Vcpu, VcpuEvent, install_kick_handler};
use crate::vm::Vm;

/// The type of `/machine`.
pub const MACHINE_TYPE: &str = "qomu-x86-machine";

/// The `/machine` notifiers, QEMU's lifecycle events.
pub(crate) struct Notifiers {
    pub(crate) migration: Notifier,
    pub(crate) stop: Notifier,
    pub(crate) resume: Notifier,
    pub(crate) reset: Notifier,
    pub(crate) shutdown: Notifier,
    pub(crate) powerdown: Notifier,
    pub(crate) device_deleted: Notifier,
}

/// What exists once the machine has been launched.
pub(crate) struct Launched {
    pub(crate) vm: Vm,
    pub(crate) vcpus: Vec<Vcpu>,
    /// kvmclock as it was when the guest stopped, set back when it runs again, so that a
    /// guest sees (almost) no time pass while it is stopped, as under QEMU
    /// (hw/i386/kvm/clock.c). `None` while the guest runs.
    pub(crate) stopped_clock: Option<u64>,
    lapics: Vec<kvm_lapic_state>,
    boot: BootConfig,
    tables: acpi::Tables,
    entry: BootEntry,
}

impl Launched {
    /// Reads kvmclock as the guest stops (its vCPUs paused), unless it is stopped already.
    fn stop_clock(&mut self) {
        if self.stopped_clock.is_none() {
            match self.vm.clock_ns() {
                Ok(ns) => self.stopped_clock = Some(ns),
                Err(e) => tracing::warn!("kvmclock goes on while the guest is stopped: {e}"),
            }
        }
    }

    /// Sets kvmclock back to where it stopped, before the vCPUs run again, and tells each
    /// vCPU's guest that it was paused (KVM_KVMCLOCK_CTRL), so that its soft-lockup
    /// watchdog does not count the pause, as QEMU does.
    fn resume_clock(&mut self) {
        let Some(ns) = self.stopped_clock.take() else {
            return;
        };
        if let Err(e) = self.vm.set_clock_ns(ns) {
            tracing::warn!("kvmclock could not be set back after the stop: {e}");
        }
        for v in &self.vcpus {
            // EINVAL where the guest has not enabled kvmclock: nothing to tell it.
            if let Err(e) = v.fd().lock().kvmclock_ctrl() {
                tracing::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", v.index());
            }
        }
    }
}

pub(crate) struct State {
    pub(crate) run: RunState,
    pub(crate) launched: Option<Launched>,
    /// Set when the VMM should end, with its exit status.
    pub(crate) exit_status: Option<i32>,
}

/// A virtual machine and its object tree.
pub struct Machine {
    tree: Tree,
    object: ObjectRef,
    pio: Arc<Bus>,
    /// The last (or current) migration, for query-migrate.
    pub(crate) migration: Mutex<crate::migration::Info>,
    mmio: Arc<Bus>,
    pci: Arc<PciBus>,
    /// Guest RAM once launched, for devices doing DMA from vCPU threads (which must not
    /// take the machine lock).
    memory: OnceLock<GuestMemoryMmap>,
    stats: Arc<Stats>,
    irq_lines: Mutex<Vec<Arc<IrqLine>>>,
    pub(crate) state: Mutex<State>,
    /// What clients poll, readable without the machine lock (status.rs).
    pub(crate) published: Published,
    changed: Condvar,
    events: Sender<VcpuEvent>,
    pub(crate) notifiers: Notifiers,
    ged: OnceLock<Arc<Ged>>,
    hotplug: OnceLock<Arc<Hotplug>>,
    /// Held while the set of devices changes (`device_add`, `device_del`, an eject) and by a
    /// save throughout; taken before the machine lock. Two unplug requests cannot both pass
    /// the check, no GED event shows the guest a request whose events have not gone out
    /// yet, and a save sees one set of devices.
    pub(crate) configuration: Mutex<()>,
    anon_devices: AtomicU64,
}

fn failed(e: impl std::fmt::Display) -> Error {
    Error::Failed(e.to_string())
}

impl Machine {
    /// Builds the tree with `/machine` and the board devices for `config`, in `prelaunch`.
    /// Nothing runs until [`Machine::cont`].
    ///
    /// # Errors
    /// A bad configuration value, or a device of `config.devices` that cannot be created.
    pub fn new(config: &MachineConfig) -> Result<Arc<Machine>> {
        install_kick_handler()
            .map_err(|e| failed(format!("cannot install the vCPU kick signal handler: {e}")))?;
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
        if let Some(g) = ged.instance::<Ged>() {
            let _ = self.ged.set(g);
        }
        for spec in &config.objects {
            let class = self.tree.types().get(&spec.driver)?;
            let id = spec
                .id
                .as_deref()
                .ok_or_else(|| Error::InvalidState("Parameter 'id' is missing".into()))?;
            self.tree
                .add_user_object(&spec.driver, id, spec_properties(&class, spec)?)?;
        }
        for spec in &config.devices {
            let class = self
                .tree
                .types()
                .get(&spec.driver)
                .map_err(|_| device_type_error(&spec.driver))?;
            self.add_device(
                &spec.driver,
                spec.id.as_deref(),
                spec_properties(&class, spec)?,
            )?;
        }
        // The demo guest documents `exit N`, so give it the port it needs.
        let has_debug_exit = config
            .devices
            .iter()
            .any(|d| d.driver == devices::debug_exit::TYPE);
        if config.kernel.is_none() && !has_debug_exit {
            self.add_device(devices::debug_exit::TYPE, None, vec![])?;
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

    /// kvmclock now, in ns, as KVM_GET_CLOCK reads it: it stands still while the guest is
    /// stopped (docs/machine.md, "Run states").
    ///
    /// # Errors
    /// The machine has not started, or KVM refuses.
    pub fn guest_clock_ns(&self) -> Result<u64> {
        let st = self.state.lock();
        let l = st.launched.as_ref().ok_or_else(|| {
            Error::InvalidState("the machine has not started yet: its clock does not exist".into())
        })?;
        l.vm.clock_ns().map_err(failed)
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

    /// Tells the tree and subscribers about the run state.
    fn publish_state(&self, run: RunState, launched: bool) {
        self.published.set_run(run);
        let (name, config_open) = match (run, launched) {
            (RunState::Prelaunch, false) => ("prelaunch", true),
            (RunState::Prelaunch, true) => ("past its first start", false),
            (run, _) => (run.name(), false),
        };
        self.tree.set_machine_state(name, config_open);
        self.object
            .notify_property_changed("status", &Value::Enum(run.name().to_owned()));
        self.changed.notify_all();
    }

    pub(crate) fn transition(&self, st: &mut State, to: RunState) -> Result<()> {
        if !valid_transition(st.run, to) {
            return Err(Error::InvalidState(format!(
                "the machine cannot go from '{}' to '{}'",
                st.run, to
            )));
        }
        self.enter(st, to);
        Ok(())
    }

    /// Puts the machine in `to`: kvmclock stops as the guest does and goes on as it runs
    /// again (the vCPUs are paused when it is read, and still paused when it is set), and
    /// the state is published.
    fn enter(&self, st: &mut State, to: RunState) {
        if let Some(l) = st.launched.as_mut() {
            if to == RunState::Running {
                l.resume_clock();
            } else {
                l.stop_clock();
            }
        }
        st.run = to;
        self.publish_state(to, st.launched.is_some());
    }

    /// `cont`: start the guest (creating the VM on the first start) or resume it.
    ///
    /// # Errors
    /// The machine needs a reset first, or the VM cannot be created or the kernel loaded
    /// (the machine then stays in prelaunch, nothing changed).
    pub fn cont(&self) -> Result<()> {
        let newly_launched = {
            let mut st = self.state.lock();
            match st.run {
                RunState::Running => return Ok(()),
                // Postmigrate: a snapshot and go on (docs/snapshot.md).
                RunState::Prelaunch | RunState::Paused | RunState::Postmigrate => {}
                s if s.needs_reset() => {
                    return Err(Error::InvalidState(format!(
                        "the machine is in '{s}' and cannot go to 'running': reset it first (system_reset)"
                    )));
                }
                s => {
                    return Err(Error::InvalidState(format!(
                        "the machine cannot go from '{s}' to 'running'"
                    )));
                }
            }
            let newly = st.launched.is_none();
            if newly {
                st.launched = Some(self.launch()?);
            }
            self.run_guest(&mut st)?;
            newly
        };
        if newly_launched {
            self.create_cpu_objects();
        }
        Ok(())
    }

    /// Lets the guest run: RESUME, the `running` state, every vCPU going.
    pub(crate) fn run_guest(&self, st: &mut State) -> Result<()> {
        self.notifiers.resume.emit(empty);
        self.transition(st, RunState::Running)?;
        resume_all(st);
        Ok(())
    }

    /// `stop`: pause the guest.
    ///
    /// # Errors
    /// The machine is not running or paused.
    pub fn stop(&self) -> Result<()> {
        let mut st = self.state.lock();
        match st.run {
            RunState::Paused => Ok(()),
            RunState::Running => {
                pause_all(&st);
                self.transition(&mut st, RunState::Paused)?;
                self.notifiers.stop.emit(empty);
                Ok(())
            }
            s => Err(Error::InvalidState(format!(
                "the machine cannot go from '{s}' to 'paused'"
            ))),
        }
    }

    /// `system_reset` (or a guest reset): reload the guest and restart it. A running
    /// machine keeps running; a stopped one goes to prelaunch, as in QEMU.
    ///
    /// # Errors
    /// Reloading the guest failed (the machine then stops with an internal error).
    pub fn reset(&self, cause: ShutdownCause) -> Result<()> {
        let mut st = self.state.lock();
        if st.exit_status.is_some() {
            return Ok(());
        }
        pause_all(&st);
        self.pio.reset_all();
        self.mmio.reset_all();
        self.pci.reset();
        let Some(l) = &st.launched else {
            self.emit_reset(cause);
            return Ok(());
        };
        let was_running = st.run == RunState::Running;
        if let Err(e) = reload(l) {
            let reason = format!("reset failed: {e}");
            drop(st);
            self.internal_error(0, &reason);
            return Err(failed(reason));
        }
        self.emit_reset(cause);
        if was_running {
            resume_all(&st);
        } else if st.run != RunState::Prelaunch {
            self.published.set_error(None);
            self.transition(&mut st, RunState::Prelaunch)?;
        }
        Ok(())
    }

    fn emit_reset(&self, cause: ShutdownCause) {
        self.notifiers.reset.emit(|| guest_reason(cause));
    }

    /// `system_powerdown`: press the ACPI power button.
    pub fn powerdown(&self) {
        let _st = self.state.lock();
        self.notifiers.powerdown.emit(empty);
        if let Some(ged) = self.ged.get() {
            ged.raise(EVENT_POWER_BUTTON);
        }
    }

    /// `quit`: end the VMM (exit status 0).
    pub fn quit(&self) {
        self.shutdown(ShutdownCause::HostQmpQuit, Some(0));
    }

    /// Stops the guest for `cause`. The VMM then ends with `exit` (or 0), unless the guest
    /// itself shut down and `no-shutdown` is set: then the machine stays in `shutdown`.
    pub fn shutdown(&self, cause: ShutdownCause, exit: Option<i32>) {
        let mut st = self.state.lock();
        if st.exit_status.is_some() {
            return;
        }
        pause_all(&st);
        self.notifiers.shutdown.emit(|| guest_reason(cause));
        if st.run != RunState::Shutdown {
            self.enter(&mut st, RunState::Shutdown);
        }
        let keep = exit.is_none()
            && cause.is_guest()
            && self.object.get("no-shutdown").ok() == Some(Value::Bool(true));
        if keep {
            self.notifiers.stop.emit(empty);
        } else {
            let status = exit.unwrap_or(0);
            st.exit_status = Some(status);
            self.published.set_exit_status(status);
            self.changed.notify_all();
        }
    }

    /// A vCPU cannot go on: stop everything in `internal-error` with the reason recorded.
    fn internal_error(&self, cpu: u32, reason: &str) {
        let mut st = self.state.lock();
        if st.exit_status.is_some() || st.run == RunState::InternalError {
            return;
        }
        tracing::error!("vCPU {cpu}: {reason}; the machine stops in internal-error");
        pause_all(&st);
        self.published
            .set_error(Some(&format!("vCPU {cpu}: {reason}")));
        let was_live = matches!(st.run, RunState::Running | RunState::Paused);
        self.enter(&mut st, RunState::InternalError);
        if was_live {
            self.notifiers.stop.emit(empty);
        }
    }

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
            VcpuEvent::Request(MachineRequest::EjectPciSlot(slot)) => self.eject(slot),
        }
    }

    /// Creates the VM, loads the guest and starts the vCPU threads (paused).
    pub(crate) fn launch(&self) -> Result<Launched> {
        let get = |name: &str| self.object.get(name);
        let memory = get("memory-size")?.as_u64().unwrap_or(0);
        let cpus = get("cpus")?.as_u64().unwrap_or(1) as u32;
        let kernel = get("kernel")?.as_str().unwrap_or_default().to_owned();
        let initrd = get("initrd")?.as_str().unwrap_or_default().to_owned();
        let boot = BootConfig {
            kernel: if kernel.is_empty() {
                KernelSource::Builtin {
                    name: "demo",
                    image: qomu_guests::DEMO,
                }
            } else {
                KernelSource::File(PathBuf::from(kernel))
            },
            initrd: (!initrd.is_empty()).then(|| PathBuf::from(initrd)),
            cmdline: get("append")?.as_str().unwrap_or_default().to_owned(),
        };
        let vm = Vm::create(memory).map_err(failed)?;
        for line in self.irq_lines.lock().iter() {
            vm.register_irq(line).map_err(failed)?;
        }
        let tables = acpi::build(&acpi::Board {
            cpus,
            serials: self.serial_ports(),
        })
        .map_err(failed)?;
        let entry =
            boot::load(vm.memory(), vm.ram_size(), &boot, tables.rsdp_addr).map_err(failed)?;
        tables.write(vm.memory()).map_err(failed)?;
        let ctx = Arc::new(ExitContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            stats: self.stats.clone(),
            events: self.events.clone(),
        });
        let mut vcpus = Vec::new();
        let mut lapics = Vec::new();
        for index in 0..cpus {
            let (fd, lapic) = vm.create_vcpu(index, cpus).map_err(failed)?;
            vm.reset_vcpu(&fd, index, &lapic, entry).map_err(failed)?;
            vcpus.push(
                Vcpu::spawn(index, fd, ctx.clone())
                    .map_err(|e| failed(format!("cannot start vCPU thread: {e}")))?,
            );
            lapics.push(lapic);
        }
        // Last: the bus keeps the VM's fd, and a launch that failed must leave no VM behind
        // (its irqfds would keep the lines' eventfds from the next attempt's VM).
        self.pci.attach_irqchip(vm.irqchip());
        self.pci.msi().attach(vm.msi_chip());
        let _ = self.memory.set(vm.memory().clone());
        self.published.set_launched(
            vcpus
                .iter()
                .map(|v| VcpuThread {
                    index: v.index(),
                    thread_id: v.thread_id(),
                })
                .collect(),
        );
        Ok(Launched {
            vm,
            vcpus,
            stopped_clock: None,
            lapics,
            boot,
            tables,
            entry,
        })
    }

    /// (I/O base, IRQ) of every realized serial port, for the DSDT.
    fn serial_ports(&self) -> Vec<(u16, u8)> {
        let mut ports = Vec::new();
        for sub in [
            "/machine/unattached",
            "/machine/peripheral",
            "/machine/peripheral-anon",
        ] {
            let Ok(container) = self.tree.lookup(sub) else {
                continue;
            };
            for dev in container.children() {
                if dev.type_name() == devices::serial::TYPE && dev.is_realized() {
                    let base = dev.get("iobase").ok().and_then(|v| v.as_u64()).unwrap_or(0) as u16;
                    let irq = dev.get("irq").ok().and_then(|v| v.as_u64()).unwrap_or(0) as u8;
                    ports.push((base, irq));
                }
            }
        }
        ports.sort_unstable();
        ports
    }

    pub(crate) fn create_cpu_objects(&self) {
        let count = self
            .state
            .lock()
            .launched
            .as_ref()
            .map_or(0, |l| l.vcpus.len());
        for index in 0..count {
            let props = vec![("cpu-index".to_owned(), Value::UInt(index as u64))];
            if let Err(e) = self.tree.create(
                "/machine/unattached",
                &format!("cpu[{index}]"),
                qom_types::CPU_TYPE,
                props,
            ) {
                tracing::warn!("cannot add vCPU {index} to the tree: {e}");
            }
        }
    }

    /// Runs `f` with every vCPU paused (pausing them briefly if the guest runs; no event).
    fn with_vcpus_paused<T>(&self, f: impl FnOnce(&Launched) -> Result<T>) -> Result<T> {
        let st = self.state.lock();
        let Some(l) = &st.launched else {
            return Err(Error::InvalidState(
                "the machine has not started yet: its vCPUs and memory do not exist".into(),
            ));
        };
        let running = st.run == RunState::Running;
        if running {
            pause_all(&st);
        }
        let result = f(l);
        if running {
            resume_all(&st);
        }
        result
    }

    /// The host thread id of a vCPU, or -1.
    pub fn vcpu_thread_id(&self, index: u32) -> i64 {
        self.published
            .vcpus()
            .iter()
            .find(|v| v.index == index)
            .map_or(-1, |v| v.thread_id)
    }

    /// The registers of every vCPU, as `query-cpus` shows them.
    ///
    /// # Errors
    /// The machine has not started.
    pub fn query_cpus(&self) -> Result<Vec<Value>> {
        self.with_vcpus_paused(|l| {
            let mut out = Vec::new();
            for v in &l.vcpus {
                let fd = v.fd().lock();
                let regs = fd.get_regs().map_err(|e| {
                    failed(format!("vCPU {}: cannot read registers: {e}", v.index()))
                })?;
                let sregs = fd.get_sregs().map_err(|e| {
                    failed(format!("vCPU {}: cannot read registers: {e}", v.index()))
                })?;
                let r = [
                    ("rax", regs.rax),
                    ("rbx", regs.rbx),
                    ("rcx", regs.rcx),
                    ("rdx", regs.rdx),
                    ("rsi", regs.rsi),
                    ("rdi", regs.rdi),
                    ("rsp", regs.rsp),
                    ("rbp", regs.rbp),
                    ("r8", regs.r8),
                    ("r9", regs.r9),
                    ("r10", regs.r10),
                    ("r11", regs.r11),
                    ("r12", regs.r12),
                    ("r13", regs.r13),
                    ("r14", regs.r14),
                    ("r15", regs.r15),
                    ("rip", regs.rip),
                    ("rflags", regs.rflags),
                    ("cr0", sregs.cr0),
                    ("cr2", sregs.cr2),
                    ("cr3", sregs.cr3),
                    ("cr4", sregs.cr4),
                    ("efer", sregs.efer),
                ];
                out.push(Value::map([
                    ("cpu-index", Value::UInt(v.index().into())),
                    (
                        "qom-path",
                        Value::Str(format!("/machine/unattached/cpu[{}]", v.index())),
                    ),
                    ("thread-id", Value::Int(v.thread_id())),
                    ("registers", Value::map(r.map(|(n, v)| (n, Value::UInt(v))))),
                ]));
            }
            Ok(out)
        })
    }

    /// `pmemsave`: writes guest physical memory `[addr, addr+size)` to `path`.
    ///
    /// # Errors
    /// The range is not RAM, the file cannot be written, or the machine has not started.
    pub fn pmemsave(&self, addr: u64, size: u64, path: &Path) -> Result<()> {
        // Guest RAM is read without the machine lock: a large dump must not hold up
        // transitions or anything that waits for them.
        let mem = self.memory.get().ok_or_else(|| {
            Error::InvalidState("the machine has not started yet: its memory does not exist".into())
        })?;
        let invalid = || failed(format!("Invalid addr {addr:#018x}/size {size} specified"));
        let end = addr.checked_add(size).ok_or_else(invalid)?;
        let mut file = File::create(path)
            .map_err(|e| failed(format!("Could not open '{}': {e}", path.display())))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = addr;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            mem.read_slice(&mut buf[..n], GuestAddress(at))
                .map_err(|_| invalid())?;
            file.write_all(&buf[..n])
                .map_err(|e| failed(format!("Error writing '{}': {e}", path.display())))?;
            at += n as u64;
        }
        Ok(())
    }

    /// `memsave`: writes guest virtual memory `[addr, addr+size)` as vCPU `cpu` sees it.
    ///
    /// # Errors
    /// An address does not translate, the vCPU does not exist, or the file cannot be
    /// written.
    pub fn memsave(&self, addr: u64, size: u64, path: &Path, cpu: u32) -> Result<()> {
        let physical = self.with_vcpus_paused(|l| {
            let v = l
                .vcpus
                .get(cpu as usize)
                .ok_or_else(|| failed(format!("CPU {cpu} not found")))?;
            let fd = v.fd().lock();
            let end = addr
                .checked_add(size)
                .ok_or_else(|| failed(format!("Invalid addr {addr:#018x} specified")))?;
            let mut pieces = Vec::new();
            let mut at = addr;
            while at < end {
                let page_end = ((at | 0xfff) + 1).min(end);
                let t = fd
                    .translate_gva(at)
                    .map_err(|e| failed(format!("Invalid addr {at:#018x} specified: {e}")))?;
                if t.valid == 0 {
                    return Err(failed(format!("Invalid addr {at:#018x} specified")));
                }
                pieces.push((t.physical_address, page_end - at));
                at = page_end;
            }
            Ok(pieces)
        })?;
        let mem = self
            .memory
            .get()
            .ok_or_else(|| Error::InvalidState("the machine has not started yet".into()))?;
        let mut file = File::create(path)
            .map_err(|e| failed(format!("Could not open '{}': {e}", path.display())))?;
        for (phys, len) in physical {
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(phys))
                .map_err(|_| failed(format!("Invalid addr {phys:#018x} specified")))?;
            file.write_all(&buf)
                .map_err(|e| failed(format!("Error writing '{}': {e}", path.display())))?;
        }
        Ok(())
    }

    /// Adds a device (`--device`, `device_add`): `/machine/peripheral/<id>`, or
    /// `/machine/peripheral-anon/device[N]` without an id. Errors use QEMU's texts.
    ///
    /// # Errors
    /// Not a device type clients may add, a bad or taken id, a refused property, or the
    /// device cannot be hot-plugged into a machine that has started.
    pub fn add_device(
        &self,
        driver: &str,
        id: Option<&str>,
        props: Vec<(String, Value)>,
    ) -> Result<ObjectRef> {
        let class = self
            .tree
            .types()
            .get(driver)
            .map_err(|_| device_type_error(driver))?;
        if !class.implements(DEVICE) {
            return Err(device_type_error(driver));
        }
        if class.is_abstract() {
            return Err(Error::InvalidState(
                "Parameter 'driver' expects a non-abstract device type".into(),
            ));
        }
        let pci = class.implements(devices::pci::PCI_DEVICE);
        let hot = self.published.launched();
        if !class.implements(USER_DEVICE) || (hot && !pci) {
            return Err(Error::InvalidState(
                "Parameter 'driver' expects a pluggable device type".into(),
            ));
        }
        let _configuration = self.configuration_for("device_add")?;
        let (parent, name) = match id {
            Some(id) => {
                qom::path::check_id(id).map_err(|_| {
                    Error::InvalidState("Parameter 'id' expects an identifier".into())
                })?;
                ("/machine/peripheral", id.to_owned())
            }
            None => (
                "/machine/peripheral-anon",
                format!(
                    "device[{}]",
                    self.anon_devices.fetch_add(1, Ordering::Relaxed)
                ),
            ),
        };
        let dev = self
            .tree
            .create(parent, &name, driver, props)
            .map_err(|e| match e {
                Error::DuplicateName { name, .. } => {
                    Error::InvalidState(format!("Duplicate device ID '{name}'"))
                }
                e => e,
            })?;
        if pci {
            // `plugged` goes out before the guest is told, so that nothing the guest does
            // with the device (`driver-ok`) can reach a client before it.
            devices::pci::announce_plugged(&dev);
            // A running guest learns of it through the hotplug controller and the GED.
            let slot = dev.get("slot").ok().and_then(|v| v.as_u64());
            if let (true, Some(slot), Some(h), Some(ged)) =
                (hot, slot, self.hotplug.get(), self.ged.get())
            {
                h.added(slot as u8);
                ged.raise(EVENT_PCI_HOTPLUG);
            }
        }
        Ok(dev)
    }

    /// `device_add` from a front end: property values may be JSON values or, as QEMU's
    /// keyval parser allows, text ("0x2f8" for an integer).
    ///
    /// # Errors
    /// As [`Machine::add_device`]; a `bus` other than the PCI root bus `pci.0` (for PCI
    /// devices), which is where PCI devices go anyway.
    pub fn device_add(
        &self,
        driver: &str,
        id: Option<&str>,
        bus: Option<&str>,
        props: &Value,
    ) -> Result<ObjectRef> {
        let class = self
            .tree
            .types()
            .get(driver)
            .map_err(|_| device_type_error(driver))?;
        match bus {
            None => {}
            Some(devices::pci::ROOT_BUS) if class.implements(devices::pci::PCI_DEVICE) => {}
            Some(devices::pci::ROOT_BUS) => {
                return Err(Error::InvalidState(format!(
                    "Device '{driver}' can't go on PCI bus"
                )));
            }
            Some(bus) => return Err(Error::InvalidState(format!("Bus '{bus}' not found"))),
        }
        let values = class.coerce_all(
            props
                .as_map()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone())),
        )?;
        self.add_device(driver, id, values)
    }

    /// `device_del`: removes a device added by a client, by id or QOM path. Until the guest
    /// has started this deletes it at once (DEVICE_DELETED); afterwards the device must
    /// support hot-unplug.
    ///
    /// # Errors
    /// No such device (`Device 'x' not found`), or one that cannot be unplugged.
    pub fn device_del(&self, id: &str) -> Result<()> {
        let dev = if id.starts_with('/') {
            self.tree.lookup(id).ok()
        } else {
            self.tree
                .lookup("/machine/peripheral")
                .ok()
                .and_then(|p| p.child(id))
        };
        let dev = dev
            .filter(|d| d.class().implements(DEVICE))
            .ok_or_else(|| Error::NotFound {
                path: id.to_owned(),
            })?;
        let user_added = dev.parent().is_some_and(|p| {
            matches!(p.path(), "/machine/peripheral" | "/machine/peripheral-anon")
        });
        let pci = dev.class().implements(devices::pci::PCI_DEVICE);
        let hot = self.published.launched();
        if !user_added || (hot && !pci) {
            return Err(Error::InvalidState(format!(
                "Device '{}' does not support hotplugging",
                dev.type_name()
            )));
        }
        let _configuration = self.configuration_for("device_del")?;
        if !hot {
            return self.remove_device(&dev);
        }
        // Hot-unplug is a request: the device goes when the guest ejects it.
        let slot = dev.get("slot")?.as_u64().unwrap_or(0) as u8;
        let (Some(h), Some(ged)) = (self.hotplug.get(), self.ged.get()) else {
            return Err(failed("the machine has no hotplug controller"));
        };
        if h.removal_requested(slot) {
            return Err(Error::InvalidState(format!(
                "Device {} is already in the process of unplug",
                dev.name()
            )));
        }
        // Announced before the guest is told (the GED): nothing the guest does about it
        // (the eject, `unplugged`) can reach a client first.
        if let Ok(n) = dev.notifier("unplug-requested") {
            n.emit(empty);
        }
        h.request_removal(slot);
        dev.notify_property_changed("unplug-pending", &Value::Bool(true));
        ged.raise(EVENT_PCI_HOTPLUG);
        Ok(())
    }

    /// The configuration lock, for a change of the set of devices by `command`; refused
    /// while a save or a restore runs (QEMU's text), where waiting for it could take
    /// seconds.
    fn configuration_for(&self, command: &str) -> Result<parking_lot::MutexGuard<'_, ()>> {
        if self.migration_running() {
            return Err(failed(format!("{command} not allowed while migrating")));
        }
        Ok(self.configuration.lock())
    }

    /// The guest ejected `slot`: the device there goes, with `unplugged` and DEVICE_DELETED.
    fn eject(&self, slot: u8) {
        let _configuration = self.configuration.lock();
        let Some(h) = self.hotplug.get() else { return };
        if !h.removal_requested(slot) {
            return;
        }
        let path = self
            .pci
            .occupants()
            .into_iter()
            .find_map(|(s, path)| (s == slot).then_some(path));
        // The controller forgets the slot before DEVICE_DELETED goes out: a client that
        // plugs the slot again as soon as it reads the event must find it announced, not
        // cleared behind it.
        h.removed(slot);
        if let Some(dev) = path.and_then(|p| self.tree.lookup(&p).ok()) {
            if let Ok(n) = dev.notifier("unplugged") {
                n.emit(empty);
            }
            if let Err(e) = self.remove_device(&dev) {
                tracing::warn!("cannot remove {} after its eject: {e}", dev.path());
            }
        }
    }

    /// Deletes a device and announces DEVICE_DELETED.
    fn remove_device(&self, dev: &ObjectRef) -> Result<()> {
        let device = dev
            .path()
            .starts_with("/machine/peripheral/")
            .then(|| dev.name().to_owned());
        self.tree.delete_subtree(dev)?;
        self.notifiers.device_deleted.emit(|| {
            let mut fields = vec![("path", Value::Str(dev.path().to_owned()))];
            if let Some(d) = device {
                fields.push(("device", Value::Str(d)));
            }
            Value::map(fields)
        });
        Ok(())
    }

    /// `query-cpus-fast`: each vCPU's index, QOM path and host thread (once started). Never
    /// waits for the machine lock.
    pub fn query_cpus_fast(&self) -> Vec<Value> {
        self.published
            .vcpus()
            .iter()
            .map(|v| {
                Value::map([
                    ("cpu-index", Value::UInt(v.index.into())),
                    (
                        "qom-path",
                        Value::Str(format!("/machine/unattached/cpu[{}]", v.index)),
                    ),
                    ("thread-id", Value::Int(v.thread_id)),
                    ("target", Value::Enum("x86_64".into())),
                    (
                        "props",
                        Value::map([
                            ("socket-id", Value::Int(v.index.into())),
                            ("core-id", Value::Int(0)),
                            ("thread-id", Value::Int(0)),
                        ]),
                    ),
                ])
            })
            .collect()
    }
}

/// The properties of a command-line spec (`--device`, `--object`), as `class` takes them.
fn spec_properties(
    class: &qom::Class,
    spec: &crate::config::DeviceSpec,
) -> Result<Vec<(String, Value)>> {
    class.coerce_all(
        spec.props
            .iter()
            .map(|(key, text)| (key.clone(), Value::Str(text.clone()))),
    )
}

fn device_type_error(driver: &str) -> Error {
    Error::InvalidState(format!("'{driver}' is not a valid device model name"))
}

pub(crate) fn empty() -> Value {
    Value::map::<&str>([])
}

fn guest_reason(cause: ShutdownCause) -> Value {
    Value::map([
        ("guest", Value::Bool(cause.is_guest())),
        ("reason", Value::Enum(cause.name().to_owned())),
    ])
}

/// Pauses every vCPU and waits until they all are.
pub(crate) fn pause_all(st: &State) {
    if let Some(l) = &st.launched {
        for v in &l.vcpus {
            v.request_pause();
        }
        for v in &l.vcpus {
            v.wait_paused();
        }
    }
}

/// Lets every vCPU run again.
fn resume_all(st: &State) {
    if let Some(l) = &st.launched {
        for v in &l.vcpus {
            v.resume();
        }
    }
}

/// Puts the guest back where it started: images, tables, vCPUs, interrupt chips.
fn reload(l: &Launched) -> std::result::Result<(), String> {
    let entry = boot::load(l.vm.memory(), l.vm.ram_size(), &l.boot, l.tables.rsdp_addr)
        .map_err(|e| e.to_string())?;
    l.tables.write(l.vm.memory()).map_err(|e| e.to_string())?;
    l.vm.reset_chips().map_err(|e| e.to_string())?;
    for (v, lapic) in l.vcpus.iter().zip(&l.lapics) {
        l.vm.reset_vcpu(&v.fd().lock(), v.index(), lapic, entry)
            .map_err(|e| e.to_string())?;
    }
    debug_assert_eq!(entry, l.entry);
    Ok(())
}

fn spawn_control_thread(machine: Weak<Machine>, events: Receiver<VcpuEvent>) -> Result<()> {
    std::thread::Builder::new()
        .name("qomu-control".into())
        .spawn(move || {
            while let Ok(event) = events.recv() {
                match machine.upgrade() {
                    Some(m) => m.handle(event),
                    None => return,
                }
            }
        })
        .map(drop)
        .map_err(|e| failed(format!("cannot start the machine's control thread: {e}")))
}

fn build_tree(weak: &Weak<Machine>) -> Result<(Tree, ObjectRef, Notifiers)> {
    let builder = Tree::builder();
    let platform: PlatformRef = weak.clone();
    devices::register_types(&builder, &platform)?;
    qom_types::register(&builder, weak)?;
    let tree = builder.machine_type(MACHINE_TYPE).build()?;
    let object = tree.lookup("/machine")?;
    let n = |name: &str| object.notifier(name);
    let notifiers = Notifiers {
        stop: n("STOP")?,
        resume: n("RESUME")?,
        reset: n("RESET")?,
        shutdown: n("SHUTDOWN")?,
        powerdown: n("POWERDOWN")?,
        migration: n("MIGRATION")?,
        device_deleted: n("DEVICE_DELETED")?,
    };
    Ok((tree, object, notifiers))
}

impl Platform for Machine {
    fn pio_bus(&self) -> &Bus {
        &self.pio
    }

    fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<IrqLine>> {
        if gsi >= IOAPIC_PINS {
            return Err(failed(format!(
                "interrupt {gsi} does not exist (the IOAPIC has {IOAPIC_PINS} pins)"
            )));
        }
        let line = Arc::new(
            IrqLine::new(gsi)
                .map_err(|e| failed(format!("cannot create an interrupt line: {e}")))?,
        );
        let st = self.state.lock();
        if let Some(l) = &st.launched {
            l.vm.register_irq(&line).map_err(failed)?;
        }
        self.irq_lines.lock().push(line.clone());
        Ok(line)
    }

    fn request(&self, request: MachineRequest) {
        let _ = self.events.send(VcpuEvent::Request(request));
    }

    fn pci_bus(&self) -> &Arc<PciBus> {
        &self.pci
    }

    fn guest_memory(&self) -> Option<GuestMemoryMmap> {
        self.memory.get().cloned()
    }
}
