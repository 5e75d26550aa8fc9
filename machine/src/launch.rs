//! Launching: at the first `cont` (or a restore) the VM is created with the configuration
//! `/machine` holds then, the guest and the ACPI tables are loaded, and the vCPU threads
//! start, paused. What exists from then on is a [`Launched`]; a reset reloads it.

use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::kvm_lapic_state;
use qom::Value;

use crate::acpi;
use crate::boot::{self, BootConfig, BootEntry, KernelSource};
use crate::error::{Error, Result};
use crate::machine::Machine;
use crate::qom_types;
use crate::status::VcpuThread;
use crate::vcpu::{ExitContext, Vcpu};
use crate::vm::Vm;

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
    pub(crate) fn stop_clock(&mut self) {
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
    pub(crate) fn resume_clock(&mut self) {
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

impl Machine {
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
        let vm = Vm::create(memory)?;
        for line in self.irq_lines.lock().iter() {
            vm.register_irq(line)?;
        }
        let tables = acpi::build(&acpi::Board {
            cpus,
            serials: self.serial_ports(),
        })
        .map_err(Error::Acpi)?;
        let entry = boot::load(vm.memory(), vm.ram_size(), &boot, tables.rsdp_addr)?;
        tables
            .write(vm.memory())
            .map_err(|e| Error::Acpi(e.to_string()))?;
        let ctx = Arc::new(ExitContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            stats: self.stats.clone(),
            events: self.events.clone(),
        });
        let mut vcpus = Vec::new();
        let mut lapics = Vec::new();
        let mut tsc_khz = Vec::new();
        for index in 0..cpus {
            let (fd, lapic) = vm.create_vcpu(index, cpus)?;
            tsc_khz.push(fd.get_tsc_khz().unwrap_or(0));
            vm.reset_vcpu(&fd, index, &lapic, entry)?;
            vcpus.push(
                Vcpu::spawn(index, fd, ctx.clone()).map_err(|source| Error::Host {
                    what: "a vCPU thread",
                    source,
                })?,
            );
            lapics.push(lapic);
        }
        // Last: the bus keeps the VM's fd, and a launch that failed must leave no VM behind
        // (its irqfds would keep the lines' eventfds from the next attempt's VM).
        self.pci.attach_irqchip(vm.irqchip());
        self.pci.msi().attach(vm.msi_chip());
        let _ = self.memory.set(vm.memory().clone());
        let _ = self.ioevents.set(vm.ioevents());
        self.pci.announce_bars();
        self.published.set_launched(
            vcpus
                .iter()
                .zip(tsc_khz)
                .map(|(v, tsc_khz)| VcpuThread {
                    index: v.index(),
                    thread_id: v.thread_id(),
                    tsc_khz,
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

    /// `/machine/unattached/cpu[N]`, once the vCPUs exist.
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
}

/// Puts the guest back where it started: images, tables, vCPUs, interrupt chips.
pub(crate) fn reload(l: &Launched) -> Result<()> {
    let entry = boot::load(l.vm.memory(), l.vm.ram_size(), &l.boot, l.tables.rsdp_addr)?;
    l.tables
        .write(l.vm.memory())
        .map_err(|e| Error::Acpi(e.to_string()))?;
    l.vm.reset_chips()?;
    for (v, lapic) in l.vcpus.iter().zip(&l.lapics) {
        l.vm.reset_vcpu(&v.fd().lock(), v.index(), lapic, entry)?;
    }
    debug_assert_eq!(entry, l.entry);
    Ok(())
}
