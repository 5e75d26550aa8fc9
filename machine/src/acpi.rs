//! ACPI tables (acpi_tables crate): RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG and a
//! DSDT describing the board: PCI root, serial ports, keyboard controller, RTC, processors,
//! power button and the Generic Event Device that signals it.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use devices::GuestMemoryMmap;
use devices::pci::bus::{INTX_GSI_BASE, INTX_GSIS};
use devices::pci::{self, hotplug, intx_gsi};
use devices::{acpi_pm, ged};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"QOMU  ";
const OEM_REVISION: u32 = 1;

fn table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"QOMU    ";
    id[4..].copy_from_slice(signature);
    id
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    pub cpus: u32,
    /// Serial ports: (I/O base, IRQ).
    pub serials: Vec<(u16, u8)>,
}

/// One table and where it goes in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// The whole set, laid out from [`ACPI_START`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub rsdp_addr: u64,
    pub tables: Vec<Table>,
}

impl Tables {
    /// Writes every table into guest memory.
    ///
    /// # Errors
    /// The ACPI area is not RAM.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
        for t in &self.tables {
            mem.write_slice(&t.bytes, GuestAddress(t.addr))?;
        }
        Ok(())
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// Builds the tables for `board`.
///
/// # Errors
/// The tables do not fit below 1 MiB (only with absurd device counts).
pub fn build(board: &Board) -> Result<Tables, String> {
    let mut next = align16(ACPI_START + Rsdp::len() as u64);
    let mut place = |signature: &str, bytes: Vec<u8>| {
        let addr = next;
        next = align16(addr + bytes.len() as u64);
        Table {
            signature: signature.to_owned(),
            addr,
            bytes,
        }
    };

    let dsdt = place("DSDT", dsdt(board));
    let mut fadt = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt.addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let io_register = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    fadt.sleep_control_reg = io_register(acpi_pm::SLEEP_CONTROL);
    fadt.sleep_status_reg = io_register(acpi_pm::SLEEP_STATUS);
    fadt.reset_reg = io_register(acpi_pm::RESET_REGISTER);
    fadt.reset_value = acpi_pm::RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"QOMU\0\0\0\0").into();
    let fadt = place("FACP", bytes_of(&fadt.finalize()));
    let madt = place("APIC", madt(board));
    let mut mcfg = MCFG::new(OEM_ID, table_id(b"MCFG"), OEM_REVISION);
    mcfg.add_ecam(ECAM_BASE, 0, 0, ((ECAM_SIZE >> 20) - 1) as u8);
    let mcfg = place("MCFG", bytes_of(&mcfg));
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    for t in [&fadt, &madt, &mcfg] {
        xsdt.add_entry(t.addr);
    }
    let xsdt = place("XSDT", bytes_of(&xsdt));
    if next > ACPI_END {
        return Err(format!(
            "the ACPI tables need {} bytes, more than the {} available",
            next - ACPI_START,
            ACPI_END - ACPI_START
        ));
    }
    let rsdp = Table {
        signature: "RSDP".into(),
        addr: ACPI_START,
        bytes: bytes_of(&Rsdp::new(OEM_ID, xsdt.addr)),
    };
    Ok(Tables {
        rsdp_addr: ACPI_START,
        tables: vec![rsdp, xsdt, fadt, madt, mcfg, dsdt],
    })
}

/// The MADT, written by hand so that PCAT_COMPAT (the 8259s exist) can be set.
fn madt(board: &Board) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, table_id(b"APIC"), OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR as u32);
    madt.write_u32(40, 1); // PCAT_COMPAT
    for cpu in 0..board.cpus {
        // Processor Local APIC: UID, APIC ID, enabled.
        madt.append_slice(&[0, 8, cpu as u8, cpu as u8, 1, 0, 0, 0]);
    }
    // I/O APIC: ID (after the CPUs'), address, GSI base 0.
    let mut ioapic = vec![1, 12, board.cpus as u8, 0];
    ioapic.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    // Local APIC NMI on LINT1 for every processor.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.as_slice().to_vec()
}

/// AML already serialized; lets the DSDT be built from plain values without a tree of
/// borrowed temporaries.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn raw(item: &dyn Aml) -> Raw {
    Raw(bytes_of(item))
}

fn name(n: &str, value: &dyn Aml) -> Raw {
    raw(&aml::Name::new(n.into(), value))
}

fn resources(items: &[&dyn Aml]) -> Raw {
    raw(&aml::ResourceTemplate::new(items.to_vec()))
}

fn device(n: &str, children: &[&dyn Aml]) -> Raw {
    raw(&aml::Device::new(n.into(), children.to_vec()))
}

/// Slots that can be hot-plugged: all but the host bridge's.
fn hotplug_slots() -> impl Iterator<Item = u8> {
    1..pci::bus::SLOTS as u8
}

fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The hotplug controller's registers as fields of `\_SB_.PCI0`.
fn hotplug_region() -> Raw {
    let (base, len) = (hotplug::MMIO_BASE as u32, hotplug::MMIO_LEN as u32);
    raw(&aml::OpRegion::new(
        "PCHP".into(),
        aml::OpRegionSpace::SystemMemory,
        &base,
        &len,
    ))
}

fn hotplug_fields() -> Raw {
    raw(&aml::Field::new(
        "PCHP".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    ))
}

/// `PCNT`: reads the added and to-be-removed slots and notifies each slot's device:
/// device check (1) for an added slot, eject request (3) for one the host wants back.
fn pcnt() -> Raw {
    let read_up = raw(&aml::Store::new(&aml::Local(0), &aml::Path::new("PCIU")));
    let read_down = raw(&aml::Store::new(&aml::Local(1), &aml::Path::new("PCID")));
    let mut body = vec![read_up, read_down];
    for slot in hotplug_slots() {
        let bit = 1u32 << slot;
        let target = aml::Path::new(&slot_name(slot));
        for (local, event) in [(0, 1u8), (1, 3u8)] {
            let masked = raw(&aml::And::new(&aml::ZERO, &aml::Local(local), &bit));
            let notify = raw(&aml::Notify::new(&target, &event));
            body.push(raw(&aml::If::new(
                &aml::Equal::new(&masked, &bit),
                vec![&notify],
            )));
        }
    }
    raw(&aml::Method::new(
        "PCNT".into(),
        0,
        true,
        body.iter().map(|b| b as &dyn Aml).collect(),
    ))
}

/// One device per hot-pluggable slot: its address, its slot number for the user, and
/// `_EJ0`, which writes its bit to B0EJ.
fn pci_slots() -> Raw {
    let devices: Vec<Raw> = hotplug_slots()
        .map(|slot| {
            let address = u32::from(slot) << 16;
            let bit = 1u32 << slot;
            let eject = raw(&aml::Store::new(&aml::Path::new("B0EJ"), &bit));
            let ej0 = raw(&aml::Method::new("_EJ0".into(), 1, true, vec![&eject]));
            device(
                &slot_name(slot),
                &[
                    &name("_ADR", &address),
                    &name("_SUN", &u32::from(slot)),
                    &ej0,
                ],
            )
        })
        .collect();
    let mut bytes = Vec::new();
    for d in &devices {
        d.to_aml_bytes(&mut bytes);
    }
    Raw(bytes)
}

/// The name of the link device for INTx GSI `gsi`.
fn intx_link(gsi: u32) -> String {
    let letter = char::from(b'A' + (gsi - INTX_GSI_BASE) as u8);
    format!("GSI{letter}")
}

/// `_PRT`: every slot's four pins to the link of the GSI [`intx_gsi`] gives them.
fn intx_routing() -> Raw {
    let entries: Vec<Raw> = (0..pci::bus::SLOTS as u8)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| {
                let address = u32::from(slot) << 16 | 0xffff;
                let link =
                    aml::Path::new(&format!("\\_SB_.{}", intx_link(intx_gsi(slot, pin + 1))));
                raw(&aml::Package::new(vec![&address, &pin, &link, &aml::ZERO]))
            })
        })
        .collect();
    raw(&aml::Package::new(
        entries.iter().map(|e| e as &dyn Aml).collect(),
    ))
}

/// One link device per INTx GSI, fixed to it: level-triggered, active high and shared
/// (as QEMU's q35 describes its GSI links), which is how KVM_IRQ_LINE drives the pins.
fn intx_links() -> Vec<Raw> {
    (0..INTX_GSIS)
        .map(|i| {
            let gsi = INTX_GSI_BASE + i;
            let crs = resources(&[&aml::Interrupt::new(true, false, false, true, gsi)]);
            let srs = raw(&aml::Method::new("_SRS".into(), 1, false, vec![]));
            device(
                &intx_link(gsi),
                &[
                    &name("_HID", &aml::EISAName::new("PNP0C0F")),
                    &name("_UID", &i),
                    &name("_PRS", &crs),
                    &name("_CRS", &crs),
                    &srs,
                ],
            )
        })
        .collect()
}

fn dsdt(board: &Board) -> Vec<u8> {
    let mut sb: Vec<Raw> = Vec::new();

    // PCI root bridge: bus 0, config ports, the legacy I/O and the 32-bit MMIO window.
    let pci_crs = resources(&[
        &aml::AddressSpace::new_bus_number(0u16, 0u16),
        &aml::IO::new(0xcf8, 0xcf8, 1, 8),
        &aml::AddressSpace::new_io(0u16, 0x0cf7u16, None),
        &aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None),
        &aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            PCI_MMIO_START as u32,
            (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32,
            None,
        ),
    ]);
    sb.push(device(
        "PCI0",
        &[
            &name("_HID", &aml::EISAName::new("PNP0A08")),
            &name("_CID", &aml::EISAName::new("PNP0A03")),
            &name("_ADR", &aml::ZERO),
            &name("_SEG", &aml::ZERO),
            &name("_UID", &aml::ZERO),
            &name("_BBN", &aml::ZERO),
            &name("_CRS", &pci_crs),
            &name("_PRT", &intx_routing()),
            &hotplug_region(),
            &hotplug_fields(),
            &pcnt(),
            &pci_slots(),
        ],
    ));
    sb.extend(intx_links());

    for (i, &(base, irq)) in board.serials.iter().enumerate().take(9) {
        let crs = resources(&[
            &aml::IO::new(base, base, 1, 8),
            &aml::Interrupt::new(true, true, false, false, irq.into()),
        ]);
        let uid = i as u8;
        sb.push(device(
            &format!("COM{}", i + 1),
            &[
                &name("_HID", &aml::EISAName::new("PNP0501")),
                &name("_UID", &uid),
                &name("_CRS", &crs),
            ],
        ));
    }

    let kbc_crs = resources(&[
        &aml::IO::new(0x60, 0x60, 1, 1),
        &aml::IO::new(0x64, 0x64, 1, 1),
        &aml::Interrupt::new(true, true, false, false, 1),
    ]);
    sb.push(device(
        "KBC_",
        &[
            &name("_HID", &aml::EISAName::new("PNP0303")),
            &name("_CRS", &kbc_crs),
        ],
    ));
    let rtc_crs = resources(&[&aml::IO::new(0x70, 0x70, 1, 2)]);
    sb.push(device(
        "RTC_",
        &[
            &name("_HID", &aml::EISAName::new("PNP0B00")),
            &name("_CRS", &rtc_crs),
        ],
    ));
    sb.push(device(
        "PWRB",
        &[
            &name("_HID", &aml::EISAName::new("PNP0C0C")),
            &name("_UID", &aml::ZERO),
        ],
    ));

    // GED: _EVT reads (and so clears) the event register and notifies the power button.
    let ged_crs = resources(&[&aml::Interrupt::new(true, true, false, false, ged::GSI)]);
    let (ged_base, ged_len) = (ged::MMIO_BASE as u32, ged::MMIO_LEN as u32);
    let ged_region = raw(&aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &ged_base,
        &ged_len,
    ));
    let ged_field = raw(&aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    ));
    let read_events = raw(&aml::Store::new(&aml::Local(0), &aml::Path::new("GDAT")));
    let power_bit = ged::EVENT_POWER_BUTTON as u8;
    let masked = raw(&aml::And::new(&aml::ZERO, &aml::Local(0), &power_bit));
    let notify = raw(&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8));
    let if_power = raw(&aml::If::new(
        &aml::Equal::new(&masked, &power_bit),
        vec![&notify],
    ));
    let hotplug_bit = ged::EVENT_PCI_HOTPLUG as u8;
    let hotplug_masked = raw(&aml::And::new(&aml::ZERO, &aml::Local(0), &hotplug_bit));
    let scan = raw(&aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]));
    let if_hotplug = raw(&aml::If::new(
        &aml::Equal::new(&hotplug_masked, &hotplug_bit),
        vec![&scan],
    ));
    let evt = raw(&aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read_events, &if_power, &if_hotplug],
    ));
    sb.push(device(
        "GED_",
        &[
            &name("_HID", &"ACPI0013"),
            &name("_UID", &aml::ZERO),
            &name("_CRS", &ged_crs),
            &ged_region,
            &ged_field,
            &evt,
        ],
    ));

    for cpu in 0..board.cpus {
        sb.push(device(
            &format!("C{cpu:03X}"),
            &[&name("_HID", &"ACPI0007"), &name("_UID", &cpu)],
        ));
    }

    let mut body = bytes_of(&aml::Scope::new(
        "\\_SB_".into(),
        sb.iter().map(|d| d as &dyn Aml).collect(),
    ));
    // S5 (soft off): the SLP_TYP the sleep control register expects.
    let s5 = acpi_pm::S5_SLEEP_TYPE;
    aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&s5, &s5, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_laid_out_and_checksummed() {
        let t = build(&Board {
            cpus: 2,
            serials: vec![(0x3f8, 4)],
        })
        .unwrap();
        assert_eq!(t.rsdp_addr, ACPI_START);
        let sigs: Vec<_> = t.tables.iter().map(|t| t.signature.as_str()).collect();
        assert_eq!(sigs, ["RSDP", "XSDT", "FACP", "APIC", "MCFG", "DSDT"]);
        for table in &t.tables[1..] {
            assert!(checksum_ok(&table.bytes), "{}", table.signature);
            assert_eq!(
                u32::from_le_bytes(table.bytes[4..8].try_into().unwrap()) as usize,
                table.bytes.len()
            );
            assert!(table.addr >= ACPI_START && table.addr + table.bytes.len() as u64 <= ACPI_END);
        }
        // RSDP's first checksum covers 20 bytes, the extended one all 36.
        assert!(checksum_ok(&t.tables[0].bytes[..20]) && checksum_ok(&t.tables[0].bytes));
        let madt = &t.tables[3].bytes;
        assert_eq!(madt.len(), 44 + 2 * 8 + 12 + 6);
    }
}
