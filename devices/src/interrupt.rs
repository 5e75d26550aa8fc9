//! Interrupt lines: a GSI and an eventfd the machine registers with KVM as an irqfd.
//!
//! A device can be realized before the VM exists (in `prelaunch`); its line's eventfd is
//! registered once the VM is created, and a trigger before that is kept by the eventfd.

use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// One edge-triggered interrupt line.
#[derive(Debug)]
pub struct IrqLine {
    gsi: u32,
    event: EventFd,
    triggered: AtomicU64,
}

impl IrqLine {
    /// A line for `gsi` (non-blocking, so a trigger never blocks the emulating thread).
    ///
    /// # Errors
    /// The eventfd could not be created.
    pub fn new(gsi: u32) -> std::io::Result<Self> {
        Ok(IrqLine {
            gsi,
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            triggered: AtomicU64::new(0),
        })
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }

    /// Raises the interrupt.
    pub fn trigger(&self) {
        self.triggered.fetch_add(1, Ordering::Relaxed);
        // A full counter (2^64-2 pending triggers) cannot happen; nothing to do on error.
        let _ = self.event.write(1);
    }

    /// How many times the line was raised.
    pub fn count(&self) -> u64 {
        self.triggered.load(Ordering::Relaxed)
    }
}

/// A line as vm-superio's devices want it.
#[derive(Debug, Clone)]
pub struct LineTrigger(pub std::sync::Arc<IrqLine>);

impl vm_superio::Trigger for LineTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger();
        Ok(())
    }
}
