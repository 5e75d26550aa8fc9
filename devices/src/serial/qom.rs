//! The `isa-serial` type: the UART core (core.rs) on an I/O range and an interrupt line,
//! its console backend (stdio, a file, none), the `line` notifier, `write-input`, the
//! counters, and the state it carries across a snapshot.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use qom::{Action, Field, Kind, Notifier, NotifierDecl, PhasePolicy, Property, TypeInfo, Value};

use super::core::{SerialCore, SerialEvents, SerialStats};
use crate::bus::BusDevice;
use crate::device::{DEVICE, Space, USER_DEVICE, claim, device_type, get_string, get_u64, release};
use crate::interrupt::LineTrigger;
use crate::platform::{PlatformRef, upgrade};

pub const TYPE: &str = "isa-serial";

/// Only one device may read the process's standard input.
static STDIN_TAKEN: AtomicBool = AtomicBool::new(false);

/// Where guest output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Stdio,
    File(String),
    None,
}

impl Backend {
    /// Parses `stdio`, `file:PATH` or `none`.
    ///
    /// # Errors
    /// Anything else.
    pub fn parse(text: &str) -> crate::Result<Backend> {
        match text {
            "stdio" => Ok(Backend::Stdio),
            "none" => Ok(Backend::None),
            t => match t.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Backend::File(path.to_owned())),
                _ => Err(crate::Error::BadValue {
                    typename: TYPE.into(),
                    property: "backend",
                    value: t.into(),
                    why: "not stdio, file:PATH or none",
                }),
            },
        }
    }
}

/// Tells subscribers each line of the guest's output.
struct LineEvents(Notifier);

impl SerialEvents for LineEvents {
    fn line(&self, line: &str) {
        self.0
            .emit(|| Value::map([("line", Value::Str(line.to_owned()))]));
    }
}

type Core = SerialCore<LineTrigger, LineEvents>;

/// The instance of an `isa-serial` object.
pub struct SerialDevice {
    platform: PlatformRef,
    core: Mutex<Option<Core>>,
    stats: Arc<SerialStats>,
    interrupts: Mutex<Option<Arc<crate::IrqLine>>>,
    uses_stdin: AtomicBool,
}

impl SerialDevice {
    /// Queues input for the guest; returns how many bytes were accepted.
    ///
    /// # Errors
    /// The device is not realized.
    pub fn send_input(&self, bytes: &[u8]) -> crate::Result<usize> {
        let mut core = self.core.lock();
        let core = core
            .as_mut()
            .ok_or_else(|| crate::Error::NotRealized { path: TYPE.into() })?;
        Ok(core.send_input(bytes))
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self.core.lock().as_mut() {
            Some(core) => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = core.read((offset + i as u64) as u8);
                }
            }
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(core) = self.core.lock().as_mut() {
            for (i, &b) in data.iter().enumerate() {
                core.write((offset + i as u64) as u8, b);
            }
        }
    }

    fn reset(&self) {
        if let Some(core) = self.core.lock().as_mut() {
            core.reset();
        }
    }
}

fn line_payload() -> Kind {
    Kind::structure(
        "SerialLine",
        vec![Field::new(
            "line",
            Kind::Str,
            "One line of guest output, without its end-of-line",
        )],
    )
}

fn open_backend(
    backend: &Backend,
    serial: &Arc<SerialDevice>,
) -> crate::Result<Option<Box<dyn Write + Send>>> {
    Ok(match backend {
        Backend::None => None,
        Backend::File(path) => Some(Box::new(File::create(path).map_err(|source| {
            crate::Error::Open {
                path: path.clone(),
                source,
            }
        })?)),
        Backend::Stdio => {
            if STDIN_TAKEN.swap(true, Ordering::SeqCst) {
                return Err(crate::Error::StdioTaken);
            }
            serial.uses_stdin.store(true, Ordering::SeqCst);
            spawn_stdin_reader(Arc::downgrade(serial));
            Some(Box::new(io::stdout()))
        }
    })
}

/// Feeds standard input to the guest until EOF or until the device is gone.
fn spawn_stdin_reader(serial: Weak<SerialDevice>) {
    let spawned = sandbox::spawn(
        sandbox::Class::SerialInput,
        "serial-stdin".into(),
        move || {
            let mut buf = [0u8; 256];
            let mut stdin = io::stdin();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let Some(dev) = serial.upgrade() else { return };
                    match dev.send_input(rest) {
                        Ok(0) => std::thread::sleep(std::time::Duration::from_millis(5)),
                        Ok(k) => rest = &rest[k..],
                        Err(_) => return,
                    }
                }
            }
        },
    );
    if let Err(e) = spawned {
        tracing::warn!("cannot start the stdin reader: {e}");
    }
}

fn counter(name: &str, description: &str) -> Property {
    Property::new(name, Kind::uint64()).description(description)
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    device_type(TYPE, DEVICE, platform, |platform, _| {
        Ok(SerialDevice {
            platform,
            core: Mutex::new(None),
            stats: Arc::new(SerialStats::default()),
            interrupts: Mutex::new(None),
            uses_stdin: AtomicBool::new(false),
        })
    })
    .implements(USER_DEVICE)
    .description("16550A UART on the ISA bus")
    .property(
        Property::new("iobase", Kind::uint16())
            .default(0x3f8u32)
            .policy(PhasePolicy::BeforeRealize)
            .description("First I/O port"),
    )
    .property(
        Property::new("irq", Kind::uint_range(0, 23))
            .default(4u32)
            .policy(PhasePolicy::BeforeRealize)
            .description("Interrupt line (GSI)"),
    )
    .property(
        Property::new("backend", Kind::Str)
            .default("none")
            .policy(PhasePolicy::BeforeRealize)
            .description("Where output goes: stdio, file:PATH or none")
            .validate(|_, v| Ok(Backend::parse(v.as_str().unwrap_or_default()).map(drop)?)),
    )
    .getter(counter("tx-bytes", "Bytes the guest wrote"), |d| {
        Value::UInt(d.stats.tx_bytes.load(Ordering::Relaxed))
    })
    .getter(counter("rx-bytes", "Bytes sent to the guest"), |d| {
        Value::UInt(d.stats.rx_bytes.load(Ordering::Relaxed))
    })
    .getter(counter("lines", "Lines of guest output"), |d| {
        Value::UInt(d.stats.lines.load(Ordering::Relaxed))
    })
    .getter(
        counter("interrupts", "Times the interrupt line was raised"),
        |d| Value::UInt(d.interrupts.lock().as_ref().map_or(0, |l| l.count())),
    )
    .notifier(NotifierDecl::new("line", line_payload()).description("A line of guest output"))
    .action(
        Action::declare("write-input")
            .description(
                "Send text to the guest as if typed on the console; returns the bytes accepted",
            )
            .arg(Field::new("data", Kind::Str, "The text"))
            .returns(Kind::uint64()),
        |d, _, args| {
            let data = args.get("data").and_then(Value::as_str).unwrap_or_default();
            Ok(Some(Value::UInt(d.send_input(data.as_bytes())? as u64)))
        },
    )
    // Version 2: the registers by name (version 1 had them in an array).
    .state(
        2,
        |d, o| {
            let core = d.core.lock();
            let core = core.as_ref().ok_or_else(|| crate::Error::NotRealized {
                path: o.path().to_owned(),
            })?;
            Ok(crate::state::encode(o, &core.save())?)
        },
        |d, o, bytes| {
            let saved = crate::state::decode(o, bytes)?;
            let mut core = d.core.lock();
            let core = core.as_mut().ok_or_else(|| crate::Error::NotRealized {
                path: o.path().to_owned(),
            })?;
            core.load(saved).map_err(|e| crate::Error::State {
                path: o.path().to_owned(),
                why: e.to_string(),
            })?;
            Ok(())
        },
    )
    .realize(|dev, o| {
        let base = get_u64(o, "iobase")?;
        let backend = Backend::parse(&get_string(o, "backend")?)?;
        let line = upgrade(&dev.platform)?.irq_line(get_u64(o, "irq")? as u32)?;
        let console = open_backend(&backend, dev)?;
        *dev.core.lock() = Some(SerialCore::new(
            LineTrigger(line.clone()),
            console,
            LineEvents(o.notifier("line")?),
            dev.stats.clone(),
        ));
        *dev.interrupts.lock() = Some(line);
        if let Err(e) = claim(&dev.platform, o, Space::Pio, base, 8, dev.clone()) {
            unrealize_serial(dev);
            return Err(e.into());
        }
        Ok(())
    })
    .unrealize(|dev, o| {
        release(&dev.platform, o);
        unrealize_serial(dev);
    })
    .build()
}

fn unrealize_serial(dev: &SerialDevice) {
    *dev.core.lock() = None;
    if dev.uses_stdin.swap(false, Ordering::SeqCst) {
        STDIN_TAKEN.store(false, Ordering::SeqCst);
    }
}
