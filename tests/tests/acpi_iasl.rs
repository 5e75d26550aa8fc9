//! The generated ACPI tables decompile cleanly with `iasl -d` (Debian's acpica-tools), the
//! DSDT names the devices the board has, and its hotplug methods do what acpiphp relies on
//! when ACPICA's `acpiexec` runs them.

use std::path::Path;
use std::process::Command;

use machine::acpi::{Board, build};

/// Runs `iasl ARGS` in `dir`: whether it succeeded, and what it printed.
fn iasl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("iasl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run iasl");
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
    let (ok, text) = iasl(dir, &["rsdp.asl"]);
    assert!(ok, "iasl could not compile the RSDP: {text}");
    assert_eq!(
        std::fs::read(dir.join("rsdp.aml")).unwrap(),
        ours,
        "the RSDP differs from what iasl builds from its fields"
    );
}

#[test]
fn every_table_decompiles_and_the_dsdt_names_the_devices() {
    qomu_tests::require_tools!("iasl" from "acpica-tools");
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
        let (ok, text) = iasl(&dir, &["-d", &file]);
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

/// What one method did in `acpiexec`: the notifications it sent, the integer it returned.
type Run = (Vec<(String, u32)>, Option<u64>);

/// Runs `methods` of the test table `ssdt` (ASL) beside our DSDT in ACPICA's `acpiexec`
/// (the interpreter Linux uses; it keeps operation regions in memory) and returns, per
/// method, the notifications it sent (`(device, value)`, sorted) and the integer it
/// returned.
fn acpiexec(dir: &Path, ssdt: &str, methods: &[&str]) -> Vec<Run> {
    std::fs::write(dir.join("test.asl"), ssdt).unwrap();
    let (ok, text) = iasl(dir, &["test.asl"]);
    assert!(ok, "iasl could not compile the test table:\n{text}");
    let batch: Vec<String> = methods.iter().map(|m| format!("execute {m}")).collect();
    let out = Command::new("acpiexec")
        .args(["-b", &batch.join("; "), "dsdt.dat", "test.aml"])
        .current_dir(dir)
        .output()
        .expect("`acpiexec` is needed for this test: install acpica-tools");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "acpiexec failed:\n{text}");
    assert!(
        !text.contains("AE_") || text.contains("AE_OK"),
        "ACPICA reported an exception:\n{text}"
    );
    let mut runs: Vec<Run> = Vec::new();
    for line in text.lines() {
        if line.starts_with("Evaluating \\") {
            runs.push((Vec::new(), None));
        } else if let Some(rest) = line.split(" Notify on [").nth(1) {
            let device = rest[..4].trim_end_matches('_').to_owned();
            let value = rest.split("Value 0x").nth(1).unwrap();
            let value = u32::from_str_radix(value.split_whitespace().next().unwrap(), 16);
            runs.last_mut().unwrap().0.push((device, value.unwrap()));
        } else if let Some(v) = line.trim().strip_prefix("[Integer] = ") {
            runs.last_mut().unwrap().1 = Some(u64::from_str_radix(v, 16).unwrap());
        }
    }
    assert_eq!(runs.len(), methods.len(), "{text}");
    // ACPICA delivers notifications from a deferred queue: their order is its own.
    for run in &mut runs {
        run.0.sort();
    }
    runs
}

#[test]
fn the_hotplug_aml_notifies_the_right_slots_and_ejects_in_acpica() {
    qomu_tests::require_tools!("iasl" from "acpica-tools", "acpiexec" from "acpica-tools");
    let dir = std::env::temp_dir().join(format!("qomu-acpiexec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let board = Board {
        cpus: 1,
        serials: vec![(0x3f8, 4)],
    };
    let tables = build(&board).unwrap();
    let dsdt = tables
        .tables
        .iter()
        .find(|t| t.signature == "DSDT")
        .unwrap();
    std::fs::write(dir.join("dsdt.dat"), &dsdt.bytes).unwrap();
    // Each method sets the registers as the devices would (the GED's status, the hotplug
    // controller's PCIU and PCID), then runs the GED's _EVT as Linux's GED driver does on
    // its interrupt; ejects run a slot's _EJ0 as acpiphp does and read B0EJ back.
    let event = |name: &str, ged: u32, up: u32, down: u32| {
        format!(
            "Method ({name}, 0) {{ \\_SB.GED.GDAT = {ged:#x}  \\_SB.PCI0.PCIU = {up:#x}  \
             \\_SB.PCI0.PCID = {down:#x}  \\_SB.GED._EVT (0) }}\n"
        )
    };
    let eject = |name: &str, slot: u32| {
        format!(
            "Method ({name}, 0) {{ \\_SB.PCI0.B0EJ = 0  \\_SB.PCI0.S{slot:02X}._EJ0 (0)  \
             Return (\\_SB.PCI0.B0EJ) }}\n"
        )
    };
    let mut ssdt = String::from(
        "DefinitionBlock (\"\", \"SSDT\", 2, \"QOMU\", \"HPTEST\", 1)\n{\n\
         External (\\_SB.GED.GDAT, FieldUnitObj)\n\
         External (\\_SB.PCI0.PCIU, FieldUnitObj)\n\
         External (\\_SB.PCI0.PCID, FieldUnitObj)\n\
         External (\\_SB.PCI0.B0EJ, FieldUnitObj)\n\
         External (\\_SB.GED._EVT, MethodObj)\n",
    );
    for slot in [1, 5, 31] {
        ssdt += &format!("External (\\_SB.PCI0.S{slot:02X}._EJ0, MethodObj)\n");
    }
    ssdt += &event("ADD5", 2, 1 << 5, 0);
    ssdt += &event("DEL5", 2, 0, 1 << 5);
    ssdt += &event("BOTH", 2, 1 << 1 | 1 << 31, 1 << 5);
    // Slot 0 is the host bridge: never announced. No hotplug bit: PCNT is not run.
    ssdt += &event("HOST", 2, 1, 1);
    ssdt += &event("NONE", 1, 1 << 5, 1 << 5);
    ssdt += &eject("EJ01", 1);
    ssdt += &eject("EJ05", 5);
    ssdt += &eject("EJ31", 31);
    ssdt += "}\n";
    let runs = acpiexec(
        &dir,
        &ssdt,
        &[
            "ADD5", "DEL5", "BOTH", "HOST", "NONE", "EJ01", "EJ05", "EJ31",
        ],
    );
    let notes = |list: &[(&str, u32)]| -> Vec<(String, u32)> {
        list.iter().map(|&(d, v)| (d.to_owned(), v)).collect()
    };
    const CHECK: u32 = 1;
    const EJECT_REQUEST: u32 = 3;
    assert_eq!(
        runs[0].0,
        notes(&[("S05", CHECK)]),
        "a device added to slot 5"
    );
    assert_eq!(
        runs[1].0,
        notes(&[("S05", EJECT_REQUEST)]),
        "slot 5 asked back"
    );
    assert_eq!(
        runs[2].0,
        notes(&[("S01", CHECK), ("S05", EJECT_REQUEST), ("S1F", CHECK)]),
        "several slots in one event"
    );
    assert_eq!(runs[3].0, notes(&[]), "slot 0 is never notified");
    // The power button bit alone notifies the button, not the slots.
    assert_eq!(runs[4].0, notes(&[("PWRB", 0x80)]));
    for (run, slot) in runs[5..].iter().zip([1u32, 5, 31]) {
        assert_eq!(
            run.1,
            Some(1 << slot),
            "S{slot:02X}._EJ0 writes its bit to B0EJ"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
