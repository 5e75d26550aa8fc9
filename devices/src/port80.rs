//! `ioport80`: the POST-code port. Firmware writes progress codes there and Linux uses it
//! for I/O delays; it keeps the last value written, and reads return all-ones as on PCs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use qom::{Kind, Property, TypeInfo, Value};

use crate::bus::BusDevice;
use crate::device::{DEVICE, Space, claim, instance, release};
use crate::platform::PlatformRef;

pub const TYPE: &str = "ioport80";
pub const PORT: u64 = 0x80;

#[derive(Default)]
pub struct Port80 {
    last: AtomicU8,
    writes: AtomicU64,
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
    let (p_realize, p_unrealize) = (platform.clone(), platform.clone());
    TypeInfo::new(TYPE, DEVICE)
        .description("POST code port 0x80")
        .property(
            Property::new("post-code", Kind::uint8())
                .description("The last value written")
                .getter(|o| {
                    Ok(Value::UInt(
                        instance::<Port80>(o)?.last.load(Ordering::Relaxed).into(),
                    ))
                }),
        )
        .property(
            Property::new("writes", Kind::uint64())
                .description("Writes so far")
                .getter(|o| {
                    Ok(Value::UInt(
                        instance::<Port80>(o)?.writes.load(Ordering::Relaxed),
                    ))
                }),
        )
        .state(
            1,
            |o| {
                let dev = instance::<Port80>(o)?;
                let saved = (
                    dev.last.load(Ordering::Relaxed),
                    dev.writes.load(Ordering::Relaxed),
                );
                crate::state::encode(o, &saved)
            },
            |o, bytes| {
                let (last, writes): (u8, u64) = crate::state::decode(o, bytes)?;
                let dev = instance::<Port80>(o)?;
                dev.last.store(last, Ordering::Relaxed);
                dev.writes.store(writes, Ordering::Relaxed);
                Ok(())
            },
        )
        .constructor(|_| Ok(Arc::new(Port80::default())))
        .realize(move |o| claim(&p_realize, o, Space::Pio, PORT, 1, instance::<Port80>(o)?))
        .unrealize(move |o| release(&p_unrealize, o))
}
