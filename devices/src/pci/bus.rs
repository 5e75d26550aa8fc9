//! The root PCI bus: 32 slots, configuration access through ports 0xCF8/0xCFC and ECAM,
//! BARs mapped on the MMIO bus where the guest (or the VMM's allocation) puts them, and
//! INTx lines shared per GSI.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use super::config::{MappedBar, PciConfig};
use crate::bus::{Bus, BusDevice};

/// Slots on the root bus.
pub const SLOTS: usize = 32;
/// The first GSI of the INTx lines; 8 lines (16-23) shared by the slots.
pub const INTX_GSI_BASE: u32 = 16;
pub const INTX_GSIS: u32 = 8;

/// The GSI of `slot`'s interrupt `pin` (1 = INTA): the usual swizzle over 8 lines. The
/// DSDT's `_PRT` says the same.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    INTX_GSI_BASE + (u32::from(slot) + u32::from(pin.max(1)) - 1) % INTX_GSIS
}

/// A function on the bus (function 0 of its slot: qomu has no multi-function devices).
pub trait PciDevice: Send + Sync {
    /// Its configuration space.
    fn config(&self) -> &Mutex<PciConfig>;
    /// A configuration read; the default reads the space as it is.
    fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.config().lock().read(offset, data);
    }
    /// A configuration write; true if the BARs must be remapped.
    fn config_write(&self, offset: usize, data: &[u8]) -> bool {
        self.config().lock().write(offset, data)
    }
    /// An access to BAR `bar` at `offset`.
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]);
    /// A system reset: back to power-on state (the configuration space included).
    fn reset(&self) {
        self.config().lock().reset();
    }
    /// BAR `bar` now decodes at `base` on the MMIO bus, or no longer decodes (`None`).
    fn bar_moved(&self, _bar: usize, _base: Option<u64>) {}
    /// The machine stops the guest (or saves, resets, unplugs): the function's own I/O
    /// finishes what it is doing and starts nothing new; with `wait`, returns once nothing
    /// is in flight.
    fn pause_io(&self, _wait: bool) {}
    /// The guest runs again: the function's I/O goes on.
    fn resume_io(&self) {}
}

/// What the machine's interrupt controller offers level-triggered lines.
pub trait IrqChip: Send + Sync {
    fn set_level(&self, gsi: u32, level: bool);
}

/// The INTx lines: a GSI is asserted while any device on it asserts.
struct Intx {
    chip: OnceLock<Arc<dyn IrqChip>>,
    asserted: Mutex<[u32; INTX_GSIS as usize]>,
}

impl Intx {
    fn change(&self, gsi: u32, up: bool) {
        let mut counts = self.asserted.lock();
        let n = &mut counts[(gsi - INTX_GSI_BASE) as usize];
        let before = *n > 0;
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
        if before != (*n > 0)
            && let Some(chip) = self.chip.get()
        {
            chip.set_level(gsi, *n > 0);
        }
    }
}

/// One device's INTx pin. Deasserts when dropped, so an unplugged device cannot leave its
/// line stuck.
pub struct IntxLine {
    intx: Arc<Intx>,
    gsi: u32,
    up: AtomicBool,
    raised: std::sync::atomic::AtomicU64,
}

impl IntxLine {
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn set(&self, level: bool) {
        if self.up.swap(level, Ordering::SeqCst) != level {
            if level {
                self.raised.fetch_add(1, Ordering::Relaxed);
            }
            self.intx.change(self.gsi, level);
        }
    }

    pub fn is_asserted(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Times the line went up.
    pub fn count(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

impl Drop for IntxLine {
    fn drop(&mut self) {
        self.set(false);
    }
}

struct Slot {
    owner: String,
    /// How errors name it: QEMU's `TYPE,id=ID`.
    label: String,
    device: Arc<dyn PciDevice>,
    mapped: Vec<MappedBar>,
}

/// The root bus.
pub struct PciBus {
    mmio: Arc<Bus>,
    /// The MMIO window BARs are allocated from: an equal share per slot.
    window: (u64, u64),
    slots: RwLock<Vec<Option<Slot>>>,
    /// The last value written to port 0xCF8.
    address: AtomicU32,
    intx: Arc<Intx>,
    /// Serializes remapping (several vCPUs may program BARs at once).
    remap: Mutex<()>,
    /// The MSI-X vectors of the bus's devices.
    msi: Arc<super::MsiRouter>,
    /// Whether the machine has its devices' I/O paused (from power-on until the guest
    /// first runs, and whenever it is stopped); a device that starts its I/O starts it so.
    io_paused: AtomicBool,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus").finish_non_exhaustive()
    }
}

/// Why a device could not be plugged, in QEMU's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlugError {
    SlotInUse { slot: u8, by: String },
    Full,
}

impl PciBus {
    /// A bus whose BARs map on `mmio`, allocated from `window` (base, size).
    pub fn new(mmio: Arc<Bus>, window: (u64, u64)) -> Arc<PciBus> {
        Arc::new(PciBus {
            mmio,
            window,
            slots: RwLock::new((0..SLOTS).map(|_| None).collect()),
            address: AtomicU32::new(0),
            intx: Arc::new(Intx {
                chip: OnceLock::new(),
                asserted: Mutex::new([0; INTX_GSIS as usize]),
            }),
            remap: Mutex::new(()),
            msi: Arc::default(),
            io_paused: AtomicBool::new(true),
        })
    }

    /// Whether the devices' I/O is paused ([`PciBus::pause_io`]).
    pub fn io_paused(&self) -> bool {
        self.io_paused.load(Ordering::Acquire)
    }

    /// Pauses every function's own I/O (the guest stops): with `wait`, returns once none
    /// has anything in flight, as a snapshot needs.
    pub fn pause_io(&self, wait: bool) {
        self.io_paused.store(true, Ordering::Release);
        for (_, d) in self.functions() {
            d.pause_io(wait);
        }
    }

    /// Lets every function's I/O go on (the guest runs).
    pub fn resume_io(&self) {
        self.io_paused.store(false, Ordering::Release);
        for (_, d) in self.functions() {
            d.resume_io();
        }
    }

    fn functions(&self) -> Vec<(u8, Arc<dyn PciDevice>)> {
        self.slots
            .read()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as u8, s.device.clone())))
            .collect()
    }

    /// The MSI vectors of the bus's devices.
    pub fn msi(&self) -> &Arc<super::MsiRouter> {
        &self.msi
    }

    /// Connects the INTx lines to the interrupt controller (once the VM exists), and
    /// raises the lines already asserted.
    pub fn attach_irqchip(&self, chip: Arc<dyn IrqChip>) {
        let counts = self.intx.asserted.lock();
        if self.intx.chip.set(chip.clone()).is_ok() {
            for (i, &n) in counts.iter().enumerate() {
                if n > 0 {
                    chip.set_level(INTX_GSI_BASE + i as u32, true);
                }
            }
        }
    }

    /// A line for `slot`'s `pin`.
    pub fn intx_line(&self, slot: u8, pin: u8) -> Arc<IntxLine> {
        Arc::new(IntxLine {
            intx: self.intx.clone(),
            gsi: intx_gsi(slot, pin),
            up: AtomicBool::new(false),
            raised: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Puts `device` (the object at `owner`, named `label` in errors) in `slot`, or the
    /// first free one, and maps its BARs if they decode. Returns the slot.
    ///
    /// # Errors
    /// The slot is taken, or every slot is.
    pub fn plug(
        &self,
        slot: Option<u8>,
        owner: &str,
        label: &str,
        device: Arc<dyn PciDevice>,
    ) -> Result<u8, PlugError> {
        let mut slots = self.slots.write();
        let index = match slot {
            Some(s) => {
                if let Some(taken) = &slots[usize::from(s)] {
                    return Err(PlugError::SlotInUse {
                        slot: s,
                        by: taken.label.clone(),
                    });
                }
                s
            }
            None => slots
                .iter()
                .position(Option::is_none)
                .ok_or(PlugError::Full)? as u8,
        };
        self.allocate_bars(index, &*device);
        slots[usize::from(index)] = Some(Slot {
            owner: owner.to_owned(),
            label: label.to_owned(),
            device,
            mapped: Vec::new(),
        });
        drop(slots);
        self.remap(index);
        Ok(index)
    }

    /// Places the device's BARs in `slot`'s share of the window, largest first, each aligned
    /// to its size (a share is 16 MiB with the board's 512 MiB window). A slot's addresses
    /// never depend on what else is plugged, so hotplug never has to move anything.
    fn allocate_bars(&self, slot: u8, device: &dyn PciDevice) {
        let share = self.window.1 / SLOTS as u64;
        let mut config = device.config().lock();
        let mut bars: Vec<(usize, u64)> = config.bars().map(|(i, b)| (i, b.size)).collect();
        bars.sort_by_key(|&(i, size)| (std::cmp::Reverse(size), i));
        let mut next = self.window.0 + u64::from(slot) * share;
        let end = next + share;
        for (index, size) in bars {
            let base = next.next_multiple_of(size);
            if base + size > end {
                tracing::warn!("slot {slot}: BAR {index} does not fit in the slot's window");
                continue;
            }
            config.set_bar_address(index, base);
            next = base + size;
        }
    }

    /// Takes the device out of `slot` and unmaps its BARs.
    pub fn unplug(&self, slot: u8) {
        let _serial = self.remap.lock();
        let taken = self.slots.write()[usize::from(slot)].take();
        if let Some(s) = taken {
            for bar in s.mapped {
                self.mmio.remove(bar.base);
                s.device.bar_moved(bar.index, None);
            }
        }
    }

    /// The qom path of the device in each slot.
    pub fn occupants(&self) -> Vec<(u8, String)> {
        self.slots
            .read()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as u8, s.owner.clone())))
            .collect()
    }

    /// The slot of the device at `owner`.
    pub fn slot_of(&self, owner: &str) -> Option<u8> {
        self.slots
            .read()
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.owner == owner))
            .map(|i| i as u8)
    }

    fn device(&self, slot: usize) -> Option<Arc<dyn PciDevice>> {
        self.slots
            .read()
            .get(slot)?
            .as_ref()
            .map(|s| s.device.clone())
    }

    /// A configuration read of bus 0, `slot`, `function`, `offset`: all ones where there is
    /// no function.
    pub fn config_read(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self
            .device(usize::from(slot))
            .filter(|_| bus == 0 && function == 0)
        {
            Some(d) => d.config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; nothing where there is no function.
    pub fn config_write(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &[u8]) {
        if bus != 0 || function != 0 {
            return;
        }
        if let Some(d) = self.device(usize::from(slot))
            && d.config_write(offset, data)
        {
            self.remap(slot);
        }
    }

    /// The function in `slot`, for saving and loading its state.
    pub fn function(&self, slot: u8) -> Option<Arc<dyn PciDevice>> {
        self.device(usize::from(slot))
    }

    /// Makes the BARs of `slot` decode as its configuration space says (after a snapshot
    /// loaded it).
    pub fn refresh(&self, slot: u8) {
        self.remap(slot);
    }

    /// Tells every function again where its mapped BARs decode: the VM now exists (a
    /// snapshot loaded before launch mapped them), so what a function attaches to a BAR's
    /// address (a virtio device's ioeventfds) can be attached.
    pub fn announce_bars(&self) {
        let mapped: Vec<_> = self
            .slots
            .read()
            .iter()
            .flatten()
            .map(|s| (s.device.clone(), s.mapped.clone()))
            .collect();
        for (device, bars) in mapped {
            for bar in bars {
                device.bar_moved(bar.index, Some(bar.base));
            }
        }
    }

    /// The configuration address latch (port 0xCF8).
    pub fn config_address(&self) -> u32 {
        self.address.load(Ordering::SeqCst)
    }

    pub fn set_config_address(&self, value: u32) {
        self.address.store(value, Ordering::SeqCst);
    }

    /// Makes the MMIO bus decode `slot`'s BARs as its configuration space says now. A BAR
    /// the guest placed over another range stays unmapped (and is logged), as two decoders
    /// on one address would be on real hardware.
    fn remap(&self, slot: u8) {
        let _serial = self.remap.lock();
        let Some((owner, device, old)) = self.slots.read()[usize::from(slot)]
            .as_ref()
            .map(|s| (s.owner.clone(), s.device.clone(), s.mapped.clone()))
        else {
            return;
        };
        let wanted = device.config().lock().mapped_bars();
        let mut mapped = Vec::new();
        for bar in &old {
            if !wanted.contains(bar) {
                self.mmio.remove(bar.base);
                device.bar_moved(bar.index, None);
            }
        }
        for bar in wanted {
            if old.contains(&bar) {
                mapped.push(bar);
                continue;
            }
            let window = Arc::new(BarWindow {
                device: device.clone(),
                index: bar.index,
            });
            match self.mmio.insert(bar.base, bar.size, &owner, window) {
                Ok(()) => {
                    device.bar_moved(bar.index, Some(bar.base));
                    mapped.push(bar);
                }
                Err(e) => tracing::warn!("{owner}: BAR {} not mapped: {e}", bar.index),
            }
        }
        if let Some(s) = self.slots.write()[usize::from(slot)].as_mut() {
            s.mapped = mapped;
        }
    }

    /// Resets every function (a system reset) and remaps their BARs.
    pub fn reset(&self) {
        let devices = self.functions();
        self.address.store(0, Ordering::SeqCst);
        for (slot, d) in devices {
            d.reset();
            self.remap(slot);
        }
    }
}

/// A BAR on the MMIO bus.
struct BarWindow {
    device: Arc<dyn PciDevice>,
    index: usize,
}

impl BusDevice for BarWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.device.bar_read(self.index, offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.device.bar_write(self.index, offset, data);
    }
}

/// Ports 0xCF8-0xCFF: the configuration address register and the data window.
pub struct ConfigPorts(pub Arc<PciBus>);

impl ConfigPorts {
    /// The bus, slot, function and register the address register selects, if enabled.
    fn target(&self, port_offset: u64) -> Option<(u8, u8, u8, usize)> {
        let a = self.0.address.load(Ordering::SeqCst);
        (a & 0x8000_0000 != 0).then(|| {
            (
                (a >> 16) as u8,
                ((a >> 11) & 0x1f) as u8,
                ((a >> 8) & 7) as u8,
                (a & 0xfc) as usize + (port_offset - 4) as usize,
            )
        })
    }
}

impl BusDevice for ConfigPorts {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            // Only whole-register reads of 0xCF8 return the address, as on real chipsets.
            let value = if offset == 0 && data.len() == 4 {
                self.0.address.load(Ordering::SeqCst)
            } else {
                u32::MAX
            };
            data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
            return;
        }
        match self.target(offset) {
            Some((bus, slot, function, reg)) => {
                self.0.config_read(bus, slot, function, reg, data);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.0.address.store(v & 0x80ff_fffc, Ordering::SeqCst);
            }
            return;
        }
        if let Some((bus, slot, function, reg)) = self.target(offset) {
            self.0.config_write(bus, slot, function, reg, data);
        }
    }
}

/// The ECAM window: 4 KiB of configuration space per function.
pub struct Ecam(pub Arc<PciBus>);

fn ecam_target(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for Ecam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (bus, slot, function, reg) = ecam_target(offset);
        self.0.config_read(bus, slot, function, reg, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let (bus, slot, function, reg) = ecam_target(offset);
        self.0.config_write(bus, slot, function, reg, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{Bar, BarKind, COMMAND, COMMAND_MEMORY, Ids};

    struct Fake {
        config: Mutex<PciConfig>,
        last: Mutex<Option<(usize, u64, Vec<u8>)>>,
    }

    impl PciDevice for Fake {
        fn config(&self) -> &Mutex<PciConfig> {
            &self.config
        }
        fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
            *self.last.lock() = Some((bar, offset, data.to_vec()));
        }
    }

    fn fake() -> Arc<Fake> {
        let mut config = PciConfig::new(Ids {
            vendor: 0x1234,
            device: 0x5678,
            class: 0xff0000,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_bar(
            0,
            Bar {
                size: 0x1000,
                kind: BarKind::Memory32,
            },
        );
        Arc::new(Fake {
            config: Mutex::new(config),
            last: Mutex::new(None),
        })
    }

    fn cf8(ports: &ConfigPorts, slot: u8, reg: u32) {
        ports.write(
            0,
            &(0x8000_0000 | u32::from(slot) << 11 | reg).to_le_bytes(),
        );
    }

    #[test]
    fn config_access_bar_mapping_and_unplug() {
        let mmio = Arc::new(Bus::new("mmio"));
        let bus = PciBus::new(mmio.clone(), (0xc000_0000, 0x2000_0000));
        let dev = fake();
        assert_eq!(bus.plug(None, "/a", "a", dev.clone()), Ok(0));
        assert_eq!(bus.plug(Some(3), "/b", "b,id=b", fake()), Ok(3));
        assert_eq!(
            bus.plug(Some(3), "/c", "c", fake()),
            Err(PlugError::SlotInUse {
                slot: 3,
                by: "b,id=b".into()
            })
        );
        let ports = ConfigPorts(bus.clone());
        let mut id = [0u8; 4];
        cf8(&ports, 3, 0);
        ports.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x5678_1234);
        // An empty slot and another function read all ones.
        cf8(&ports, 4, 0);
        ports.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        let ecam = Ecam(bus.clone());
        ecam.read(3 << 15 | 1 << 12, &mut id);
        assert_eq!(id, [0xff; 4]);
        ecam.read(3 << 15, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x5678_1234);
        // Turning memory decoding on maps the BAR; the byte lane of 0xCFE reaches COMMAND+2.
        assert!(mmio.ranges().is_empty());
        ecam.write(COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        let mut b = [0u8; 1];
        assert!(mmio.read(0xc000_0010, &mut b));
        assert_eq!(b, [0x10]);
        assert!(mmio.write(0xc000_0004, &[9]));
        assert_eq!(*dev.last.lock(), Some((0, 4, vec![9])));
        // Slot 3's BAR was allocated in its share of the window.
        ecam.read(3 << 15 | 0x10, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0xc300_0000);
        // Moving the BAR moves the mapping.
        ecam.write(0x10, &0xc020_0000u32.to_le_bytes());
        assert!(!mmio.read(0xc000_0010, &mut b));
        assert!(mmio.read(0xc020_0010, &mut b));
        bus.unplug(0);
        assert!(mmio.ranges().is_empty());
        assert_eq!(bus.occupants(), [(3, "/b".to_owned())]);
        assert_eq!(bus.plug(None, "/d", "d", fake()), Ok(0));
    }

    #[test]
    fn shared_intx_lines_stay_up_while_any_device_asserts() {
        struct Chip(Mutex<Vec<(u32, bool)>>);
        impl IrqChip for Chip {
            fn set_level(&self, gsi: u32, level: bool) {
                self.0.lock().push((gsi, level));
            }
        }
        let bus = PciBus::new(Arc::new(Bus::new("mmio")), (0xc000_0000, 0x2000_0000));
        let a = bus.intx_line(1, 1);
        let b = bus.intx_line(9, 1);
        assert_eq!((a.gsi(), b.gsi()), (17, 17));
        a.set(true);
        let chip = Arc::new(Chip(Mutex::new(Vec::new())));
        bus.attach_irqchip(chip.clone());
        b.set(true);
        a.set(false);
        drop(b);
        assert_eq!(*chip.0.lock(), [(17, true), (17, false)]);
        assert_eq!(a.count(), 1);
    }
}
