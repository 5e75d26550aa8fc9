//! The guest's physical address map and the board's fixed resources.
//!
//! ```text
//! 0x0000_0500  GDT                       0x0000_7000  zero page (boot_params)
//! 0x0000_9000  PML4, then PDPT, 4 PDs    0x0002_0000  kernel command line (64 KiB max)
//! 0x0009_fc00  EBDA (reserved)           0x000e_0000  RSDP and the ACPI tables
//! 0x0010_0000  kernel (1 MiB)            ...          RAM up to 3 GiB
//! 0xc000_0000  PCI MMIO window (512 MiB) 0xe000_0000  PCI ECAM (bus 0)
//! 0xfec0_0000  IOAPIC                    0xfed0_0000  ACPI GED
//! 0xfed0_1000  PCI hotplug registers
//! 0xfee0_0000  LAPIC                     0x1_0000_0000 RAM above 3 GiB
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (the ELF test guests set up their own).
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories mapping the first 4 GiB with 2 MiB pages.
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
/// The BIOS area where Linux also looks for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;

/// RAM above this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
pub const ECAM_BASE: u64 = 0xe000_0000;
/// One bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_SIZE: u64 = 0x10_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Where KVM puts the real-mode TSS it needs on Intel.
pub const TSS_ADDR: u64 = 0xfffb_d000;

/// Smallest and largest guest RAM accepted.
pub const MIN_MEMORY: u64 = 16 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs (one IOAPIC, 8-bit APIC IDs).
pub const MAX_CPUS: u64 = 255;
/// GSIs of the in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

/// The RAM regions for `size` bytes of guest memory: below the MMIO hole, and the rest
/// above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_regions(256 << 20), [(0, 256 << 20)]);
        assert_eq!(ram_regions(4 << 30), [(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}
