//! A PCI function's 256-byte configuration space (type 0 header): identity, command and
//! status, BARs with their size masks, interrupt pin and line, and a capability list.
//!
//! Every byte has a write mask (which bits the guest may change) and a write-1-to-clear
//! mask (status error bits), as the PCI spec describes; everything else reads back as the
//! device set it.

/// Bytes of configuration space (conventional PCI; through ECAM the extended space reads
/// as zeros, that is: no extended capabilities).
pub const CONFIG_SIZE: usize = 256;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const LATENCY_TIMER: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_INTERRUPT: u16 = 1 << 3;
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status bits the guest clears by writing 1 (parity and abort errors).
const STATUS_W1C: u16 = 0xf900;

/// Where a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    /// Takes this BAR and the next.
    Memory64,
}

/// A BAR the device offers: its size (a power of two, at least 16 bytes) and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub size: u64,
    pub kind: BarKind,
}

/// A BAR as it decodes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedBar {
    pub index: usize,
    pub base: u64,
    pub size: u64,
}

/// The identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub vendor: u16,
    pub device: u16,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// One function's configuration space.
#[derive(Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    w1c: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; 6],
    /// The space as built, restored by a reset.
    initial: [u8; CONFIG_SIZE],
    /// Where the next capability goes.
    next_cap: usize,
    last_cap: Option<usize>,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &self.read_u16(VENDOR_ID))
            .field("device", &self.read_u16(DEVICE_ID))
            .finish_non_exhaustive()
    }
}

impl PciConfig {
    /// A type 0 header for `ids`, with no BARs, capabilities or interrupt.
    pub fn new(ids: Ids) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            w1c: [0; CONFIG_SIZE],
            bars: [None; 6],
            initial: [0; CONFIG_SIZE],
            next_cap: 0x40,
            last_cap: None,
        };
        c.put_u16(VENDOR_ID, ids.vendor);
        c.put_u16(DEVICE_ID, ids.device);
        c.bytes[REVISION] = ids.revision;
        c.bytes[CLASS_PROG..CLASS_PROG + 3].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        c.put_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.put_u16(SUBSYSTEM_ID, ids.subsystem);
        let command = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE;
        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        c.w1c[STATUS..STATUS + 2].copy_from_slice(&STATUS_W1C.to_le_bytes());
        c.wmask[CACHE_LINE_SIZE] = 0xff;
        c.wmask[LATENCY_TIMER] = 0xff;
        c.initial = c.bytes;
        c
    }

    /// Offers BAR `index` (call while building, before [`PciConfig::seal`]).
    ///
    /// # Panics
    /// A bad index, size or a 64-bit BAR in slot 5: a bug in the device's definition.
    pub fn add_bar(&mut self, index: usize, bar: Bar) {
        assert!(bar.size.is_power_of_two() && bar.size >= 16, "BAR size");
        let wide = bar.kind == BarKind::Memory64;
        assert!(index < if wide { 5 } else { 6 }, "BAR index");
        let mask = !(bar.size - 1);
        let offset = BAR0 + 4 * index;
        let low_flags: u32 = if wide { 0b100 } else { 0 };
        self.put_u32(offset, low_flags);
        self.wmask[offset..offset + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if wide {
            self.wmask[offset + 4..offset + 8]
                .copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(bar);
        self.initial = self.bytes;
    }

    /// Sets where BAR `index` decodes (the VMM's allocation; the guest may move it).
    pub fn set_bar_address(&mut self, index: usize, base: u64) {
        let Some(bar) = self.bars[index] else { return };
        let offset = BAR0 + 4 * index;
        let flags = self.read_u32(offset) & 0xf;
        self.put_u32(offset, (base as u32 & !0xf) | flags);
        if bar.kind == BarKind::Memory64 {
            self.put_u32(offset + 4, (base >> 32) as u32);
        }
        self.initial = self.bytes;
    }

    /// Sets the interrupt pin (1 = INTA) and the line the guest sees first.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
        self.bytes[INTERRUPT_LINE] = line;
        self.wmask[INTERRUPT_LINE] = 0xff;
        self.initial = self.bytes;
    }

    /// Appends a capability: `id`, the next pointer (filled in), then `body`. Returns its
    /// offset. Bytes of it the guest may write are marked with [`PciConfig::set_writable`].
    ///
    /// # Panics
    /// The capabilities do not fit in the header (a bug in the device's definition).
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let offset = self.next_cap;
        let len = (2 + body.len() + 3) & !3;
        assert!(offset + len <= CONFIG_SIZE, "capabilities overflow");
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + 2 + body.len()].copy_from_slice(body);
        match self.last_cap {
            Some(last) => self.bytes[last + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITIES] = offset as u8;
                let status = self.read_u16(STATUS) | STATUS_CAP_LIST;
                self.put_u16(STATUS, status);
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        self.initial = self.bytes;
        offset
    }

    /// Lets the guest write `mask` bits from `offset` on (a capability's control fields).
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        self.wmask[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// Reads `data.len()` bytes at `offset`; beyond the header reads as zeros.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        crate::bus::read_window(&self.bytes, offset, data);
    }

    /// The guest writes `data` at `offset`: only writable bits change, write-1-to-clear bits
    /// clear. Returns true if the decoding changed (a BAR or the command register), so the
    /// bus must remap the BARs.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        let mut remap = false;
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let (w, c) = (self.wmask[at], self.w1c[at]);
            let old = self.bytes[at];
            let new = ((old & !w) | (v & w)) & !(v & c);
            if new != old {
                self.bytes[at] = new;
                remap |= (COMMAND..COMMAND + 2).contains(&at) || (BAR0..BAR0 + 24).contains(&at);
            }
        }
        remap
    }

    /// The whole space as the guest left it (for a snapshot).
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Puts back a space [`PciConfig::snapshot`] took of the same function.
    ///
    /// # Errors
    /// Not 256 bytes, or a read-only bit (identity, capability list and fields) that is not
    /// this function's.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let bytes: [u8; CONFIG_SIZE] = bytes
            .try_into()
            .map_err(|_| format!("{} bytes of configuration space, not 256", bytes.len()))?;
        // What the guest cannot write (identity, header type, BAR types, the capabilities
        // and their fixed fields) is the device's build: it must be this device's.
        let foreign = (0..CONFIG_SIZE)
            .find(|&i| (bytes[i] ^ self.initial[i]) & !(self.wmask[i] | self.w1c[i]) != 0);
        if let Some(at) = foreign {
            return Err(format!(
                "the saved configuration space is another function's (byte {at:#x} is {:#04x}, \
                 this device has {:#04x})",
                bytes[at], self.initial[at]
            ));
        }
        self.bytes = bytes;
        Ok(())
    }

    /// Back to the state the device was built with (a system reset).
    pub fn reset(&mut self) {
        self.bytes = self.initial;
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    /// Device-side writes (status bits, capability fields the device updates).
    pub fn put_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn put_u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// The BARs offered.
    pub fn bars(&self) -> impl Iterator<Item = (usize, Bar)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
    }

    /// BAR `index`'s current base address.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let offset = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(offset) & !0xf);
        Some(match bar.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 => low | u64::from(self.read_u32(offset + 4)) << 32,
        })
    }

    /// The memory BARs that decode now: memory decoding on, and an address that is neither
    /// zero nor wrapping (a guest sizing a BAR writes all ones, which must not map).
    pub fn mapped_bars(&self) -> Vec<MappedBar> {
        if self.command() & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        self.bars()
            .filter_map(|(index, bar)| {
                let base = self.bar_address(index)?;
                let wraps = base.checked_add(bar.size).is_none_or(|end| end > 1 << 48);
                (base != 0 && !wraps && base & (bar.size - 1) == 0).then_some(MappedBar {
                    index,
                    base,
                    size: bar.size,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Ids {
        Ids {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0x00ff00,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    fn read32(c: &PciConfig, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bar_sizing_and_mapping_follow_the_spec() {
        let mut c = PciConfig::new(ids());
        c.add_bar(
            4,
            Bar {
                size: 0x4000,
                kind: BarKind::Memory64,
            },
        );
        c.set_bar_address(4, 0xc000_0000);
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        assert_eq!(read32(&c, BAR0 + 16), 0xc000_0004);
        // Memory decoding is off until the guest turns it on.
        assert!(c.mapped_bars().is_empty());
        assert!(c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes()));
        assert_eq!(
            c.mapped_bars(),
            [MappedBar {
                index: 4,
                base: 0xc000_0000,
                size: 0x4000
            }]
        );
        // Sizing: all ones reads back the size mask with the type bits, and maps nothing.
        c.write(BAR0 + 16, &[0xff; 4]);
        c.write(BAR0 + 20, &[0xff; 4]);
        assert_eq!(read32(&c, BAR0 + 16), 0xffff_c004);
        assert_eq!(read32(&c, BAR0 + 20), 0xffff_ffff);
        assert!(c.mapped_bars().is_empty());
        c.write(BAR0 + 16, &0xd000_0000u32.to_le_bytes());
        c.write(BAR0 + 20, &[0; 4]);
        assert_eq!(c.mapped_bars()[0].base, 0xd000_0000);
        // Read-only identity, a BAR that is not offered.
        c.write(0, &[0; 4]);
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        c.write(BAR0, &[0xff; 4]);
        assert_eq!(read32(&c, BAR0), 0);
        c.reset();
        assert_eq!(read32(&c, BAR0 + 16), 0xc000_0004);
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn capabilities_chain_and_status_bits() {
        let mut c = PciConfig::new(ids());
        let a = c.add_capability(0x09, &[1, 2, 3]);
        let b = c.add_capability(0x11, &[0; 10]);
        assert_eq!((a, b), (0x40, 0x48));
        let mut head = [0u8; 1];
        c.read(CAPABILITIES, &mut head);
        assert_eq!(head[0], 0x40);
        let mut cap = [0u8; 2];
        c.read(a, &mut cap);
        assert_eq!(cap, [0x09, 0x48]);
        c.read(b, &mut cap);
        assert_eq!(cap, [0x11, 0]);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        // Error bits clear on a 1, the capability bit is read-only.
        c.put_u16(STATUS, c.read_u16(STATUS) | 0x8000);
        c.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), STATUS_CAP_LIST);
        // Reads past the header are zeros; writes there are ignored.
        let mut far = [0xaau8; 4];
        c.read(0x100, &mut far);
        assert_eq!(far, [0; 4]);
        assert!(!c.write(0xfe, &[1, 2, 3, 4]));
    }

    #[test]
    fn restore_takes_only_a_space_of_the_same_build() {
        let build = |caps: &[u8]| {
            let mut c = PciConfig::new(ids());
            c.add_bar(
                0,
                Bar {
                    size: 0x1000,
                    kind: BarKind::Memory32,
                },
            );
            for &id in caps {
                let at = c.add_capability(id, &[0; 6]);
                c.set_writable(at + 2, &[0xff]);
            }
            c
        };
        let mut guest = build(&[0x09, 0x11]);
        guest.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        guest.write(BAR0, &0xd000_0000u32.to_le_bytes());
        guest.write(0x42, &[0x5a]);
        let saved = guest.snapshot();

        let mut same = build(&[0x09, 0x11]);
        assert_eq!(same.restore(&saved), Ok(()));
        assert_eq!(same.snapshot(), saved);
        // Another capability list (one more capability moves the next), another identity.
        let mut other = build(&[0x09, 0x09, 0x11]);
        let err = other.restore(&saved).unwrap_err();
        assert!(err.contains("another function's"), "{err}");
        let mut other_id = PciConfig::new(Ids {
            device: 0x1042,
            ..ids()
        });
        assert!(other_id.restore(&saved).is_err());
        assert_eq!(
            other.snapshot(),
            build(&[0x09, 0x09, 0x11]).snapshot(),
            "unchanged"
        );
        assert!(same.restore(&saved[..255]).is_err());
    }
}
