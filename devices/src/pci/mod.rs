//! PCI: configuration space, the root bus, its host bridge (`pci-host`), and what every
//! PCI device type shares (its `addr`, plugging into a slot).
//!
//! The root bus is `pci.0`, as QEMU names the root bus of its `pc` machine. Devices are
//! function 0 of their slot; slot 0 is the host bridge's.

pub mod bus;
pub mod config;
pub mod hotplug;
pub mod msi;
pub mod msix;

use std::sync::Arc;

use parking_lot::Mutex;
use qom::{Field, Kind, NotifierDecl, ObjectRef, Property, TypeInfo, Value};
use serde::{Deserialize, Serialize};

pub use bus::{ConfigPorts, Ecam, IntxLine, IrqChip, PciBus, PciDevice, PlugError, intx_gsi};
pub use config::{Bar, BarKind, Ids, PciConfig};
pub use msi::{MsiChip, MsiRouter, MsiVector};
pub use msix::Msix;

use crate::device::{DEVICE, Space, claim, get_string, release};
use crate::platform::{PlatformRef, upgrade};

/// The host bridge's qom type.
pub const HOST_TYPE: &str = "pci-host";
/// The abstract base of PCI devices.
pub const PCI_DEVICE: &str = "pci-device";
/// The root bus's name (`device_add`'s `bus`).
pub const ROOT_BUS: &str = "pci.0";
/// Where the machine puts the hotplug controller.
pub const HOTPLUG_PATH: &str = "/machine/unattached/pci-hotplug";
/// The configuration ports.
pub const CONFIG_PORT: u64 = 0xcf8;
pub const CONFIG_PORT_LEN: u64 = 8;

/// The host bridge as a function: slot 0, class "host bridge", no BARs. Red Hat's
/// vendor ID and QEMU's "PCIe host bridge" device ID, as QEMU's generic host does.
struct HostBridge {
    config: Mutex<PciConfig>,
}

impl PciDevice for HostBridge {
    fn config(&self) -> &Mutex<PciConfig> {
        &self.config
    }
    fn bar_read(&self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Parses a PCI address as QEMU's `addr` property does: `SLOT` or `SLOT.FN`, hexadecimal
/// with or without `0x`. Empty means "the first free slot".
///
/// # Errors
/// Not such an address, a slot past 31, or a function other than 0 (qomu has no
/// multi-function devices).
pub fn parse_addr(typename: &str, text: &str) -> qom::Result<Option<u8>> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || {
        qom::Error::failed(format!(
            "Property '{typename}.addr' doesn't take value '{text}'"
        ))
    };
    let (slot, function) = match text.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (text, None),
    };
    let hex = |t: &str| {
        let t = t.strip_prefix("0x").unwrap_or(t);
        (!t.is_empty() && t.len() <= 2)
            .then(|| u8::from_str_radix(t, 16).ok())
            .flatten()
    };
    let slot = hex(slot)
        .filter(|&s| usize::from(s) < bus::SLOTS)
        .ok_or_else(bad)?;
    match function.map(hex) {
        None | Some(Some(0)) => Ok(Some(slot)),
        Some(Some(f)) if f < 8 => Err(qom::Error::failed(format!(
            "PCI: function {f} of slot {slot} is not available: qomu's devices are single-function"
        ))),
        Some(_) => Err(bad()),
    }
}

/// How errors name a device: QEMU's `TYPE,id=ID` (the id only under /machine/peripheral).
fn label(obj: &ObjectRef) -> String {
    match obj.path().strip_prefix("/machine/peripheral/") {
        Some(id) => format!("{},id={id}", obj.type_name()),
        None => obj.type_name().to_owned(),
    }
}

/// Plugs the device at `obj` into the root bus at its `addr` (in its realize hook).
/// Returns the slot.
///
/// # Errors
/// A bad `addr`, a taken slot, a full bus, or the machine is gone.
pub fn plug(
    platform: &PlatformRef,
    obj: &ObjectRef,
    device: Arc<dyn PciDevice>,
) -> qom::Result<u8> {
    let slot = parse_addr(obj.type_name(), &get_string(obj, "addr")?)?;
    let platform = upgrade(platform)?;
    platform
        .pci_bus()
        .plug(slot, obj.path(), &label(obj), device)
        .map_err(|e| {
            qom::Error::failed(match e {
                PlugError::SlotInUse { slot, by } => format!(
                    "PCI: slot {slot} function 0 not available for {}, in use by {by}",
                    obj.type_name()
                ),
                PlugError::Full => format!(
                    "PCI: no slot/function available for {}, all in use or reserved",
                    obj.type_name()
                ),
            })
        })
}

/// Announces that the device at `obj` is on the bus (its `plugged` notifier), once it is
/// in the tree.
pub fn announce_plugged(obj: &ObjectRef) {
    let (Ok(notifier), Some(slot)) = (
        obj.notifier("plugged"),
        obj.get("slot").ok().and_then(|v| v.as_u64()),
    ) else {
        return;
    };
    notifier.emit(|| {
        Value::map([
            ("bus", Value::Str(ROOT_BUS.to_owned())),
            ("slot", Value::UInt(slot)),
        ])
    });
}

/// Takes the device at `obj` off the bus (in its unrealize hook).
pub fn unplug(platform: &PlatformRef, obj: &ObjectRef) {
    if let Some(platform) = platform.upgrade() {
        let bus = platform.pci_bus();
        if let Some(slot) = bus.slot_of(obj.path()) {
            bus.unplug(slot);
        }
    }
}

/// A function's state in a snapshot: where it sits and its configuration space (BARs,
/// command register, capabilities' control fields).
#[derive(Serialize, Deserialize)]
struct FunctionState {
    slot: u8,
    config: Vec<u8>,
}

fn save_function(platform: &PlatformRef, obj: &ObjectRef) -> qom::Result<FunctionState> {
    let bus = upgrade(platform)?.pci_bus().clone();
    let not_plugged = || qom::Error::failed(format!("{} is not on the PCI bus", obj.path()));
    let slot = bus.slot_of(obj.path()).ok_or_else(not_plugged)?;
    let function = bus.function(slot).ok_or_else(not_plugged)?;
    let config = function.config().lock().snapshot();
    Ok(FunctionState { slot, config })
}

fn load_function(
    platform: &PlatformRef,
    obj: &ObjectRef,
    saved: &FunctionState,
) -> qom::Result<()> {
    let bus = upgrade(platform)?.pci_bus().clone();
    let not_plugged = || qom::Error::failed(format!("{} is not on the PCI bus", obj.path()));
    let slot = bus.slot_of(obj.path()).ok_or_else(not_plugged)?;
    if slot != saved.slot {
        return Err(qom::Error::failed(format!(
            "{} was in PCI slot {} when saved and is in slot {slot} here",
            obj.path(),
            saved.slot
        )));
    }
    let function = bus.function(slot).ok_or_else(not_plugged)?;
    function
        .config()
        .lock()
        .restore(&saved.config)
        .map_err(|e| qom::Error::failed(format!("{}: {e}", obj.path())))?;
    bus.refresh(slot);
    Ok(())
}

/// The host bridge's snapshot: its function and the configuration address latch.
#[derive(Serialize, Deserialize)]
struct HostState {
    function: FunctionState,
    address: u32,
}

/// The abstract base of PCI devices: `addr` and the slot it got.
fn device_type(platform: &PlatformRef) -> TypeInfo {
    let p = platform.clone();
    let (p_save, p_load) = (platform.clone(), platform.clone());
    TypeInfo::new(PCI_DEVICE, DEVICE)
        .abstract_type()
        .description("A device on the PCI root bus")
        .state(
            1,
            move |o| crate::state::encode(o, &save_function(&p_save, o)?),
            move |o, bytes| load_function(&p_load, o, &crate::state::decode(o, bytes)?),
        )
        .notifier(
            NotifierDecl::new(
                "plugged",
                Kind::structure(
                    "PciPlugged",
                    vec![
                        Field::new("bus", Kind::Str, "The bus"),
                        Field::new("slot", Kind::uint8(), "The slot"),
                    ],
                ),
            )
            .description("The device is on the bus and visible to the guest"),
        )
        .notifier(
            NotifierDecl::new("unplug-requested", Kind::structure("PciUnplugRequested", vec![]))
                .description("device_del asked the guest to release the device"),
        )
        .notifier(
            NotifierDecl::new("unplugged", Kind::structure("PciUnplugged", vec![]))
                .description("The guest ejected the device; it is being deleted"),
        )
        .property(
            Property::new("unplug-pending", Kind::Bool)
                .notifying()
                .description("An unplug was requested and the guest has not ejected the device yet")
                .getter(|o| {
                    let slot = o.get("slot")?.as_i64().unwrap_or(-1);
                    let hotplug = o
                        .tree()
                        .lookup(HOTPLUG_PATH)
                        .ok()
                        .and_then(|h| h.instance::<hotplug::Hotplug>());
                    Ok(Value::Bool(match (u8::try_from(slot), hotplug) {
                        (Ok(slot), Some(h)) => h.removal_requested(slot),
                        _ => false,
                    }))
                }),
        )
        .property(
        Property::new("addr", Kind::Str)
            .policy(qom::PhasePolicy::BeforeRealize)
            .description("Slot on the root bus: SLOT or SLOT.0 in hex (\"4\", \"0x04.0\"); empty for the first free one")
            .validate(|o, v| parse_addr(o.type_name(), v.as_str().unwrap_or_default()).map(drop)),
    )
    .property(
        Property::new("slot", Kind::int32())
            .description("The slot the device is plugged into, -1 while it is not")
            .getter(move |o| {
                let slot = p
                    .upgrade()
                    .and_then(|p| p.pci_bus().slot_of(o.path()))
                    .map_or(-1, i64::from);
                Ok(Value::Int(slot))
            }),
    )
}

pub(crate) fn types(platform: &PlatformRef) -> Vec<TypeInfo> {
    let (p_realize, p_unrealize, p_slots) = (platform.clone(), platform.clone(), platform.clone());
    let (p_save, p_load) = (platform.clone(), platform.clone());
    let host = TypeInfo::new(HOST_TYPE, DEVICE)
        .state(
            1,
            move |o| {
                let state = HostState {
                    function: save_function(&p_save, o)?,
                    address: upgrade(&p_save)?.pci_bus().config_address(),
                };
                crate::state::encode(o, &state)
            },
            move |o, bytes| {
                let state: HostState = crate::state::decode(o, bytes)?;
                load_function(&p_load, o, &state.function)?;
                upgrade(&p_load)?
                    .pci_bus()
                    .set_config_address(state.address);
                Ok(())
            },
        )
        .description(
            "PCI host bridge: the root bus pci.0, configuration through ports 0xcf8/0xcfc and ECAM",
        )
        .property(
            Property::new("bus", Kind::Str)
                .description("The name of the root bus")
                .getter(|_| Ok(Value::Str(ROOT_BUS.to_owned()))),
        )
        .property(
            Property::new(
                "slots",
                Kind::list(Kind::structure(
                    "PciSlot",
                    vec![
                        Field::new("slot", Kind::uint8(), "Slot number"),
                        Field::new("device", Kind::Str, "QOM path of the device in it"),
                    ],
                )),
            )
            .description("The occupied slots of the root bus")
            .getter(move |_| {
                let bus = upgrade(&p_slots)?.pci_bus().clone();
                Ok(Value::List(
                    bus.occupants()
                        .into_iter()
                        .map(|(slot, path)| {
                            Value::map([
                                ("slot", Value::UInt(slot.into())),
                                ("device", Value::Str(path)),
                            ])
                        })
                        .collect(),
                ))
            }),
        )
        .property(
            Property::new("ecam-base", Kind::uint64())
                .policy(qom::PhasePolicy::BeforeRealize)
                .description("Guest physical address of the ECAM window (1 MiB: bus 0)"),
        )
        .constructor(|_| {
            let config = PciConfig::new(Ids {
                vendor: 0x1b36,
                device: 0x0008,
                class: 0x06_00_00,
                revision: 0,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            });
            Ok(Arc::new(HostBridge {
                config: Mutex::new(config),
            }))
        })
        .realize(move |o| {
            let bridge = o
                .instance::<HostBridge>()
                .ok_or_else(|| qom::Error::failed("pci-host has no state"))?;
            let bus = upgrade(&p_realize)?.pci_bus().clone();
            let ecam = crate::device::get_u64(o, "ecam-base")?;
            bus.plug(Some(0), o.path(), HOST_TYPE, bridge)
                .map_err(|_| qom::Error::failed("PCI: slot 0 is taken"))?;
            let claimed = claim(
                &p_realize,
                o,
                Space::Pio,
                CONFIG_PORT,
                CONFIG_PORT_LEN,
                Arc::new(ConfigPorts(bus.clone())),
            )
            .and_then(|()| {
                claim(
                    &p_realize,
                    o,
                    Space::Mmio,
                    ecam,
                    1 << 20,
                    Arc::new(Ecam(bus.clone())),
                )
            });
            claimed.inspect_err(|_| {
                release(&p_realize, o);
                bus.unplug(0);
            })
        })
        .unrealize(move |o| {
            release(&p_unrealize, o);
            unplug(&p_unrealize, o);
        });
    vec![host, device_type(platform), hotplug::register(platform)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_parses_as_qemus() {
        assert_eq!(parse_addr("x", "").unwrap(), None);
        assert_eq!(parse_addr("x", "4").unwrap(), Some(4));
        assert_eq!(parse_addr("x", "0x1f").unwrap(), Some(31));
        assert_eq!(parse_addr("x", "0a.0").unwrap(), Some(10));
        assert_eq!(
            parse_addr("virtio-rng-pci", "0x20")
                .unwrap_err()
                .to_string(),
            "Property 'virtio-rng-pci.addr' doesn't take value '0x20'"
        );
        for bad in ["zz", "4.", ".0", "4.8", "123", "0x", "-1"] {
            assert!(parse_addr("x", bad).is_err(), "{bad}");
        }
        assert!(
            parse_addr("x", "4.1")
                .unwrap_err()
                .to_string()
                .contains("single-function")
        );
    }
}
