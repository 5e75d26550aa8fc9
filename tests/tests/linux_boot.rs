//! Boots Debian's cloud kernel with a busybox initramfs (scripts/guest-kit) and a
//! virtio-blk-pci, hot-plugs a virtio-rng-pci into it and takes it back (Linux's acpiphp,
//! the virtio drivers over MSI-X), and waits for its init to report and power off through
//! ACPI; and saves and restores a Linux that works with both devices. Linux needs
//! hardware virtualization: on hosts whose /dev/kvm emulates guest ring 0 (PVM) it cannot
//! boot, and the native test says so and skips; the nested test runs the same test on an
//! emulated host that has it (QEMU's TCG with SVM, kvm-amd in it), on any host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use machine::{MachineConfig, RunState};
use qom::{SubscribeOptions, Target, Value};
use qomu_tests::{
    TempDir, TestVm, hardware_virtualization, kvm_usable, require_tools, skip_run_by_twin,
};

/// The kit: `QOMU_GUEST_KIT` if set (a kit built elsewhere, for a host without the
/// package archive), else `target/guest-kit`, built or rebuilt by `scripts/guest-kit`
/// (once, though both tests ask for it at the same time).
fn guest_kit() -> PathBuf {
    static KIT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KIT.get_or_init(find_or_build_kit).clone()
}

fn find_or_build_kit() -> PathBuf {
    if let Some(kit) = std::env::var_os("QOMU_GUEST_KIT") {
        return PathBuf::from(kit);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let kit = root.join("target/guest-kit");
    let script = root.join("scripts/guest-kit");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // Built again when the script is newer than the initramfs it made.
    let stale = modified(&kit.join("initramfs.cpio.gz")) < modified(&script);
    if stale || !kit.join("vmlinuz").is_file() || !kit.join("busybox").is_file() {
        let status = Command::new(&script)
            .arg(&kit)
            .status()
            .expect("run scripts/guest-kit");
        assert!(status.success(), "scripts/guest-kit failed");
    }
    kit
}

/// What the disk plugged at start holds at its first byte.
const DISK_TEXT: &str = "QOMU DISK READ BY LINUX";
/// What the hot-plugged disk holds at its first byte (under 24 bytes: the guest reads 24).
const HOT_TEXT: &str = "HOT-PLUGGED DISK, LINUX";

/// The native tests, run by `scripts/linux-check-nested` on a QEMU guest whose CPU has
/// SVM, with this very test binary: the whole check on an emulated host with hardware
/// virtualization, where this host has none (or as well as natively where it has).
#[test]
fn linux_check_on_an_emulated_host_with_svm() {
    require_tools!("qemu-system-x86_64" from "qemu-system-x86");
    let kit = guest_kit();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/linux-check-nested");
    check_nested(&script, &kit, None, "3 passed");
    // The migration between two qomu processes on an emulated host of its own: run after
    // the three in-process tests on the same emulated host it stalled before the migration
    // began, twice on 2026-12-02, while alone it passes (not understood yet,
    // docs/testing.md).
    check_nested(&script, &kit, Some(MIGRATION_TEST), "1 passed");
}

/// The Linux test that migrates between two qomu processes.
const MIGRATION_TEST: &str = "linux_migrates_live_between_two_qomu_processes";

/// Runs scripts/linux-check-nested for `only` (or every test but [`MIGRATION_TEST`]) and
/// checks its summary says `passed`.
fn check_nested(script: &Path, kit: &Path, only: Option<&str>, passed: &str) {
    let run = || {
        let mut cmd = Command::new(script);
        cmd.arg(kit)
            .arg(std::env::current_exe().expect("this test binary"))
            .stdin(Stdio::null());
        match only {
            Some(name) => cmd.arg(name),
            None => cmd.env("QOMU_NESTED_SKIP", MIGRATION_TEST),
        };
        cmd.output().expect("run scripts/linux-check-nested")
    };
    let mut out = run();
    // Status 3: the emulated host itself went away mid-test, without the test's result (QEMU's
    // TCG with nested SVM did, once in about five runs here, docs/testing.md). A guest kernel
    // that stalled in its own boot, before its init ran (CI saw one on 2026-12-02, after
    // i8042's probe; the vCPUs' state goes into the log). A guest that stopped making
    // progress later, no console line coming for the whole patience (seen once here on
    // 2026-12-02, the snapshot test's restored guest after tick 4; and status 124, the
    // emulated host's own time running out). These are treated as the emulator's: one more
    // run, said so, with the first run's whole log. A test that failed any other way (a
    // wrong value, a refused operation) is not run again. Open: whether the later stalls are
    // qomu's (docs/testing.md).
    let stalled = |out: &std::process::Output| {
        let console = String::from_utf8_lossy(&out.stdout);
        console.contains(STALLED_IN_BOOT)
            || console.contains("no console line containing \"qomu-linux-boot:")
            || out.status.code() == Some(124)
    };
    if out.status.code() == Some(3) || (!out.status.success() && stalled(&out)) {
        eprintln!(
            "linux-check-nested: the emulated host ended, or its guest stopped making progress, \
             before the test was done; running it once more:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out = run();
    }
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // What the guests reported, shown with --nocapture (the whole console on a failure).
    for line in console.lines().filter(|l| l.contains("qomu-")) {
        eprintln!("{line}");
    }
    assert!(
        console.contains("qomu-nested: svm 2 npt 2"),
        "the emulated host has SVM with nested paging:\n{console}\n{stderr}"
    );
    assert!(
        console.contains(&format!("test result: ok. {passed}")),
        "the Linux boot test ran and passed on the emulated host:\n{console}\n{stderr}"
    );
    assert!(out.status.success(), "{}:\n{console}\n{stderr}", out.status);
}

/// A raw image `name` of `size` bytes in `dir`, starting with `text`.
fn image(dir: &TempDir, name: &str, size: usize, text: &str) -> PathBuf {
    let path = dir.path(name);
    let mut bytes = vec![0u8; size];
    bytes[..text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(&path, &bytes).expect("disk image");
    path
}

/// The disk plugged at start: 2 MiB, `DISK_TEXT` in sector 0.
fn disk_image(dir: &TempDir) -> PathBuf {
    image(dir, "disk.img", 2 << 20, DISK_TEXT)
}

/// `device_del ID`, a request the guest's acpiphp answers with `_EJ0`: `unplugged`,
/// DEVICE_DELETED, the guest's `removed` line, and the device gone from the tree.
fn unplug(vm: &mut TestVm, id: &str, removed: &str) {
    vm.machine.device_del(id).expect("device_del");
    vm.wait_event("unplugged");
    vm.wait_event("DEVICE_DELETED");
    guest_says(vm, removed);
    let path = format!("/machine/peripheral/{id}");
    assert!(vm.machine.tree().lookup(&path).is_err(), "{path} is gone");
}

/// The guest's init reports `ok` and powers off through ACPI: a `guest-shutdown` and
/// exit status 0.
fn powers_off(vm: &mut TestVm) {
    guest_says(vm, "qomu-linux-boot: ok");
    let shutdown = vm.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown.field("reason"),
        Some(&Value::Enum("guest-shutdown".into()))
    );
    assert_eq!(vm.wait_exit(), 0);
}

/// The kit's Linux with 2 vCPUs, 512 MiB, a virtio-blk on `disk` plugged at start
/// (`qomu.disk=1`), `more` devices and `append` for its init.
fn linux(kit: &Path, disk: &Path, more: &[&str], append: &str) -> MachineConfig {
    let blk = format!(
        "virtio-blk-pci,id=disk0,file={},serial=LINUX-0001",
        disk.display()
    );
    MachineConfig {
        memory: 512 << 20,
        cpus: 2,
        initrd: Some(kit.join("initramfs.cpio.gz")),
        devices: std::iter::once(blk.as_str())
            .chain(more.iter().copied())
            .map(|d| d.parse().expect("device spec"))
            .collect(),
        ..MachineConfig::with_kernel(
            kit.join("vmlinuz"),
            &format!("console=ttyS0 panic=-1 quiet loglevel=4 qomu.disk=1 {append}"),
        )
    }
}

/// Waits for the guest's report line containing `text`, and shows it (`--nocapture`).
fn guest_says(vm: &mut TestVm, text: &str) -> String {
    let line = vm.wait_line(text);
    eprintln!("{line}");
    line
}

/// What a Linux guest that never reached its init says through the test's panic: the
/// nested check runs once more on seeing it (an emulated host's stall, see
/// [`linux_check_on_an_emulated_host_with_svm`]).
const STALLED_IN_BOOT: &str = "qomu-linux-boot: stalled before its init";

/// Waits for the guest's init to report the kernel up; returns that line. A kernel that
/// never gets there fails the test with [`STALLED_IN_BOOT`], its last console lines and
/// where its vCPUs stand.
fn kernel_up(vm: &mut TestVm) -> String {
    match vm.try_wait_line("qomu-linux-boot: kernel") {
        Some(line) => {
            eprintln!("{line}");
            line
        }
        None => panic!(
            "{STALLED_IN_BOOT} within {:?}; the console's last lines:\n{}\nthe vCPUs: {:?}",
            qomu_tests::patience(),
            vm.recent_lines(),
            vm.machine.query_cpus()
        ),
    }
}

/// Whether Linux can run on this host's KVM; if not, says why, and the test skips.
fn linux_runs_here() -> bool {
    if !hardware_virtualization() {
        skip_run_by_twin(
            "this CPU shows no hardware virtualization (no vmx or svm in /proc/cpuinfo); \
             KVM emulates guest ring 0 here and an unmodified Linux kernel cannot boot (see docs/testing.md)",
            "linux_check_on_an_emulated_host_with_svm, on an emulated host that has it,",
        );
        return false;
    }
    kvm_usable()
}

#[test]
fn linux_boots_hotplugs_a_virtio_rng_and_powers_off() {
    if !linux_runs_here() {
        return;
    }
    let kit = guest_kit();
    let dir = TempDir::new("linux-disk");
    let disk = disk_image(&dir);
    let mut vm = TestVm::with_config(linux(&kit, &disk, &[], "qomu.hotplug=1"));
    vm.start();
    let up = kernel_up(&mut vm);
    assert!(
        up.contains(
            &std::fs::read_to_string(kit.join("kernel-version"))
                .unwrap()
                .trim()
                .to_owned()
        ),
        "{up}"
    );
    let found = guest_says(&mut vm, "qomu-linux-boot: cpus=");
    assert!(
        found.contains("cpus=2"),
        "Linux found both vCPUs through ACPI: {found}"
    );

    // The cold-plugged disk, through Linux's virtio-blk driver: get-id, capacity, a read,
    // and a write with a flush that lands in the image file.
    let vda = guest_says(&mut vm, "qomu-linux-boot: vda serial");
    assert!(
        vda.ends_with("serial LINUX-0001 size 4096"),
        "{vda}\n{}",
        vm.recent_lines()
    );
    let read = guest_says(&mut vm, "qomu-linux-boot: vda reads");
    assert!(read.ends_with(DISK_TEXT), "{read}");
    let wrote = guest_says(&mut vm, "qomu-linux-boot: vda write status");
    assert!(wrote.ends_with("status 0"), "{wrote}");
    let written = std::fs::read(&disk).expect("disk image");
    assert!(
        written[512..].starts_with(b"written by Linux through virtio-blk\n"),
        "sector 1 of the image: {:?}",
        String::from_utf8_lossy(&written[512..600])
    );
    assert!(
        vm.get("/machine/peripheral/disk0", "flushes")
            .as_u64()
            .unwrap_or(0)
            > 0,
        "conv=fsync reached the device as a flush"
    );

    // Hot plug: acpiphp brings the device up, the driver uses it through MSI-X.
    for notifier in ["plugged", "driver-ok", "unplugged"] {
        vm.client
            .subscribe(
                Target::Type("virtio-device".into()),
                notifier,
                SubscribeOptions::default(),
            )
            .expect(notifier);
    }
    vm.client
        .subscribe(
            Target::Object("/machine".into()),
            "DEVICE_DELETED",
            SubscribeOptions::default(),
        )
        .expect("DEVICE_DELETED");
    guest_says(&mut vm, "qomu-linux-boot: hotplug ready");
    vm.machine
        .device_add(
            "virtio-rng-pci",
            Some("rng0"),
            None,
            &Value::map::<&str>([]),
        )
        .expect("device_add");
    vm.wait_event("plugged");
    let added = guest_says(&mut vm, "qomu-linux-boot: hotplug added");
    assert!(added.contains("/sys/bus/pci/devices/"), "{added}");
    vm.wait_event("driver-ok");
    let hwrng = guest_says(&mut vm, "qomu-linux-boot: hwrng");
    let msix = guest_says(&mut vm, "qomu-linux-boot: msix");
    // The guest's interrupt counts and its kernel's last messages come before this.
    guest_says(&mut vm, "qomu-linux-boot: hotplug in use");
    let counters: Vec<String> = [
        "status",
        "notifications",
        "used-batches",
        "msix-messages",
        "interrupts",
    ]
    .iter()
    .map(|p| format!("{p}={:?}", vm.get("/machine/peripheral/rng0", p)))
    .collect();
    assert!(
        hwrng.contains("virtio_rng") && hwrng.ends_with(" 64 bytes"),
        "the driver read entropy (its interrupts arrived): {hwrng}\ndevice: {}\n{}",
        counters.join(" "),
        vm.recent_lines()
    );
    assert!(
        !msix.contains("msix 0 "),
        "Linux uses MSI-X: {msix}\n{}",
        vm.recent_lines()
    );
    let messages = vm.get("/machine/peripheral/rng0", "msix-messages");
    assert!(
        messages.as_u64().unwrap_or(0) > 0,
        "MSI-X messages sent: {messages:?}"
    );
    unplug(&mut vm, "rng0", "qomu-linux-boot: hotplug removed");

    // A disk, hot-plugged and taken back the same way: Linux's virtio-blk reads it as vdb.
    guest_says(&mut vm, "qomu-linux-boot: hotplug blk ready");
    let hot = image(&dir, "hot.img", 1 << 20, HOT_TEXT);
    vm.machine
        .device_add(
            "virtio-blk-pci",
            Some("disk1"),
            None,
            &Value::map([
                ("file", Value::Str(hot.display().to_string())),
                ("serial", Value::Str("HOT-0002".into())),
            ]),
        )
        .expect("device_add");
    vm.wait_event("plugged");
    vm.wait_event("driver-ok");
    let vdb = guest_says(&mut vm, "qomu-linux-boot: hotplug blk vdb");
    assert!(
        vdb.ends_with(&format!("serial HOT-0002 reads {HOT_TEXT}")),
        "{vdb}\n{}",
        vm.recent_lines()
    );
    unplug(&mut vm, "disk1", "qomu-linux-boot: hotplug blk removed");
    powers_off(&mut vm);
}

/// The guest's uptime in a tick line (`... uptime 6.92 ...`).
fn uptime(tick: &str) -> f64 {
    tick.split_whitespace()
        .skip_while(|w| *w != "uptime")
        .nth(1)
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no uptime in {tick:?}"))
}

/// Linux saved while it works (a tick a second: the timer, a disk write with a flush,
/// entropy over MSI-X) and restored into a new machine goes on where it was: the ticks
/// continue without a reboot, and every device still answers; then a 5 s `stop` and `cont`
/// hardly shows in its clocks.
#[test]
fn linux_goes_on_after_a_snapshot_and_a_restore() {
    if !linux_runs_here() {
        return;
    }
    let kit = guest_kit();
    let dir = TempDir::new("linux-snapshot");
    let disk = disk_image(&dir);
    // 256 MiB: the RAM is saved and loaded, slowly on an emulated host.
    let config = || MachineConfig {
        memory: 256 << 20,
        ..linux(&kit, &disk, &["virtio-rng-pci,id=rng0"], "qomu.ticks=8")
    };
    let mut vm = TestVm::with_config(config());
    vm.start();
    kernel_up(&mut vm);
    let tick = guest_says(&mut vm, "qomu-linux-boot: tick 3 ");
    assert!(tick.contains("hwrng 16 disk tick 3"), "{tick}");
    let saved_at = uptime(&tick);

    let uri = format!("file:{}", dir.path("linux.snapshot").display());
    vm.machine.migrate(&uri).expect("migrate");
    assert!(
        vm.machine
            .wait_for_state(RunState::Postmigrate, qomu_tests::patience()),
        "saved: {:?}",
        vm.machine.query_migrate()
    );
    vm.machine.quit();
    assert_eq!(vm.wait_exit(), 0);
    drop(vm);

    let mut vm = TestVm::with_config(config());
    vm.machine.incoming(&uri, true).expect("incoming");
    let mut last = saved_at;
    let mut tick_length = 0.0;
    for n in 4..=8 {
        let tick = guest_says(&mut vm, &format!("qomu-linux-boot: tick {n} "));
        assert!(
            tick.contains(&format!("hwrng 16 disk tick {n}")),
            "{tick}\n{}",
            vm.recent_lines()
        );
        let gap = uptime(&tick) - last;
        last = uptime(&tick);
        match n {
            4 => {
                // The guest's clock did not count the save and the load (on an emulated
                // host loading the RAM alone takes over 10 s); a tick takes about 1.1 s.
                assert!(
                    gap < 5.0,
                    "the guest saw {gap:.2} s pass between tick 3 and tick 4"
                );
            }
            5 => {
                // A 5 s stop: kvmclock stands still, so the guest's clocks (its uptime,
                // CLOCK_BOOTTIME: CLOCK_MONOTONIC plus time suspended, none here) see less
                // than 1 s of it.
                tick_length = gap;
                vm.machine.stop().expect("stop");
                std::thread::sleep(std::time::Duration::from_secs(5));
                vm.machine.cont().expect("cont");
            }
            6 => {
                let seen = gap - tick_length;
                eprintln!("qomu-linux-boot: a 5 s stop showed as {seen:.2} s in the guest");
                assert!(
                    seen < 1.0,
                    "the guest saw {seen:.2} s of a 5 s stop (ticks {tick_length:.2} s apart, \
                     {gap:.2} s across the stop)"
                );
            }
            _ => {}
        }
    }
    powers_off(&mut vm);
    // Everything the restored guest printed (a few lines, all kept): no new boot.
    assert!(
        !vm.recent_lines().contains("qomu-linux-boot: kernel"),
        "no reboot after the restore:\n{}",
        vm.recent_lines()
    );
}

/// Runs `ip ARGS` (iproute2's, or busybox's on the emulated host) in this thread's network
/// namespace; true if it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Linux's virtio_net on a NIC plugged at start (1024-entry receive queue, MTU 1400
/// advised), its tap's other end 10.0.2.2/24 in a
/// network namespace of this test's thread (`unshare(CLONE_NEWNET)`: the machine, its taps
/// and the `ip` runs are all in it, nothing outside): it pings 10.0.2.2 and sends it UDP
/// (a traceroute probe, answered by the namespace's ICMP port unreachable). Then a second
/// NIC, hot-plugged on a second tap (10.0.3.2/24), is brought up by acpiphp and
/// virtio_net, pings its end, and is unplugged; the netdev goes with netdev_del.
#[test]
fn linux_talks_over_virtio_net_and_hot_plugs_a_second_nic() {
    if !linux_runs_here() {
        return;
    }
    // SAFETY: unshare has no memory preconditions; it moves only this thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "a network namespace of the test's own: {}",
            std::io::Error::last_os_error()
        );
    }
    assert!(ip(&["link", "set", "lo", "up"]), "ip link set lo up");
    let kit = guest_kit();
    let dir = TempDir::new("linux-net");
    let disk = disk_image(&dir);
    let mut config = linux(
        &kit,
        &disk,
        &["virtio-net-pci,id=nic0,netdev=n0,rx_queue_size=1024,host_mtu=1400"],
        "qomu.net=1 qomu.nethotplug=1",
    );
    config.netdevs = vec![
        "tap,id=n0,ifname=qlt0,script=no,downscript=no"
            .parse()
            .expect("netdev spec"),
    ];
    let mut vm = TestVm::with_config(config);
    assert!(ip(&["addr", "add", "10.0.2.2/24", "dev", "qlt0"]));
    assert!(ip(&["link", "set", "qlt0", "up"]));
    for notifier in ["plugged", "driver-ok"] {
        vm.client
            .subscribe(
                Target::Type("virtio-device".into()),
                notifier,
                SubscribeOptions::default(),
            )
            .expect(notifier);
    }
    vm.client
        .subscribe(
            Target::Object("/machine".into()),
            "DEVICE_DELETED",
            SubscribeOptions::default(),
        )
        .expect("DEVICE_DELETED");
    vm.start();
    kernel_up(&mut vm);
    let eth0 = guest_says(&mut vm, "qomu-linux-boot: net eth0 ");
    assert!(
        // The MTU the device advised (VIRTIO_NET_F_MTU) is the one Linux took.
        eth0.contains("52:54:00:12:34:56 mtu 1400") && eth0.ends_with("carrier 1"),
        "{eth0}\n{}",
        vm.recent_lines()
    );
    let ping = guest_says(&mut vm, "qomu-linux-boot: net ping ");
    assert!(
        ping.ends_with("3 packets received"),
        "{ping}\n{}",
        vm.recent_lines()
    );
    let udp = guest_says(&mut vm, "qomu-linux-boot: net udp ");
    assert!(
        udp.contains("10.0.2.2"),
        "the UDP probe was answered: {udp}"
    );
    let nic = "/machine/peripheral/nic0";
    let sent = vm.get(nic, "tx-packets").as_u64().unwrap_or(0);
    assert!(
        sent >= 5,
        "ARP, 3 echo requests and the probe: tx-packets {sent}"
    );
    assert_eq!(vm.get("/netdev/n0", "tx-packets").as_u64(), Some(sent));
    // The filter Linux programmed through the control queue: not promiscuous, the IPv4
    // all-hosts group in its multicast table.
    let filter = vm
        .machine
        .query_rx_filter(Some("nic0"))
        .expect("query-rx-filter");
    eprintln!("qomu-linux-boot: rx filter {filter:?}");
    let Value::List(infos) = &filter else {
        panic!("{filter:?}")
    };
    assert_eq!(infos[0].field("promiscuous"), Some(&Value::Bool(false)));
    assert!(
        matches!(infos[0].field("multicast-table"), Some(Value::List(t))
            if t.contains(&Value::Str("01:00:5e:00:00:01".into()))),
        "{filter:?}"
    );
    let features = vm.get(nic, "guest-features").as_u64().unwrap_or(0);
    eprintln!("qomu-linux-boot: virtio_net took features {features:#x}");

    guest_says(&mut vm, "qomu-linux-boot: nethotplug ready");
    vm.machine
        .netdev_add(
            "tap",
            Some("n1"),
            vec![("ifname".into(), Value::Str("qlt1".into()))],
        )
        .expect("netdev_add");
    assert!(ip(&["addr", "add", "10.0.3.2/24", "dev", "qlt1"]));
    assert!(ip(&["link", "set", "qlt1", "up"]));
    vm.machine
        .device_add(
            "virtio-net-pci",
            Some("nic1"),
            None,
            &Value::map([("netdev", Value::Str("n1".into()))]),
        )
        .expect("device_add");
    vm.wait_event("plugged");
    vm.wait_event("driver-ok");
    let eth1 = guest_says(&mut vm, "qomu-linux-boot: nethotplug eth1 ");
    assert!(
        eth1.contains("52:54:00:12:34:57") && eth1.ends_with("3 packets received"),
        "{eth1}\n{}",
        vm.recent_lines()
    );
    vm.machine.device_del("nic1").expect("device_del");
    vm.wait_event("DEVICE_DELETED");
    guest_says(&mut vm, "qomu-linux-boot: nethotplug eth1 removed");
    vm.machine.netdev_del("n1").expect("netdev_del");
    assert!(
        !ip(&["link", "show", "qlt1"]),
        "the tap went with its netdev"
    );
    powers_off(&mut vm);
}

/// Waits for a line containing `text` in the console file `path`; the file's text.
fn console_says(path: &Path, text: &str) -> String {
    let deadline = std::time::Instant::now() + qomu_tests::patience();
    loop {
        let out = std::fs::read_to_string(path).unwrap_or_default();
        if out.contains(text) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no '{text}' on the console within {:?}:\n{out}",
            qomu_tests::patience()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Linux with a virtio-blk and a virtio-rng, ticking, migrated live between two qomu
/// processes over a unix socket: the destination goes on ticking from where the source
/// was (entropy and the disk still answering), without a reboot, and powers off.
#[test]
fn linux_migrates_live_between_two_qomu_processes() {
    if !linux_runs_here() {
        return;
    }
    let kit = guest_kit();
    let dir = TempDir::new("linux-migrate");
    let disk = disk_image(&dir);
    let args = |console: &Path| -> Vec<String> {
        [
            "--kernel",
            kit.join("vmlinuz").to_str().unwrap(),
            "--initrd",
            kit.join("initramfs.cpio.gz").to_str().unwrap(),
            "--append",
            // Enough ticks for the migration to end well before them (the emulated host's
            // memory copies are slow).
            "console=ttyS0 panic=-1 quiet loglevel=4 qomu.disk=1 qomu.ticks=60",
            "-m",
            "256M",
            "--cpus",
            "2",
            "--device",
            &format!(
                "virtio-blk-pci,id=disk0,file={},serial=LINUX-0001",
                disk.display()
            ),
            "--device",
            "virtio-rng-pci,id=rng0",
            "--serial",
            &format!("file:{}", console.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let spawn = |a: &[String]| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        qomu_tests::Qomu::spawn(&a)
    };
    let (console1, console2) = (dir.path("c1"), dir.path("c2"));
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let mut dest_args = args(&console2);
    dest_args.extend(["--incoming".into(), uri.clone()]);
    let mut second = spawn(&dest_args);
    let mut first = spawn(&args(&console1));
    let mut c = first.session();
    console_says(&console1, "qomu-linux-boot: tick 3 ");
    c.ok("migrate", serde_json::json!({"uri": uri}));
    // MIGRATION's `completed` (or `failed`), read as it comes.
    let deadline = std::time::Instant::now() + qomu_tests::patience();
    loop {
        if let Ok(Some(status)) = first.child.try_wait() {
            panic!("the source qomu ended mid-migration: {status}");
        }
        let waited =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.wait_event("MIGRATION")));
        let Ok(e) = waited else {
            std::thread::sleep(std::time::Duration::from_millis(500));
            panic!(
                "the source's QMP connection closed mid-migration; the source: {:?} (exit \
                 status 0: its guest ran its ticks out and powered off first)",
                first.child.try_wait()
            );
        };
        let status = e["data"]["status"].as_str().unwrap_or_default().to_owned();
        eprintln!("qomu-linux-boot: migration {status}");
        if status == "completed" {
            break;
        }
        assert_ne!(status, "failed", "{e}");
        assert!(std::time::Instant::now() < deadline);
    }
    let info = c.ok("query-migrate", serde_json::json!({}));
    eprintln!("qomu-linux-boot: migrated: {info}");
    let _ = first.child.kill();
    first.wait_exit(std::time::Duration::from_secs(10));
    let out = console_says(&console2, "qomu-linux-boot: ok");
    assert!(
        out.contains("hwrng 16 disk tick 60"),
        "the ticks went on, entropy and disk answering:\n{out}"
    );
    assert!(
        !out.contains("qomu-linux-boot: kernel"),
        "no reboot:\n{out}"
    );
    assert_eq!(second.wait_exit(qomu_tests::patience()), Some(0));
}
