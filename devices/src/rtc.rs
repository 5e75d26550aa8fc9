//! `mc146818rtc`: the CMOS real-time clock at ports 0x70-0x71, with its 128 bytes of
//! NVRAM. The clock runs at host time plus an offset the guest (or `base`) sets; alarm,
//! periodic and update interrupts are not generated.

use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use qom::{Kind, PhasePolicy, Property, TypeInfo, Value};

use crate::bus::BusDevice;
use crate::device::{DEVICE, Space, claim, device_type, get_string, release};
use crate::platform::PlatformRef;
use crate::state::SerdeState;

pub const TYPE: &str = "mc146818rtc";
const BASE: u64 = 0x70;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const B_24H: u8 = 1 << 1;
const B_BINARY: u8 = 1 << 2;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl DateTime {
    pub fn from_unix(secs: i64) -> DateTime {
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    pub fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// 1 = Sunday, as the RTC counts.
    fn weekday(self) -> u8 {
        ((days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) + 1) as u8
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS` (a trailing `Z` is allowed).
    pub fn parse(text: &str) -> Option<DateTime> {
        let t = text.strip_suffix('Z').unwrap_or(text);
        let (date, time) = t.split_once('T')?;
        let mut d = date.splitn(3, '-').map(str::parse::<u32>);
        let mut h = time.splitn(3, ':').map(str::parse::<u32>);
        let dt = DateTime {
            year: i64::from(d.next()?.ok()?),
            month: d.next()?.ok()?,
            day: d.next()?.ok()?,
            hour: h.next()?.ok()?,
            minute: h.next()?.ok()?,
            second: h.next()?.ok()?,
        };
        let valid = (1..=12).contains(&dt.month)
            && (1..=31).contains(&dt.day)
            && dt.hour < 24
            && dt.minute < 60
            && dt.second < 60
            && DateTime::from_unix(dt.to_unix()) == dt;
        valid.then_some(dt)
    }
}

impl std::fmt::Display for DateTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

struct Cmos {
    index: u8,
    nvram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
}

impl Cmos {
    fn now(&self) -> DateTime {
        DateTime::from_unix(host_now() + self.offset)
    }

    fn encode(&self, v: u32) -> u8 {
        if self.nvram[usize::from(REG_B)] & B_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.nvram[usize::from(REG_B)] & B_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn read(&self, reg: u8) -> u8 {
        let t = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => {
                if self.nvram[usize::from(REG_B)] & B_24H != 0 {
                    self.encode(t.hour)
                } else {
                    let pm = if t.hour >= 12 { 0x80 } else { 0 };
                    self.encode(match t.hour % 12 {
                        0 => 12,
                        h => h,
                    }) | pm
                }
            }
            REG_WEEKDAY => self.encode(t.weekday().into()),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year.rem_euclid(100)) as u32),
            REG_CENTURY => self.encode((t.year.div_euclid(100)) as u32),
            // Never in an update cycle; no interrupt flags.
            REG_A => self.nvram[usize::from(REG_A)] & 0x7f,
            REG_C => 0,
            REG_D => 0x80,
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }

    fn write(&mut self, reg: u8, v: u8) {
        let mut t = self.now();
        match reg {
            REG_SECONDS => t.second = self.decode(v).min(59),
            REG_MINUTES => t.minute = self.decode(v).min(59),
            REG_HOURS => {
                t.hour = if self.nvram[usize::from(REG_B)] & B_24H != 0 {
                    self.decode(v).min(23)
                } else {
                    self.decode(v & 0x7f) % 12 + if v & 0x80 != 0 { 12 } else { 0 }
                }
            }
            REG_DAY => t.day = self.decode(v).clamp(1, 31),
            REG_MONTH => t.month = self.decode(v).clamp(1, 12),
            REG_YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(v) % 100),
            REG_CENTURY => t.year = i64::from(self.decode(v)) * 100 + t.year.rem_euclid(100),
            REG_WEEKDAY | REG_C | REG_D => return,
            r => {
                self.nvram[usize::from(r & 0x7f)] = v;
                return;
            }
        }
        self.offset = t.to_unix() - host_now();
    }
}

/// The CMOS in a snapshot. The clock is kept as the guest's offset from host time, so a
/// restored guest's clock follows the host's (as a QEMU guest's does with `base=utc`).
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCmos {
    index: u8,
    nvram: Vec<u8>,
    offset: i64,
}

pub struct Rtc {
    platform: PlatformRef,
    cmos: Mutex<Cmos>,
}

impl Rtc {
    /// The guest's current date and time.
    pub fn date(&self) -> DateTime {
        self.cmos.lock().now()
    }
}

impl BusDevice for Rtc {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let cmos = self.cmos.lock();
        let v = if offset == 1 {
            cmos.read(cmos.index)
        } else {
            0xff
        };
        data.fill(v);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let mut cmos = self.cmos.lock();
        if offset == 0 {
            // Bit 7 masks NMIs on real hardware; the index is the low 7 bits.
            cmos.index = v & 0x7f;
        } else {
            let index = cmos.index;
            cmos.write(index, v);
        }
    }
}

fn parse_base(text: &str) -> crate::Result<i64> {
    match text {
        "utc" | "" => Ok(0),
        t => DateTime::parse(t)
            .map(|dt| dt.to_unix() - host_now())
            .ok_or_else(|| crate::Error::BadValue {
                typename: TYPE.into(),
                property: "base",
                value: t.into(),
                why: "neither 'utc' nor a date like 2006-06-17T16:01:21",
            }),
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    device_type(TYPE, DEVICE, platform, |platform, _| {
        let mut nvram = [0u8; 128];
        nvram[usize::from(REG_A)] = 0x26;
        nvram[usize::from(REG_B)] = B_24H;
        nvram[usize::from(REG_D)] = 0x80;
        Ok(Rtc {
            platform,
            cmos: Mutex::new(Cmos {
                index: 0,
                nvram,
                offset: 0,
            }),
        })
    })
    .description("CMOS real-time clock and NVRAM at ports 0x70-0x71")
    .property(
        Property::new("base", Kind::Str)
            .default("utc")
            .policy(PhasePolicy::BeforeRealize)
            .description(
                "Start the clock at host UTC ('utc') or at a date like 2006-06-17T16:01:21",
            )
            .validate(|_, v| Ok(parse_base(v.as_str().unwrap_or_default()).map(drop)?)),
    )
    .getter(
        Property::new("date", Kind::Str).description("The guest's current date and time (UTC)"),
        |d| Value::Str(d.date().to_string()),
    )
    .serde_state(
        1,
        |d| {
            let c = d.cmos.lock();
            SavedCmos {
                index: c.index,
                nvram: c.nvram.to_vec(),
                offset: c.offset,
            }
        },
        |d, saved: SavedCmos| {
            let nvram: [u8; 128] =
                saved
                    .nvram
                    .as_slice()
                    .try_into()
                    .map_err(|_| crate::Error::State {
                        path: TYPE.into(),
                        why: "the saved CMOS is not 128 bytes".into(),
                    })?;
            let mut c = d.cmos.lock();
            c.index = saved.index;
            c.nvram = nvram;
            c.offset = saved.offset;
            Ok(())
        },
    )
    .realize(|dev, o| {
        dev.cmos.lock().offset = parse_base(&get_string(o, "base")?)?;
        Ok(claim(&dev.platform, o, Space::Pio, BASE, 2, dev.clone())?)
    })
    .unrealize(|dev, o| release(&dev.platform, o))
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        for secs in [0i64, 951_782_400, 1_700_000_000, 4_102_444_800, -86_400] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        assert_eq!(
            DateTime::from_unix(951_782_400).to_string(),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            DateTime::parse("2006-06-17T16:01:21").map(|d| d.to_unix()),
            Some(1_150_560_081)
        );
        assert_eq!(DateTime::parse("2006-02-30T00:00:00"), None);
        assert_eq!(
            DateTime::from_unix(0).weekday(),
            5,
            "1970-01-01 was a Thursday"
        );
    }

    #[test]
    fn guest_sets_and_reads_the_clock_in_bcd_and_binary() {
        let mut c = Cmos {
            index: 0,
            nvram: [0; 128],
            offset: 0,
        };
        c.nvram[usize::from(REG_B)] = B_24H;
        c.write(REG_YEAR, 0x99);
        c.write(REG_CENTURY, 0x19);
        c.write(REG_MONTH, 0x12);
        c.write(REG_DAY, 0x31);
        c.write(REG_HOURS, 0x23);
        assert_eq!(c.read(REG_YEAR), 0x99);
        assert_eq!(c.read(REG_CENTURY), 0x19);
        assert_eq!(c.read(REG_MONTH), 0x12);
        c.nvram[usize::from(REG_B)] = B_24H | B_BINARY;
        assert_eq!(c.read(REG_DAY), 31);
        // NVRAM keeps what is written.
        c.write(0x50, 0xab);
        assert_eq!(c.read(0x50), 0xab);
    }
}
