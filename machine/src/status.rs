//! What clients poll about the machine, published as it changes so that reading it never
//! waits: the run state, the exit status, the last internal error, whether the VM exists,
//! and its vCPUs' host threads.
//!
//! The machine lock (`Machine::state`) is held for whole transitions, and a save or a
//! restore holds it from start to end (seconds, for a guest of some GiB). A client that
//! polls `query-status`, `/machine`'s `status` or `query-cpus-fast` meanwhile must not wait
//! for it, so every change is written here too, by the code that makes it, and these reads
//! take no lock but this module's own, each held only to copy a value
//! (docs/object-model.md, "Threads and locks").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};

use parking_lot::Mutex;

use crate::runstate::RunState;

/// A vCPU as `query-cpus-fast` and `thread-id` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VcpuThread {
    pub(crate) index: u32,
    pub(crate) thread_id: i64,
    /// The guest's TSC rate, as KVM set it for this vCPU (0 where KVM does not say).
    pub(crate) tsc_khz: u32,
}

/// What `exit_status` holds until the VMM is ending (no `i32` is).
const NO_EXIT_STATUS: i64 = i64::MIN;

/// The machine's published status.
#[derive(Debug)]
pub(crate) struct Published {
    run: AtomicU8,
    /// The VMM's exit status once it is ending, else [`NO_EXIT_STATUS`].
    exit_status: AtomicI64,
    launched: AtomicBool,
    error: Mutex<Option<Arc<str>>>,
    vcpus: Mutex<Arc<[VcpuThread]>>,
}

impl Default for Published {
    fn default() -> Self {
        Published {
            run: AtomicU8::new(RunState::Prelaunch.index()),
            exit_status: AtomicI64::new(NO_EXIT_STATUS),
            launched: AtomicBool::new(false),
            error: Mutex::new(None),
            vcpus: Mutex::new(Arc::from([])),
        }
    }
}

impl Published {
    pub(crate) fn run(&self) -> RunState {
        RunState::from_index(self.run.load(Ordering::Acquire))
    }

    pub(crate) fn set_run(&self, run: RunState) {
        self.run.store(run.index(), Ordering::Release);
    }

    pub(crate) fn exit_status(&self) -> Option<i32> {
        i32::try_from(self.exit_status.load(Ordering::Acquire)).ok()
    }

    pub(crate) fn set_exit_status(&self, status: i32) {
        self.exit_status.store(status.into(), Ordering::Release);
    }

    /// Whether the VM exists (the machine has been started once).
    pub(crate) fn launched(&self) -> bool {
        self.launched.load(Ordering::Acquire)
    }

    /// The VM exists now, with these vCPUs.
    pub(crate) fn set_launched(&self, vcpus: Vec<VcpuThread>) {
        *self.vcpus.lock() = vcpus.into();
        self.launched.store(true, Ordering::Release);
    }

    pub(crate) fn error(&self) -> Option<Arc<str>> {
        self.error.lock().clone()
    }

    pub(crate) fn set_error(&self, error: Option<&str>) {
        *self.error.lock() = error.map(Arc::from);
    }

    pub(crate) fn vcpus(&self) -> Arc<[VcpuThread]> {
        self.vcpus.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_state_round_trips_through_its_index() {
        let p = Published::default();
        assert_eq!(p.run(), RunState::Prelaunch);
        for s in RunState::ALL {
            p.set_run(s);
            assert_eq!(p.run(), s);
        }
    }

    #[test]
    fn exit_status_error_and_vcpus() {
        let p = Published::default();
        assert_eq!(p.exit_status(), None);
        p.set_exit_status(3);
        assert_eq!(p.exit_status(), Some(3));
        assert_eq!(p.error(), None);
        p.set_error(Some("vCPU 0: boom"));
        assert_eq!(p.error().as_deref(), Some("vCPU 0: boom"));
        p.set_error(None);
        assert_eq!(p.error(), None);
        assert!(!p.launched());
        let v = VcpuThread {
            index: 0,
            thread_id: 42,
            tsc_khz: 2_000_000,
        };
        p.set_launched(vec![v]);
        assert!(p.launched());
        assert_eq!(&*p.vcpus(), &[v]);
    }
}
