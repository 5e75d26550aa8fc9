//! `isa-debug-exit`: QEMU's test device. A guest write of V ends the VMM with exit status
//! `(V << 1) | 1`; reads return 0. Defaults as QEMU's: iobase 0x501, iosize 2.

use qom::{Field, Kind, Notifier, NotifierDecl, PhasePolicy, Property, TypeInfo, Value};

use crate::bus::BusDevice;
use crate::device::{DEVICE, OnPlatform, Space, USER_DEVICE, claims_range, device_type, get_u64};
use crate::platform::{MachineRequest, PlatformRef};

pub const TYPE: &str = "isa-debug-exit";

pub struct DebugExit {
    platform: PlatformRef,
    notifier: Notifier,
}

/// The exit status for a written value, as QEMU computes it.
pub fn exit_status(value: u64) -> i32 {
    ((value << 1) | 1) as i32
}

impl BusDevice for DebugExit {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(bytes);
        let status = exit_status(value);
        self.notifier.emit_fields(|| {
            [
                ("value", Value::UInt(value)),
                ("status", Value::Int(status.into())),
            ]
        });
        if let Some(p) = self.platform.upgrade() {
            p.request(MachineRequest::Exit(status));
        }
    }
}

impl OnPlatform for DebugExit {
    fn platform(&self) -> &PlatformRef {
        &self.platform
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let info = device_type(TYPE, DEVICE, platform, |platform, o| {
        Ok(DebugExit {
            platform,
            notifier: o.notifier("exit-request")?,
        })
    })
    .implements(USER_DEVICE)
    .description("Debug exit port: a write of V ends the VMM with status (V << 1) | 1")
    .property(
        Property::new("iobase", Kind::uint16())
            .default(0x501u32)
            .policy(PhasePolicy::BeforeRealize)
            .description("I/O port"),
    )
    .property(
        Property::new("iosize", Kind::uint_range(1, 4))
            .default(2u32)
            .policy(PhasePolicy::BeforeRealize)
            .description("Ports claimed"),
    )
    .notifier(
        NotifierDecl::new(
            "exit-request",
            Kind::structure(
                "DebugExitRequest",
                vec![
                    Field::new("value", Kind::uint64(), "The value written"),
                    Field::new("status", Kind::int32(), "The exit status it asks for"),
                ],
            ),
        )
        .description("The guest asked the VMM to exit"),
    );
    claims_range(info, Space::Pio, |o| {
        Ok((get_u64(o, "iobase")?, get_u64(o, "iosize")?))
    })
    .build()
}
