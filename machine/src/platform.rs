//! What the devices see of the machine: its buses, interrupt lines, guest memory, the
//! board's GED and hotplug controller, KVM's ioeventfds, and a way to ask for a reset or a
//! shutdown. Everything here is reached without the machine lock: devices call it from
//! vCPU threads and from their own I/O threads.

use std::sync::Arc;

use devices::GuestMemoryMmap;
use devices::ged::Ged;
use devices::pci::PciBus;
use devices::pci::hotplug::Hotplug;
use devices::{Bus, IrqLine, MachineRequest, Platform};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::IOAPIC_PINS;
use crate::machine::Machine;
use crate::vcpu::VcpuEvent;

impl Platform for Machine {
    fn pio_bus(&self) -> &Bus {
        &self.pio
    }

    fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    fn irq_line(&self, gsi: u32) -> devices::Result<Arc<IrqLine>> {
        if gsi >= IOAPIC_PINS {
            return Err(devices::Error::NoSuchInterrupt {
                gsi,
                pins: IOAPIC_PINS,
            });
        }
        let line = Arc::new(IrqLine::new(gsi).map_err(|source| devices::Error::Host {
            what: "make an interrupt line",
            source,
        })?);
        let st = self.state.lock();
        if let Some(l) = &st.launched {
            l.vm.register_irq(&line).map_err(|e| devices::Error::Host {
                what: "register an interrupt line with KVM",
                source: std::io::Error::other(e.to_string()),
            })?;
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

    fn ged(&self) -> Option<Arc<Ged>> {
        self.ged.get().cloned()
    }

    fn hotplug(&self) -> Option<Arc<Hotplug>> {
        self.hotplug.get().cloned()
    }

    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> devices::Result<bool> {
        let Some(ioevents) = self.ioevents.get() else {
            return Ok(false);
        };
        ioevents
            .register(fd, addr)
            .map(|()| true)
            .map_err(|e| devices::Error::Host {
                what: "register an ioeventfd",
                source: std::io::Error::other(e.to_string()),
            })
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) {
        if let Some(ioevents) = self.ioevents.get() {
            if DEFERRING.get() {
                ioevents.unregister_later(fd, addr);
            } else {
                ioevents.unregister(fd, addr);
            }
        }
    }
}

thread_local! {
    /// Set while [`deferring_ioevent_teardown`] runs on this thread.
    static DEFERRING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the ioeventfds it takes away put off until [`IoEvents::flush`]
/// (crate::vm::IoEvents): an unplug answers before KVM's grace period, not after.
pub(crate) fn deferring_ioevent_teardown<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            DEFERRING.set(self.0);
        }
    }
    let _reset = Reset(DEFERRING.replace(true));
    f()
}
