//! Run states (QEMU's `RunState` names) and the one table of valid transitions.

/// The machine's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
}

impl RunState {
    /// Every state, in QEMU's order (the `RunState` enum's values).
    pub const ALL: [RunState; 16] = [
        RunState::Debug,
        RunState::Inmigrate,
        RunState::InternalError,
        RunState::IoError,
        RunState::Paused,
        RunState::Postmigrate,
        RunState::Prelaunch,
        RunState::FinishMigrate,
        RunState::RestoreVm,
        RunState::Running,
        RunState::SaveVm,
        RunState::Shutdown,
        RunState::Suspended,
        RunState::Watchdog,
        RunState::GuestPanicked,
        RunState::Colo,
    ];

    /// The state's place in [`RunState::ALL`].
    pub fn index(self) -> u8 {
        // ALL lists the variants in declaration order.
        self as u8
    }

    /// The state at `index` of [`RunState::ALL`] (`Prelaunch` for an index past its end).
    pub fn from_index(index: u8) -> RunState {
        RunState::ALL
            .get(usize::from(index))
            .copied()
            .unwrap_or(RunState::Prelaunch)
    }

    /// QEMU's name of the state.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Debug => "debug",
            RunState::Inmigrate => "inmigrate",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Paused => "paused",
            RunState::Postmigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::FinishMigrate => "finish-migrate",
            RunState::RestoreVm => "restore-vm",
            RunState::Running => "running",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Colo => "colo",
        }
    }

    /// True in the states that need a reset before the guest can run again.
    pub fn needs_reset(self) -> bool {
        matches!(
            self,
            RunState::InternalError | RunState::Shutdown | RunState::GuestPanicked
        )
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the machine may go from `from` to `to`: the subset of QEMU's table that qomu's
/// machine uses (reset from a stopped state goes to prelaunch, as in QEMU).
pub fn valid_transition(from: RunState, to: RunState) -> bool {
    use RunState::*;
    matches!(
        (from, to),
        (Prelaunch, Running | Shutdown | Inmigrate | Prelaunch)
            | (
                Running,
                Paused | Shutdown | InternalError | GuestPanicked | SaveVm | FinishMigrate
            )
            | (
                Paused,
                Running | Shutdown | Prelaunch | SaveVm | FinishMigrate
            )
            | (InternalError, Prelaunch | Paused | Shutdown)
            | (GuestPanicked, Prelaunch | Shutdown)
            | (Shutdown, Prelaunch | Shutdown)
            | (Inmigrate, Running | Paused | Shutdown | InternalError)
            | (SaveVm, Running | Paused)
            | (FinishMigrate, Running | Paused | Postmigrate | Shutdown)
            | (Postmigrate, Running | Shutdown | Prelaunch)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_transitions() {
        assert!(valid_transition(RunState::Prelaunch, RunState::Running));
        assert!(valid_transition(RunState::Running, RunState::Paused));
        assert!(valid_transition(RunState::Paused, RunState::Running));
        assert!(valid_transition(RunState::Running, RunState::InternalError));
        assert!(
            !valid_transition(RunState::InternalError, RunState::Running),
            "a reset is needed first"
        );
        assert!(!valid_transition(RunState::Prelaunch, RunState::Paused));
        assert!(!valid_transition(RunState::Shutdown, RunState::Running));
        assert_eq!(
            RunState::ALL
                .iter()
                .map(|s| s.name())
                .collect::<std::collections::HashSet<_>>()
                .len(),
            16
        );
    }

    #[test]
    fn indexes_follow_all() {
        for (i, s) in RunState::ALL.iter().enumerate() {
            assert_eq!(usize::from(s.index()), i);
            assert_eq!(RunState::from_index(s.index()), *s);
        }
    }
}
