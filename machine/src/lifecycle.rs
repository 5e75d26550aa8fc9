//! Run states and the transitions between them: `cont`, `stop`, resets, the power button,
//! shutdowns and internal errors, with QEMU's events (docs/machine.md, "Run states").
//!
//! Every change of run state goes through [`Machine::enter`]: the guest's kvmclock stops
//! when it stops and goes on when it runs, the devices' I/O pauses and resumes with it, and
//! the new state is published.

use devices::ShutdownCause;
use devices::ged::EVENT_POWER_BUTTON;
use qom::Value;

use crate::error::{Error, Result};
use crate::launch::reload;
use crate::machine::{Machine, State, empty};
use crate::runstate::{RunState, valid_transition};

fn guest_reason(cause: ShutdownCause) -> Value {
    Value::map([
        ("guest", Value::Bool(cause.is_guest())),
        ("reason", Value::Enum(cause.name().to_owned())),
    ])
}

impl Machine {
    /// Tells the tree and subscribers about the run state.
    pub(crate) fn publish_state(&self, run: RunState, launched: bool) {
        self.published.set_run(run);
        let (name, config_open) = match (run, launched) {
            (RunState::Prelaunch, false) => ("prelaunch", true),
            (RunState::Prelaunch, true) => ("past its first start", false),
            (run, _) => (run.name(), false),
        };
        self.tree.set_machine_state(name, config_open);
        self.object
            .notify_property_changed("status", &Value::Enum(run.name().to_owned()));
        self.changed.notify_all();
    }

    /// Goes to `to` if the run-state table allows it.
    ///
    /// # Errors
    /// It does not.
    pub(crate) fn transition(&self, st: &mut State, to: RunState) -> Result<()> {
        if !valid_transition(st.run, to) {
            return Err(Error::Transition { from: st.run, to });
        }
        self.enter(st, to);
        Ok(())
    }

    /// Puts the machine in `to`: kvmclock stops as the guest does and goes on as it runs
    /// again (the vCPUs are paused when it is read, and still paused when it is set), the
    /// devices' I/O pauses or resumes with the guest, and the state is published.
    pub(crate) fn enter(&self, st: &mut State, to: RunState) {
        if let Some(l) = st.launched.as_mut() {
            if to == RunState::Running {
                l.resume_clock();
            } else {
                l.stop_clock();
            }
        }
        if to == RunState::Running {
            self.pci.resume_io();
        } else if st.run == RunState::Running {
            // Requests being served complete on the devices' threads; `stop` does not
            // wait for them (a save, a reset and an unplug do).
            self.pci.pause_io(false);
        }
        st.run = to;
        self.publish_state(to, st.launched.is_some());
    }

    /// `cont`: start the guest (creating the VM on the first start) or resume it.
    ///
    /// # Errors
    /// The machine needs a reset first, or the VM cannot be created or the kernel loaded
    /// (the machine then stays in prelaunch, nothing changed).
    pub fn cont(&self) -> Result<()> {
        self.give_the_demo_its_exit_port()?;
        let newly_launched = {
            let mut st = self.state.lock();
            match st.run {
                RunState::Running => return Ok(()),
                // Postmigrate: a snapshot and go on (docs/snapshot.md).
                RunState::Prelaunch | RunState::Paused | RunState::Postmigrate => {}
                s if s.needs_reset() => return Err(Error::NeedsReset { state: s }),
                s => {
                    return Err(Error::Transition {
                        from: s,
                        to: RunState::Running,
                    });
                }
            }
            let newly = st.launched.is_none();
            if newly {
                st.launched = Some(self.launch()?);
            }
            self.run_guest(&mut st)?;
            newly
        };
        if newly_launched {
            self.create_cpu_objects();
        }
        Ok(())
    }

    /// Lets the guest run: RESUME, the `running` state, every vCPU going.
    pub(crate) fn run_guest(&self, st: &mut State) -> Result<()> {
        self.notifiers.resume.emit(empty);
        self.transition(st, RunState::Running)?;
        resume_all(st);
        Ok(())
    }

    /// `stop`: pause the guest. It answers as soon as the vCPUs are paused: a device
    /// request being served completes on its own thread meanwhile.
    ///
    /// # Errors
    /// The machine is not running or paused.
    pub fn stop(&self) -> Result<()> {
        let mut st = self.state.lock();
        match st.run {
            RunState::Paused => Ok(()),
            RunState::Running => {
                pause_all(&st);
                self.transition(&mut st, RunState::Paused)?;
                self.notifiers.stop.emit(empty);
                Ok(())
            }
            s => Err(Error::Transition {
                from: s,
                to: RunState::Paused,
            }),
        }
    }

    /// `system_reset` (or a guest reset): reload the guest and restart it. A running
    /// machine keeps running; a stopped one goes to prelaunch, as in QEMU.
    ///
    /// # Errors
    /// Reloading the guest failed (the machine then stops with an internal error).
    pub fn reset(&self, cause: ShutdownCause) -> Result<()> {
        let mut st = self.state.lock();
        if st.exit_status.is_some() {
            return Ok(());
        }
        pause_all(&st);
        self.pio.reset_all();
        self.mmio.reset_all();
        // Each PCI function's I/O stops (after the request it serves) as it resets.
        self.pci.reset();
        let Some(l) = &st.launched else {
            self.emit_reset(cause);
            return Ok(());
        };
        let was_running = st.run == RunState::Running;
        if let Err(e) = reload(l) {
            let e = Error::Reset(Box::new(e));
            drop(st);
            self.internal_error(0, &e.to_string());
            return Err(e);
        }
        self.emit_reset(cause);
        if was_running {
            resume_all(&st);
        } else if st.run != RunState::Prelaunch {
            self.published.set_error(None);
            self.transition(&mut st, RunState::Prelaunch)?;
        }
        Ok(())
    }

    fn emit_reset(&self, cause: ShutdownCause) {
        self.notifiers.reset.emit(|| guest_reason(cause));
    }

    /// `system_powerdown`: press the ACPI power button.
    pub fn powerdown(&self) {
        let _st = self.state.lock();
        self.notifiers.powerdown.emit(empty);
        if let Some(ged) = self.ged.get() {
            ged.raise(EVENT_POWER_BUTTON);
        }
    }

    /// `quit`: end the VMM (exit status 0).
    pub fn quit(&self) {
        self.shutdown(ShutdownCause::HostQmpQuit, Some(0));
    }

    /// Stops the guest for `cause`. The VMM then ends with `exit` (or 0), unless the guest
    /// itself shut down and `no-shutdown` is set: then the machine stays in `shutdown`.
    pub fn shutdown(&self, cause: ShutdownCause, exit: Option<i32>) {
        let mut st = self.state.lock();
        if st.exit_status.is_some() {
            return;
        }
        pause_all(&st);
        self.notifiers.shutdown.emit(|| guest_reason(cause));
        if st.run != RunState::Shutdown {
            self.enter(&mut st, RunState::Shutdown);
        }
        let keep = exit.is_none()
            && cause.is_guest()
            && self.object.get("no-shutdown").ok() == Some(Value::Bool(true));
        if keep {
            self.notifiers.stop.emit(empty);
        } else {
            let status = exit.unwrap_or(0);
            st.exit_status = Some(status);
            self.published.set_exit_status(status);
            self.changed.notify_all();
        }
    }

    /// A vCPU cannot go on: stop everything in `internal-error` with the reason recorded.
    pub(crate) fn internal_error(&self, cpu: u32, reason: &str) {
        let mut st = self.state.lock();
        if st.exit_status.is_some() || st.run == RunState::InternalError {
            return;
        }
        tracing::error!("vCPU {cpu}: {reason}; the machine stops in internal-error");
        pause_all(&st);
        self.published
            .set_error(Some(&format!("vCPU {cpu}: {reason}")));
        let was_live = matches!(st.run, RunState::Running | RunState::Paused);
        self.enter(&mut st, RunState::InternalError);
        if was_live {
            self.notifiers.stop.emit(empty);
        }
    }
}

/// Pauses every vCPU and waits until they all are.
pub(crate) fn pause_all(st: &State) {
    if let Some(l) = &st.launched {
        for v in &l.vcpus {
            v.request_pause();
        }
        for v in &l.vcpus {
            v.wait_paused();
        }
    }
}

/// Lets every vCPU run again.
pub(crate) fn resume_all(st: &State) {
    if let Some(l) = &st.launched {
        for v in &l.vcpus {
            v.resume();
        }
    }
}
