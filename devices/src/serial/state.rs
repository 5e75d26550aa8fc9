//! What a snapshot keeps of a UART: its registers and receive FIFO (vm-superio's
//! `SerialState`), and the input still waiting for room in the FIFO.
//!
//! The serde mirror of `SerialState` is written here rather than taken from vm-superio-ser:
//! that crate pins vm-superio to `=0.8.1` (qomu uses 0.8.2) and brings the `versionize`
//! framework, which Firecracker itself dropped in 2023, with bincode 1, syn 1 and an older
//! vmm-sys-util, all for ten named fields.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

/// vm-superio's `SerialState`, by field name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for UartRegisters {
    fn from(s: &SerialState) -> Self {
        UartRegisters {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&UartRegisters> for SerialState {
    fn from(s: &UartRegisters) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// A UART in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSerial {
    pub uart: UartRegisters,
    pub pending_input: Vec<u8>,
}

/// Why a saved UART cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the saved serial port holds more input than it can")]
    TooMuchInput,
    #[error("vm-superio refuses the saved serial port: {0}")]
    Refused(String),
}
