//! The machine's configuration as the command line gives it, and `--device` specs.

use std::path::PathBuf;

use crate::layout::MAX_CPUS;

/// Everything `qomu` is started with (the front ends are configured elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    pub memory: u64,
    pub cpus: u32,
    /// `None`: the bundled demo guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: String,
    /// Backend of the first serial port: `stdio`, `file:PATH` or `none`.
    pub serial: String,
    pub name: Option<String>,
    pub no_shutdown: bool,
    /// `utc` or a date for the RTC to start at.
    pub rtc_base: String,
    pub devices: Vec<DeviceSpec>,
    /// `--object TYPE,id=ID,...`: user objects, created before the devices (which may
    /// name them, as virtio-rng's `rng` does).
    pub objects: Vec<DeviceSpec>,
    /// `--netdev TYPE,id=ID,...`: host network backends, created first.
    pub netdevs: Vec<DeviceSpec>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            memory: 256 << 20,
            cpus: 1,
            kernel: None,
            initrd: None,
            append: String::new(),
            serial: "none".into(),
            name: None,
            no_shutdown: false,
            rtc_base: "utc".into(),
            devices: Vec::new(),
            objects: Vec::new(),
            netdevs: Vec::new(),
        }
    }
}

impl MachineConfig {
    /// A machine booting `kernel` with `append`, output to `serial`.
    pub fn with_kernel(kernel: impl Into<PathBuf>, append: &str) -> Self {
        MachineConfig {
            kernel: Some(kernel.into()),
            append: append.to_owned(),
            ..Default::default()
        }
    }
}

/// One `--device DRIVER[,id=ID][,KEY=VALUE...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub driver: String,
    pub id: Option<String>,
    /// Property values as text; the device type's kinds decide how to parse them.
    pub props: Vec<(String, String)>,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    /// Parses QEMU's `-device` syntax; `,,` stands for a literal comma in a value.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    current.push(',');
                } else {
                    parts.push(std::mem::take(&mut current));
                }
            } else {
                current.push(c);
            }
        }
        parts.push(current);
        let mut parts = parts.into_iter();
        let driver = parts.next().unwrap_or_default();
        if driver.is_empty() || driver.contains('=') {
            return Err(format!(
                "'{text}': the device spec must start with the driver name (DRIVER,KEY=VALUE,...)"
            ));
        }
        let mut spec = DeviceSpec {
            driver,
            id: None,
            props: Vec::new(),
        };
        for part in parts {
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!("'{part}' in '{text}' is not KEY=VALUE"));
            };
            if key == "id" {
                spec.id = Some(value.to_owned());
            } else if key == "driver" {
                return Err(format!(
                    "'{text}': the driver is given first, not as driver="
                ));
            } else {
                spec.props.push((key.to_owned(), value.to_owned()));
            }
        }
        Ok(spec)
    }
}

/// Parses a memory size (`256M`, `1G`, `268435456`), at least 1 MiB.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let kind = qom::Kind::size();
    let value = kind.parse_text("memory", text).map_err(|e| e.to_string())?;
    let bytes = value.as_u64().unwrap_or(0);
    // A bare number below 1 MiB is taken as MiB, like QEMU's -m.
    Ok(
        if bytes < (1 << 20) && text.chars().all(|c| c.is_ascii_digit()) {
            bytes << 20
        } else {
            bytes
        },
    )
}

/// Parses a vCPU count.
pub fn parse_cpus(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if (1..=MAX_CPUS as u32).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{text}' is not a vCPU count between 1 and {MAX_CPUS}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        let d: DeviceSpec = "isa-serial,id=com2,iobase=0x2f8,backend=file:/tmp/a,,b"
            .parse()
            .unwrap();
        assert_eq!(d.driver, "isa-serial");
        assert_eq!(d.id.as_deref(), Some("com2"));
        assert_eq!(
            d.props,
            [
                ("iobase".into(), "0x2f8".into()),
                ("backend".into(), "file:/tmp/a,b".into())
            ]
        );
        assert!("".parse::<DeviceSpec>().is_err());
        assert!("id=x".parse::<DeviceSpec>().is_err());
        assert!("isa-serial,bogus".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn ids_sizes_and_counts() {
        assert_eq!(parse_memory("512"), Ok(512 << 20));
        assert_eq!(parse_memory("1G"), Ok(1 << 30));
        assert_eq!(parse_memory("268435456"), Ok(256 << 20));
        assert!(parse_memory("lots").is_err());
        assert_eq!(parse_cpus("4"), Ok(4));
        assert!(parse_cpus("0").is_err());
    }
}
