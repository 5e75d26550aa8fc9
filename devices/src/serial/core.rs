//! The UART as a plain struct: vm-superio's 16550 for the registers, the guest's output
//! cut into lines for [`SerialEvents`], input kept until the receive FIFO has room, and
//! the counters. No qom, no platform: the interrupt is any vm-superio `Trigger`, output is
//! any writer.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_superio::Trigger;
use vm_superio::serial::{NoEvents, Serial};

use super::state::{SavedSerial, StateError};

/// Longest line [`SerialEvents::line`] gets; a longer one arrives in pieces.
pub const MAX_LINE: usize = 4096;
/// Most input bytes waiting for the guest to read them, in the receive FIFO or not.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;
/// The receive FIFO's size in vm-superio's 16550.
pub(crate) const FIFO_SIZE: usize = 64;

/// What the UART tells its owner.
pub trait SerialEvents: Send {
    /// The guest wrote a line (without its `\n` or `\r\n`), or `MAX_LINE` bytes of one.
    fn line(&self, line: &str);
}

/// Counters, readable while the UART is in use.
#[derive(Debug, Default)]
pub struct SerialStats {
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub lines: AtomicU64,
}

/// Where output goes: shared between the UART's output and the owner, so that a reset or
/// a load can make a new UART writing to the same console.
type Console = Arc<parking_lot::Mutex<Option<Box<dyn Write + Send>>>>;

/// Receives the guest's output: writes it to the console and cuts it into lines.
struct Output<E> {
    console: Console,
    line: Vec<u8>,
    events: Arc<E>,
    stats: Arc<SerialStats>,
}

impl<E: SerialEvents> Output<E> {
    fn finish_line(&mut self) {
        let mut bytes = std::mem::take(&mut self.line);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        self.stats.lines.fetch_add(1, Ordering::Relaxed);
        self.events.line(&String::from_utf8_lossy(&bytes));
    }
}

impl<E: SerialEvents> Write for Output<E> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stats
            .tx_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let mut console = self.console.lock();
        if let Some(out) = console.as_mut()
            && out.write_all(buf).and_then(|()| out.flush()).is_err()
        {
            // A console that went away (closed stdout, full disk) must not stop the guest.
            tracing::warn!("serial output backend failed; discarding further output");
            *console = None;
        }
        drop(console);
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

/// A 16550 UART with its console.
pub struct SerialCore<T: Trigger + Clone, E: SerialEvents> {
    uart: Serial<T, NoEvents, Output<E>>,
    pending_input: VecDeque<u8>,
    interrupt: T,
    console: Console,
    events: Arc<E>,
    stats: Arc<SerialStats>,
}

impl<T: Trigger + Clone, E: SerialEvents> SerialCore<T, E> {
    /// A UART raising `interrupt`, writing to `console` (none: output is only cut into
    /// lines), telling `events` of each line.
    pub fn new(
        interrupt: T,
        console: Option<Box<dyn Write + Send>>,
        events: E,
        stats: Arc<SerialStats>,
    ) -> Self {
        let console = Arc::new(parking_lot::Mutex::new(console));
        let events = Arc::new(events);
        let uart = Serial::new(
            interrupt.clone(),
            Output {
                console: console.clone(),
                line: Vec::new(),
                events: events.clone(),
                stats: stats.clone(),
            },
        );
        SerialCore {
            uart,
            pending_input: VecDeque::new(),
            interrupt,
            console,
            events,
            stats,
        }
    }

    fn output(&self) -> Output<E> {
        Output {
            console: self.console.clone(),
            line: Vec::new(),
            events: self.events.clone(),
            stats: self.stats.clone(),
        }
    }

    /// A read of register `offset` (0-7).
    pub fn read(&mut self, offset: u8) -> u8 {
        let v = self.uart.read(offset);
        self.feed();
        v
    }

    /// A write of register `offset` (0-7).
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial write: {e:?}");
        }
    }

    /// Queues input for the guest, as far as [`MAX_PENDING_INPUT`] allows: how many bytes
    /// were taken.
    pub fn send_input(&mut self, bytes: &[u8]) -> usize {
        let in_fifo = FIFO_SIZE.saturating_sub(self.uart.fifo_capacity());
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending_input.len() + in_fifo);
        let n = room.min(bytes.len());
        self.pending_input.extend(&bytes[..n]);
        self.feed();
        self.stats.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Input bytes not yet in the receive FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending_input.len()
    }

    /// Moves waiting input into the receive FIFO as far as it has room.
    fn feed(&mut self) {
        while !self.pending_input.is_empty() && self.uart.fifo_capacity() > 0 {
            let n = self.uart.fifo_capacity().min(self.pending_input.len());
            let chunk: Vec<u8> = self.pending_input.drain(..n).collect();
            if self.uart.enqueue_raw_bytes(&chunk).is_err() {
                break;
            }
        }
    }

    /// Back to power-on state with the same interrupt, console and events: registers
    /// cleared; the FIFO, waiting input and a partial line gone.
    pub fn reset(&mut self) {
        self.uart = Serial::new(self.interrupt.clone(), self.output());
        self.pending_input.clear();
    }

    /// What a snapshot keeps: the registers, the receive FIFO and the input still waiting.
    pub fn save(&self) -> SavedSerial {
        SavedSerial {
            uart: (&self.uart.state()).into(),
            pending_input: self.pending_input.iter().copied().collect(),
        }
    }

    /// Puts the UART in the state `saved` holds.
    ///
    /// # Errors
    /// The saved state holds more input than a UART can, or vm-superio refuses it (its
    /// interrupt cannot be raised); nothing changes then.
    pub fn load(&mut self, saved: SavedSerial) -> Result<(), StateError> {
        if saved.uart.in_buffer.len() > FIFO_SIZE
            || saved.uart.in_buffer.len() + saved.pending_input.len() > MAX_PENDING_INPUT
        {
            return Err(StateError::TooMuchInput);
        }
        let uart = Serial::from_state(
            &(&saved.uart).into(),
            self.interrupt.clone(),
            NoEvents,
            self.output(),
        )
        .map_err(|e| StateError::Refused(format!("{e:?}")))?;
        self.uart = uart;
        self.pending_input = saved.pending_input.into();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use parking_lot::Mutex;

    use super::*;

    const RBR_THR: u8 = 0;
    const IER: u8 = 1;
    const LSR: u8 = 5;
    const SCRATCH: u8 = 7;
    const LSR_DATA_READY: u8 = 0x01;
    const IER_RDA: u8 = 0x01;

    #[derive(Clone, Default)]
    struct Count(Arc<AtomicU32>);

    impl Trigger for Count {
        type E = io::Error;
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl SerialEvents for Lines {
        fn line(&self, line: &str) {
            self.0.lock().push(line.to_owned());
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Uart {
        core: SerialCore<Count, Lines>,
        irqs: Count,
        lines: Lines,
        console: Captured,
        stats: Arc<SerialStats>,
    }

    fn uart() -> Uart {
        let (irqs, lines, console) = (Count::default(), Lines::default(), Captured::default());
        let stats = Arc::new(SerialStats::default());
        let core = SerialCore::new(
            irqs.clone(),
            Some(Box::new(console.clone())),
            lines.clone(),
            stats.clone(),
        );
        Uart {
            core,
            irqs,
            lines,
            console,
            stats,
        }
    }

    fn type_out(core: &mut SerialCore<Count, Lines>, text: &[u8]) {
        for &b in text {
            core.write(RBR_THR, b);
        }
    }

    /// Everything the guest can read now, as a driver polling LSR reads it.
    fn read_all(core: &mut SerialCore<Count, Lines>) -> Vec<u8> {
        let mut got = Vec::new();
        while core.read(LSR) & LSR_DATA_READY != 0 {
            got.push(core.read(RBR_THR));
        }
        got
    }

    #[test]
    fn output_reaches_the_console_and_arrives_as_lines() {
        let mut u = uart();
        type_out(&mut u.core, b"hello\r\nworld\npartial");
        assert_eq!(*u.console.0.lock(), b"hello\r\nworld\npartial");
        assert_eq!(
            *u.lines.0.lock(),
            ["hello", "world"],
            "no \\r, no partial line"
        );
        assert_eq!(u.stats.tx_bytes.load(Ordering::Relaxed), 20);
        assert_eq!(u.stats.lines.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_line_longer_than_max_line_arrives_in_pieces() {
        let mut u = uart();
        type_out(&mut u.core, &[b'x'; MAX_LINE + 3]);
        type_out(&mut u.core, b"\n");
        let lines = u.lines.0.lock();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1], "xxx");
    }

    #[test]
    fn a_failing_console_is_dropped_and_lines_still_arrive() {
        let lines = Lines::default();
        let mut core = SerialCore::new(
            Count::default(),
            Some(Box::new(Broken)),
            lines.clone(),
            Arc::new(SerialStats::default()),
        );
        type_out(&mut core, b"one\ntwo\n");
        assert_eq!(*lines.0.lock(), ["one", "two"]);
    }

    #[test]
    fn input_waits_for_room_in_the_fifo_and_arrives_in_order() {
        let mut u = uart();
        u.core.write(IER, IER_RDA);
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(u.core.send_input(&input), 200);
        assert_eq!(u.core.pending_input(), 200 - FIFO_SIZE);
        assert!(
            u.irqs.0.load(Ordering::SeqCst) > 0,
            "received data raises the line"
        );
        assert_eq!(read_all(&mut u.core), input);
        assert_eq!(u.core.pending_input(), 0);
        assert_eq!(u.stats.rx_bytes.load(Ordering::Relaxed), 200);
    }

    #[test]
    fn input_past_the_cap_is_refused_not_queued() {
        let mut u = uart();
        let total = MAX_PENDING_INPUT;
        assert_eq!(u.core.send_input(&vec![7; total + 10]), total);
        assert_eq!(u.core.send_input(b"more"), 0, "full");
        assert_eq!(u.stats.rx_bytes.load(Ordering::Relaxed), total as u64);
        assert_eq!(read_all(&mut u.core).len(), total);
        assert_eq!(u.core.send_input(b"room again"), 10);
    }

    #[test]
    fn a_reset_clears_registers_input_and_the_partial_line() {
        let mut u = uart();
        u.core.write(SCRATCH, 0x5a);
        u.core.send_input(&[1; 100]);
        type_out(&mut u.core, b"half a li");
        u.core.reset();
        assert_eq!(u.core.read(SCRATCH), 0);
        assert_eq!(u.core.pending_input(), 0);
        assert_eq!(u.core.read(LSR) & LSR_DATA_READY, 0, "FIFO empty");
        type_out(&mut u.core, b"ne\n");
        assert_eq!(*u.lines.0.lock(), ["ne"]);
        assert!(
            u.console.0.lock().ends_with(b"half a line\n"),
            "same console"
        );
    }

    #[test]
    fn save_and_load_keep_registers_fifo_and_waiting_input() {
        let mut u = uart();
        u.core.write(SCRATCH, 0x5a);
        u.core.write(IER, IER_RDA);
        let input: Vec<u8> = (0..150u8).collect();
        u.core.send_input(&input);
        let saved = u.core.save();

        let mut other = uart();
        other.core.load(saved.clone()).unwrap();
        assert_eq!(other.core.read(SCRATCH), 0x5a);
        assert_eq!(other.core.read(IER), IER_RDA);
        assert_eq!(read_all(&mut other.core), input);
        type_out(&mut other.core, b"after\n");
        assert_eq!(
            *other.lines.0.lock(),
            ["after"],
            "the loaded UART keeps its own events"
        );
        assert!(u.lines.0.lock().is_empty());

        // Too much input for any UART: refused, and the UART is as it was.
        let mut bloated = saved;
        bloated.pending_input = vec![0; MAX_PENDING_INPUT + 1];
        assert!(matches!(
            other.core.load(bloated),
            Err(StateError::TooMuchInput)
        ));
        assert_eq!(other.core.read(SCRATCH), 0x5a);
        assert_eq!(other.core.pending_input(), 0);
    }
}
