//! `acpi-pm`: the registers a hardware-reduced ACPI platform uses to power off and reset:
//! sleep control (a write of SLP_TYP=5 with SLP_EN is S5, power off), sleep status, and
//! the FADT reset register.

use qom::TypeInfo;

use crate::bus::BusDevice;
use crate::device::{DEVICE, OnPlatform, Space, claims_range, device_type};
use crate::platform::{MachineRequest, PlatformRef, ShutdownCause};

pub const TYPE: &str = "acpi-pm";
/// Sleep control (+0), sleep status (+1), reset (+2).
pub const BASE: u16 = 0x600;
pub const SLEEP_CONTROL: u16 = BASE;
pub const SLEEP_STATUS: u16 = BASE + 1;
pub const RESET_REGISTER: u16 = BASE + 2;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP of S5 in the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;

pub struct AcpiPm {
    platform: PlatformRef,
}

impl OnPlatform for AcpiPm {
    fn platform(&self) -> &PlatformRef {
        &self.platform
    }
}

impl BusDevice for AcpiPm {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep (WAK_STS clear); the others read as zero.
        data.fill(0);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let request = match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLEEP_TYPE => {
                MachineRequest::Shutdown(ShutdownCause::GuestShutdown)
            }
            2 if v == RESET_VALUE => MachineRequest::Reset(ShutdownCause::GuestReset),
            _ => return,
        };
        if let Some(p) = self.platform.upgrade() {
            p.request(request);
        }
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let info = device_type(TYPE, DEVICE, platform, |platform, _| {
        Ok(AcpiPm { platform })
    })
    .description("ACPI sleep control, sleep status and reset registers (ports 0x600-0x602)");
    claims_range(info, Space::Pio, |_| Ok((BASE.into(), 3))).build()
}
