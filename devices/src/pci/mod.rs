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
use crate::platform::{Platform, PlatformRef, upgrade};

/// The host bridge's qom type.
pub const HOST_TYPE: &str = "pci-host";
/// The abstract base of PCI devices.
pub const PCI_DEVICE: &str = "pci-device";
/// The root bus's name (`device_add`'s `bus`).
pub const ROOT_BUS: &str = "pci.0";
/// The configuration ports.
pub const CONFIG_PORT: u64 = 0xcf8;
pub const CONFIG_PORT_LEN: u64 = 8;

/// Parses a PCI address as QEMU's `addr` property does: `SLOT` or `SLOT.FN`, hexadecimal
/// with or without `0x`. Empty means "the first free slot".
///
/// # Errors
/// Not such an address, a slot past 31, or a function other than 0 (qomu has no
/// multi-function devices).
pub fn parse_addr(typename: &str, text: &str) -> crate::Result<Option<u8>> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || crate::Error::BadValue {
        typename: typename.to_owned(),
        property: "addr",
        value: text.to_owned(),
        why: "not SLOT or SLOT.0 in hex, with a slot below 32",
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
        Some(Some(function)) if function < 8 => {
            Err(crate::Error::FunctionUnavailable { slot, function })
        }
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
    let plugged = platform
        .pci_bus()
        .plug(slot, obj.path(), &label(obj), device)
        .map_err(|e| match e {
            PlugError::SlotInUse { slot, by } => crate::Error::SlotInUse {
                slot,
                driver: obj.type_name().to_owned(),
                by,
            },
            PlugError::Full => crate::Error::BusFull {
                driver: obj.type_name().to_owned(),
            },
        })?;
    Ok(plugged)
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

/// A closure for a type's hooks that runs `f` with the platform: the platform handle is
/// copied into it here, once, rather than in a block of copies before each type.
fn on_platform<R>(
    platform: &PlatformRef,
    f: impl Fn(&dyn Platform, &ObjectRef) -> crate::Result<R> + Send + Sync + 'static,
) -> impl Fn(&ObjectRef) -> qom::Result<R> + Send + Sync + 'static {
    let platform = platform.clone();
    move |o| Ok(f(&*upgrade(&platform)?, o)?)
}

/// A function's state in a snapshot: where it sits and its configuration space (BARs,
/// command register, capabilities' control fields).
#[derive(Serialize, Deserialize)]
struct FunctionState {
    slot: u8,
    config: Vec<u8>,
}

fn save_function(platform: &dyn Platform, obj: &ObjectRef) -> crate::Result<FunctionState> {
    let bus = platform.pci_bus();
    let not_plugged = || crate::Error::NotPlugged {
        path: obj.path().to_owned(),
    };
    let slot = bus.slot_of(obj.path()).ok_or_else(not_plugged)?;
    let function = bus.function(slot).ok_or_else(not_plugged)?;
    let config = function.config().lock().snapshot();
    Ok(FunctionState { slot, config })
}

fn load_function(
    platform: &dyn Platform,
    obj: &ObjectRef,
    saved: &FunctionState,
) -> crate::Result<()> {
    let bus = platform.pci_bus();
    let not_plugged = || crate::Error::NotPlugged {
        path: obj.path().to_owned(),
    };
    let slot = bus.slot_of(obj.path()).ok_or_else(not_plugged)?;
    if slot != saved.slot {
        return Err(crate::Error::MovedSlot {
            path: obj.path().to_owned(),
            saved: saved.slot,
            here: slot,
        });
    }
    let function = bus.function(slot).ok_or_else(not_plugged)?;
    function
        .config()
        .lock()
        .restore(&saved.config)
        .map_err(|why| crate::Error::State {
            path: obj.path().to_owned(),
            why,
        })?;
    bus.refresh(slot);
    Ok(())
}

/// The host bridge's snapshot: its function and the configuration address latch.
#[derive(Serialize, Deserialize)]
struct HostState {
    function: FunctionState,
    address: u32,
}

/// The slot of the device at `obj`, if it is on the bus.
fn slot_of(platform: &dyn Platform, obj: &ObjectRef) -> Option<u8> {
    platform.pci_bus().slot_of(obj.path())
}

/// The abstract base of PCI devices: `addr` and the slot it got.
fn device_type(platform: &PlatformRef) -> TypeInfo {
    let save = on_platform(platform, |p, o| {
        crate::state::encode(o, &save_function(p, o)?)
    });
    let load = {
        let platform = platform.clone();
        move |o: &ObjectRef, bytes: &[u8]| -> qom::Result<()> {
            let saved: FunctionState = crate::state::decode(o, bytes)?;
            Ok(load_function(&*upgrade(&platform)?, o, &saved)?)
        }
    };
    TypeInfo::new(PCI_DEVICE, DEVICE)
        .abstract_type()
        .description("A device on the PCI root bus")
        .state(1, save, load)
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
                .getter(on_platform(platform, |p, o| {
                    let pending = match (slot_of(p, o), p.hotplug()) {
                        (Some(slot), Some(h)) => h.removal_requested(slot),
                        _ => false,
                    };
                    Ok(Value::Bool(pending))
                })),
        )
        .property(
            Property::new("addr", Kind::Str)
                .policy(qom::PhasePolicy::BeforeRealize)
                .description("Slot on the root bus: SLOT or SLOT.0 in hex (\"4\", \"0x04.0\"); empty for the first free one")
                .validate(|o, v| Ok(parse_addr(o.type_name(), v.as_str().unwrap_or_default()).map(drop)?)),
        )
        .property(
            Property::new("slot", Kind::int32())
                .description("The slot the device is plugged into, -1 while it is not")
                .getter(on_platform(platform, |p, o| {
                    Ok(Value::Int(slot_of(p, o).map_or(-1, i64::from)))
                })),
        )
}

/// The host bridge's instance.
struct HostBridge {
    platform: PlatformRef,
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

fn host_type(platform: &PlatformRef) -> TypeInfo {
    crate::device::device_type(HOST_TYPE, DEVICE, platform, |platform, _| {
        // Red Hat's vendor ID and QEMU's "PCIe host bridge" device ID, as QEMU's generic
        // host does.
        let config = PciConfig::new(Ids {
            vendor: 0x1b36,
            device: 0x0008,
            class: 0x06_00_00,
            revision: 0,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        });
        Ok(HostBridge {
            platform,
            config: Mutex::new(config),
        })
    })
    .description(
        "PCI host bridge: the root bus pci.0, configuration through ports 0xcf8/0xcfc and ECAM",
    )
    .state(
        1,
        |h, o| {
            let platform = upgrade(&h.platform)?;
            let state = HostState {
                function: save_function(&*platform, o)?,
                address: platform.pci_bus().config_address(),
            };
            Ok(crate::state::encode(o, &state)?)
        },
        |h, o, bytes| {
            let state: HostState = crate::state::decode(o, bytes)?;
            let platform = upgrade(&h.platform)?;
            load_function(&*platform, o, &state.function)?;
            platform.pci_bus().set_config_address(state.address);
            Ok(())
        },
    )
    .getter(
        Property::new("bus", Kind::Str).description("The name of the root bus"),
        |_| Value::Str(ROOT_BUS.to_owned()),
    )
    .try_getter(
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
        .description("The occupied slots of the root bus"),
        |h, _| {
            let platform = upgrade(&h.platform)?;
            Ok(Value::List(
                platform
                    .pci_bus()
                    .occupants()
                    .into_iter()
                    .map(|(slot, path)| {
                        Value::map([
                            ("slot", Value::UInt(slot.into())),
                            ("device", Value::Str(path)),
                        ])
                    })
                    .collect(),
            ))
        },
    )
    .property(
        Property::new("ecam-base", Kind::uint64())
            .policy(qom::PhasePolicy::BeforeRealize)
            .description("Guest physical address of the ECAM window (1 MiB: bus 0)"),
    )
    .realize(|h, o| {
        let bus = upgrade(&h.platform)?.pci_bus().clone();
        let ecam = crate::device::get_u64(o, "ecam-base")?;
        bus.plug(Some(0), o.path(), HOST_TYPE, h.clone())
            .map_err(|_| crate::Error::SlotInUse {
                slot: 0,
                driver: HOST_TYPE.into(),
                by: "another host bridge".into(),
            })?;
        let claimed = claim(
            &h.platform,
            o,
            Space::Pio,
            CONFIG_PORT,
            CONFIG_PORT_LEN,
            Arc::new(ConfigPorts(bus.clone())),
        )
        .and_then(|()| {
            claim(
                &h.platform,
                o,
                Space::Mmio,
                ecam,
                1 << 20,
                Arc::new(Ecam(bus.clone())),
            )
        });
        claimed.map_err(|e| {
            release(&h.platform, o);
            bus.unplug(0);
            e.into()
        })
    })
    .unrealize(|h, o| {
        release(&h.platform, o);
        unplug(&h.platform, o);
    })
    .build()
}

pub(crate) fn types(platform: &PlatformRef) -> Vec<TypeInfo> {
    vec![
        host_type(platform),
        device_type(platform),
        hotplug::register(platform),
    ]
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
            parse_addr("virtio-rng-pci", "0x20").unwrap_err().fault(),
            qom::Fault::BadValue {
                typename: "virtio-rng-pci".into(),
                property: "addr".into(),
                value: "0x20".into()
            }
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
