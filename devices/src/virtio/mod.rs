//! virtio over PCI, the modern (virtio 1.x) transport, with its queues served on each
//! device's own I/O thread.
//!
//! | file | what |
//! |---|---|
//! | [`transport`] | the common configuration's state machine: features, status, queue set-up, vectors, generation. Pure. |
//! | [`interrupt`] | how a device raises its interrupts: the ISR and INTx, or MSI-X; queue and configuration-change interrupts |
//! | [`worker`] | the I/O thread: waits on the queues' kick eventfds, serves their descriptor chains, pauses and stops on request |
//! | [`pci`] | the PCI function: configuration space and capabilities, the BAR's structures, ioeventfds on the notify region, activation and reset |
//! | [`state`] | the transport in a snapshot |
//! | [`qom`] | the abstract `virtio-device` type |
//! | [`blk`], [`net`], [`rng`] | the device models |
//!
//! A device model implements [`VirtioDevice`] (its features, its configuration structure)
//! and hands a [`QueueHandler`] to its I/O thread when the driver sets DRIVER_OK. No vCPU
//! runs device code: a queue notification is a KVM ioeventfd (or, before the VM exists, an
//! eventfd the exiting vCPU writes), the I/O thread serves the queue and raises the
//! interrupt through an irqfd (MSI-X) or the INTx line. A machine that stops, resets,
//! unplugs a device or saves it pauses the thread first ([`pci::VirtioPci`]).

pub mod blk;
pub mod interrupt;
pub mod net;
pub mod pci;
mod qom;
pub mod rng;
pub mod state;
pub mod transport;
pub mod worker;

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::DescriptorChain;

pub use self::pci::{VirtioEvents, VirtioPci};
pub(crate) use self::qom::base_type;
pub use self::qom::{VIRTIO_DEVICE, VirtioObject};

/// Device status bits (virtio-bindings' `VIRTIO_CONFIG_S_*`, as the status byte holds them).
pub const STATUS_ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub const STATUS_DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
pub const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

/// A feature bit as a mask.
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Transport feature bits every device offers.
pub const F_INDIRECT_DESC: u64 = feature(VIRTIO_RING_F_INDIRECT_DESC);
pub const F_EVENT_IDX: u64 = feature(VIRTIO_RING_F_EVENT_IDX);
pub const F_VERSION_1: u64 = feature(VIRTIO_F_VERSION_1);
/// What the transport itself offers on top of a model's features.
pub const TRANSPORT_FEATURES: u64 = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX;

/// Largest queue offered.
pub const QUEUE_MAX: u16 = 256;

/// What the PCI function shows of a model before it is configured: its virtio device ID
/// (virtio-bindings' `VIRTIO_ID_*`), PCI class code and number of queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub device_id: u16,
    pub class: u32,
    pub queues: usize,
}

/// A virtio device model: what the transport presents of it, and what serves its queues
/// once the driver has set it up. Its methods run on vCPU threads (configuration reads and
/// writes, DRIVER_OK, a reset), never while its queues are served.
pub trait VirtioDevice: Send + Sync {
    /// Device-specific feature bits offered.
    fn features(&self) -> u64 {
        0
    }
    /// The largest size of queue `queue` (a power of 2, at most 32768).
    fn queue_max(&self, _queue: usize) -> u16 {
        QUEUE_MAX
    }
    /// Reads the device-specific configuration structure at `offset`.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// A driver's write to the configuration structure.
    fn write_config(&self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK having accepted `features`: what serves the queues on the
    /// device's I/O thread from now on.
    fn activate(&self, features: u64) -> Box<dyn QueueHandler>;
    /// The driver reset the device (or the machine did).
    fn reset(&self) {}
}

/// A host descriptor a handler waits on besides the queues' kicks (a NIC's backend), and
/// for what; neither: not now (a receive path with no buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    pub fd: std::os::fd::RawFd,
    pub read: bool,
    pub write: bool,
}

/// Serves a device's queues, on its I/O thread.
///
/// Most queues are served chain by chain ([`QueueHandler::serve`]). A queue the device
/// fills when something happens on the host (a NIC's receive queue) says so in
/// [`QueueHandler::serves_chains`]: its kicks, which mean "buffers added", go to
/// [`QueueHandler::kicked`], and the host side to [`QueueHandler::source_ready`], both
/// with the queues at hand ([`worker::Io`]).
pub trait QueueHandler: Send {
    /// Serves one descriptor chain the driver made available on queue `queue`: the number
    /// of bytes written into its device-writable buffers (the used length). A chain that
    /// cannot be served (too short, unreadable) is answered with what could be written, 0
    /// if nothing: the device never stops for a bad chain.
    fn serve(
        &mut self,
        queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32;

    /// Whether queue `queue` is served chain by chain (the default), or by the handler.
    fn serves_chains(&self, _queue: usize) -> bool {
        true
    }

    /// The driver kicked queue `queue`, one the handler serves itself; also called when
    /// the thread starts or resumes, for buffers added meanwhile.
    fn kicked(&mut self, _queue: usize, _io: &mut worker::Io<'_>) {}

    /// What host descriptor to wait on now, if any; asked again after every call into
    /// the handler.
    fn interest(&self) -> Option<Interest> {
        None
    }

    /// The descriptor of [`QueueHandler::interest`] is ready for what was asked.
    fn source_ready(&mut self, _io: &mut worker::Io<'_>) {}
}
