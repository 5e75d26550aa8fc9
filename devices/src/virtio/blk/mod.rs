//! `virtio-blk-pci`: a block device on a raw image file. Requests: read, write, flush and
//! get-id; anything else is answered UNSUPP. A request past the end of the image, a write
//! to a read-only device or a failed host I/O is answered IOERR and reported through
//! [`BlkEvents`] (the `io-error` notifier); the guest and the VMM go on.
//!
//! - [`request`]: the requests, parsed and executed against a [`request::Disk`];
//! - [`disk`]: the raw image;
//! - this file: the model the transport presents (features, configuration structure) and
//!   the handler serving its queue on the device's I/O thread;
//! - [`qom`]: the `virtio-blk-pci` type.

pub mod disk;
mod qom;
pub mod request;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::DescriptorChain;

pub use self::qom::TYPE;
pub(crate) use self::qom::register;
use self::request::{BlkStats, Disk, RequestError, SECTOR};
use super::{Identity, QUEUE_MAX, QueueHandler, VirtioDevice, feature};
use crate::bus::read_window;

pub const F_SEG_MAX: u64 = feature(VIRTIO_BLK_F_SEG_MAX);
pub const F_RO: u64 = feature(VIRTIO_BLK_F_RO);
pub const F_BLK_SIZE: u64 = feature(VIRTIO_BLK_F_BLK_SIZE);
pub const F_FLUSH: u64 = feature(VIRTIO_BLK_F_FLUSH);

/// What the PCI function shows: a mass-storage device with one request queue.
pub const IDENTITY: Identity = Identity {
    device_id: VIRTIO_ID_BLOCK as u16,
    class: 0x01_80_00,
    queues: 1,
};

/// What the device reports.
pub trait BlkEvents: Send + Sync {
    /// A request failed and was answered IOERR.
    fn io_error(&self, operation: &'static str, sector: u64, error: &RequestError);
}

/// The block device: its disk, serial, counters, and whom it tells of failures.
pub struct Blk {
    disk: Arc<dyn Disk>,
    serial: Vec<u8>,
    stats: Arc<BlkStats>,
    events: Arc<dyn BlkEvents>,
    /// Test only: how long each request waits before it is served, in milliseconds
    /// (`x-delay-ms`, which a client may change at any time).
    delay_ms: Arc<AtomicU64>,
}

impl Blk {
    pub fn new(
        disk: Arc<dyn Disk>,
        serial: Vec<u8>,
        stats: Arc<BlkStats>,
        events: Arc<dyn BlkEvents>,
        delay_ms: Arc<AtomicU64>,
    ) -> Self {
        stats.capacity.store(
            disk.sectors() * SECTOR,
            std::sync::atomic::Ordering::Relaxed,
        );
        Blk {
            disk,
            serial,
            stats,
            events,
            delay_ms,
        }
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        // Unrealized: no capacity any more.
        self.stats
            .capacity
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

impl VirtioDevice for Blk {
    fn features(&self) -> u64 {
        let ro = if self.disk.read_only() { F_RO } else { 0 };
        F_SEG_MAX | F_BLK_SIZE | F_FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64), size_max (u32), seg_max (u32), geometry (4 bytes), blk_size (u32).
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_MAX - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        read_window(&config, offset as usize, data);
    }

    fn activate(&self, _features: u64) -> Box<dyn QueueHandler> {
        Box::new(BlkHandler {
            disk: self.disk.clone(),
            serial: self.serial.clone(),
            stats: self.stats.clone(),
            events: self.events.clone(),
            delay_ms: self.delay_ms.clone(),
        })
    }
}

/// Serves the request queue, on the device's I/O thread.
struct BlkHandler {
    disk: Arc<dyn Disk>,
    serial: Vec<u8>,
    stats: Arc<BlkStats>,
    events: Arc<dyn BlkEvents>,
    delay_ms: Arc<AtomicU64>,
}

impl QueueHandler for BlkHandler {
    fn serve(
        &mut self,
        _queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let served = request::serve(chain, mem, &*self.disk, &self.serial, &self.stats);
        match (&served.result, served.request) {
            (Err(e), Some(r)) if e.is_failure() => {
                tracing::debug!("virtio-blk: {} at sector {}: {e}", r.kind.name(), r.sector);
                self.events.io_error(r.kind.name(), r.sector, e);
            }
            // A chain the guest built wrong (no header, no status byte): answered as far
            // as it can be, and not a host failure to report.
            (Err(e), None) => tracing::debug!("virtio-blk: a malformed request: {e}"),
            _ => {}
        }
        served.used
    }
}
