//! Boots Debian's cloud kernel with a busybox initramfs (scripts/guest-kit) and waits for
//! its init to report and power off through ACPI. Linux needs hardware virtualization: on
//! hosts whose /dev/kvm emulates guest ring 0 (PVM) it cannot boot, and this test says so
//! and skips.

use std::path::PathBuf;
use std::process::Command;

use machine::MachineConfig;
use qom::Value;
use qomu_tests::{TestVm, hardware_virtualization, require_kvm};

fn guest_kit() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let kit = root.join("target/guest-kit");
    if !kit.join("vmlinuz").is_file() || !kit.join("initramfs.cpio.gz").is_file() {
        let status = Command::new(root.join("scripts/guest-kit"))
            .arg(&kit)
            .status()
            .expect("run scripts/guest-kit");
        assert!(status.success(), "scripts/guest-kit failed");
    }
    kit
}

#[test]
fn linux_boots_finds_its_hardware_and_powers_off() {
    if !hardware_virtualization() {
        eprintln!(
            "SKIPPED linux_boot: this CPU shows no hardware virtualization (no vmx or svm in /proc/cpuinfo); \
             KVM emulates guest ring 0 here and an unmodified Linux kernel cannot boot (see docs/testing.md)"
        );
        return;
    }
    require_kvm!();
    let kit = guest_kit();
    let mut vm = TestVm::with_config(MachineConfig {
        memory: 512 << 20,
        cpus: 2,
        initrd: Some(kit.join("initramfs.cpio.gz")),
        ..MachineConfig::with_kernel(
            kit.join("vmlinuz"),
            "console=ttyS0 panic=-1 quiet loglevel=4",
        )
    });
    vm.start();
    let up = vm.wait_line("qomu-linux-boot: kernel");
    assert!(
        up.contains(
            &std::fs::read_to_string(kit.join("kernel-version"))
                .unwrap()
                .trim()
                .to_owned()
        ),
        "{up}"
    );
    let found = vm.wait_line("qomu-linux-boot: cpus=");
    assert!(
        found.contains("cpus=2"),
        "Linux found both vCPUs through ACPI: {found}"
    );
    vm.wait_line("qomu-linux-boot: ok");
    let shutdown = vm.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown.field("reason"),
        Some(&Value::Enum("guest-shutdown".into()))
    );
    assert_eq!(vm.wait_exit(), 0);
}
