//! The generated ACPI tables decompile cleanly with `iasl -d` (Debian's acpica-tools) and
//! the DSDT names the devices the board has.

use std::path::Path;
use std::process::Command;

use machine::acpi::{Board, build};

fn iasl_decompile(dir: &Path, file: &str) -> (bool, String) {
    let out = Command::new("iasl")
        .arg("-d")
        .arg(file)
        .current_dir(dir)
        .output()
        .expect(
            "`iasl` is needed for this test: install acpica-tools (apt-get install acpica-tools)",
        );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// iasl cannot disassemble an RSDP from a binary file (it has no standard table header;
/// iasl 20200925 refuses even one it compiled itself), so check it the other way round:
/// iasl compiles the RSDP from its fields, computing both checksums, and the bytes must
/// equal ours.
fn check_rsdp_with_iasl(dir: &Path, ours: &[u8]) {
    assert_eq!(&ours[..8], b"RSD PTR ");
    let oem = std::str::from_utf8(&ours[9..15]).unwrap();
    let xsdt = u64::from_le_bytes(ours[24..32].try_into().unwrap());
    let source = format!(
        "[0008] Signature : \"RSD PTR \"\n[0001] Checksum : 00\n[0006] Oem ID : \"{oem}\"\n[0001] Revision : {:02X}\n\
         [0004] RSDT Address : {:08X}\n[0004] Length : {:08X}\n[0008] XSDT Address : {xsdt:016X}\n\
         [0001] Extended Checksum : 00\n[0003] Reserved : 000000\n",
        ours[15],
        u32::from_le_bytes(ours[16..20].try_into().unwrap()),
        u32::from_le_bytes(ours[20..24].try_into().unwrap()),
    );
    std::fs::write(dir.join("rsdp.asl"), source).unwrap();
    let out = Command::new("iasl")
        .arg("rsdp.asl")
        .current_dir(dir)
        .output()
        .expect("iasl (acpica-tools)");
    assert!(
        out.status.success(),
        "iasl could not compile the RSDP: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        std::fs::read(dir.join("rsdp.aml")).unwrap(),
        ours,
        "the RSDP differs from what iasl builds from its fields"
    );
}

#[test]
fn every_table_decompiles_and_the_dsdt_names_the_devices() {
    let dir = std::env::temp_dir().join(format!("qomu-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let board = Board {
        cpus: 3,
        serials: vec![(0x3f8, 4), (0x2f8, 3)],
    };
    let tables = build(&board).unwrap();
    let (rsdp, described) = tables.tables.split_first().unwrap();
    check_rsdp_with_iasl(&dir, &rsdp.bytes);
    for t in described {
        let file = format!("{}.dat", t.signature.to_lowercase());
        std::fs::write(dir.join(&file), &t.bytes).unwrap();
        let (ok, text) = iasl_decompile(&dir, &file);
        assert!(ok, "iasl -d {file} failed:\n{text}");
        let lower = text.to_lowercase();
        assert!(
            !lower.contains("error") || lower.contains("0 errors"),
            "iasl reported errors for {file}:\n{text}"
        );
        assert!(
            !lower.contains("warning ") && !lower.contains("invalid"),
            "iasl complained about {file}:\n{text}"
        );
    }
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    // iasl prints names without their trailing underscores (KBC_ as KBC).
    for device in [
        "PCI0", "COM1", "COM2", "KBC", "RTC", "PWRB", "GED", "C000", "C001", "C002", "GSIA", "GSIH",
    ] {
        assert!(
            dsl.contains(&format!("Device ({device})")),
            "the DSDT lacks device {device}:\n{dsl}"
        );
    }
    for name in ["Name (\\_S5", "Method (_EVT", "Notify (\\_SB.PWRB, 0x80)"] {
        assert!(dsl.contains(name), "the DSDT lacks {name}:\n{dsl}");
    }
    for hid in [
        "PNP0A08", "PNP0501", "PNP0303", "PNP0B00", "PNP0C0C", "ACPI0013", "ACPI0007", "PNP0C0F",
    ] {
        assert!(dsl.contains(hid), "the DSDT lacks a {hid} device:\n{dsl}");
    }
    assert!(dsl.contains("0x02F8"), "COM2's ports are described");
    // _PRT: 32 slots x 4 pins, slot 3's INTA on GSI 19 (link D), as the bus routes it.
    let prt = dsl.split("Name (_PRT").nth(1).expect("PCI0 has a _PRT");
    let prt = &prt[..prt.find("})").unwrap_or(prt.len())];
    assert_eq!(prt.matches("Package (0x04)").count(), 128, "{prt}");
    let slot3 = prt.split("0x0003FFFF").nth(1).unwrap();
    assert_eq!(devices::pci::intx_gsi(3, 1), 19);
    let entry: String = slot3
        .split('}')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(entry, ",Zero,\\_SB.GSID,Zero", "{slot3}");
    assert!(
        dsl.contains("Interrupt (ResourceConsumer, Level, ActiveHigh, Shared, ,, )"),
        "{dsl}"
    );
    let madt = std::fs::read_to_string(dir.join("apic.dsl")).unwrap();
    assert_eq!(madt.matches("Processor Local APIC").count(), 3, "{madt}");
    assert!(madt.contains("I/O APIC"));
    let fadt = std::fs::read_to_string(dir.join("facp.dsl")).unwrap();
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    let mcfg = std::fs::read_to_string(dir.join("mcfg.dsl")).unwrap();
    assert!(mcfg.contains("00000000E0000000"), "{mcfg}");
    std::fs::remove_dir_all(&dir).unwrap();
}
