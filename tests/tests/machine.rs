//! End-to-end tests of the machine through the qom API (no front end): real guests on
//! /dev/kvm, events and console lines through subscriptions.

use std::time::Duration;

use machine::{MachineConfig, RunState};
use qom::{Error, PhasePolicy, Value};
use qomu_tests::{TestVm, require_kvm};

#[test]
fn hello_prints_and_exits_with_the_chosen_code() {
    require_kvm!();
    let mut vm = TestVm::new("hello", "exit=5 greeting");
    vm.start();
    assert_eq!(vm.wait_line("hello from"), "hello from the qomu test guest");
    assert_eq!(vm.wait_line("cmdline"), "cmdline: exit=5 greeting");
    assert_eq!(vm.wait_line("ram"), "ram: 255 MiB");
    assert_eq!(vm.wait_exit(), (5 << 1) | 1);
    // The debug exit is a guest shutdown as far as events go.
    let shutdown = vm.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown,
        Value::map([
            ("guest", Value::Bool(true)),
            ("reason", Value::Enum("guest-shutdown".into()))
        ])
    );
    assert_eq!(vm.get("/machine", "status"), Value::Enum("shutdown".into()));
    assert_eq!(vm.get("/machine", "exit-status"), Value::Int(11));
    assert!(
        vm.get("/machine/unattached/serial0", "lines")
            .as_u64()
            .unwrap()
            >= 4
    );
}

#[test]
fn kvmclock_stands_still_while_the_guest_is_stopped() {
    require_kvm!();
    let mut vm = TestVm::new("idle", "");
    vm.start();
    vm.wait_line("idle guest: halting");
    let clock = |vm: &TestVm| vm.machine.guest_clock_ns().expect("KVM_GET_CLOCK");
    // It runs while the guest runs...
    let t0 = clock(&vm);
    std::thread::sleep(Duration::from_millis(300));
    let running = clock(&vm) - t0;
    assert!(
        running >= 250_000_000,
        "kvmclock ran {running} ns in 300 ms"
    );
    // ...stands still while it is stopped, and goes on from there on `cont`.
    let before = clock(&vm);
    vm.machine.stop().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let stopped = clock(&vm);
    vm.machine.cont().unwrap();
    let after = clock(&vm);
    let paused = after - before;
    eprintln!("kvmclock moved {paused} ns across a 2 s stop");
    assert!(
        paused < 100_000_000,
        "kvmclock moved {paused} ns across a 2 s stop"
    );
    assert!(
        stopped >= before,
        "KVM's clock itself counts on while stopped"
    );
    // The same across a save of the stopped machine: the file holds the stopped clock.
    vm.machine.stop().unwrap();
    let dir = qomu_tests::TempDir::new("kvmclock");
    let file = dir.path("vm.snap");
    vm.machine
        .migrate(&format!("file:{}", file.display()))
        .unwrap();
    assert!(
        vm.machine
            .wait_for_state(RunState::Postmigrate, qomu_tests::patience())
    );
    std::thread::sleep(Duration::from_secs(1));
    let saved_at = clock(&vm);
    vm.machine.cont().unwrap();
    let moved = clock(&vm) - after;
    assert!(
        moved < 100_000_000,
        "kvmclock moved {moved} ns across a stop and a save"
    );
    assert!(saved_at > after);
}

#[test]
fn stop_mid_spin_and_cont_finishes_correctly() {
    require_kvm!();
    let mut vm = TestVm::new("spin", "iters=400000 step=20000");
    vm.start();
    vm.wait_line("spin guest: 20000");
    vm.machine.stop().unwrap();
    assert_eq!(vm.machine.run_state(), RunState::Paused);
    assert_eq!(vm.get("/machine", "status"), Value::Enum("paused".into()));
    vm.wait_event("STOP");
    // Paused means paused: no output, and the instruction pointer stays put.
    let rip = |vm: &TestVm| {
        vm.machine.query_cpus().unwrap()[0]
            .field("registers")
            .unwrap()
            .field("rip")
            .unwrap()
            .clone()
    };
    let before = rip(&vm);
    let seen = vm.lines_so_far().len();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        vm.lines_so_far().len(),
        seen,
        "the guest printed while paused"
    );
    assert_eq!(rip(&vm), before);
    // Stop again is harmless; cont resumes.
    vm.machine.stop().unwrap();
    vm.machine.cont().unwrap();
    vm.wait_event("RESUME");
    assert_eq!(vm.wait_line("sum="), "spin guest: sum=80000200000 ok");
    assert_eq!(vm.wait_exit(), 1);
    assert!(
        vm.take_events().iter().all(|e| e != "STOP"),
        "a second stop while paused emits nothing"
    );
}

#[test]
fn reset_restarts_the_guest() {
    require_kvm!();
    let mut vm = TestVm::new("reset", "");
    vm.start();
    assert_eq!(vm.wait_line("boot"), "reset guest: boot 1");
    vm.wait_line("requesting reset");
    let reset = vm.wait_event("RESET");
    assert_eq!(
        reset,
        Value::map([
            ("guest", Value::Bool(true)),
            ("reason", Value::Enum("guest-reset".into()))
        ])
    );
    // The guest ran again from its start: its output appears a second time.
    assert_eq!(vm.wait_line("boot"), "reset guest: boot 2");
    vm.wait_line("reset guest: done");
    assert_eq!(vm.wait_exit(), (2 << 1) | 1);
    assert_eq!(
        vm.get("/machine/unattached/i8042", "reset-requests"),
        Value::UInt(1)
    );
}

#[test]
fn system_reset_from_the_host() {
    require_kvm!();
    let mut vm = TestVm::new("spin", "iters=100000000 step=20000");
    vm.start();
    vm.wait_line("spin guest: 20000");
    vm.machine
        .reset(machine::ShutdownCause::HostQmpSystemReset)
        .unwrap();
    let reset = vm.wait_event("RESET");
    assert_eq!(
        reset.field("reason"),
        Some(&Value::Enum("host-qmp-system-reset".into()))
    );
    assert_eq!(reset.field("guest"), Some(&Value::Bool(false)));
    vm.wait_line("spin guest: start");
    assert_eq!(vm.machine.run_state(), RunState::Running);
    // A reset while paused leaves the machine in prelaunch, as QEMU does; cont runs it.
    vm.machine.stop().unwrap();
    vm.machine
        .reset(machine::ShutdownCause::HostQmpSystemReset)
        .unwrap();
    assert_eq!(vm.machine.run_state(), RunState::Prelaunch);
    // The configuration stays closed after the first start.
    let err = vm
        .machine
        .object()
        .set("memory-size", Value::UInt(512 << 20))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the machine is past its first start"),
        "{err}"
    );
    vm.machine.cont().unwrap();
    vm.wait_line("spin guest: start");
    vm.machine.quit();
    assert_eq!(vm.wait_exit(), 0);
    let shutdown = vm.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown.field("reason"),
        Some(&Value::Enum("host-qmp-quit".into()))
    );
}

#[test]
fn wild_accesses_are_counted_and_answered_with_all_ones() {
    require_kvm!();
    let mut vm = TestVm::new("wild", "count=4");
    vm.start();
    assert_eq!(
        vm.wait_line("not-all-ones"),
        "wild guest: reads=84 writes=72 not-all-ones=0"
    );
    assert_eq!(vm.wait_exit(), 1, "the guest saw all-ones for every read");
    // 4 rounds x 4 ports x 6 accesses; 4 rounds x 3 addresses x 5 accesses.
    assert_eq!(vm.get("/machine", "unmapped-pio-accesses"), Value::UInt(96));
    assert_eq!(
        vm.get("/machine", "unmapped-mmio-accesses"),
        Value::UInt(60)
    );
    // The VMM is alive and answers.
    assert!(vm.machine.tree().list("/machine").is_ok());
}

#[test]
fn an_instruction_kvm_cannot_run_stops_the_machine_in_internal_error() {
    require_kvm!();
    let mut vm = TestVm::new("bad", "");
    vm.start();
    vm.wait_line("xsave to MMIO");
    assert!(
        vm.machine
            .wait_for_state(RunState::InternalError, qomu_tests::patience())
    );
    vm.wait_event("STOP");
    let error = vm.get("/machine", "error");
    assert!(
        error.as_str().unwrap().contains("KVM internal error"),
        "{error}"
    );
    assert!(vm.machine.exit_status().is_none(), "the VMM keeps running");
    // cont needs a reset first; the error names both states.
    let err = vm.machine.cont().unwrap_err();
    assert_eq!(
        err.to_string(),
        "the machine is in 'internal-error' and cannot go to 'running': reset it first (system_reset)"
    );
    vm.machine
        .reset(machine::ShutdownCause::HostQmpSystemReset)
        .unwrap();
    assert_eq!(vm.machine.run_state(), RunState::Prelaunch);
    assert_eq!(vm.get("/machine", "error"), Value::Str(String::new()));
    vm.machine.cont().unwrap();
    vm.wait_line("xsave to MMIO");
    assert!(
        vm.machine
            .wait_for_state(RunState::InternalError, qomu_tests::patience())
    );
}

#[test]
fn prelaunch_properties_are_refused_once_running() {
    require_kvm!();
    let vm = TestVm::new("spin", "iters=100000000");
    let m = vm.machine.object();
    // In prelaunch they may change; bad values are refused and change nothing.
    m.set("memory-size", Value::UInt(128 << 20)).unwrap();
    assert!(matches!(
        m.set("cpus", Value::UInt(0)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(m.set("memory-size", Value::UInt((128 << 20) + 1)).is_err());
    assert!(m.set("kernel", Value::Str("/nonexistent".into())).is_err());
    assert_eq!(m.get("memory-size").unwrap(), Value::UInt(128 << 20));
    vm.start();
    for (prop, value) in [
        ("memory-size", Value::UInt(64 << 20)),
        ("cpus", Value::UInt(2)),
        ("kernel", Value::Str(String::new())),
        ("append", Value::Str("x".into())),
    ] {
        let err = m.set(prop, value).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::WrongPhase {
                    policy: PhasePolicy::Prelaunch,
                    ..
                }
            ),
            "{prop}: {err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "property '{prop}' of '/machine' can only be set while the machine is in prelaunch; the machine is running"
            )
        );
    }
    assert_eq!(m.get("memory-size").unwrap(), Value::UInt(128 << 20));
    assert!(matches!(
        m.set("status", Value::Str("paused".into())),
        Err(Error::ReadOnly { .. })
    ));
    // Device creation arguments are fixed once realized.
    let err = vm
        .machine
        .tree()
        .set("/machine/unattached/serial0", "iobase", Value::UInt(0x2f8))
        .unwrap_err();
    assert!(matches!(
        err,
        Error::WrongPhase {
            policy: PhasePolicy::BeforeRealize,
            ..
        }
    ));
    vm.machine.quit();
}

#[test]
fn a_missing_kernel_fails_at_cont_and_leaves_prelaunch_intact() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("qomu-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("vanishing.elf");
    std::fs::copy(qomu_guests::path("hello"), &kernel).unwrap();
    let vm = TestVm::with_config(MachineConfig::with_kernel(&kernel, ""));
    std::fs::remove_file(&kernel).unwrap();
    let err = vm.machine.cont().unwrap_err();
    assert!(err.to_string().contains("cannot open"), "{err}");
    assert_eq!(vm.machine.run_state(), RunState::Prelaunch);
    // Fix the configuration and go.
    vm.machine
        .object()
        .set(
            "kernel",
            Value::Str(qomu_guests::path("hello").display().to_string()),
        )
        .unwrap();
    vm.machine
        .add_device("isa-debug-exit", Some("dbg"), vec![])
        .unwrap();
    vm.machine.cont().unwrap();
    assert_eq!(vm.wait_exit(), 1);
}

#[test]
fn the_demo_guest_answers_input_and_the_power_button() {
    require_kvm!();
    let mut vm = TestVm::with_config(MachineConfig::default());
    vm.start();
    vm.wait_line("exit N");
    let sent = vm
        .machine
        .tree()
        .call(
            "serial0",
            "write-input",
            [("data".to_owned(), Value::Str("count 3\r".into()))].into(),
        )
        .unwrap();
    assert_eq!(sent, Some(Value::UInt(8)));
    assert_eq!(vm.wait_line("1 2"), "1 2 3");
    vm.machine.powerdown();
    vm.wait_event("POWERDOWN");
    vm.wait_line("power button pressed");
    let shutdown = vm.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown.field("reason"),
        Some(&Value::Enum("guest-shutdown".into()))
    );
    assert_eq!(vm.wait_exit(), 0);
}

/// The isa-debug-exit devices in the tree.
fn debug_exits(vm: &TestVm) -> usize {
    ["/machine/peripheral", "/machine/peripheral-anon"]
        .iter()
        .filter_map(|p| vm.machine.tree().lookup(p).ok())
        .flat_map(|p| p.children())
        .filter(|d| d.type_name() == "isa-debug-exit")
        .count()
}

#[test]
fn the_demo_guest_gets_its_exit_port_at_its_start_and_only_the_demo() {
    require_kvm!();
    // The demo: no port in prelaunch, one from its first start, and `exit 3` ends qomu as
    // the demo's help says.
    let mut vm = TestVm::with_config(MachineConfig::default());
    assert_eq!(debug_exits(&vm), 0, "nothing the user did not ask for yet");
    vm.start();
    assert_eq!(debug_exits(&vm), 1);
    vm.wait_line("exit N");
    vm.machine
        .tree()
        .call(
            "serial0",
            "write-input",
            [("data".to_owned(), Value::Str("exit 3\r".into()))].into(),
        )
        .unwrap();
    assert_eq!(vm.wait_exit(), 3 << 1 | 1);

    // A machine built without a kernel and given one before it starts (configure.py's
    // way) gets no port it was not given: the guest's write to 0x501 goes nowhere.
    let mut vm = TestVm::with_config(MachineConfig::default());
    vm.machine
        .tree()
        .set(
            "/machine",
            "kernel",
            Value::Str(qomu_guests::path("hello").display().to_string()),
        )
        .unwrap();
    vm.start();
    vm.wait_line("exiting with code 0");
    assert_eq!(debug_exits(&vm), 0);
    assert_eq!(
        vm.machine.run_state(),
        RunState::Running,
        "no port ended it"
    );
    vm.machine.quit();
}

#[test]
fn no_shutdown_keeps_the_machine_until_reset() {
    require_kvm!();
    let mut vm = TestVm::with_config(MachineConfig {
        no_shutdown: true,
        ..MachineConfig::default()
    });
    vm.start();
    vm.wait_line("exit N");
    vm.machine
        .tree()
        .call(
            "serial0",
            "write-input",
            [("data".to_owned(), Value::Str("poweroff\r".into()))].into(),
        )
        .unwrap();
    vm.wait_event("SHUTDOWN");
    vm.wait_event("STOP");
    assert_eq!(vm.machine.run_state(), RunState::Shutdown);
    assert!(vm.machine.exit_status().is_none());
    vm.machine
        .reset(machine::ShutdownCause::HostQmpSystemReset)
        .unwrap();
    vm.machine.cont().unwrap();
    vm.wait_line("qomu demo guest");
    vm.machine.quit();
    assert_eq!(vm.wait_exit(), 0);
}

#[test]
fn memory_dumps_and_registers() {
    require_kvm!();
    let mut vm = TestVm::new("spin", "iters=100000000 step=50000");
    assert!(
        vm.machine.query_cpus().is_err(),
        "no vCPUs before the start"
    );
    vm.start();
    vm.wait_line("spin guest: start");
    vm.machine.stop().unwrap();
    let cpus = vm.machine.query_cpus().unwrap();
    assert_eq!(cpus.len(), 1);
    let regs = cpus[0].field("registers").unwrap();
    let rip = regs.field("rip").unwrap().as_u64().unwrap();
    assert!(
        (0x100000..0x110000).contains(&rip),
        "rip {rip:#x} is in the guest's code"
    );
    assert_eq!(
        regs.field("cr3").unwrap().as_u64(),
        Some(machine::layout::PML4_ADDR)
    );
    assert!(cpus[0].field("thread-id").unwrap().as_i64().unwrap() > 0);
    assert_eq!(
        vm.get("/machine/unattached/cpu[0]", "thread-id"),
        cpus[0].field("thread-id").unwrap().clone()
    );

    let dir = std::env::temp_dir().join(format!("qomu-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (phys, virt) = (dir.join("phys"), dir.join("virt"));
    vm.machine.pmemsave(0x100000, 4096, &phys).unwrap();
    vm.machine.memsave(0x100000, 4096, &virt, 0).unwrap();
    let image = std::fs::read(qomu_guests::path("spin")).unwrap();
    let dumped = std::fs::read(&phys).unwrap();
    // The guest's first code bytes (start.S) appear in the ELF file and in memory.
    let code = &dumped[..16];
    assert!(image.windows(16).any(|w| w == code));
    assert_eq!(
        std::fs::read(&virt).unwrap(),
        dumped,
        "identity mapped: virtual equals physical"
    );
    let err = qom::Error::from(vm.machine.pmemsave(0xf000_0000, 16, &phys).unwrap_err());
    assert_eq!(
        err.fault(),
        Some(&qom::Fault::BadAddress {
            addr: 0xf000_0000,
            size: Some(16)
        })
    );
    assert_eq!(
        bus_bridge::qmp::error::from_qom(&err, bus_bridge::qmp::error::Context::Other).desc,
        "Invalid addr 0x00000000f0000000/size 16 specified",
        "QEMU's text on the wire"
    );
    assert!(
        vm.machine
            .memsave(0x100000, 16, &dir.join("no/such/dir"), 0)
            .is_err()
    );
    assert!(
        vm.machine.memsave(0x100000, 16, &virt, 7).is_err(),
        "no vCPU 7"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    vm.machine.quit();
}

#[test]
fn two_vcpus_and_added_devices() {
    require_kvm!();
    let config = MachineConfig {
        cpus: 2,
        devices: vec![
            "isa-debug-exit,id=dbg".parse().unwrap(),
            "isa-serial,id=com2,iobase=0x2f8,irq=3".parse().unwrap(),
        ],
        ..MachineConfig::with_kernel(qomu_guests::path("hello"), "exit=0")
    };
    let vm = TestVm::with_config(config);
    assert_eq!(
        vm.get("/machine/peripheral/com2", "iobase"),
        Value::UInt(0x2f8)
    );
    assert_eq!(vm.get("com2", "irq"), Value::UInt(3));
    // A second device on the same ports is refused, naming the owner.
    let err = vm
        .machine
        .add_device(
            "isa-serial",
            Some("com3"),
            vec![("iobase".into(), Value::UInt(0x2f8))],
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pio range 0x2f8-0x2ff overlaps 0x2f8-0x2ff of '/machine/peripheral/com2'"
    );
    assert!(
        vm.machine
            .tree()
            .lookup("/machine/peripheral/com3")
            .is_err()
    );
    assert!(
        vm.machine.add_device("i8042", None, vec![]).is_err(),
        "board devices cannot be added"
    );
    assert!(vm.machine.add_device("nonsense", None, vec![]).is_err());
    assert!(
        vm.machine
            .add_device("isa-debug-exit", Some("9bad"), vec![])
            .is_err()
    );
    vm.start();
    assert_eq!(vm.wait_exit(), 1);
    assert_eq!(vm.machine.query_cpus().unwrap().len(), 2);
    assert!(
        vm.machine
            .tree()
            .lookup("/machine/unattached/cpu[1]")
            .is_ok()
    );
}
