//! Counters of the machine's exits and of guest accesses nothing answered, with a
//! rate-limited log of the latter (a guest poking at random must not flood the log).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

/// Kinds of unanswered accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    PioRead,
    PioWrite,
    MmioRead,
    MmioWrite,
}

/// Most unanswered accesses logged per second.
const LOG_PER_SECOND: u64 = 10;

#[derive(Default)]
pub struct Stats {
    exits: AtomicU64,
    unmapped_pio: AtomicU64,
    unmapped_mmio: AtomicU64,
    /// Start of the current one-second log window, and messages logged in it.
    window: Mutex<Option<(Instant, u64)>>,
}

impl Stats {
    pub fn count_exit(&self) {
        self.exits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    pub fn unmapped_pio(&self) -> u64 {
        self.unmapped_pio.load(Ordering::Relaxed)
    }

    pub fn unmapped_mmio(&self) -> u64 {
        self.unmapped_mmio.load(Ordering::Relaxed)
    }

    /// Counts an access nothing answered and logs it, at most [`LOG_PER_SECOND`] a second.
    pub fn unmapped(&self, access: Access, addr: u64, size: usize) {
        match access {
            Access::PioRead | Access::PioWrite => self.unmapped_pio.fetch_add(1, Ordering::Relaxed),
            Access::MmioRead | Access::MmioWrite => {
                self.unmapped_mmio.fetch_add(1, Ordering::Relaxed)
            }
        };
        let mut window = self.window.lock();
        let now = Instant::now();
        let (start, logged) = window.get_or_insert((now, 0));
        if now.duration_since(*start).as_secs() >= 1 {
            if *logged > LOG_PER_SECOND {
                tracing::warn!(
                    "{} more unanswered guest accesses in the last second were not logged",
                    *logged - LOG_PER_SECOND
                );
            }
            *start = now;
            *logged = 0;
        }
        *logged += 1;
        if *logged <= LOG_PER_SECOND {
            let what = match access {
                Access::PioRead => "read of port",
                Access::PioWrite => "write to port",
                Access::MmioRead => "read of address",
                Access::MmioWrite => "write to address",
            };
            tracing::warn!(
                "guest {what} {addr:#x} ({size} bytes): nothing there; reads return all-ones"
            );
        }
    }
}
