//! A virtio PCI function in a snapshot: the transport's state as the driver set it up, where
//! each queue's device side stands, the ISR, and the MSI-X table and pending bits. (The PCI
//! configuration space is the `pci-device` level's; what the model derives from its
//! properties, such as a disk's capacity, is not saved.)

use serde::{Deserialize, Serialize};

use super::transport::Transport;

/// Where a queue's device side stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

/// The function's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVirtio {
    pub transport: Transport,
    /// One per queue; all zero until the driver set DRIVER_OK.
    pub positions: Vec<QueuePosition>,
    pub isr: u8,
    pub msix_table: Vec<[u32; 4]>,
    pub msix_pending: u64,
}
