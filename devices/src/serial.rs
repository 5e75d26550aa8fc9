//! `isa-serial`: a 16550 UART (vm-superio's emulation) with a console backend and a `line`
//! notifier that delivers the guest's output line by line.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use qom::{
    Action, Field, Kind, Notifier, NotifierDecl, ObjectRef, PhasePolicy, Property, TypeInfo, Value,
};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, Serial, SerialState};

use crate::bus::BusDevice;
use crate::device::{DEVICE, Space, USER_DEVICE, claim, get_string, get_u64, instance, release};
use crate::interrupt::LineTrigger;
use crate::platform::{PlatformRef, upgrade};

pub const TYPE: &str = "isa-serial";

/// Longest line the `line` notifier delivers; a longer one arrives in pieces.
pub const MAX_LINE: usize = 4096;
/// Most input bytes waiting for the guest to read them.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

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
    pub fn parse(text: &str) -> qom::Result<Backend> {
        match text {
            "stdio" => Ok(Backend::Stdio),
            "none" => Ok(Backend::None),
            t => match t.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Backend::File(path.to_owned())),
                _ => Err(qom::Error::failed(format!(
                    "serial backend '{t}' is not stdio, file:PATH or none"
                ))),
            },
        }
    }
}

#[derive(Default)]
struct Stats {
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    lines: AtomicU64,
}

/// Receives the guest's output bytes: writes them to the backend and cuts lines.
struct Sink {
    out: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    notifier: Notifier,
    stats: Arc<Stats>,
}

impl Sink {
    fn finish_line(&mut self) {
        let mut bytes = std::mem::take(&mut self.line);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        self.stats.lines.fetch_add(1, Ordering::Relaxed);
        self.notifier.emit(|| {
            Value::map([(
                "line",
                Value::Str(String::from_utf8_lossy(&bytes).into_owned()),
            )])
        });
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stats
            .tx_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if let Some(out) = &mut self.out
            && out.write_all(buf).and_then(|()| out.flush()).is_err()
        {
            // A console that went away (closed stdout, full disk) must not stop the guest.
            tracing::warn!("serial output backend failed; discarding further output");
            self.out = None;
        }
        for &b in buf {
            if b == b'\n' {
                self.finish_line();
            } else {
                self.line.push(b);
                if self.line.len() >= MAX_LINE {
                    self.finish_line();
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Live {
    uart: Serial<LineTrigger, NoEvents, Sink>,
    pending_input: VecDeque<u8>,
}

impl Live {
    /// Moves waiting input into the UART's FIFO as far as it has room.
    fn feed(&mut self) {
        while !self.pending_input.is_empty() && self.uart.fifo_capacity() > 0 {
            let n = self.uart.fifo_capacity().min(self.pending_input.len());
            let chunk: Vec<u8> = self.pending_input.drain(..n).collect();
            if self.uart.enqueue_raw_bytes(&chunk).is_err() {
                break;
            }
        }
    }
}

/// The device state of an `isa-serial` object.
pub struct SerialDevice {
    live: Mutex<Option<Live>>,
    stats: Arc<Stats>,
    interrupts: Mutex<Option<Arc<crate::IrqLine>>>,
    uses_stdin: AtomicBool,
}

impl SerialDevice {
    /// Queues input for the guest; returns how many bytes were accepted.
    ///
    /// # Errors
    /// The device is not realized.
    pub fn send_input(&self, bytes: &[u8]) -> qom::Result<usize> {
        let mut live = self.live.lock();
        let live = live
            .as_mut()
            .ok_or_else(|| qom::Error::InvalidState("the serial port is not realized".into()))?;
        let room = MAX_PENDING_INPUT.saturating_sub(live.pending_input.len());
        let n = room.min(bytes.len());
        live.pending_input.extend(&bytes[..n]);
        live.feed();
        self.stats.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut live = self.live.lock();
        match live.as_mut() {
            Some(l) => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = l.uart.read((offset + i as u64) as u8);
                }
                l.feed();
            }
            None => data.fill(0xff),
        }
    }

    fn reset(&self) {
        let mut live = self.live.lock();
        if let Some(old) = live.take() {
            // A fresh UART with the same backend and interrupt line; pending input is gone.
            let trigger = old.uart.interrupt_evt().clone();
            let mut sink = old.uart.into_writer();
            sink.line.clear();
            *live = Some(Live {
                uart: Serial::new(trigger, sink),
                pending_input: VecDeque::new(),
            });
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(l) = self.live.lock().as_mut() {
            for (i, &b) in data.iter().enumerate() {
                if let Err(e) = l.uart.write((offset + i as u64) as u8, b) {
                    tracing::debug!("serial write: {e:?}");
                }
            }
        }
    }
}

/// What a snapshot keeps of the UART: its registers, its receive FIFO and the input still
/// waiting for room in it.
#[derive(Serialize, Deserialize)]
struct Saved {
    registers: [u8; 9],
    fifo: Vec<u8>,
    pending_input: Vec<u8>,
}

/// The receive FIFO's size in vm-superio's 16550.
const FIFO_SIZE: usize = 64;

impl SerialDevice {
    fn save(&self) -> qom::Result<Saved> {
        let live = self.live.lock();
        let l = live
            .as_ref()
            .ok_or_else(|| qom::Error::InvalidState("the serial port is not realized".into()))?;
        let s = l.uart.state();
        Ok(Saved {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
            pending_input: l.pending_input.iter().copied().collect(),
        })
    }

    fn load(&self, saved: Saved) -> qom::Result<()> {
        if saved.fifo.len() > FIFO_SIZE || saved.pending_input.len() > MAX_PENDING_INPUT {
            return Err(qom::Error::failed(
                "the saved serial port holds more input than it can",
            ));
        }
        let [dll, dlh, ier, iir, lcr, lsr, mcr, msr, scr] = saved.registers;
        let state = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlh,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: saved.fifo,
        };
        let mut live = self.live.lock();
        let old = live
            .take()
            .ok_or_else(|| qom::Error::InvalidState("the serial port is not realized".into()))?;
        let trigger = old.uart.interrupt_evt().clone();
        let sink = old.uart.into_writer();
        let uart = Serial::from_state(&state, trigger, NoEvents, sink)
            .map_err(|e| qom::Error::failed(format!("cannot load the serial port: {e:?}")))?;
        *live = Some(Live {
            uart,
            pending_input: saved.pending_input.into(),
        });
        Ok(())
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
) -> qom::Result<Option<Box<dyn Write + Send>>> {
    Ok(match backend {
        Backend::None => None,
        Backend::File(path) => Some(Box::new(File::create(path).map_err(|e| {
            qom::Error::failed(format!("cannot open serial output file '{path}': {e}"))
        })?)),
        Backend::Stdio => {
            if STDIN_TAKEN.swap(true, Ordering::SeqCst) {
                return Err(qom::Error::failed("another serial port already uses stdio"));
            }
            serial.uses_stdin.store(true, Ordering::SeqCst);
            spawn_stdin_reader(Arc::downgrade(serial));
            Some(Box::new(io::stdout()))
        }
    })
}

/// Feeds standard input to the guest until EOF or until the device is gone.
fn spawn_stdin_reader(serial: Weak<SerialDevice>) {
    let spawned = std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
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
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the stdin reader: {e}");
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let (p_realize, p_unrealize) = (platform.clone(), platform.clone());
    let counter = |name: &str, description: &str, read: fn(&Stats) -> &AtomicU64| {
        Property::new(name, Kind::uint64())
            .description(description)
            .getter(move |o| {
                Ok(Value::UInt(
                    read(&instance::<SerialDevice>(o)?.stats).load(Ordering::Relaxed),
                ))
            })
    };
    TypeInfo::new(TYPE, DEVICE)
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
                .validate(|_, v| Backend::parse(v.as_str().unwrap_or_default()).map(drop)),
        )
        .property(counter("tx-bytes", "Bytes the guest wrote", |s| {
            &s.tx_bytes
        }))
        .property(counter("rx-bytes", "Bytes sent to the guest", |s| {
            &s.rx_bytes
        }))
        .property(counter("lines", "Lines of guest output", |s| &s.lines))
        .property(
            Property::new("interrupts", Kind::uint64())
                .description("Times the interrupt line was raised")
                .getter(|o| {
                    let dev = instance::<SerialDevice>(o)?;
                    Ok(Value::UInt(
                        dev.interrupts.lock().as_ref().map_or(0, |l| l.count()),
                    ))
                }),
        )
        .notifier(NotifierDecl::new("line", line_payload()).description("A line of guest output"))
        .action(
            Action::new("write-input", |o, args| {
                let data = args.get("data").and_then(Value::as_str).unwrap_or_default();
                let n = instance::<SerialDevice>(o)?.send_input(data.as_bytes())?;
                Ok(Some(Value::UInt(n as u64)))
            })
            .description(
                "Send text to the guest as if typed on the console; returns the bytes accepted",
            )
            .arg(Field::new("data", Kind::Str, "The text"))
            .returns(Kind::uint64()),
        )
        .state(
            1,
            |o| crate::state::encode(o, &instance::<SerialDevice>(o)?.save()?),
            |o, bytes| instance::<SerialDevice>(o)?.load(crate::state::decode(o, bytes)?),
        )
        .constructor(|_| {
            Ok(Arc::new(SerialDevice {
                live: Mutex::new(None),
                stats: Arc::new(Stats::default()),
                interrupts: Mutex::new(None),
                uses_stdin: AtomicBool::new(false),
            }))
        })
        .realize(move |o| {
            let dev = instance::<SerialDevice>(o)?;
            let base = get_u64(o, "iobase")?;
            let backend = Backend::parse(&get_string(o, "backend")?)?;
            let platform = upgrade(&p_realize)?;
            let line = platform.irq_line(get_u64(o, "irq")? as u32)?;
            let out = open_backend(&backend, &dev)?;
            let sink = Sink {
                out,
                line: Vec::new(),
                notifier: o.notifier("line")?,
                stats: dev.stats.clone(),
            };
            *dev.live.lock() = Some(Live {
                uart: Serial::new(LineTrigger(line.clone()), sink),
                pending_input: VecDeque::new(),
            });
            *dev.interrupts.lock() = Some(line);
            if let Err(e) = claim(&p_realize, o, Space::Pio, base, 8, dev.clone()) {
                unrealize_serial(&dev);
                return Err(e);
            }
            Ok(())
        })
        .unrealize(move |o: &ObjectRef| {
            release(&p_unrealize, o);
            if let Ok(dev) = instance::<SerialDevice>(o) {
                unrealize_serial(&dev);
            }
        })
}

fn unrealize_serial(dev: &SerialDevice) {
    *dev.live.lock() = None;
    if dev.uses_stdin.swap(false, Ordering::SeqCst) {
        STDIN_TAKEN.store(false, Ordering::SeqCst);
    }
}
