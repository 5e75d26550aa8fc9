//! The I/O buses: port I/O and MMIO address ranges, each served by one device.
//!
//! A device claims its ranges when it is realized and releases them when unrealized. The
//! vCPU threads dispatch every exit through [`Bus::read`] / [`Bus::write`]; an access that
//! no device claims is reported back so the machine can count it and answer all-ones.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::{Error, Result};

/// A device on a bus. Offsets are relative to the base of the range it claimed.
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
    /// Returns to power-on state (a system reset). What survives a real reset (CMOS
    /// NVRAM, the clock) survives this.
    fn reset(&self) {}
}

/// Answers a read of `data.len()` bytes at `offset` of a register window: the window's
/// bytes, and zeros past its end.
pub fn read_window(window: &[u8], offset: usize, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i)
            .and_then(|at| window.get(at))
            .copied()
            .unwrap_or(0);
    }
}

struct Range {
    len: u64,
    owner: String,
    device: Arc<dyn BusDevice>,
}

/// One address space (port I/O or MMIO).
pub struct Bus {
    name: &'static str,
    ranges: RwLock<BTreeMap<u64, Range>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus").field("name", &self.name).finish()
    }
}

/// A claimed range, as listed by [`Bus::ranges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeInfo {
    pub base: u64,
    pub len: u64,
    /// The qom path of the device that claimed it.
    pub owner: String,
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            ranges: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Claims `base..base+len` for `device`, owned by the object at `owner`.
    ///
    /// # Errors
    /// An empty range, or one overlapping a claimed range (the message names its owner).
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        owner: &str,
        device: Arc<dyn BusDevice>,
    ) -> Result<()> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::EmptyRange {
                bus: self.name,
                base,
                len,
            })?;
        let mut ranges = self.ranges.write();
        let before = ranges.range(..end).next_back();
        if let Some((&b, r)) = before
            && b + r.len > base
        {
            return Err(Error::RangeTaken {
                bus: self.name,
                base,
                last: end - 1,
                other_base: b,
                other_last: b + r.len - 1,
                owner: r.owner.clone(),
            });
        }
        ranges.insert(
            base,
            Range {
                len,
                owner: owner.to_owned(),
                device,
            },
        );
        Ok(())
    }

    /// Releases the range starting at `base`; true if there was one.
    pub fn remove(&self, base: u64) -> bool {
        self.ranges.write().remove(&base).is_some()
    }

    /// Releases every range of `owner`.
    pub fn remove_owner(&self, owner: &str) {
        self.ranges.write().retain(|_, r| r.owner != owner);
    }

    /// Resets every device on the bus once, however many ranges it claimed.
    pub fn reset_all(&self) {
        let devices: Vec<Arc<dyn BusDevice>> = {
            let ranges = self.ranges.read();
            let mut seen: Vec<Arc<dyn BusDevice>> = Vec::new();
            for r in ranges.values() {
                if !seen.iter().any(|d| Arc::ptr_eq(d, &r.device)) {
                    seen.push(r.device.clone());
                }
            }
            seen
        };
        for d in devices {
            d.reset();
        }
    }

    pub fn ranges(&self) -> Vec<RangeInfo> {
        self.ranges
            .read()
            .iter()
            .map(|(&base, r)| RangeInfo {
                base,
                len: r.len,
                owner: r.owner.clone(),
            })
            .collect()
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, Arc<dyn BusDevice>)> {
        let ranges = self.ranges.read();
        let (&base, range) = ranges.range(..=addr).next_back()?;
        // The whole access must fall inside the range.
        let offset = addr - base;
        (offset.checked_add(len as u64)? <= range.len).then(|| (offset, range.device.clone()))
    }

    /// Reads from the device at `addr`; false (and `data` untouched) if none claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false if none claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn register_windows_read_zeros_past_their_end() {
        let mut data = [0xaa; 4];
        read_window(&[1, 2, 3], 1, &mut data);
        assert_eq!(data, [2, 3, 0, 0]);
        read_window(&[1, 2, 3], usize::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn dispatch_overlap_and_removal() {
        let bus = Bus::new("pio");
        let dev = Arc::new(Recorder::default());
        bus.insert(0x3f8, 8, "/serial", dev.clone()).unwrap();
        let err = bus.insert(0x3fc, 2, "/other", dev.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pio range 0x3fc-0x3fd overlaps 0x3f8-0x3ff of '/serial'"
        );
        assert!(bus.insert(0x3f0, 9, "/other", dev.clone()).is_err());
        bus.insert(0x3f0, 8, "/other", dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[7]));
        assert!(!bus.write(0x400, &[1]));
        // An access crossing the end of a range is not the device's.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
        assert!(bus.remove(0x3f8));
        assert!(!bus.read(0x3fd, &mut b));
        bus.remove_owner("/other");
        assert!(bus.ranges().is_empty());
        assert!(bus.insert(u64::MAX, 2, "/x", dev).is_err());
    }
}
