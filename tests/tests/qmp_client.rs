//! qomu's QMP driven by QEMU's own Python client library, `qemu.qmp` (installed from PyPI
//! by .ci/run): each scenario of tests/qmp/qmp_scenarios.py against a real qomu process.

use std::path::PathBuf;
use std::process::Command;

use qomu_tests::{python_modules_present, qomu_binary, require_kvm};

fn scenario(name: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("qmp/qmp_scenarios.py");
    let guests = qomu_guests::path("hello")
        .parent()
        .expect("guest dir")
        .to_owned();
    if !python_modules_present(&[("qemu.qmp", "qemu.qmp")]) {
        return;
    }
    let out = Command::new("python3")
        .arg(&script)
        .arg(qomu_binary())
        .arg(&guests)
        .arg(name)
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scenario {name} failed:\n{text}");
}

macro_rules! scenarios {
    ($($name:ident)*) => {$(
        #[test]
        fn $name() {
            scenario(stringify!($name));
        }
    )*};
    (guest: $($name:ident)*) => {$(
        #[test]
        fn $name() {
            require_kvm!();
            scenario(stringify!($name));
        }
    )*};
}

// The machine stays in prelaunch: no KVM needed.
scenarios! {
    handshake
    qom_types
    object_add_del
    unsubscribe_and_disconnect
    errors_through_the_library
}

// A guest runs.
scenarios! {
    guest:
    qom_basics
    stop_cont_reset_quit
    serial_subscription
    type_subscription_before_the_object
}
