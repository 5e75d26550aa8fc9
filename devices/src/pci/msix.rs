//! An MSI-X capability with its table and pending-bit array (PBA) in a memory BAR, as any
//! PCI device can offer it. Each table entry is a vector of the bus's [`MsiRouter`]: the
//! guest's address and data become the vector's KVM route, and signalling an unmasked
//! vector is one eventfd write. A masked vector (its entry's mask bit or the function
//! mask) records the message in the PBA instead and sends it when unmasked.

use std::sync::Arc;

use super::config::PciConfig;
use super::msi::{MsiRouter, MsiVector};
use crate::bus::read_window;

/// The MSI-X capability ID.
pub const CAP_MSIX: u8 = 0x11;
const ENABLE: u16 = 1 << 15;
const FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// The most vectors a device here offers (one PBA word).
pub const MAX_VECTORS: u16 = 64;

pub struct Msix {
    /// Offset of the capability in configuration space.
    cap: usize,
    table: Vec<[u32; 4]>,
    pending: u64,
    /// One per entry while the device is realized.
    vectors: Vec<MsiVector>,
    messages: u64,
}

impl Msix {
    /// Adds the capability for `count` vectors to `config`: the table at `table_offset`
    /// and the PBA at `pba_offset` of BAR `bar`.
    ///
    /// # Panics
    /// More than [`MAX_VECTORS`] or none (a bug in the device's definition).
    pub fn new(
        config: &mut PciConfig,
        count: u16,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Msix {
        assert!((1..=MAX_VECTORS).contains(&count), "MSI-X vector count");
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(count - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let cap = config.add_capability(CAP_MSIX, &body);
        // The guest may set Enable and Function Mask (bits 15 and 14 of Message Control).
        config.set_writable(cap + 3, &[0xc0]);
        Msix {
            cap,
            table: vec![[0, 0, 0, ENTRY_MASKED]; usize::from(count)],
            pending: 0,
            vectors: Vec::new(),
            messages: 0,
        }
    }

    /// Takes a vector of `router` for every entry (at realize).
    ///
    /// # Errors
    /// The router is out of GSIs or KVM refuses an irqfd.
    pub fn connect(&mut self, router: &Arc<MsiRouter>) -> std::io::Result<()> {
        let vectors = (0..self.table.len())
            .map(|_| router.vector())
            .collect::<std::io::Result<Vec<_>>>()?;
        for (v, e) in vectors.iter().zip(&self.table) {
            v.set_route(route(e));
        }
        self.vectors = vectors;
        Ok(())
    }

    /// Gives the vectors back (at unrealize).
    pub fn disconnect(&mut self) {
        self.vectors.clear();
    }

    fn control(&self, config: &PciConfig) -> u16 {
        config.read_u16(self.cap + 2)
    }

    /// MSI-X is on: interrupts go through it, not INTx.
    pub fn enabled(&self, config: &PciConfig) -> bool {
        self.control(config) & ENABLE != 0
    }

    pub fn len(&self) -> u16 {
        self.table.len() as u16
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Messages sent so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    fn masked(&self, config: &PciConfig, vector: usize) -> bool {
        self.control(config) & FUNCTION_MASK != 0 || self.table[vector][3] & ENTRY_MASKED != 0
    }

    /// Sends `vector`'s message, or marks it pending while masked. False for a vector the
    /// table does not have.
    pub fn signal(&mut self, config: &PciConfig, vector: u16) -> bool {
        let v = usize::from(vector);
        if v >= self.table.len() {
            return false;
        }
        if self.masked(config, v) {
            self.pending |= 1 << v;
        } else {
            self.send(v);
        }
        true
    }

    fn send(&mut self, v: usize) {
        self.pending &= !(1 << v);
        if let Some(vector) = self.vectors.get(v) {
            self.messages += 1;
            vector.trigger();
        }
    }

    /// Sends what became unmasked (after a table or Message Control write).
    pub fn unmasked(&mut self, config: &PciConfig) {
        for v in 0..self.table.len() {
            if self.pending & (1 << v) != 0 && !self.masked(config, v) {
                self.send(v);
            }
        }
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let entry = (offset / ENTRY_SIZE) as usize;
        match self.table.get(entry) {
            Some(e) => {
                let bytes: Vec<u8> = e.iter().flat_map(|w| w.to_le_bytes()).collect();
                read_window(&bytes, (offset % ENTRY_SIZE) as usize, data);
            }
            None => data.fill(0),
        }
    }

    /// A write to the table: 32-bit accesses (or 64-bit, two words), as the spec asks.
    pub fn table_write(&mut self, config: &PciConfig, offset: u64, data: &[u8]) {
        let entry = (offset / ENTRY_SIZE) as usize;
        let word = ((offset % ENTRY_SIZE) / 4) as usize;
        if entry >= self.table.len()
            || !offset.is_multiple_of(4)
            || !(data.len() == 4 || data.len() == 8)
        {
            return;
        }
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            if let Some(w) = self.table[entry].get_mut(word + i) {
                *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        if let Some(v) = self.vectors.get(entry) {
            v.set_route(route(&self.table[entry]));
        }
        self.unmasked(config);
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        read_window(&self.pending.to_le_bytes(), offset as usize, data);
    }

    /// The table and the pending bits (for a snapshot).
    pub fn snapshot(&self) -> (Vec<[u32; 4]>, u64) {
        (self.table.clone(), self.pending)
    }

    /// Puts back what [`Msix::snapshot`] took, routing each vector as its entry says.
    ///
    /// # Errors
    /// A table of another size.
    pub fn restore(&mut self, table: &[[u32; 4]], pending: u64) -> Result<(), String> {
        if table.len() != self.table.len() {
            return Err(format!(
                "the saved MSI-X table has {} entries, this device {}",
                table.len(),
                self.table.len()
            ));
        }
        self.table.copy_from_slice(table);
        self.pending = pending
            & u64::MAX
                .checked_shr(64 - self.table.len() as u32)
                .unwrap_or(0);
        for (v, e) in self.vectors.iter().zip(&self.table) {
            v.set_route(route(e));
        }
        Ok(())
    }

    /// A reset: every entry masked and cleared, nothing pending (Message Control comes
    /// back with the configuration space).
    pub fn reset(&mut self) {
        self.table.fill([0, 0, 0, ENTRY_MASKED]);
        for v in &self.vectors {
            v.set_route(None);
        }
        self.pending = 0;
    }
}

/// The route of an entry: its message, once the guest has programmed an address.
fn route(e: &[u32; 4]) -> Option<(u64, u32)> {
    let address = u64::from(e[1]) << 32 | u64::from(e[0]);
    (address != 0).then_some((address, e[2]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::Ids;

    fn config() -> PciConfig {
        PciConfig::new(Ids {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0xff_0000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        })
    }

    #[test]
    fn a_masked_vector_is_pending_until_unmasked() {
        let mut config = config();
        let mut msix = Msix::new(&mut config, 2, 4, 0x4000, 0x5000);
        let router = Arc::new(MsiRouter::default());
        msix.connect(&router).unwrap();
        assert_eq!(router.len(), 2);
        let cap = msix.cap;
        let mut word = [0u8; 4];
        config.read(cap, &mut word);
        assert_eq!(word, [CAP_MSIX, 0, 1, 0], "ID, next, table size 2 - 1");
        config.read(cap + 4, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0x4004, "table offset | BIR 4");
        // Enable; the entries start masked.
        config.write(cap + 2, &[0x01, 0x80]);
        assert!(msix.enabled(&config));
        assert_eq!(
            config.read_u16(cap + 2),
            0x8001,
            "the table size is read-only"
        );
        msix.table_write(&config, 16, &0xfee0_0000u32.to_le_bytes());
        msix.table_write(&config, 24, &0x41u32.to_le_bytes());
        assert!(msix.signal(&config, 1));
        let mut pba = [0u8; 8];
        msix.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert_eq!(msix.messages(), 0);
        // Unmasking sends it.
        msix.table_write(&config, 28, &0u32.to_le_bytes());
        msix.pba_read(0, &mut pba);
        assert_eq!((pba[0], msix.messages()), (0, 1));
        // The function mask holds everything back.
        config.write(cap + 3, &[0xc0]);
        assert!(msix.signal(&config, 1));
        assert_eq!(msix.messages(), 1);
        config.write(cap + 3, &[0x80]);
        msix.unmasked(&config);
        assert_eq!(msix.messages(), 2);
        assert!(!msix.signal(&config, 2), "no such vector");
        let mut entry = [0u8; 16];
        msix.table_read(16, &mut entry);
        assert_eq!(&entry[..4], &0xfee0_0000u32.to_le_bytes());
        msix.disconnect();
        assert!(router.is_empty());
    }
}
