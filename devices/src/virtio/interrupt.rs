//! How a virtio PCI function raises its interrupts, from its I/O thread or a vCPU: through
//! the MSI-X vector the driver chose once it has MSI-X on, else by setting the ISR's bit
//! (1: a queue, 2: the configuration) and asserting INTx until the driver reads the ISR.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, Ordering};

use parking_lot::Mutex;

use super::transport::{NO_VECTOR, Transport};
use crate::pci::config::COMMAND_INTX_DISABLE;
use crate::pci::{IntxLine, Msix, PciConfig};

/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the device's configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// The function's interrupt state, shared by the vCPU side and the I/O thread.
///
/// Lock order: `config`, then `msix`, then `intx`.
pub struct Signals {
    pub(crate) config: Mutex<PciConfig>,
    pub(crate) msix: Mutex<Msix>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    intx: Mutex<Option<Arc<IntxLine>>>,
}

impl Signals {
    pub fn new(config: PciConfig, msix: Msix, queues: usize) -> Self {
        Signals {
            config: Mutex::new(config),
            msix: Mutex::new(msix),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            intx: Mutex::new(None),
        }
    }

    /// Takes the driver's vector choices from the transport.
    pub fn follow(&self, t: &Transport) {
        self.config_vector
            .store(t.config_vector(), Ordering::Release);
        for (v, q) in self.queue_vectors.iter().zip(t.queues()) {
            v.store(q.vector, Ordering::Release);
        }
    }

    /// Queue `index` has used buffers the driver should look at.
    pub fn signal_queue(&self, index: usize) {
        let vector = self
            .queue_vectors
            .get(index)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.signal(ISR_QUEUE, vector);
    }

    /// The device's configuration changed (the transport's generation moved on).
    pub fn signal_config(&self) {
        self.signal(ISR_CONFIG, self.config_vector.load(Ordering::Acquire));
    }

    fn signal(&self, isr: u8, vector: u16) {
        let config = self.config.lock();
        let mut msix = self.msix.lock();
        if msix.enabled(&config) {
            // Without a vector the driver asked for no interrupt.
            if vector != NO_VECTOR {
                msix.signal(&config, vector);
            }
            return;
        }
        drop((msix, config));
        self.isr.fetch_or(isr, Ordering::AcqRel);
        self.set_intx(true);
    }

    /// The driver's read of the ISR: its bits, cleared, and INTx deasserted.
    pub fn read_isr(&self) -> u8 {
        let isr = self.isr.swap(0, Ordering::AcqRel);
        self.set_intx(false);
        isr
    }

    pub fn isr(&self) -> u8 {
        self.isr.load(Ordering::Acquire)
    }

    /// Puts the ISR back as a snapshot had it (INTx follows).
    pub fn restore_isr(&self, isr: u8) {
        self.isr.store(isr, Ordering::Release);
        self.set_intx(isr != 0);
    }

    /// INTx follows the ISR after the driver toggled INTx disable.
    pub fn intx_follows_isr(&self) {
        self.set_intx(self.isr() != 0);
    }

    /// Everything as after power-on, INTx deasserted.
    pub fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.set_intx(false);
    }

    pub fn set_intx_line(&self, line: Option<Arc<IntxLine>>) {
        *self.intx.lock() = line;
    }

    /// Times INTx was raised.
    pub fn intx_count(&self) -> u64 {
        self.intx.lock().as_ref().map_or(0, |l| l.count())
    }

    fn set_intx(&self, level: bool) {
        let enabled = self.config.lock().command() & COMMAND_INTX_DISABLE == 0;
        if let Some(line) = self.intx.lock().as_ref() {
            line.set(level && enabled);
        }
    }
}
