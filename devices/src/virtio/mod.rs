//! virtio over PCI, the modern (virtio 1.x) transport: the common, ISR, device and notify
//! structures in one 64-bit memory BAR, described by vendor capabilities, with split
//! virtqueues from the virtio-queue crate. Device models plug in as a [`Backend`].
//!
//! Queues are processed on the vCPU thread that writes the notify register. Interrupts go
//! through MSI-X once the driver enables it (one vector for configuration changes, one
//! per queue, table and PBA in the same BAR), else through INTx (the ISR byte says why;
//! reading it lowers the line).
//!
//! A fifth capability, `VIRTIO_PCI_CAP_PCI_CFG`, is the window the spec asks every device
//! to offer: the driver writes a BAR, an offset and a length (1, 2 or 4) into it, and a
//! read or write of its `pci_cfg_data` field becomes that access to the BAR, for drivers
//! (firmware, early boot) that reach configuration space but not the BARs.
//!
//! The qom side: the abstract type `virtio-device` (a `pci-device`) with the transport's
//! state as properties and the `driver-ok` notifier; each model is a concrete subtype.

pub mod blk;
pub mod rng;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{Field, Kind, Notifier, NotifierDecl, ObjectRef, Property, TypeInfo, Value};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::bus::read_window;
use crate::device::instance;
use crate::pci::config::{COMMAND_INTX_DISABLE, Ids};
use crate::pci::{self, Bar, BarKind, IntxLine, Msix, PCI_DEVICE, PciConfig, PciDevice};
use crate::platform::{PlatformRef, upgrade};

/// The abstract qom type of virtio devices.
pub const VIRTIO_DEVICE: &str = "virtio-device";

const VENDOR: u16 = 0x1af4;
/// The BAR holding every structure, and its layout.
const BAR_INDEX: usize = 4;
/// The same, as a capability's `bar` field holds it.
const BAR: u8 = BAR_INDEX as u8;
const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CONFIG: u64 = 0x2000;
const DEVICE_CONFIG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
/// Largest queue offered.
pub const QUEUE_MAX: u16 = 256;
const NO_VECTOR: u16 = 0xffff;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Transport feature bits every device offers.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// ISR bits.
const ISR_QUEUE: u8 = 1;

/// Capability types (`cfg_type`).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Fields of the `VIRTIO_PCI_CAP_PCI_CFG` capability, from its start: `bar`, `offset`,
/// `length`, and the data window.
const CFG_BAR: usize = 4;
const CFG_OFFSET: usize = 8;
const CFG_LENGTH: usize = 12;
const CFG_DATA: usize = 16;
const PCI_CAP_VENDOR: u8 = 0x09;

/// A device model behind the transport.
pub trait Backend: Send + std::any::Any {
    /// The virtio device ID (4: entropy, 2: block).
    fn device_id(&self) -> u16;
    /// PCI class code (24 bits).
    fn class(&self) -> u32;
    /// Device-specific feature bits.
    fn features(&self) -> u64 {
        0
    }
    /// Number of virtqueues.
    fn queues(&self) -> usize;
    /// Takes what the model needs from its object's properties (files, backends) when
    /// the device is realized.
    ///
    /// # Errors
    /// A property names something unusable; the device is not created.
    fn realize(&mut self, _obj: &ObjectRef) -> qom::Result<()> {
        Ok(())
    }
    /// Lets go of what [`Backend::realize`] took.
    fn unrealize(&mut self) {}
    /// Reads the device-specific configuration structure.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Handles what the driver made available on queue `index`; true if any buffer was
    /// used (returned to the driver).
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// What the model shares with readers that must not wait for the transport's lock,
    /// which is held while a request is served (its counters): taken once, when the device
    /// is made, and reached with [`VirtioPci::published`].
    fn published(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        None
    }
}

/// The transport's registers.
struct Transport {
    backend: Box<dyn Backend>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<Queue>,
    isr: u8,
    generation: u8,
    /// MSI-X vectors the table has, and those the driver chose (NO_VECTOR: none).
    msix_vectors: u16,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

impl Transport {
    fn offered(&self) -> u64 {
        self.backend.features() | F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX
    }

    fn queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn reset(&mut self) {
        self.backend.reset();
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.isr = 0;
        self.config_vector = NO_VECTOR;
        self.queue_vectors.fill(NO_VECTOR);
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// A vector the driver asks for, or NO_VECTOR if the table has no such entry (the
    /// driver reads it back to learn that).
    fn vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors { v } else { NO_VECTOR }
    }
}

fn new_queues(n: usize) -> Vec<Queue> {
    (0..n)
        .map(|_| Queue::new(QUEUE_MAX).unwrap_or_else(|_| unreachable!("256 is a valid size")))
        .collect()
}

/// Counters shown as properties.
#[derive(Default)]
struct Counters {
    notifications: AtomicU64,
    used: AtomicU64,
}

/// The transport's status and the driver's features, published at every change so that
/// reading them never waits for the transport's lock, which a request being served holds.
#[derive(Default)]
struct PublishedTransport {
    status: std::sync::atomic::AtomicU8,
    driver_features: AtomicU64,
}

impl PublishedTransport {
    fn update(&self, t: &Transport) {
        self.status.store(t.status, Ordering::Release);
        self.driver_features
            .store(t.driver_features, Ordering::Release);
    }
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: Mutex<PciConfig>,
    /// Locked after `config`, never before.
    msix: Mutex<Msix>,
    transport: Mutex<Transport>,
    intx: Mutex<Option<Arc<IntxLine>>>,
    memory: OnceLock<GuestMemoryMmap>,
    platform: PlatformRef,
    driver_ok: Mutex<Option<Notifier>>,
    counters: Counters,
    transport_state: PublishedTransport,
    /// The features offered (fixed by the model).
    offered: u64,
    /// What the model publishes beside the transport ([`Backend::published`]).
    published: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// Where the `VIRTIO_PCI_CAP_PCI_CFG` capability starts in the configuration space.
    cfg_cap: usize,
}

fn capability(cfg_type: u8, bar: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length (after cap_vndr and cap_next).
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, bar, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPci {
    /// The device for `backend`, not yet plugged.
    pub fn new(backend: Box<dyn Backend>, platform: PlatformRef) -> Self {
        let mut config = PciConfig::new(Ids {
            vendor: VENDOR,
            device: 0x1040 + backend.device_id(),
            class: backend.class(),
            revision: 1,
            subsystem_vendor: VENDOR,
            subsystem: 0x1100,
        });
        config.add_bar(
            BAR_INDEX,
            Bar {
                size: BAR_SIZE,
                kind: BarKind::Memory64,
            },
        );
        let queues = backend.queues();
        config.add_capability(
            PCI_CAP_VENDOR,
            &capability(CAP_COMMON, BAR, COMMON, COMMON_LEN, &[]),
        );
        config.add_capability(PCI_CAP_VENDOR, &capability(CAP_ISR, BAR, ISR, 1, &[]));
        config.add_capability(
            PCI_CAP_VENDOR,
            &capability(CAP_DEVICE, BAR, DEVICE_CONFIG, DEVICE_CONFIG_LEN, &[]),
        );
        config.add_capability(
            PCI_CAP_VENDOR,
            &capability(
                CAP_NOTIFY,
                BAR,
                NOTIFY,
                u64::from(NOTIFY_MULTIPLIER) * queues as u64,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        );
        // The access window: bar, offset, length and data are the driver's to write. Its
        // `bar` starts as 0, which has nothing behind it: a driver must choose.
        let cfg_cap =
            config.add_capability(PCI_CAP_VENDOR, &capability(CAP_PCI_CFG, 0, 0, 0, &[0; 4]));
        config.set_writable(cfg_cap + CFG_BAR, &[0xff]);
        config.set_writable(cfg_cap + CFG_OFFSET, &[0xff; 12]);
        let vectors = queues as u16 + 1;
        let msix = Msix::new(
            &mut config,
            vectors,
            BAR_INDEX as u8,
            MSIX_TABLE as u32,
            MSIX_PBA as u32,
        );
        let published = backend.published();
        let offered = backend.features() | F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX;
        VirtioPci {
            config: Mutex::new(config),
            msix: Mutex::new(msix),
            transport: Mutex::new(Transport {
                backend,
                status: 0,
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                queue_select: 0,
                queues: new_queues(queues),
                isr: 0,
                generation: 0,
                msix_vectors: vectors,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; queues],
            }),
            intx: Mutex::new(None),
            memory: OnceLock::new(),
            platform,
            driver_ok: Mutex::new(None),
            counters: Counters::default(),
            transport_state: PublishedTransport::default(),
            offered,
            published,
            cfg_cap,
        }
    }

    /// What the model publishes ([`Backend::published`]), if it is a `T`. Takes no lock.
    ///
    /// # Errors
    /// The model publishes nothing, or no `T` (a type registered with the wrong model: a
    /// bug).
    pub fn published<T: Send + Sync + 'static>(&self) -> qom::Result<Arc<T>> {
        self.published
            .clone()
            .and_then(|p| p.downcast::<T>().ok())
            .ok_or_else(|| qom::Error::failed("the virtio device publishes no such state"))
    }

    /// Runs `f` on the device model, if it is a `T` (for the model's own properties).
    ///
    /// # Errors
    /// The model is not a `T` (a type registered with the wrong model: a bug).
    pub fn with_backend<T: Backend, R>(&self, f: impl FnOnce(&T) -> R) -> qom::Result<R> {
        let t = self.transport.lock();
        let any: &dyn std::any::Any = &*t.backend;
        any.downcast_ref::<T>()
            .map(f)
            .ok_or_else(|| qom::Error::failed("the virtio device has another model"))
    }

    fn memory(&self) -> Option<&GuestMemoryMmap> {
        if self.memory.get().is_none() {
            let mem = self.platform.upgrade()?.guest_memory()?;
            let _ = self.memory.set(mem);
        }
        self.memory.get()
    }

    fn set_intx(&self, level: bool) {
        let enabled = self.config.lock().command() & COMMAND_INTX_DISABLE == 0;
        if let Some(line) = self.intx.lock().as_ref() {
            line.set(level && enabled);
        }
    }

    fn read_common(&self, t: &Transport, offset: u64) -> (u64, u64) {
        let q = t.queue();
        let qu16 = |f: fn(&Queue) -> u16| q.map_or(0, f);
        match offset {
            0x00 => (0x00, u64::from(t.device_feature_select)),
            0x04 => (
                0x04,
                match t.device_feature_select {
                    0 => t.offered() & 0xffff_ffff,
                    1 => t.offered() >> 32,
                    _ => 0,
                },
            ),
            0x08 => (0x08, u64::from(t.driver_feature_select)),
            0x0c => (
                0x0c,
                match t.driver_feature_select {
                    0 => t.driver_features & 0xffff_ffff,
                    1 => t.driver_features >> 32,
                    _ => 0,
                },
            ),
            0x10 | 0x11 => (0x10, u64::from(t.config_vector)),
            0x12 | 0x13 => (0x12, t.queues.len() as u64),
            0x14 => (0x14, u64::from(t.status)),
            0x15 => (0x15, u64::from(t.generation)),
            0x16 | 0x17 => (0x16, u64::from(t.queue_select)),
            0x18 | 0x19 => (0x18, u64::from(qu16(|q| q.size()))),
            0x1a | 0x1b => (
                0x1a,
                u64::from(
                    t.queue_vectors
                        .get(usize::from(t.queue_select))
                        .copied()
                        .unwrap_or(NO_VECTOR),
                ),
            ),
            0x1c | 0x1d => (0x1c, u64::from(qu16(|q| u16::from(q.ready())))),
            0x1e | 0x1f => (
                0x1e,
                if q.is_some() {
                    u64::from(t.queue_select)
                } else {
                    0
                },
            ),
            0x20..=0x27 => (0x20, q.map_or(0, |q| q.desc_table())),
            0x28..=0x2f => (0x28, q.map_or(0, |q| q.avail_ring())),
            0x30..=0x37 => (0x30, q.map_or(0, |q| q.used_ring())),
            _ => (offset, 0),
        }
    }

    fn write_common(&self, t: &mut Transport, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let v = u64::from_le_bytes(bytes);
        let (low, high) = (v as u32, (v >> 32) as u32);
        match (offset, data.len()) {
            (0x00, 4) => t.device_feature_select = low,
            (0x08, 4) => t.driver_feature_select = low,
            (0x0c, 4) => {
                // Features are fixed once FEATURES_OK is set.
                if t.status & STATUS_FEATURES_OK == 0 {
                    match t.driver_feature_select {
                        0 => {
                            t.driver_features = (t.driver_features & !0xffff_ffff) | u64::from(low)
                        }
                        1 => {
                            t.driver_features =
                                (t.driver_features & 0xffff_ffff) | u64::from(low) << 32
                        }
                        _ => {}
                    }
                }
            }
            (0x10, 2) => t.config_vector = t.vector(low as u16),
            (0x1a, 2) => {
                let v = t.vector(low as u16);
                let select = usize::from(t.queue_select);
                if let Some(q) = t.queue_vectors.get_mut(select) {
                    *q = v;
                }
            }
            (0x14, 1) => self.write_status(t, low as u8),
            (0x16, 2) => t.queue_select = low as u16,
            (0x18, 2) => {
                let size = low as u16;
                if let Some(q) = t.queue_mut()
                    && !q.ready()
                    && size.is_power_of_two()
                    && size <= QUEUE_MAX
                {
                    q.set_size(size);
                }
            }
            (0x1c, 2) => {
                if low & 1 == 1 {
                    self.enable_queue(t);
                }
            }
            (0x20 | 0x28 | 0x30, 4 | 8) | (0x24 | 0x2c | 0x34, 4) => {
                let base = offset & !7;
                let (lo, hi) = match (offset & 4, data.len()) {
                    (0, 8) => (Some(low), Some(high)),
                    (0, _) => (Some(low), None),
                    _ => (None, Some(low)),
                };
                if let Some(q) = t.queue_mut()
                    && !q.ready()
                {
                    match base {
                        0x20 => q.set_desc_table_address(lo, hi),
                        0x28 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => tracing::debug!(
                "virtio: ignored common write at {offset:#x}, {} bytes",
                data.len()
            ),
        }
    }

    fn enable_queue(&self, t: &mut Transport) {
        let event_idx = t.driver_features & F_EVENT_IDX != 0;
        let Some(mem) = self.memory() else { return };
        if let Some(q) = t.queue_mut() {
            q.set_event_idx(event_idx);
            // The crate checks a queue only once it is marked ready.
            q.set_ready(true);
            if !q.is_valid(mem) {
                q.set_ready(false);
                tracing::warn!("virtio: the driver enabled a queue with bad addresses or size");
                t.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn write_status(&self, t: &mut Transport, status: u8) {
        if status == 0 {
            t.reset();
            if let Some(line) = self.intx.lock().as_ref() {
                line.set(false);
            }
            return;
        }
        let mut status = status;
        let newly = status & !t.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = t.offered();
            let acceptable =
                t.driver_features & !offered == 0 && t.driver_features & F_VERSION_1 != 0;
            if !acceptable {
                status &= !STATUS_FEATURES_OK;
            }
        }
        t.status = status;
        if newly & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK != 0 {
            let features = t.driver_features;
            if let Some(n) = self.driver_ok.lock().as_ref() {
                n.emit(|| Value::map([("features", Value::UInt(features))]));
            }
        }
    }

    fn notify(&self, index: usize) {
        self.counters.notifications.fetch_add(1, Ordering::Relaxed);
        let Some(mem) = self.memory() else { return };
        let mut t = self.transport.lock();
        if t.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        let Transport {
            backend, queues, ..
        } = &mut *t;
        let Some(q) = queues.get_mut(index).filter(|q| q.ready()) else {
            return;
        };
        // Served as a driver that suppresses notifications expects: while the device
        // works, none is asked for (without EVENT_IDX, the used ring's NO_NOTIFY flag);
        // after it, notifications are asked for again (with EVENT_IDX, by publishing the
        // next index the device will look at as `avail_event`, without which a Linux
        // driver stops notifying after its first request), and buffers the driver added
        // meanwhile, about which it may not notify, are served now. A round that serves
        // nothing ends it, so a broken ring cannot keep the vCPU here.
        let mut used = false;
        loop {
            let _ = q.disable_notification(mem);
            let served = backend.process(index, q, mem);
            used |= served;
            let more = q.enable_notification(mem).unwrap_or(false);
            if !(served && more) {
                break;
            }
        }
        if !used {
            return;
        }
        self.counters.used.fetch_add(1, Ordering::Relaxed);
        if !q.needs_notification(mem).unwrap_or(true) {
            return;
        }
        let vector = t.queue_vectors.get(index).copied().unwrap_or(NO_VECTOR);
        let config = self.config.lock();
        let mut msix = self.msix.lock();
        if msix.enabled(&config) {
            // Without a vector for the queue the driver asked for no interrupt.
            if vector != NO_VECTOR {
                msix.signal(&config, vector);
            }
            return;
        }
        drop((msix, config));
        t.isr |= ISR_QUEUE;
        drop(t);
        self.set_intx(true);
    }

    fn read_isr(&self) -> u8 {
        let isr = std::mem::take(&mut self.transport.lock().isr);
        self.set_intx(false);
        isr
    }

    /// The BAR access `VIRTIO_PCI_CAP_PCI_CFG` asks for when a configuration access of
    /// `len` bytes at `offset` reaches the first byte of its data field (as QEMU decides):
    /// the offset in the BAR and the length, or None if the window names no BAR of this
    /// device, a length other than 1, 2 or 4, or a range past the BAR's end (the access
    /// is then dropped and the data field left as it is).
    fn window(&self, offset: usize, len: usize) -> Option<(u64, usize)> {
        let data = self.cfg_cap + CFG_DATA;
        if !(offset..offset + len).contains(&data) {
            return None;
        }
        let config = self.config.lock();
        let mut bar = [0u8];
        config.read(self.cfg_cap + CFG_BAR, &mut bar);
        let at = u64::from(config.read_u32(self.cfg_cap + CFG_OFFSET));
        let length = config.read_u32(self.cfg_cap + CFG_LENGTH) as usize;
        let valid = usize::from(bar[0]) == BAR_INDEX
            && matches!(length, 1 | 2 | 4)
            && at + length as u64 <= BAR_SIZE;
        valid.then_some((at, length))
    }
}

/// A virtqueue in a snapshot: the driver's configuration and the device's ring positions.
#[derive(Serialize, Deserialize)]
struct SavedQueue {
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
}

/// The transport in a snapshot (the PCI configuration space is the `pci-device` level's).
#[derive(Serialize, Deserialize)]
struct SavedTransport {
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    isr: u8,
    generation: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    queues: Vec<SavedQueue>,
    msix_table: Vec<[u32; 4]>,
    msix_pending: u64,
}

impl VirtioPci {
    fn save(&self) -> SavedTransport {
        let t = self.transport.lock();
        let (msix_table, msix_pending) = self.msix.lock().snapshot();
        SavedTransport {
            status: t.status,
            device_feature_select: t.device_feature_select,
            driver_feature_select: t.driver_feature_select,
            driver_features: t.driver_features,
            queue_select: t.queue_select,
            isr: t.isr,
            generation: t.generation,
            config_vector: t.config_vector,
            queue_vectors: t.queue_vectors.clone(),
            queues: t
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    SavedQueue {
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                    }
                })
                .collect(),
            msix_table,
            msix_pending,
        }
    }

    /// Loads a saved transport; checks everything before changing anything.
    fn load(&self, saved: SavedTransport) -> Result<(), String> {
        let mut t = self.transport.lock();
        if saved.queues.len() != t.queues.len() || saved.queue_vectors.len() != t.queues.len() {
            return Err(format!(
                "the saved device has {} queues, this one {}",
                saved.queues.len(),
                t.queues.len()
            ));
        }
        let queues = saved
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Queue::try_from(QueueState {
                    max_size: QUEUE_MAX,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: q.event_idx,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                })
                .map_err(|e| format!("saved queue {i} is not valid: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.msix
            .lock()
            .restore(&saved.msix_table, saved.msix_pending)?;
        t.queues = queues;
        t.status = saved.status;
        t.device_feature_select = saved.device_feature_select;
        t.driver_feature_select = saved.driver_feature_select;
        t.driver_features = saved.driver_features;
        t.queue_select = saved.queue_select;
        t.isr = saved.isr;
        t.generation = saved.generation;
        t.config_vector = t.vector(saved.config_vector);
        t.queue_vectors = saved.queue_vectors.iter().map(|&v| t.vector(v)).collect();
        self.transport_state.update(&t);
        let pending = t.isr != 0;
        drop(t);
        self.set_intx(pending);
        Ok(())
    }
}

/// Answers a read at `offset` inside the register field starting at `field_start`.
fn put(value: u64, field_start: u64, offset: u64, data: &mut [u8]) {
    read_window(&value.to_le_bytes(), (offset - field_start) as usize, data);
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &Mutex<PciConfig> {
        &self.config
    }

    fn config_read(&self, offset: usize, data: &mut [u8]) {
        if let Some((at, len)) = self.window(offset, data.len()) {
            let mut bytes = [0u8; 4];
            self.bar_read(BAR_INDEX, at, &mut bytes[..len]);
            self.config
                .lock()
                .put_u32(self.cfg_cap + CFG_DATA, u32::from_le_bytes(bytes));
        }
        self.config.lock().read(offset, data);
    }

    fn config_write(&self, offset: usize, data: &[u8]) -> bool {
        let remap = {
            let mut config = self.config.lock();
            let remap = config.write(offset, data);
            // Clearing the function mask sends what waited.
            self.msix.lock().unmasked(&config);
            remap
        };
        if let Some((at, len)) = self.window(offset, data.len()) {
            let bytes = self
                .config
                .lock()
                .read_u32(self.cfg_cap + CFG_DATA)
                .to_le_bytes();
            self.bar_write(BAR_INDEX, at, &bytes[..len]);
        }
        // INTx disable toggled: the line follows.
        if remap {
            let pending = self.transport.lock().isr != 0;
            self.set_intx(pending);
        }
        remap
    }

    fn bar_read(&self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            COMMON..0x1000 if offset < COMMON_LEN => {
                let t = self.transport.lock();
                let (start, value) = self.read_common(&t, offset);
                put(value, start, offset, data);
            }
            ISR => {
                let isr = self.read_isr();
                put(u64::from(isr), ISR, offset, data);
            }
            DEVICE_CONFIG..NOTIFY => {
                self.transport
                    .lock()
                    .backend
                    .read_config(offset - DEVICE_CONFIG, data);
            }
            MSIX_TABLE..MSIX_PBA => self.msix.lock().table_read(offset - MSIX_TABLE, data),
            MSIX_PBA..BAR_SIZE => self.msix.lock().pba_read(offset - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            COMMON..0x1000 if offset < COMMON_LEN => {
                let mut t = self.transport.lock();
                self.write_common(&mut t, offset, data);
                self.transport_state.update(&t);
            }
            DEVICE_CONFIG..NOTIFY => {
                self.transport
                    .lock()
                    .backend
                    .write_config(offset - DEVICE_CONFIG, data);
            }
            NOTIFY..MSIX_TABLE => {
                let index = ((offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                self.notify(index);
            }
            MSIX_TABLE..MSIX_PBA => {
                let config = self.config.lock();
                self.msix
                    .lock()
                    .table_write(&config, offset - MSIX_TABLE, data);
            }
            _ => {}
        }
    }

    fn reset(&self) {
        self.config.lock().reset();
        self.msix.lock().reset();
        let mut t = self.transport.lock();
        t.reset();
        self.transport_state.update(&t);
        drop(t);
        self.set_intx(false);
    }
}

/// The abstract `virtio-device` type.
pub(crate) fn base_type(platform: &PlatformRef) -> TypeInfo {
    let (p_realize, p_unrealize) = (platform.clone(), platform.clone());
    let published_u64 = |name: &str, description: &str, read: fn(&VirtioPci) -> u64| {
        Property::new(name, Kind::uint64())
            .description(description)
            .getter(move |o| Ok(Value::UInt(read(&*instance::<VirtioPci>(o)?))))
    };
    let counter = |name: &str, description: &str, read: fn(&Counters) -> &AtomicU64| {
        Property::new(name, Kind::uint64())
            .description(description)
            .getter(move |o| {
                Ok(Value::UInt(
                    read(&instance::<VirtioPci>(o)?.counters).load(Ordering::Relaxed),
                ))
            })
    };
    TypeInfo::new(VIRTIO_DEVICE, PCI_DEVICE)
        .abstract_type()
        .description("A virtio device on PCI (virtio 1.x, modern transport)")
        .state(
            1,
            |o| crate::state::encode(o, &instance::<VirtioPci>(o)?.save()),
            |o, bytes| {
                instance::<VirtioPci>(o)?
                    .load(crate::state::decode(o, bytes)?)
                    .map_err(|e| qom::Error::failed(format!("{}: {e}", o.path())))
            },
        )
        .property(
            Property::new("status", Kind::uint8())
                .description("The device status the driver set (4: DRIVER_OK)")
                .getter(|o| {
                    let dev = instance::<VirtioPci>(o)?;
                    Ok(Value::UInt(
                        dev.transport_state.status.load(Ordering::Acquire).into(),
                    ))
                }),
        )
        .property(published_u64(
            "host-features",
            "Feature bits the device offers",
            |d| d.offered,
        ))
        .property(published_u64(
            "guest-features",
            "Feature bits the driver accepted",
            |d| d.transport_state.driver_features.load(Ordering::Acquire),
        ))
        .property(counter(
            "notifications",
            "Queue notifications from the driver",
            |c| &c.notifications,
        ))
        .property(counter(
            "used-batches",
            "Notifications that returned buffers to the driver",
            |c| &c.used,
        ))
        .property(
            Property::new("interrupts", Kind::uint64())
                .description("Times the device raised its interrupt")
                .getter(|o| {
                    let dev = instance::<VirtioPci>(o)?;
                    Ok(Value::UInt(
                        dev.intx.lock().as_ref().map_or(0, |l| l.count()),
                    ))
                }),
        )
        .property(
            Property::new("msix-messages", Kind::uint64())
                .description("MSI-X messages sent (interrupts while the driver has MSI-X on)")
                .getter(|o| {
                    Ok(Value::UInt(
                        instance::<VirtioPci>(o)?.msix.lock().messages(),
                    ))
                }),
        )
        .notifier(
            NotifierDecl::new(
                "driver-ok",
                Kind::structure(
                    "VirtioDriverOk",
                    vec![Field::new(
                        "features",
                        Kind::uint64(),
                        "The features the driver accepted",
                    )],
                ),
            )
            .description("The guest driver set DRIVER_OK: the device is in use"),
        )
        .realize(move |o| {
            let dev = instance::<VirtioPci>(o)?;
            *dev.driver_ok.lock() = Some(o.notifier("driver-ok")?);
            let platform = upgrade(&p_realize)?;
            dev.msix
                .lock()
                .connect(platform.pci_bus().msi())
                .map_err(|e| qom::Error::failed(format!("cannot create MSI-X vectors: {e}")))?;
            let undo = || {
                dev.msix.lock().disconnect();
                dev.transport.lock().backend.unrealize();
            };
            let realized = dev.transport.lock().backend.realize(o);
            realized.inspect_err(|_| undo())?;
            let slot = pci::plug(&p_realize, o, dev.clone()).inspect_err(|_| undo())?;
            let line = platform.pci_bus().intx_line(slot, 1);
            dev.config.lock().set_interrupt(1, line.gsi() as u8);
            *dev.intx.lock() = Some(line);
            Ok(())
        })
        .unrealize(move |o: &ObjectRef| {
            pci::unplug(&p_unrealize, o);
            if let Ok(dev) = instance::<VirtioPci>(o) {
                *dev.intx.lock() = None;
                *dev.driver_ok.lock() = None;
                dev.msix.lock().disconnect();
                dev.transport.lock().backend.unrealize();
            }
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Weak;

    use super::*;
    use crate::bus::Bus;
    use crate::interrupt::IrqLine;
    use crate::pci::PciBus;
    use crate::platform::{MachineRequest, Platform};
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress};

    /// The writes to a model's configuration structure: offset and bytes.
    type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// A model with two queues whose configuration structure reads as its offset.
    struct Model(Writes);

    impl Backend for Model {
        fn device_id(&self) -> u16 {
            2
        }
        fn class(&self) -> u32 {
            0x01_00_00
        }
        fn queues(&self) -> usize {
            2
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset as u8 + i as u8;
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().push((offset, data.to_vec()));
        }
        fn process(&mut self, _: usize, _: &mut Queue, _: &GuestMemoryMmap) -> bool {
            false
        }
    }

    /// A platform that is never reached: the device under test is not plugged.
    struct Unplugged;

    impl Platform for Unplugged {
        fn pio_bus(&self) -> &Bus {
            unreachable!("not plugged")
        }
        fn mmio_bus(&self) -> &Bus {
            unreachable!("not plugged")
        }
        fn irq_line(&self, _: u32) -> qom::Result<Arc<IrqLine>> {
            Err(qom::Error::failed("not plugged"))
        }
        fn request(&self, _: MachineRequest) {}
        fn pci_bus(&self) -> &Arc<PciBus> {
            unreachable!("not plugged")
        }
        fn guest_memory(&self) -> Option<GuestMemoryMmap> {
            None
        }
    }

    fn device() -> (VirtioPci, Writes) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let platform: PlatformRef = Weak::<Unplugged>::new();
        (
            VirtioPci::new(Box::new(Model(writes.clone())), platform),
            writes,
        )
    }

    fn read(dev: &VirtioPci, offset: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        dev.config_read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn write(dev: &VirtioPci, offset: usize, len: usize, v: u32) {
        dev.config_write(offset, &v.to_le_bytes()[..len]);
    }

    /// The `VIRTIO_PCI_CAP_PCI_CFG` capability, found as a driver finds it.
    fn window(dev: &VirtioPci) -> usize {
        let mut at = read(dev, 0x34, 1) as usize;
        while at != 0 {
            if read(dev, at, 1) == 0x09 && read(dev, at + 3, 1) == u32::from(CAP_PCI_CFG) {
                assert_eq!(read(dev, at + 2, 1), 20, "cap_len");
                return at;
            }
            at = read(dev, at + 1, 1) as usize;
        }
        panic!("no VIRTIO_PCI_CAP_PCI_CFG capability");
    }

    fn aim(dev: &VirtioPci, cap: usize, bar: u8, offset: u64, length: u32) {
        write(dev, cap + CFG_BAR, 1, bar.into());
        write(dev, cap + CFG_OFFSET, 4, offset as u32);
        write(dev, cap + CFG_LENGTH, 4, length);
    }

    fn bar(dev: &VirtioPci, offset: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        dev.bar_read(BAR_INDEX, offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    /// A one-queue model that uses every buffer offered, and plays a driver that offers
    /// `late` more buffers while the device is busy with its first round.
    struct Serve {
        late: u16,
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const QSIZE: u16 = 8;
    const VRING_DESC_F_WRITE: u16 = 2;
    const VRING_USED_F_NO_NOTIFY: u16 = 1;
    /// `avail_event`, after the used ring's flags, idx and QSIZE elements.
    const AVAIL_EVENT: u64 = USED + 4 + 8 * QSIZE as u64;

    impl Backend for Serve {
        fn device_id(&self) -> u16 {
            4
        }
        fn class(&self) -> u32 {
            0xff_00_00
        }
        fn queues(&self) -> usize {
            1
        }
        fn process(&mut self, _: usize, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
            let mut served = false;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                q.add_used(mem, chain.head_index(), 0).expect("used ring");
                served = true;
            }
            if std::mem::take(&mut self.late) > 0 {
                offer(mem, 1);
            }
            served
        }
    }

    fn read16(mem: &GuestMemoryMmap, at: u64) -> u16 {
        mem.read_obj(GuestAddress(at)).expect("guest memory")
    }

    /// The driver offers `n` more buffers (all descriptor 0) and does not notify.
    fn offer(mem: &GuestMemoryMmap, n: u16) {
        let idx = read16(mem, AVAIL + 2);
        for i in 0..n {
            let slot = u64::from(idx.wrapping_add(i) % QSIZE);
            mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
                .expect("avail ring");
        }
        mem.write_obj(idx.wrapping_add(n), GuestAddress(AVAIL + 2))
            .expect("avail idx");
    }

    /// A device whose driver has set up queue 0 as a virtio 1.x driver does, accepting
    /// EVENT_IDX or not, in 64 KiB of guest memory.
    fn serving(event_idx: bool, late: u16) -> (VirtioPci, GuestMemoryMmap) {
        let platform: PlatformRef = Weak::<Unplugged>::new();
        let dev = VirtioPci::new(Box::new(Serve { late }), platform);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        dev.memory.set(mem.clone()).expect("no memory yet");
        mem.write_obj(
            Descriptor::new(0x8000, 16, VRING_DESC_F_WRITE, 0),
            GuestAddress(DESC),
        )
        .expect("descriptor");
        let common = |offset: u64, data: &[u8]| dev.bar_write(BAR_INDEX, COMMON + offset, data);
        common(0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        let accepted = F_VERSION_1 | if event_idx { F_EVENT_IDX } else { 0 };
        for word in 0..2u32 {
            common(0x08, &word.to_le_bytes());
            common(0x0c, &((accepted >> (32 * word)) as u32).to_le_bytes());
        }
        common(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        common(0x16, &0u16.to_le_bytes());
        common(0x18, &QSIZE.to_le_bytes());
        for (offset, at) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            common(offset, &at.to_le_bytes());
        }
        common(0x1c, &1u16.to_le_bytes());
        common(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
        );
        assert_eq!(bar(&dev, COMMON + 0x1c, 2), 1, "queue enabled");
        (dev, mem)
    }

    fn kick(dev: &VirtioPci) {
        dev.bar_write(BAR_INDEX, NOTIFY, &0u16.to_le_bytes());
    }

    #[test]
    fn with_event_idx_the_device_asks_for_the_next_notification() {
        let (dev, mem) = serving(true, 0);
        offer(&mem, 1);
        kick(&dev);
        assert_eq!(read16(&mem, USED + 2), 1, "used");
        // A Linux driver notifies only when its new buffers pass `avail_event`: left at 0,
        // it would never notify again.
        assert_eq!(read16(&mem, AVAIL_EVENT), 1);
        offer(&mem, 2);
        kick(&dev);
        assert_eq!(read16(&mem, USED + 2), 3);
        assert_eq!(read16(&mem, AVAIL_EVENT), 3);
        assert_eq!(
            read16(&mem, USED),
            0,
            "the flags are not used with EVENT_IDX"
        );
    }

    #[test]
    fn without_event_idx_no_notify_is_clear_between_requests() {
        let (dev, mem) = serving(false, 0);
        mem.write_obj(VRING_USED_F_NO_NOTIFY, GuestAddress(USED))
            .expect("flags");
        offer(&mem, 1);
        kick(&dev);
        assert_eq!(read16(&mem, USED + 2), 1);
        assert_eq!(read16(&mem, USED), 0, "NO_NOTIFY only while serving");
        assert_eq!(read16(&mem, AVAIL_EVENT), 0, "avail_event untouched");
    }

    #[test]
    fn buffers_offered_while_serving_are_served_without_a_notification() {
        for event_idx in [true, false] {
            let (dev, mem) = serving(event_idx, 1);
            offer(&mem, 1);
            kick(&dev);
            assert_eq!(read16(&mem, USED + 2), 2, "event_idx {event_idx}");
            assert_eq!(dev.counters.notifications.load(Ordering::Relaxed), 1);
            if event_idx {
                assert_eq!(read16(&mem, AVAIL_EVENT), 2);
            }
        }
    }

    #[test]
    fn pci_cfg_window_reaches_every_structure_of_the_bar() {
        let (dev, writes) = device();
        let cap = window(&dev);
        let data = cap + CFG_DATA;
        // Fresh: no BAR chosen, so the data field stays as it is.
        assert_eq!(read(&dev, cap + CFG_BAR, 1), 0);
        assert_eq!(read(&dev, data, 4), 0);

        // Reads: number of queues (2 bytes), the feature word the select picks (4 bytes,
        // the select itself written through the window), the device structure (1 byte).
        aim(&dev, cap, BAR, COMMON + 0x12, 2);
        assert_eq!(read(&dev, data, 4), 2);
        aim(&dev, cap, BAR, COMMON, 4);
        write(&dev, data, 4, 1);
        assert_eq!(bar(&dev, COMMON, 4), 1, "device_feature_select written");
        aim(&dev, cap, BAR, COMMON + 0x04, 4);
        assert_eq!(read(&dev, data, 4), (F_VERSION_1 >> 32) as u32);
        aim(&dev, cap, BAR, DEVICE_CONFIG + 0x21, 1);
        assert_eq!(read(&dev, data, 1), 0x21);

        // Writes: status (1 byte), the device structure (2 bytes), an MSI-X table entry
        // (its write takes the configuration lock the window's write has let go of).
        aim(&dev, cap, BAR, COMMON + 0x14, 1);
        write(&dev, data, 1, u32::from(STATUS_ACKNOWLEDGE));
        assert_eq!(bar(&dev, COMMON + 0x14, 1), u32::from(STATUS_ACKNOWLEDGE));
        aim(&dev, cap, BAR, DEVICE_CONFIG + 6, 2);
        write(&dev, data, 4, 0xbeef_1234);
        assert_eq!(
            *writes.lock(),
            [(6, vec![0x34, 0x12])],
            "first `length` bytes"
        );
        aim(&dev, cap, BAR, MSIX_TABLE + 8, 4);
        write(&dev, data, 4, 0x41);
        assert_eq!(bar(&dev, MSIX_TABLE + 8, 4), 0x41);

        // Only an access reaching the data field's first byte goes through.
        aim(&dev, cap, BAR, COMMON + 0x14, 1);
        write(&dev, data + 2, 2, 0);
        assert_eq!(read(&dev, data + 2, 2), 0);
        assert_eq!(bar(&dev, COMMON + 0x14, 1), u32::from(STATUS_ACKNOWLEDGE));
    }

    #[test]
    fn pci_cfg_window_drops_what_names_nothing() {
        let (dev, writes) = device();
        let cap = window(&dev);
        let data = cap + CFG_DATA;
        aim(&dev, cap, BAR, DEVICE_CONFIG, 4);
        let mut held = 0x0302_0100;
        assert_eq!(read(&dev, data, 4), held);
        for (bar_index, offset, length) in [
            (0, DEVICE_CONFIG + 4, 4),     // a BAR the device does not have
            (BAR, DEVICE_CONFIG + 4, 3),   // a length other than 1, 2, 4
            (BAR, DEVICE_CONFIG + 4, 0),   //
            (BAR, BAR_SIZE - 2, 4),        // past the BAR's end
            (BAR, u64::from(u32::MAX), 4), //
        ] {
            aim(&dev, cap, bar_index, offset, length);
            // The field keeps what was last read or written into it.
            assert_eq!(read(&dev, data, 4), held, "{bar_index} {offset} {length}");
            held += 1;
            write(&dev, data, 4, held);
        }
        assert!(writes.lock().is_empty());
        // A reset puts the window back as built.
        PciDevice::reset(&dev);
        assert_eq!(read(&dev, cap + CFG_BAR, 1), 0);
        assert_eq!(read(&dev, cap + CFG_LENGTH, 4), 0);
        assert_eq!(read(&dev, data, 4), 0);
    }
}
