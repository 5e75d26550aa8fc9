//! `ioport80`: the POST-code port. Firmware writes progress codes there and Linux uses it
//! for I/O delays; it keeps the last value written, and reads return all-ones as on PCs.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use qom::{Kind, Property, TypeInfo, Value};

use crate::bus::BusDevice;
use crate::device::{DEVICE, OnPlatform, Space, claims_range, device_type};
use crate::platform::PlatformRef;
use crate::state::SerdeState;

pub const TYPE: &str = "ioport80";
pub const PORT: u64 = 0x80;

pub struct Port80 {
    platform: PlatformRef,
    last: AtomicU8,
    writes: AtomicU64,
}

impl OnPlatform for Port80 {
    fn platform(&self) -> &PlatformRef {
        &self.platform
    }
}

impl BusDevice for Port80 {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.last.store(v, Ordering::Relaxed);
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let info = device_type(TYPE, DEVICE, platform, |platform, _| {
        Ok(Port80 {
            platform,
            last: AtomicU8::new(0),
            writes: AtomicU64::new(0),
        })
    })
    .description("POST code port 0x80")
    .getter(
        Property::new("post-code", Kind::uint8()).description("The last value written"),
        |d| Value::UInt(d.last.load(Ordering::Relaxed).into()),
    )
    .getter(
        Property::new("writes", Kind::uint64()).description("Writes so far"),
        |d| Value::UInt(d.writes.load(Ordering::Relaxed)),
    )
    .serde_state(
        1,
        |d| {
            (
                d.last.load(Ordering::Relaxed),
                d.writes.load(Ordering::Relaxed),
            )
        },
        |d, (last, writes): (u8, u64)| {
            d.last.store(last, Ordering::Relaxed);
            d.writes.store(writes, Ordering::Relaxed);
            Ok(())
        },
    );
    claims_range(info, Space::Pio, |_| Ok((PORT, 1))).build()
}
