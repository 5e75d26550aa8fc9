//! `i8042`: the keyboard controller, for its CPU reset line (vm-superio's emulation).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use qom::{Kind, Notifier, NotifierDecl, Property, TypeInfo, Value};
use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::device::{DEVICE, Space, claim, instance, release};
use crate::platform::{MachineRequest, PlatformRef, ShutdownCause};

pub const TYPE: &str = "i8042";
const BASE: u64 = 0x60;
/// Ports 0x60 (data) to 0x64 (command), as vm-superio expects them.
const LEN: u64 = 5;

/// The reset line: tells subscribers, then asks the machine to reset.
struct ResetLine {
    platform: PlatformRef,
    notifier: Notifier,
    requests: Arc<AtomicU64>,
}

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.notifier.emit(|| Value::map::<&str>([]));
        if let Some(p) = self.platform.upgrade() {
            p.request(MachineRequest::Reset(ShutdownCause::GuestReset));
        }
        Ok(())
    }
}

pub struct I8042 {
    emulation: Mutex<Option<I8042Device<ResetLine>>>,
    requests: Arc<AtomicU64>,
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut emu = self.emulation.lock();
        for b in data.iter_mut() {
            *b = emu.as_mut().map_or(0xff, |e| e.read(offset as u8));
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if let (Some(e), Some(&v)) = (self.emulation.lock().as_mut(), data.first()) {
            let _ = e.write(offset as u8, v);
        }
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let (p_realize, p_unrealize) = (platform.clone(), platform.clone());
    TypeInfo::new(TYPE, DEVICE)
        .description("Keyboard controller (its CPU reset line) at ports 0x60-0x64")
        .property(
            Property::new("reset-requests", Kind::uint64())
                .description("Resets the guest asked for")
                .getter(|o| {
                    Ok(Value::UInt(
                        instance::<I8042>(o)?.requests.load(Ordering::Relaxed),
                    ))
                }),
        )
        .notifier(
            NotifierDecl::new("reset-request", Kind::structure("ResetRequest", vec![]))
                .description("The guest pulsed the CPU reset line"),
        )
        .constructor(|_| {
            Ok(Arc::new(I8042 {
                emulation: Mutex::new(None),
                requests: Arc::new(AtomicU64::new(0)),
            }))
        })
        .realize(move |o| {
            let dev = instance::<I8042>(o)?;
            let line = ResetLine {
                platform: p_realize.clone(),
                notifier: o.notifier("reset-request")?,
                requests: dev.requests.clone(),
            };
            *dev.emulation.lock() = Some(I8042Device::new(line));
            claim(&p_realize, o, Space::Pio, BASE, LEN, dev.clone())
                .inspect_err(|_| *dev.emulation.lock() = None)
        })
        .unrealize(move |o| {
            release(&p_unrealize, o);
            if let Ok(dev) = instance::<I8042>(o) {
                *dev.emulation.lock() = None;
            }
        })
}
