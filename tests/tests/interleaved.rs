//! Both front ends on one VM at once (after cloud-hypervisor's
//! `test_api_dbus_and_http_interleaved`): what one does, the other sees.

use std::collections::HashMap;

use qomu_tests::dbus::*;
use qomu_tests::{QmpRaw, kvm_usable, require_dbus};
use serde_json::json;
use zbus::{OwnedVariant, Variant};

fn qom_get(qmp: &mut QmpRaw, path: &str, property: &str) -> serde_json::Value {
    qmp.cmd(&format!(
        r#"{{"execute": "qom-get", "arguments": {{"path": "{path}", "property": "{property}"}}}}"#
    ))
}

fn subscriptions(qmp: &mut QmpRaw) -> Vec<String> {
    qmp.cmd(r#"{"execute": "qom-list", "arguments": {"path": "/subscriptions"}}"#)["return"]
        .as_array()
        .expect("qom-list")
        .iter()
        .filter(|p| p["type"] == "child<subscription>")
        .map(|p| format!("/subscriptions/{}", p["name"].as_str().unwrap()))
        .collect()
}

#[test]
fn qmp_and_dbus_on_one_vm() {
    require_dbus!();
    let bus = SessionBus::start();
    let q = bus.qomu(&["-S"]);
    let mut qmp = q.connect();
    qmp.negotiate();
    let c = bus.client();

    // A subscription made over D-Bus is visible over QMP, owned by the caller's bus name.
    let dbus_sub = c.subscribe(MACHINE, "RESUME");
    let dbus_sub_qom = dbus_sub.trim_start_matches(ROOT).to_owned();
    assert!(subscriptions(&mut qmp).contains(&dbus_sub_qom));
    assert_eq!(
        qom_get(&mut qmp, &dbus_sub_qom, "owner")["return"],
        json!(c.unique_name())
    );
    assert_eq!(
        qom_get(&mut qmp, &dbus_sub_qom, "notifier")["return"],
        "RESUME"
    );

    // And the other way round: QMP's subscription is an object on D-Bus.
    let r = qmp.cmd(
        r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "/machine", "notifier": "property-changed"}}"#,
    );
    let qmp_sub = r["return"]["subscription"].as_str().unwrap().to_owned();
    let qmp_sub_dbus = format!("{ROOT}{qmp_sub}");
    let owner =
        String::try_from(c.get(&qmp_sub_dbus, "org.qomu.Type.Subscription", "Owner")).unwrap();
    assert!(owner.starts_with("qmp:"), "{owner}");
    assert_eq!(
        String::try_from(c.get(&qmp_sub_dbus, "org.qomu.Type.Subscription", "Notifier")).unwrap(),
        "property-changed"
    );
    // Neither front end may remove the other's.
    let e = c.err(&qmp_sub_dbus, OBJECT1, "Delete", &());
    assert_eq!(e.name, "org.freedesktop.DBus.Error.AccessDenied");
    let r = qmp.cmd(&format!(
        r#"{{"execute": "__org.qomu_unsubscribe", "arguments": {{"subscription": "{dbus_sub_qom}"}}}}"#
    ));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");

    // A property set over QMP is a PropertiesChanged on D-Bus...
    let mut changes = c.listen(&format!(
        "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',path='{MACHINE}'"
    ));
    let r = qmp.cmd(
        r#"{"execute": "qom-set", "arguments": {"path": "/machine", "property": "name", "value": "from-qmp"}}"#,
    );
    assert_eq!(r, json!({"return": {}}));
    let m = changes.wait_for("PropertiesChanged", |_| true);
    let (iface, changed, invalidated): (String, HashMap<String, OwnedVariant>, Vec<String>) =
        m.body().deserialize().unwrap();
    assert_eq!(iface, MACHINE_IFACE);
    assert_eq!(
        String::try_from(changed["Name"].try_clone().unwrap()).unwrap(),
        "from-qmp"
    );
    assert!(invalidated.is_empty());
    // ...and QMP's own subscription saw it.
    let ev = qmp.wait_event("__org.qomu_NOTIFY");
    assert_eq!(
        ev["data"]["data"],
        json!({"property": "name", "value": "from-qmp"})
    );

    // A property set over D-Bus reads back over QMP, and QMP hears of it.
    c.set(MACHINE, MACHINE_IFACE, "Name", Variant::from("from-dbus"))
        .unwrap();
    assert_eq!(qom_get(&mut qmp, "/machine", "name")["return"], "from-dbus");
    let ev = qmp.wait_event("__org.qomu_NOTIFY");
    assert_eq!(ev["data"]["data"]["value"], "from-dbus");
    let m = changes.wait_for("PropertiesChanged", |_| true);
    let (_, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
        m.body().deserialize().unwrap();
    assert_eq!(
        String::try_from(changed["Name"].try_clone().unwrap()).unwrap(),
        "from-dbus"
    );

    // A refused set is refused on both, each in its own words (QMP keeps QEMU's text).
    let dbus_err = c
        .set(SERIAL0, SERIAL_IFACE, "Irq", Variant::from(5u8))
        .unwrap_err();
    let qmp_err = qmp.cmd(
        r#"{"execute": "qom-set", "arguments": {"path": "/machine/unattached/serial0", "property": "irq", "value": 5}}"#,
    );
    assert_eq!(dbus_err.name, "org.qomu.Error.WrongPhase");
    assert!(dbus_err.message.contains("'irq'"), "{dbus_err:?}");
    assert_eq!(
        qmp_err["error"]["desc"],
        "Attempt to set property 'irq' on device 'serial0' (type 'isa-serial') after it was realized"
    );
    assert_eq!(
        u8::try_from(c.get(SERIAL0, SERIAL_IFACE, "Irq")).unwrap(),
        4
    );

    if kvm_usable() {
        // `cont` over QMP: RESUME on QMP, the Resume signal to the D-Bus subscriber, and
        // Status over D-Bus.
        let mut mine = c.listen(&format!("type='signal',path='{dbus_sub}'"));
        assert_eq!(qmp.cmd(r#"{"execute": "cont"}"#), json!({"return": {}}));
        qmp.wait_event("RESUME");
        let m = mine.wait_for("Resume", |m| member(m) == "Resume");
        assert_eq!(m.header().interface().unwrap().as_str(), MACHINE_IFACE);
        assert_eq!(
            String::try_from(c.get(MACHINE, MACHINE_IFACE, "Status")).unwrap(),
            "running"
        );
        // `Stop` over D-Bus: STOP over QMP.
        c.ok(MACHINE, MACHINE_IFACE, "Stop", &());
        qmp.wait_event("STOP");
        assert_eq!(
            qmp.cmd(r#"{"execute": "query-status"}"#)["return"]["status"],
            "paused"
        );
    }
}
