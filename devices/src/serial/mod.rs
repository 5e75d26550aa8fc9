//! `isa-serial`: a 16550 UART with a console backend and a `line` notifier that delivers
//! the guest's output line by line.
//!
//! - [`core`]: the emulation, plain: vm-superio's 16550 for the registers, with what a
//!   console needs around it (output cut into lines, input waiting for room in the receive
//!   FIFO, counters), reporting lines through [`SerialEvents`].
//! - [`state`]: what a snapshot keeps of it.
//! - [`qom`]: the `isa-serial` type: properties, the `line` notifier, `write-input`, the
//!   console backend (stdio, a file).

pub mod core;
mod qom;
pub mod state;

pub use self::core::{MAX_LINE, MAX_PENDING_INPUT, SerialCore, SerialEvents, SerialStats};
pub(crate) use self::qom::register;
pub use self::qom::{Backend, SerialDevice, TYPE};
