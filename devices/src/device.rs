//! The `device` base type and what every device shares: claiming and releasing bus ranges.

use std::sync::Arc;

use qom::{Kind, ObjectRef, Property, TypeInfo, TypedInfo, Value};

use crate::bus::BusDevice;
use crate::platform::{Platform, PlatformRef, upgrade};

/// The abstract base type of every device.
pub const DEVICE: &str = "device";
/// Interface of device types clients may add (`--device`, `device_add`); board devices the
/// machine creates itself (i8042, RTC, ACPI) do not implement it.
pub const USER_DEVICE: &str = "user-device";

pub(crate) fn base_types() -> Vec<TypeInfo> {
    vec![
        TypeInfo::new(DEVICE, qom::OBJECT)
            .abstract_type()
            .description("The base of every device")
            .property(
                Property::new("realized", Kind::Bool)
                    .description("The device is live: its resources are claimed")
                    .getter(|o| Ok(Value::Bool(o.is_realized()))),
            ),
        TypeInfo::interface(USER_DEVICE, qom::INTERFACE)
            .description("Devices clients may add with --device or device_add"),
    ]
}

/// Which bus a range is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Pio,
    Mmio,
}

/// Claims a bus range for the device at `obj` (in its realize hook).
///
/// # Errors
/// The range is taken or invalid, or the machine is gone.
pub fn claim(
    platform: &PlatformRef,
    obj: &ObjectRef,
    space: Space,
    base: u64,
    len: u64,
    device: Arc<dyn BusDevice>,
) -> crate::Result<()> {
    let platform = upgrade(platform)?;
    bus(&*platform, space).insert(base, len, obj.path(), device)
}

/// Releases every range the device at `obj` claimed (in its unrealize hook).
pub fn release(platform: &PlatformRef, obj: &ObjectRef) {
    if let Some(platform) = platform.upgrade() {
        platform.pio_bus().remove_owner(obj.path());
        platform.mmio_bus().remove_owner(obj.path());
    }
}

fn bus(platform: &dyn Platform, space: Space) -> &crate::bus::Bus {
    match space {
        Space::Pio => platform.pio_bus(),
        Space::Mmio => platform.mmio_bus(),
    }
}

/// A device instance that knows the machine it is plugged into.
pub(crate) trait OnPlatform {
    fn platform(&self) -> &PlatformRef;
}

/// A device type whose instances are made by `make` with the machine's platform handle,
/// which they keep for their own hooks: the one place a device type takes a copy of it.
pub(crate) fn device_type<T: Send + Sync + 'static>(
    name: &str,
    parent: &str,
    platform: &PlatformRef,
    make: impl Fn(PlatformRef, &ObjectRef) -> qom::Result<T> + Send + Sync + 'static,
) -> TypedInfo<T> {
    let platform = platform.clone();
    TypedInfo::new(name, parent).constructor(move |o| make(platform.clone(), o))
}

/// Realize and unrealize hooks claiming one bus range for the instance itself, where
/// `range` says (from its properties), and releasing it.
pub(crate) fn claims_range<T: OnPlatform + BusDevice + 'static>(
    info: TypedInfo<T>,
    space: Space,
    range: impl Fn(&ObjectRef) -> qom::Result<(u64, u64)> + Send + Sync + 'static,
) -> TypedInfo<T> {
    info.realize(move |dev, o| {
        let (base, len) = range(o)?;
        Ok(claim(dev.platform(), o, space, base, len, dev.clone())?)
    })
    .unrealize(|dev, o| release(dev.platform(), o))
}

/// A property's value as `u64` (the kind was checked by the tree).
pub(crate) fn get_u64(obj: &ObjectRef, name: &str) -> qom::Result<u64> {
    Ok(obj.get(name)?.as_u64().unwrap_or(0))
}

/// A property's value as a string.
pub(crate) fn get_string(obj: &ObjectRef, name: &str) -> qom::Result<String> {
    Ok(obj.get(name)?.as_str().unwrap_or_default().to_owned())
}
