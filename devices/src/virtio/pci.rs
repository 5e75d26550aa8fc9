//! The virtio PCI function: vendor 1af4, device 0x1040 + the virtio ID, one 64-bit memory
//! BAR (BAR 4, 32 KiB) holding the common configuration (0x0), ISR (0x1000), device
//! configuration (0x2000) and notification (0x3000, multiplier 4) structures, each
//! described by a vendor capability, and the MSI-X table (0x4000) and PBA (0x5000).
//!
//! A fifth capability, `VIRTIO_PCI_CAP_PCI_CFG`, is the window the spec asks every device
//! to offer: the driver writes a BAR, an offset and a length (1, 2 or 4) into it, and a
//! read or write of its `pci_cfg_data` field becomes that access to the BAR, for drivers
//! (firmware, early boot) that reach configuration space but not the BARs.
//!
//! Notifications: each queue has a kick eventfd, registered with KVM as an ioeventfd on
//! its notify address whenever the BAR is mapped and the VM exists; a notify write that
//! still exits (before the VM exists, or where KVM has no ioeventfd) signals the same
//! eventfd. Either way the device's I/O thread ([`super::worker`]) serves the queue.
//!
//! The capability structure offsets and `cfg_type` values are written here: virtio-bindings
//! 0.2 does not carry `virtio_pci.h`.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::GuestMemoryMmap;
use parking_lot::Mutex;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::interrupt::Signals;
use super::state::{QueuePosition, SavedVirtio};
use super::transport::{COMMON_LEN, Effect, QueueConfig, Transport};
use super::worker::{Counters, Job, Worker};
use super::{F_EVENT_IDX, Identity, QUEUE_MAX, STATUS_DRIVER_OK, VirtioDevice};
use crate::bus::read_window;
use crate::pci::config::Ids;
use crate::pci::{Bar, BarKind, Msix, PciConfig, PciDevice};
use crate::platform::PlatformRef;

const VENDOR: u16 = 0x1af4;
/// The BAR holding every structure, and its layout.
pub const BAR_INDEX: usize = 4;
/// The same, as a capability's `bar` field holds it.
const BAR: u8 = BAR_INDEX as u8;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON: u64 = 0x0000;
pub const ISR: u64 = 0x1000;
pub const DEVICE_CONFIG: u64 = 0x2000;
const DEVICE_CONFIG_LEN: u64 = 0x1000;
pub const NOTIFY: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x5000;

/// Capability types (`cfg_type`, virtio 1.x 4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
pub const CAP_PCI_CFG: u8 = 5;
/// Fields of the `VIRTIO_PCI_CAP_PCI_CFG` capability, from its start: `bar`, `offset`,
/// `length`, and the data window.
pub const CFG_BAR: usize = 4;
pub const CFG_OFFSET: usize = 8;
pub const CFG_LENGTH: usize = 12;
pub const CFG_DATA: usize = 16;
const PCI_CAP_VENDOR: u8 = 0x09;

/// What the function tells its owner (the qom face turns it into notifiers).
pub trait VirtioEvents: Send + Sync {
    /// The driver set DRIVER_OK having accepted `features`: the device is in use.
    fn driver_ok(&self, features: u64);
}

/// The transport's status and the driver's features, published at every change so that
/// reading them never waits for the function's lock.
#[derive(Default)]
struct Published {
    status: AtomicU8,
    driver_features: AtomicU64,
}

/// What is behind the function's lock.
struct Inner {
    transport: Transport,
    model: Option<Arc<dyn VirtioDevice>>,
    /// The I/O thread, while the driver has the device running.
    worker: Option<Worker>,
    /// The notify region's guest address, while its ioeventfds are registered.
    ioevents_at: Option<u64>,
    events: Option<Arc<dyn VirtioEvents>>,
    /// How the I/O thread is named (after the object, once realized).
    name: String,
}

/// A virtio device on PCI.
pub struct VirtioPci {
    identity: Identity,
    platform: PlatformRef,
    signals: Arc<Signals>,
    inner: Mutex<Inner>,
    kicks: Vec<Arc<EventFd>>,
    counters: Arc<Counters>,
    published: Published,
    /// Whether notifications go through KVM ioeventfds (QEMU's `ioeventfd` property).
    use_ioeventfd: AtomicBool,
    /// Where the `VIRTIO_PCI_CAP_PCI_CFG` capability starts in the configuration space.
    cfg_cap: usize,
    /// Guest RAM, fetched from the platform on first use.
    memory: OnceLock<GuestMemoryMmap>,
}

fn capability(cfg_type: u8, bar: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length (after cap_vndr and cap_next).
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, bar, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// Answers a read at `offset` inside the register field starting at `field_start`.
fn put(value: u64, field_start: u64, offset: u64, data: &mut [u8]) {
    read_window(&value.to_le_bytes(), (offset - field_start) as usize, data);
}

impl VirtioPci {
    /// The function for a model of `identity`, not yet plugged and with no model
    /// installed ([`VirtioPci::install`]).
    ///
    /// # Errors
    /// The kick eventfds cannot be made.
    pub fn new(identity: Identity, platform: PlatformRef) -> crate::Result<Self> {
        let mut config = PciConfig::new(Ids {
            vendor: VENDOR,
            device: 0x1040 + identity.device_id,
            class: identity.class,
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
        let queues = identity.queues;
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
        let kicks = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| crate::Error::Host {
                what: "make a queue's kick eventfd",
                source,
            })?;
        Ok(VirtioPci {
            identity,
            platform,
            signals: Arc::new(Signals::new(config, msix, queues)),
            inner: Mutex::new(Inner {
                transport: Transport::new(queues, QUEUE_MAX, vectors),
                model: None,
                worker: None,
                ioevents_at: None,
                events: None,
                name: "virtio-io".into(),
            }),
            kicks,
            counters: Arc::new(Counters::default()),
            published: Published::default(),
            use_ioeventfd: AtomicBool::new(true),
            cfg_cap,
            memory: OnceLock::new(),
        })
    }

    /// The model the device presents from now on (at realize, once its properties are
    /// known), the events it reports to, the name of its I/O thread, and whether its
    /// notifications use KVM ioeventfds (off: every notify write exits to the vCPU, which
    /// signals the I/O thread; slower, for comparison and for hosts without them).
    pub fn install(
        &self,
        model: Arc<dyn VirtioDevice>,
        events: Arc<dyn VirtioEvents>,
        thread_name: String,
        ioeventfd: bool,
    ) {
        self.use_ioeventfd.store(ioeventfd, Ordering::Release);
        let mut inner = self.inner.lock();
        inner.transport.offer(model.features());
        inner.transport.set_queue_maxes(
            (0..self.identity.queues)
                .map(|i| model.queue_max(i))
                .collect(),
        );
        inner.model = Some(model);
        inner.events = Some(events);
        inner.name = thread_name;
    }

    /// Stops the I/O thread and drops the model (at unrealize).
    pub fn uninstall(&self) {
        let worker = {
            let mut inner = self.inner.lock();
            inner.model = None;
            inner.events = None;
            inner.worker.take()
        };
        drop(worker);
        self.unregister_ioevents();
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The device status the driver set, without waiting for the function's lock.
    pub fn status(&self) -> u8 {
        self.published.status.load(Ordering::Acquire)
    }

    /// The features the driver accepted, without waiting for the function's lock.
    pub fn driver_features(&self) -> u64 {
        self.published.driver_features.load(Ordering::Acquire)
    }

    /// Each queue's largest size, as the driver reads it before choosing.
    pub fn queue_maxes(&self) -> Vec<u16> {
        let inner = self.inner.lock();
        (0..self.identity.queues)
            .map(|i| inner.transport.queue_max(i))
            .collect()
    }

    /// The features offered.
    pub fn offered(&self) -> u64 {
        self.inner.lock().transport.offered()
    }

    /// The device-specific configuration changed: a new configuration generation, and the
    /// configuration-change interrupt (ISR bit 1, or the configuration MSI-X vector).
    pub fn config_changed(&self) {
        self.inner.lock().transport.config_changed();
        self.signals.signal_config();
    }

    fn memory(&self) -> Option<&GuestMemoryMmap> {
        if self.memory.get().is_none() {
            let mem = self.platform.upgrade()?.guest_memory()?;
            let _ = self.memory.set(mem);
        }
        self.memory.get()
    }

    fn publish(&self, t: &Transport) {
        self.published.status.store(t.status(), Ordering::Release);
        self.published
            .driver_features
            .store(t.driver_features(), Ordering::Release);
    }

    /// Whether the machine has the devices' I/O paused (the guest is stopped). A device
    /// on no machine (a unit test's) runs.
    fn io_paused(&self) -> bool {
        self.platform
            .upgrade()
            .is_some_and(|p| p.pci_bus().io_paused())
    }

    /// A queue of at most `max` entries as its driver set it up, the device side at
    /// `position`.
    fn queue(
        config: &QueueConfig,
        max: u16,
        event_idx: bool,
        position: QueuePosition,
    ) -> Option<Queue> {
        Queue::try_from(QueueState {
            max_size: max,
            next_avail: position.next_avail,
            next_used: position.next_used,
            event_idx_enabled: event_idx,
            size: config.size,
            ready: config.ready,
            desc_table: config.desc_table,
            avail_ring: config.avail_ring,
            used_ring: config.used_ring,
        })
        .ok()
    }

    /// Starts the I/O thread for the driver's queues, at `positions` (zero for a fresh
    /// start, a snapshot's on a restore). Paused while the machine's I/O is.
    fn activate(&self, inner: &mut Inner, features: u64, positions: &[QueuePosition]) {
        let (Some(model), Some(memory)) = (inner.model.clone(), self.memory().cloned()) else {
            return;
        };
        let event_idx = features & F_EVENT_IDX != 0;
        let transport = &inner.transport;
        let queues = transport
            .queues()
            .iter()
            .enumerate()
            .zip(
                positions
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(QueuePosition {
                        next_avail: 0,
                        next_used: 0,
                    })),
            )
            .map(|((i, config), position)| {
                let max = transport.queue_max(i);
                Self::queue(config, max, event_idx, position).unwrap_or_else(|| {
                    Queue::new(max)
                        .or_else(|_| Queue::new(QUEUE_MAX))
                        .unwrap_or_else(|_| unreachable!("a valid size"))
                })
            })
            .collect();
        let job = Job {
            handler: model.activate(features),
            queues,
            kicks: self.kicks.clone(),
            signals: self.signals.clone(),
            memory,
            counters: self.counters.clone(),
        };
        match Worker::start(inner.name.clone(), job, self.io_paused()) {
            Ok(worker) => inner.worker = Some(worker),
            Err(e) => {
                tracing::error!("virtio: {}: cannot start the I/O thread: {e}", inner.name);
                inner.transport.needs_reset(0);
            }
        }
    }

    /// The device goes back to its power-on state: the I/O thread stops first (after the
    /// request it serves), then the model, the transport and the interrupts reset.
    fn reset_device(&self, inner: &mut Inner) {
        if let Some(worker) = inner.worker.take() {
            worker.stop();
        }
        if let Some(model) = &inner.model {
            model.reset();
        }
        inner.transport.reset();
        self.signals.reset();
    }

    fn write_common(&self, offset: u64, data: &[u8]) {
        let mut inner = self.inner.lock();
        let effect = inner.transport.write(offset, data);
        match effect {
            Effect::None => {}
            Effect::Reset => self.reset_device(&mut inner),
            Effect::VectorsChanged => self.signals.follow(&inner.transport),
            Effect::QueueEnabled(index) => {
                let event_idx = inner.transport.event_idx();
                let max = inner.transport.queue_max(index);
                let valid = match (inner.transport.queues().get(index), self.memory()) {
                    (Some(config), Some(mem)) => Self::queue(
                        config,
                        max,
                        event_idx,
                        QueuePosition {
                            next_avail: 0,
                            next_used: 0,
                        },
                    )
                    .is_some_and(|q| q.is_valid(mem)),
                    _ => false,
                };
                if !valid {
                    tracing::warn!("virtio: the driver enabled a queue with bad addresses or size");
                    inner.transport.needs_reset(index);
                }
            }
            Effect::DriverOk { features } => {
                self.activate(&mut inner, features, &[]);
                let events = inner.events.clone();
                self.publish(&inner.transport);
                drop(inner);
                if let Some(events) = events {
                    events.driver_ok(features);
                }
                return;
            }
        }
        self.publish(&inner.transport);
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
        let config = self.signals.config.lock();
        let mut bar = [0u8];
        config.read(self.cfg_cap + CFG_BAR, &mut bar);
        let at = u64::from(config.read_u32(self.cfg_cap + CFG_OFFSET));
        let length = config.read_u32(self.cfg_cap + CFG_LENGTH) as usize;
        let valid = usize::from(bar[0]) == BAR_INDEX
            && matches!(length, 1 | 2 | 4)
            && at + length as u64 <= BAR_SIZE;
        valid.then_some((at, length))
    }

    fn unregister_ioevents(&self) {
        let Some(at) = self.inner.lock().ioevents_at.take() else {
            return;
        };
        if let Some(platform) = self.platform.upgrade() {
            for (i, kick) in self.kicks.iter().enumerate() {
                platform.unregister_ioevent(kick, notify_address(at, i));
            }
        }
    }

    /// Whether the queues' notifications reach the I/O thread without a vCPU exit.
    pub fn ioevents_registered(&self) -> bool {
        self.inner.lock().ioevents_at.is_some()
    }

    fn register_ioevents(&self, bar_base: u64) {
        if !self.use_ioeventfd.load(Ordering::Acquire) {
            return;
        }
        let Some(platform) = self.platform.upgrade() else {
            return;
        };
        let at = bar_base + NOTIFY;
        let mut registered = 0;
        for (i, kick) in self.kicks.iter().enumerate() {
            match platform.register_ioevent(kick, notify_address(at, i)) {
                Ok(true) => registered += 1,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(
                        "virtio: no ioeventfd for queue {i}: {e}; its notifications exit"
                    );
                    break;
                }
            }
        }
        if registered == self.kicks.len() && registered > 0 {
            self.inner.lock().ioevents_at = Some(at);
        } else {
            for (i, kick) in self.kicks.iter().enumerate().take(registered) {
                platform.unregister_ioevent(kick, notify_address(at, i));
            }
        }
    }

    /// The function's state for a snapshot. The I/O thread is paused (waiting for the
    /// request it serves) to read where its queues stand, and goes on unless the
    /// machine's I/O is paused.
    pub fn save(&self) -> SavedVirtio {
        let inner = self.inner.lock();
        let positions = match &inner.worker {
            Some(worker) => {
                worker.pause(true);
                let states = worker.queue_states();
                if !self.io_paused() {
                    worker.resume();
                }
                states
                    .iter()
                    .map(|s| QueuePosition {
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                    })
                    .collect()
            }
            None => vec![
                QueuePosition {
                    next_avail: 0,
                    next_used: 0
                };
                self.identity.queues
            ],
        };
        let (msix_table, msix_pending) = self.signals.msix.lock().snapshot();
        SavedVirtio {
            transport: inner.transport.clone(),
            positions,
            isr: self.signals.isr(),
            msix_table,
            msix_pending,
        }
    }

    /// Loads a snapshot's state: checks it first, then, for a device the driver had
    /// running, starts its I/O thread where its queues stood (paused while the machine's
    /// I/O is).
    ///
    /// # Errors
    /// A state of another shape (queues, MSI-X table); nothing changes then.
    pub fn load(&self, saved: SavedVirtio) -> Result<(), String> {
        let queues = saved.transport.queues().len();
        if queues != self.identity.queues || saved.positions.len() != queues {
            return Err(format!(
                "the saved device has {queues} queues, this one {}",
                self.identity.queues
            ));
        }
        let mut inner = self.inner.lock();
        let offered = inner.transport.offered();
        if saved.transport.offered() != offered {
            return Err(format!(
                "the saved device offered features {:#x}, this one {offered:#x}",
                saved.transport.offered()
            ));
        }
        for i in 0..queues {
            let (was, is) = (saved.transport.queue_max(i), inner.transport.queue_max(i));
            if was != is {
                return Err(format!(
                    "the saved device's queue {i} held at most {was} entries, this one {is}"
                ));
            }
        }
        self.signals
            .msix
            .lock()
            .restore(&saved.msix_table, saved.msix_pending)?;
        if let Some(worker) = inner.worker.take() {
            worker.stop();
        }
        inner.transport = saved.transport;
        self.signals.follow(&inner.transport);
        self.signals.restore_isr(saved.isr);
        if inner.transport.status() & STATUS_DRIVER_OK != 0 {
            let features = inner.transport.driver_features();
            self.activate(&mut inner, features, &saved.positions);
        }
        self.publish(&inner.transport);
        Ok(())
    }
}

/// Where queue `index` notifies, the notify region starting at `at`.
fn notify_address(at: u64, index: usize) -> u64 {
    at + u64::from(NOTIFY_MULTIPLIER) * index as u64
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &Mutex<PciConfig> {
        &self.signals.config
    }

    fn config_read(&self, offset: usize, data: &mut [u8]) {
        if let Some((at, len)) = self.window(offset, data.len()) {
            let mut bytes = [0u8; 4];
            self.bar_read(BAR_INDEX, at, &mut bytes[..len]);
            self.signals
                .config
                .lock()
                .put_u32(self.cfg_cap + CFG_DATA, u32::from_le_bytes(bytes));
        }
        self.signals.config.lock().read(offset, data);
    }

    fn config_write(&self, offset: usize, data: &[u8]) -> bool {
        let remap = {
            let mut config = self.signals.config.lock();
            let remap = config.write(offset, data);
            // Clearing the function mask sends what waited.
            self.signals.msix.lock().unmasked(&config);
            remap
        };
        if let Some((at, len)) = self.window(offset, data.len()) {
            let bytes = self
                .signals
                .config
                .lock()
                .read_u32(self.cfg_cap + CFG_DATA)
                .to_le_bytes();
            self.bar_write(BAR_INDEX, at, &bytes[..len]);
        }
        // INTx disable toggled: the line follows.
        if remap {
            self.signals.intx_follows_isr();
        }
        remap
    }

    fn bar_read(&self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            COMMON..0x1000 if offset < COMMON_LEN => {
                let (start, value) = self.inner.lock().transport.read(offset);
                put(value, start, offset, data);
            }
            ISR => put(u64::from(self.signals.read_isr()), ISR, offset, data),
            DEVICE_CONFIG..NOTIFY => {
                let model = self.inner.lock().model.clone();
                match model {
                    Some(m) => m.read_config(offset - DEVICE_CONFIG, data),
                    None => data.fill(0),
                }
            }
            MSIX_TABLE..MSIX_PBA => self
                .signals
                .msix
                .lock()
                .table_read(offset - MSIX_TABLE, data),
            MSIX_PBA..BAR_SIZE => self.signals.msix.lock().pba_read(offset - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            COMMON..0x1000 if offset < COMMON_LEN => self.write_common(offset, data),
            DEVICE_CONFIG..NOTIFY => {
                let model = self.inner.lock().model.clone();
                if let Some(m) = model {
                    m.write_config(offset - DEVICE_CONFIG, data);
                }
            }
            NOTIFY..MSIX_TABLE => {
                // A notification that exited (no ioeventfd): the I/O thread serves it.
                let index = ((offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(kick) = self.kicks.get(index) {
                    self.counters.notify_exits.fetch_add(1, Ordering::Relaxed);
                    let _ = kick.write(1);
                }
            }
            MSIX_TABLE..MSIX_PBA => {
                let config = self.signals.config.lock();
                self.signals
                    .msix
                    .lock()
                    .table_write(&config, offset - MSIX_TABLE, data);
            }
            _ => {}
        }
    }

    fn reset(&self) {
        let mut inner = self.inner.lock();
        self.reset_device(&mut inner);
        self.publish(&inner.transport);
        drop(inner);
        self.signals.config.lock().reset();
        self.signals.msix.lock().reset();
    }

    fn bar_moved(&self, bar: usize, base: Option<u64>) {
        if bar != BAR_INDEX {
            return;
        }
        self.unregister_ioevents();
        if let Some(base) = base {
            self.register_ioevents(base);
        }
    }

    fn pause_io(&self, wait: bool) {
        if let Some(worker) = &self.inner.lock().worker {
            worker.pause(wait);
        }
    }

    fn resume_io(&self) {
        if let Some(worker) = &self.inner.lock().worker {
            worker.resume();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Weak;
    use std::time::{Duration, Instant};

    use virtio_queue::DescriptorChain;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::bus::Bus;
    use crate::ged::Ged;
    use crate::interrupt::IrqLine;
    use crate::pci::PciBus;
    use crate::pci::hotplug::Hotplug;
    use crate::platform::{MachineRequest, Platform};
    use crate::virtio::interrupt::{ISR_CONFIG, ISR_QUEUE};
    use crate::virtio::{
        F_VERSION_1, QueueHandler, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK,
    };

    /// A platform that is never reached: the device under test is not plugged.
    struct Unplugged;

    impl Platform for Unplugged {
        fn pio_bus(&self) -> &Bus {
            unreachable!("not plugged")
        }
        fn mmio_bus(&self) -> &Bus {
            unreachable!("not plugged")
        }
        fn irq_line(&self, _: u32) -> crate::Result<Arc<IrqLine>> {
            Err(crate::Error::MachineGone)
        }
        fn request(&self, _: MachineRequest) {}
        fn pci_bus(&self) -> &Arc<PciBus> {
            unreachable!("not plugged")
        }
        fn guest_memory(&self) -> Option<GuestMemoryMmap> {
            None
        }
        fn ged(&self) -> Option<Arc<Ged>> {
            None
        }
        fn hotplug(&self) -> Option<Arc<Hotplug>> {
            None
        }
        fn register_ioevent(&self, _: &EventFd, _: u64) -> crate::Result<bool> {
            Ok(false)
        }
        fn unregister_ioevent(&self, _: &EventFd, _: u64) {}
    }

    struct NoEvents;

    impl VirtioEvents for NoEvents {
        fn driver_ok(&self, _: u64) {}
    }

    /// The writes to a model's configuration structure: offset and bytes.
    type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// A model whose configuration structure reads as its offset, and whose handler uses
    /// every buffer offered and, in its first round, plays a driver that offers `late`
    /// more buffers while the device is busy.
    struct Model {
        writes: Writes,
        late: u16,
    }

    impl VirtioDevice for Model {
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset as u8 + i as u8;
            }
        }
        fn write_config(&self, offset: u64, data: &[u8]) {
            self.writes.lock().push((offset, data.to_vec()));
        }
        fn activate(&self, _: u64) -> Box<dyn QueueHandler> {
            Box::new(Serve { late: self.late })
        }
    }

    struct Serve {
        late: u16,
    }

    impl QueueHandler for Serve {
        fn serve(
            &mut self,
            _: usize,
            _: DescriptorChain<&GuestMemoryMmap>,
            mem: &GuestMemoryMmap,
        ) -> u32 {
            let late = std::mem::take(&mut self.late);
            if late > 0 {
                offer(mem, late);
            }
            0
        }
    }

    const IDENTITY: Identity = Identity {
        device_id: 2,
        class: 0x01_00_00,
        queues: 2,
    };
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const QSIZE: u16 = 8;
    const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const VRING_USED_F_NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;
    /// `avail_event`, after the used ring's flags, idx and QSIZE elements.
    const AVAIL_EVENT: u64 = USED + 4 + 8 * QSIZE as u64;

    fn device_with(late: u16) -> (VirtioPci, Writes) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let platform: PlatformRef = Weak::<Unplugged>::new();
        let dev = VirtioPci::new(IDENTITY, platform).expect("eventfds");
        dev.install(
            Arc::new(Model {
                writes: writes.clone(),
                late,
            }),
            Arc::new(NoEvents),
            "virtio-test".into(),
            true,
        );
        (dev, writes)
    }

    fn device() -> (VirtioPci, Writes) {
        device_with(0)
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

    fn common(dev: &VirtioPci, offset: u64, data: &[u8]) {
        dev.bar_write(BAR_INDEX, COMMON + offset, data);
    }

    /// A device whose driver has set up queue 0 as a virtio 1.x driver does, accepting
    /// EVENT_IDX or not, in 64 KiB of guest memory; its I/O thread runs.
    fn serving(event_idx: bool, late: u16) -> (VirtioPci, GuestMemoryMmap) {
        let (dev, _) = device_with(late);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        dev.memory.set(mem.clone()).expect("no memory yet");
        mem.write_obj(
            Descriptor::new(0x8000, 16, VRING_DESC_F_WRITE, 0),
            GuestAddress(DESC),
        )
        .expect("descriptor");
        common(&dev, 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        let accepted = F_VERSION_1 | if event_idx { F_EVENT_IDX } else { 0 };
        for word in 0..2u32 {
            common(&dev, 0x08, &word.to_le_bytes());
            common(
                &dev,
                0x0c,
                &((accepted >> (32 * word)) as u32).to_le_bytes(),
            );
        }
        common(
            &dev,
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        common(&dev, 0x16, &0u16.to_le_bytes());
        common(&dev, 0x18, &QSIZE.to_le_bytes());
        for (offset, at) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            common(&dev, offset, &at.to_le_bytes());
        }
        common(&dev, 0x1c, &1u16.to_le_bytes());
        common(
            &dev,
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
        );
        assert_eq!(bar(&dev, COMMON + 0x1c, 2), 1, "queue enabled");
        assert_eq!(dev.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        (dev, mem)
    }

    /// A notify write that exits (no ioeventfd here).
    fn kick(dev: &VirtioPci) {
        dev.bar_write(BAR_INDEX, NOTIFY, &0u16.to_le_bytes());
    }

    fn wait_used(mem: &GuestMemoryMmap, idx: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while read16(mem, USED + 2) != idx {
            assert!(
                Instant::now() < deadline,
                "used idx {} for {idx}",
                read16(mem, USED + 2)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// What the I/O thread writes after the used index (avail_event, the flags) is
    /// written once it has served: wait for the thread to be idle.
    fn settle(dev: &VirtioPci) {
        dev.pause_io(true);
        dev.resume_io();
    }

    #[test]
    fn with_event_idx_the_device_asks_for_the_next_notification() {
        let (dev, mem) = serving(true, 0);
        offer(&mem, 1);
        kick(&dev);
        wait_used(&mem, 1);
        settle(&dev);
        // A Linux driver notifies only when its new buffers pass `avail_event`: left at 0,
        // it would never notify again.
        assert_eq!(read16(&mem, AVAIL_EVENT), 1);
        offer(&mem, 2);
        kick(&dev);
        wait_used(&mem, 3);
        settle(&dev);
        assert_eq!(read16(&mem, AVAIL_EVENT), 3);
        assert_eq!(
            read16(&mem, USED),
            0,
            "the flags are not used with EVENT_IDX"
        );
        assert_eq!(
            dev.signals().read_isr(),
            ISR_QUEUE,
            "INTx: the ISR says a queue"
        );
    }

    #[test]
    fn without_event_idx_no_notify_is_clear_between_requests() {
        let (dev, mem) = serving(false, 0);
        mem.write_obj(VRING_USED_F_NO_NOTIFY, GuestAddress(USED))
            .expect("flags");
        offer(&mem, 1);
        kick(&dev);
        wait_used(&mem, 1);
        settle(&dev);
        assert_eq!(read16(&mem, USED), 0, "NO_NOTIFY only while serving");
        assert_eq!(read16(&mem, AVAIL_EVENT), 0, "avail_event untouched");
    }

    #[test]
    fn buffers_offered_while_serving_are_served_without_a_notification() {
        for event_idx in [true, false] {
            let (dev, mem) = serving(event_idx, 1);
            offer(&mem, 1);
            kick(&dev);
            wait_used(&mem, 2);
            settle(&dev);
            assert_eq!(
                dev.counters().notifications.load(Ordering::Relaxed),
                1,
                "event_idx {event_idx}"
            );
            assert_eq!(
                dev.counters().notify_exits.load(Ordering::Relaxed),
                1,
                "no ioeventfd unplugged"
            );
            if event_idx {
                assert_eq!(read16(&mem, AVAIL_EVENT), 2);
            }
        }
    }

    #[test]
    fn a_paused_device_serves_what_was_kicked_once_resumed() {
        let (dev, mem) = serving(true, 0);
        dev.pause_io(true);
        offer(&mem, 1);
        kick(&dev);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(read16(&mem, USED + 2), 0, "nothing while paused");
        dev.resume_io();
        wait_used(&mem, 1);
    }

    #[test]
    fn a_reset_stops_the_io_thread_and_a_save_keeps_the_queue_positions() {
        let (dev, mem) = serving(true, 0);
        offer(&mem, 3);
        kick(&dev);
        wait_used(&mem, 3);
        let saved = dev.save();
        assert_eq!(saved.positions[0].next_avail, 3);
        assert_eq!(saved.positions[0].next_used, 3);
        common(&dev, 0x14, &[0]);
        assert_eq!(dev.status(), 0);
        offer(&mem, 1);
        kick(&dev);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(read16(&mem, USED + 2), 3, "no thread after the reset");
        // Loaded back, the device goes on from where the snapshot had its queue.
        dev.load(saved).expect("same shape");
        wait_used(&mem, 4);
        assert_eq!(dev.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    }

    #[test]
    fn a_state_of_another_shape_is_refused_and_changes_nothing() {
        let (dev, mem) = serving(true, 0);
        let mut saved = dev.save();
        saved.positions.pop();
        assert!(dev.load(saved).is_err());
        offer(&mem, 1);
        kick(&dev);
        wait_used(&mem, 1);
    }

    #[test]
    fn a_configuration_change_raises_the_config_interrupt_and_generation() {
        let (dev, _) = device();
        let generation = bar(&dev, COMMON + 0x15, 1);
        dev.config_changed();
        assert_eq!(bar(&dev, COMMON + 0x15, 1), (generation + 1) & 0xff);
        assert_eq!(dev.signals().read_isr(), ISR_CONFIG);
        assert_eq!(dev.signals().read_isr(), 0, "read clears");
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
