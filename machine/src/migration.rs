//! Snapshot to a file (`migrate file:PATH`) and restore (`qomu --incoming file:PATH`), and
//! the same stream between two qomu processes over QEMU's other URIs (`unix:`, `tcp:`,
//! `exec:`, `fd:`; machine/src/migration_uri.rs), with QEMU's migration statuses, MIGRATION
//! events and run states (docs/snapshot.md, docs/migration.md).
//!
//! Saving runs on its own thread, as QEMU's migration does: `migrate` answers at once and
//! the client follows `query-migrate` or the MIGRATION events. The thread takes the
//! machine lock for the whole save, with the vCPUs paused (`finish-migrate`), so nothing
//! changes under it; the machine then stays paused in `postmigrate` (`cont` resumes it).
//! If the save fails, the partial file is removed and the machine goes back to the state
//! it was in.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use qom::{ObjectRef, Value};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::launch::Launched;
use crate::lifecycle::pause_all;
use crate::machine::{Machine, State, empty};
use crate::migration_uri::{self, Uri};
use crate::precopy;
use crate::runstate::RunState;
use crate::snapshot::{self, Fingerprint, Reader, Writer};
use crate::vm::{ChipState, VcpuState};

/// QEMU's `MigrationStatus` values qomu passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Setup,
    Active,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
}

/// What `query-migrate` reports.
#[derive(Debug, Default, Clone)]
pub struct Info {
    pub status: Option<Status>,
    pub setup_ms: u64,
    pub total_ms: u64,
    /// How long the guest was stopped for it.
    pub downtime_ms: u64,
    /// Bytes of the file, once written (or read), or of RAM pages sent so far in a live
    /// migration.
    pub bytes: u64,
    /// A live migration's figures (zero for a file): guest RAM, pages sent and skipped as
    /// zero, what the last pass left dirty, passes made, and the downtime expected.
    pub ram_total: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub remaining: u64,
    pub passes: u64,
    pub expected_downtime_ms: u64,
    pub error: Option<String>,
}

impl Info {
    /// How far along, in per cent: RAM sent in the first pass, then the last pass's dirty
    /// pages against what it left; 100 when completed.
    pub fn progress(&self) -> u64 {
        match self.status {
            Some(Status::Completed) => 100,
            _ if self.ram_total == 0 => 0,
            _ => {
                let sent = self.normal_pages * 4096 + self.zero_pages * 4096;
                (sent.min(self.ram_total) * 100 / self.ram_total).min(99)
            }
        }
    }

    /// QEMU's `MigrationInfo`: `{}` before any migration.
    pub fn to_value(&self) -> Value {
        let Some(status) = self.status else {
            return empty();
        };
        let mut fields = vec![("status", Value::Enum(status.name().to_owned()))];
        if matches!(status, Status::Active | Status::Completed) {
            let ms = self.total_ms.max(1);
            let live = self.passes > 0;
            let (total, normal, normal_bytes) = if live {
                (self.ram_total, self.normal_pages, self.normal_pages * 4096)
            } else {
                (self.bytes, self.bytes / 4096, self.bytes)
            };
            // Every member of QEMU's MigrationStats (all are required there).
            let ram = Value::map([
                ("transferred", Value::UInt(self.bytes)),
                ("remaining", Value::UInt(self.remaining)),
                ("total", Value::UInt(total)),
                ("duplicate", Value::UInt(self.zero_pages)),
                ("normal", Value::UInt(normal)),
                ("normal-bytes", Value::UInt(normal_bytes)),
                ("dirty-pages-rate", Value::UInt(0)),
                ("page-size", Value::UInt(4096)),
                ("dirty-sync-count", Value::UInt(self.passes.max(1))),
                ("mbps", Value::UInt(self.bytes * 8 / 1000 / ms)),
                ("postcopy-requests", Value::UInt(0)),
                ("multifd-bytes", Value::UInt(0)),
                ("pages-per-second", Value::UInt(normal * 1000 / ms)),
                ("precopy-bytes", Value::UInt(self.bytes)),
                ("downtime-bytes", Value::UInt(0)),
                ("postcopy-bytes", Value::UInt(0)),
                ("dirty-sync-missed-zero-copy", Value::UInt(0)),
            ]);
            fields.push(("ram", ram));
            fields.push(("setup-time", Value::UInt(self.setup_ms)));
            if status == Status::Active && live {
                fields.push(("expected-downtime", Value::UInt(self.expected_downtime_ms)));
            }
        }
        if status == Status::Completed {
            fields.push(("total-time", Value::UInt(self.total_ms)));
            fields.push(("downtime", Value::UInt(self.downtime_ms)));
        }
        if let Some(e) = &self.error {
            fields.push(("error-desc", Value::Str(e.clone())));
        }
        Value::map(fields)
    }
}

/// What `migrate-set-parameters` sets, with QEMU's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The downtime a live migration aims for, ms (QEMU's `downtime-limit`, 300).
    pub downtime_limit_ms: u64,
    /// Bytes per second a migration may send (QEMU's `max-bandwidth`, 128 MiB/s).
    pub max_bandwidth: u64,
    /// The NICs' self-announcement after a migration (QEMU's `announce-*`): the first
    /// after `initial` ms, `rounds` in all, each gap `step` ms longer than the one before,
    /// at most `max` ms.
    pub announce: Announce,
}

/// QEMU's announce parameters (50, 550, 5, 100 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    pub initial: u64,
    pub max: u64,
    pub rounds: u64,
    pub step: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            downtime_limit_ms: 300,
            max_bandwidth: 128 << 20,
            announce: Announce {
                initial: 50,
                max: 550,
                rounds: 5,
                step: 100,
            },
        }
    }
}

/// The largest `downtime-limit` QEMU takes: 2000 s.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2000 * 1000;

/// QEMU's migration capabilities, all off by default; qomu does `events` (and sends its
/// events whatever it says, as it always has), and refuses to turn the others on.
pub const CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];
/// Passes before a live migration stops the guest whatever remains (a guest that writes
/// faster than the stream carries would never converge; QEMU's auto-converge slows it
/// instead, which qomu does not do).
const MAX_PASSES: u32 = 30;

/// The section a live migration's source writes when it has stopped its guest, before the
/// last pass: empty. A file snapshot has none.
const SWITCH_OVER: &str = "switch-over";

/// The prefix of the empty section after each pass but the last (`pass-end:N`), which a
/// destination with a way back answers with [`migration_uri::PASS_LOADED`].
const PASS_END: &str = "pass-end:";

/// A snapshot that does not fit or does not load, in a sentence.
fn failed(e: impl std::fmt::Display) -> Error {
    Error::Snapshot(e.to_string())
}

/// Every object whose type levels carry state, in tree order.
pub fn stateful_objects(root: &ObjectRef) -> Vec<ObjectRef> {
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(obj) = stack.pop() {
        if obj.is_realized() && !obj.class().state_hooks().is_empty() {
            out.push(obj.clone());
        }
        let mut children = obj.children();
        children.reverse();
        stack.extend(children);
    }
    out
}

impl Machine {
    /// What this machine is, to compare with a snapshot's.
    fn fingerprint(&self, objects: &[ObjectRef], run_state: &str) -> Result<Fingerprint> {
        let get = |name: &str| self.object().get(name);
        Ok(Fingerprint {
            memory_size: get("memory-size")?.as_u64().unwrap_or(0),
            cpus: get("cpus")?.as_u64().unwrap_or(1) as u32,
            objects: objects
                .iter()
                .map(|o| (o.path().to_owned(), o.type_name().to_owned()))
                .collect(),
            run_state: run_state.to_owned(),
            writer: format!("qomu {}", env!("CARGO_PKG_VERSION")),
        })
    }

    fn set_migration(&self, f: impl FnOnce(&mut Info)) {
        let mut info = self.migration.lock();
        let before = info.status;
        f(&mut info);
        let status = info.status;
        drop(info);
        if status != before
            && let Some(s) = status
        {
            self.notifiers
                .migration
                .emit(|| Value::map([("status", Value::Enum(s.name().to_owned()))]));
            if let Ok(o) = self.tree().lookup("/machine/migration") {
                o.notify_property_changed("status", &Value::Str(s.name().to_owned()));
            }
        }
    }

    /// The last (or current) migration's figures.
    pub fn migration_info(&self) -> Info {
        self.migration.lock().clone()
    }

    /// `query-migrate`.
    pub fn query_migrate(&self) -> Value {
        self.migration.lock().to_value()
    }

    /// Whether a save or a restore is under way.
    pub(crate) fn migration_running(&self) -> bool {
        matches!(
            self.migration.lock().status,
            Some(Status::Setup | Status::Active | Status::Cancelling)
        )
    }

    /// `migrate {"uri": URI}`: starts saving the machine to a file, or sending it to a
    /// destination qomu, and returns; the MIGRATION events and `query-migrate` tell how it
    /// goes (a destination that cannot be reached fails the migration, as in QEMU).
    ///
    /// # Errors
    /// Not a migration URI, a migration already under way, or a machine that is not
    /// running or paused.
    pub fn migrate(self: &Arc<Self>, uri: &str) -> Result<()> {
        let target = Uri::parse(uri)?;
        {
            let st = self.state.lock();
            if st.launched.is_none() || !matches!(st.run, RunState::Running | RunState::Paused) {
                return Err(Error::NotSaveable { state: st.run });
            }
            let mut info = self.migration.lock();
            if matches!(info.status, Some(Status::Setup | Status::Active)) {
                return Err(Error::MigrationRunning);
            }
            *info = Info::default();
        }
        self.cancel_migration
            .store(false, std::sync::atomic::Ordering::Release);
        self.set_migration(|i| i.status = Some(Status::Setup));
        let machine = self.clone();
        sandbox::spawn(
            sandbox::Class::Migration,
            "qomu-migrate".into(),
            move || machine.save_thread(&target),
        )
        .map(drop)
        .map_err(|source| {
            let e = Error::Host {
                what: "the migration thread",
                source,
            };
            self.set_migration(|i| {
                i.status = Some(Status::Failed);
                i.error = Some(e.to_string());
            });
            e
        })
    }

    fn save_thread(&self, target: &Uri) {
        let started = Instant::now();
        // A peer is reached before anything stops (QEMU's setup phase).
        let outgoing = match target {
            Uri::File(_) => None,
            uri => match migration_uri::connect(uri) {
                Ok(o) => Some(o),
                Err(e) => {
                    self.set_migration(|i| {
                        i.status = Some(Status::Failed);
                        i.error = Some(e.to_string());
                        i.total_ms = started.elapsed().as_millis() as u64;
                    });
                    return;
                }
            },
        };
        let _configuration = self.configuration.lock();
        let active = || {
            let setup_ms = started.elapsed().as_millis() as u64;
            self.set_migration(|i| {
                i.status = Some(Status::Active);
                i.setup_ms = setup_ms;
            });
        };
        let result = match outgoing {
            None => {
                // A file: active once the guest is stopped for it (finish-migrate), as
                // clients polling both may expect.
                let mut st = self.state.lock();
                let before = st.run;
                let result = self.save_locked(&mut st, target, None, started, &active);
                self.finish_save(&mut st, before, result.is_ok());
                result
            }
            // Live: active while the guest runs and its RAM goes.
            Some(out) => {
                active();
                self.save_live(target, out, started)
            }
        };
        match result {
            Ok((bytes, downtime_ms)) => {
                self.set_migration(|i| {
                    i.status = Some(Status::Completed);
                    i.bytes = bytes;
                    i.remaining = 0;
                    i.total_ms = started.elapsed().as_millis() as u64;
                    i.downtime_ms = downtime_ms;
                });
            }
            Err(e)
                if self
                    .cancel_migration
                    .load(std::sync::atomic::Ordering::Acquire) =>
            {
                tracing::info!("migration to {target} cancelled: {e}");
                self.set_migration(|i| {
                    i.status = Some(Status::Cancelled);
                    i.total_ms = started.elapsed().as_millis() as u64;
                });
            }
            Err(e) => {
                tracing::warn!("migration to {target} failed: {e}");
                self.set_migration(|i| {
                    i.status = Some(Status::Failed);
                    i.error = Some(e.to_string());
                    i.total_ms = started.elapsed().as_millis() as u64;
                });
            }
        }
    }

    /// `migrate_cancel`: a migration under way stops at its next section, the guest goes on
    /// as it was (statuses `cancelling`, then `cancelled`); with none, nothing happens (as
    /// QEMU's, it succeeds). Once the guest has stopped for the last copy, that finishes.
    pub fn migrate_cancel(&self) {
        if !self.migration_running() {
            return;
        }
        self.cancel_migration
            .store(true, std::sync::atomic::Ordering::Release);
        self.set_migration(|i| {
            if matches!(i.status, Some(Status::Setup | Status::Active)) {
                i.status = Some(Status::Cancelling);
            }
        });
    }

    /// Stops the guest for the state to be read (`finish-migrate`, STOP if it ran): its
    /// vCPUs, and each device's I/O thread after the request it serves, so that no request
    /// is half-served in the snapshot. Whether it was running, and when it stopped.
    fn stop_for_save(&self, st: &mut State) -> Result<(bool, Instant)> {
        let was_running = st.run == RunState::Running;
        let stopped = Instant::now();
        if was_running {
            pause_all(st);
        }
        self.transition(st, RunState::FinishMigrate)?;
        if was_running {
            self.notifiers.stop.emit(empty);
        }
        self.pci.pause_io(true);
        Ok((was_running, stopped))
    }

    /// After a save: `postmigrate` if it went well; else the guest back as it was before
    /// (running again, or paused).
    fn finish_save(&self, st: &mut State, before: RunState, ok: bool) {
        if ok {
            let _ = self.transition(st, RunState::Postmigrate);
        } else if st.run == RunState::FinishMigrate {
            let _ = if before == RunState::Running {
                self.run_guest(st)
            } else {
                self.transition(st, before)
            };
        }
    }

    /// A live (pre-copy) migration to a stream: the config first, so the destination can
    /// refuse before anything else comes; then RAM in passes while the guest runs, each
    /// sending what the one before left dirty (KVM's log and the devices' bitmap), until
    /// what remains would take less than the downtime limit at the last pass's rate; then
    /// the guest stops for the rest and the device and vCPU state. Returns the bytes sent and
    /// how long the guest was stopped.
    fn save_live(
        &self,
        target: &Uri,
        out: migration_uri::Outgoing,
        started: Instant,
    ) -> Result<(u64, u64)> {
        let io = |source: std::io::Error| {
            failed(format!(
                "the destination stopped taking the stream: {source}"
            ))
        };
        let (tracker, fingerprint) = {
            let st = self.state.lock();
            let l = st
                .launched
                .as_ref()
                .ok_or_else(|| failed("the machine has no VM"))?;
            let run_state = if st.run == RunState::Running {
                "running"
            } else {
                "paused"
            };
            let objects = stateful_objects(&self.tree().root());
            (l.vm.dirty_tracker(), self.fingerprint(&objects, run_state)?)
        };
        let mut child = out.child;
        let mut back = out.back;
        let mut w = Writer::stream(out.stream).map_err(io)?;
        w.section("config", &[&json(&fingerprint)?]).map_err(io)?;
        tracker.set_dirty_logging(true)?;
        // Logging goes off whatever happens next.
        struct LoggingOff<'a>(&'a crate::vm::DirtyTracker);
        impl Drop for LoggingOff<'_> {
            fn drop(&mut self) {
                if let Err(e) = self.0.set_dirty_logging(false) {
                    tracing::warn!("migration: dirty logging stays on: {e}");
                }
            }
        }
        let _off = LoggingOff(&tracker);
        let ram_total = tracker.memory().iter().map(|r| r.len()).sum::<u64>();
        let mut dirty: Option<Vec<Vec<u64>>> = None;
        let mut pass = 1u32;
        loop {
            self.notifiers
                .migration_pass
                .emit_fields(|| [("pass", Value::UInt(pass.into()))]);
            if let Some(n) = self
                .tree()
                .lookup("/machine/migration")
                .ok()
                .and_then(|o| o.notifier("pass").ok())
            {
                n.emit_fields(|| [("pass", Value::UInt(pass.into()))]);
            }
            let t = Instant::now();
            let bandwidth = self.migration_params.lock().max_bandwidth;
            let sent = precopy::send(
                &mut w,
                tracker.memory(),
                dirty.as_deref(),
                pass,
                bandwidth,
                &self.cancel_migration,
            )
            .map_err(io)?;
            // The pass ends, its last bytes go now, and on a two-way stream the source waits
            // for the destination to have loaded them: a destination still loading an
            // earlier pass (faulting in its RAM) at the switch-over would do it in the
            // downtime. The pass's rate is then what the destination takes, not what the
            // socket buffers.
            w.section(&format!("{PASS_END}{pass}"), &[]).map_err(io)?;
            w.flush().map_err(io)?;
            if let Some(back) = back.as_mut() {
                await_word(back, migration_uri::PASS_LOADED, &format!("pass {pass}"))?;
            }
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let next = tracker.take_dirty()?;
            let left = precopy::count(&next) * precopy::PAGE as u64;
            // Bytes per ms the stream took in this pass.
            let rate = (sent.bytes as f64 / ms.max(0.001)).max(1.0);
            let expected = left as f64 / rate;
            self.set_migration(|i| {
                i.bytes += sent.bytes;
                i.ram_total = ram_total;
                i.normal_pages += sent.pages;
                i.zero_pages += sent.zero_pages;
                i.remaining = left;
                i.passes = pass.into();
                i.expected_downtime_ms = expected as u64;
                i.total_ms = started.elapsed().as_millis() as u64;
            });
            dirty = Some(next);
            if self
                .cancel_migration
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return Err(failed(precopy::CANCELLED));
            }
            let limit = self.migration_params.lock().downtime_limit_ms as f64;
            if expected <= limit || pass >= MAX_PASSES {
                break;
            }
            pass += 1;
        }
        let mut st = self.state.lock();
        let before = st.run;
        let result = self.switch_over(
            &mut st,
            w,
            &tracker,
            dirty,
            pass + 1,
            child.as_mut(),
            back.as_mut(),
            &io,
        );
        self.finish_save(&mut st, before, result.is_ok());
        if result.is_ok() {
            tracing::info!("migrated to {target} in {:?}", started.elapsed());
        }
        result
    }

    /// The end of a live migration: the guest stops, the last dirty pages and the state go,
    /// and the destination has everything (an `exec:` command, once it exits well).
    #[allow(clippy::too_many_arguments)]
    fn switch_over(
        &self,
        st: &mut State,
        mut w: Writer,
        tracker: &crate::vm::DirtyTracker,
        dirty: Option<Vec<Vec<u64>>>,
        pass: u32,
        child: Option<&mut std::process::Child>,
        back: Option<&mut Box<dyn std::io::Read + Send>>,
        io: &dyn Fn(std::io::Error) -> Error,
    ) -> Result<(u64, u64)> {
        let (was_running, stopped) = self.stop_for_save(st)?;
        tracing::debug!("switch-over: stopped in {:?}", stopped.elapsed());
        // Tells the destination the last pass comes next (see `load_sections`).
        w.section(SWITCH_OVER, &[]).map_err(io)?;
        let mut rest = tracker.take_dirty()?;
        if let Some(d) = &dirty {
            precopy::merge(&mut rest, d);
        }
        // The guest is stopped: as fast as the stream goes (QEMU too lifts the limit here).
        let sent = precopy::send(
            &mut w,
            tracker.memory(),
            Some(&rest),
            pass,
            u64::MAX,
            &Default::default(),
        )
        .map_err(io)?;
        self.set_migration(|i| {
            i.bytes += sent.bytes;
            i.normal_pages += sent.pages;
            i.remaining = 0;
        });
        let l = st
            .launched
            .as_ref()
            .ok_or_else(|| failed("the machine has no VM"))?;
        // The destination loads the last pages while the vCPUs' state is read here.
        w.flush().map_err(io)?;
        tracing::debug!("switch-over: last pages sent at {:?}", stopped.elapsed());
        self.write_device_state(l, &mut w, io)?;
        let run_state = if was_running { "running" } else { "paused" };
        w.section("run", &[run_state.as_bytes()]).map_err(io)?;
        let bytes = w.finish().map_err(io)?;
        tracing::debug!("switch-over: state sent at {:?}", stopped.elapsed());
        if let Some(back) = back {
            await_word(back, migration_uri::LOADED, "the stream")?;
        }
        if let Some(child) = child {
            let status = child.wait().map_err(io)?;
            if !status.success() {
                return Err(failed(format!("the command ended with {status}")));
            }
        }
        Ok((bytes, stopped.elapsed().as_millis() as u64))
    }

    /// Stops the guest and writes the file (through a temporary name, renamed at the end, so
    /// a failed save leaves no partial file and spares an older one). Returns the bytes
    /// written and how long the guest was stopped.
    fn save_locked(
        &self,
        st: &mut State,
        target: &Uri,
        outgoing: Option<migration_uri::Outgoing>,
        started: Instant,
        active: &dyn Fn(),
    ) -> Result<(u64, u64)> {
        let (was_running, stopped) = self.stop_for_save(st)?;
        active();
        let l = st
            .launched
            .as_ref()
            .ok_or_else(|| failed("the machine has no VM"))?;
        let run_state = if was_running { "running" } else { "paused" };
        let bytes = match (target, outgoing) {
            (Uri::File(path), _) => {
                let partial = partial_path(path);
                let io = |source: std::io::Error| Error::Write {
                    path: partial.clone(),
                    source,
                };
                let written = Writer::create(&partial)
                    .map_err(io)
                    .and_then(|w| self.write_sections(l, w, run_state, &io))
                    .and_then(|bytes| {
                        std::fs::rename(&partial, path).map_err(io)?;
                        Ok(bytes)
                    });
                if written.is_err() {
                    let _ = std::fs::remove_file(&partial);
                }
                written?
            }
            // Streams go live (save_live).
            (uri, _) => return Err(failed(format!("{uri}: not a file"))),
        };
        tracing::info!("saved {bytes} bytes to {target} in {:?}", started.elapsed());
        Ok((bytes, stopped.elapsed().as_millis() as u64))
    }

    /// Writes every section to `w`; the bytes written. `io` words a write's failure.
    fn write_sections(
        &self,
        l: &Launched,
        mut w: Writer,
        run_state: &str,
        io: &dyn Fn(std::io::Error) -> Error,
    ) -> Result<u64> {
        let objects = stateful_objects(&self.tree().root());
        let fingerprint = self.fingerprint(&objects, run_state)?;
        w.section("config", &[&json(&fingerprint)?]).map_err(io)?;
        self.write_device_state(l, &mut w, io)?;
        let memory = l.vm.memory();
        for region in memory.iter() {
            let start = region.start_addr();
            let host = memory.get_host_address(start).map_err(failed)?;
            // SAFETY: the region's mapping is `region.len()` bytes from `host` and lives as
            // long as the VM (borrowed through `l`). Every vCPU is paused and every device's
            // I/O thread too (`pause_io(true)` above), so nothing writes it while it is
            // read.
            let bytes = unsafe { std::slice::from_raw_parts(host, region.len() as usize) };
            w.section(&format!("ram:{:#x}", start.0), &[bytes])
                .map_err(io)?;
        }
        w.finish().map_err(io)
    }

    /// Writes the vCPUs', the chips' and every object's state (the guest is stopped).
    fn write_device_state(
        &self,
        l: &Launched,
        w: &mut Writer,
        io: &dyn Fn(std::io::Error) -> Error,
    ) -> Result<()> {
        for v in &l.vcpus {
            let state =
                l.vm.save_vcpu(&mut v.fd().lock())
                    .map_err(|e| failed(format!("vCPU {}: {e}", v.index())))?;
            w.section(&format!("cpu:{}", v.index()), &[&json(&state)?])
                .map_err(io)?;
        }
        let mut chips = l.vm.save_chips()?;
        // The clock as the guest stopped, not as it has counted on since.
        if let Some(ns) = l.stopped_clock {
            chips = chips.with_clock(ns);
        }
        w.section("chips", &[&json(&chips)?]).map_err(io)?;
        for obj in stateful_objects(&self.tree().root()) {
            for level in obj.class().state_hooks() {
                let bytes = (level.save)(&obj)?;
                let name = snapshot::state_section(obj.path(), &level.level, level.version);
                w.section(&name, &[&bytes]).map_err(io)?;
            }
        }
        Ok(())
    }

    /// `--incoming URI`: `file:PATH` loads a snapshot into this machine, which must be in
    /// prelaunch and configured as the saved one was; the guest then runs if it was running
    /// when saved and `start` is true, else it stays paused. Any other URI starts listening
    /// there (`inmigrate`) and returns; a thread of its own takes the stream when the source
    /// sends it ([`Machine::migrate`] in the other qomu), and a stream that fails ends this
    /// qomu with the reason (exit status 1), as a QEMU destination does.
    ///
    /// # Errors
    /// The file is unreadable, damaged, of another version or of another configuration (the
    /// guest has not run: the machine stops in internal-error, with the reason); the address
    /// cannot be listened on.
    pub fn incoming(self: &Arc<Self>, uri: &str, start: bool) -> Result<()> {
        let source = Uri::parse(uri)?;
        let Uri::File(path) = &source else {
            return self.listen_incoming(&source, start);
        };
        self.give_the_demo_its_exit_port()?;
        let r = Reader::open(path)?;
        let name = path.display().to_string();
        self.load_stream(r, &name, start, None)
    }

    /// `query-migrate-parameters`.
    pub fn migration_parameters(&self) -> Value {
        let p = *self.migration_params.lock();
        Value::map([
            ("downtime-limit", Value::UInt(p.downtime_limit_ms)),
            ("max-bandwidth", Value::UInt(p.max_bandwidth)),
            ("announce-initial", Value::UInt(p.announce.initial)),
            ("announce-max", Value::UInt(p.announce.max)),
            ("announce-rounds", Value::UInt(p.announce.rounds)),
            ("announce-step", Value::UInt(p.announce.step)),
        ])
    }

    /// Announces every NIC's MAC out of its netdev, `announce` rounds apart, on a thread
    /// of its own (QEMU's self-announcement, after a migration or on `announce-self`).
    pub fn announce_nics(self: &Arc<Self>, announce: Announce) {
        let machine = Arc::downgrade(self);
        let spawned = sandbox::spawn(
            sandbox::Class::Migration,
            "qomu-announce".into(),
            move || {
                let mut gap = announce.initial;
                for round in 0..announce.rounds {
                    std::thread::sleep(std::time::Duration::from_millis(gap.min(announce.max)));
                    let Some(m) = machine.upgrade() else { return };
                    let sent = m
                        .nics()
                        .iter()
                        .filter(|n| devices::virtio::net::announce(n))
                        .count();
                    tracing::debug!("announce: round {round}: {sent} NICs");
                    gap += announce.step;
                }
            },
        );
        if let Err(e) = spawned {
            tracing::warn!("migration: cannot announce the NICs: {e}");
        }
    }

    /// `migrate-set-parameters`: the ones given change, for the next pass of a migration
    /// under way too.
    ///
    /// # Errors
    /// A `downtime-limit` past 2000 s (QEMU's text); nothing changes then.
    pub fn set_migration_parameters(
        &self,
        downtime_limit_ms: Option<u64>,
        max_bandwidth: Option<u64>,
        announce: [Option<u64>; 4],
    ) -> Result<()> {
        if downtime_limit_ms.is_some_and(|d| d > MAX_DOWNTIME_LIMIT_MS) {
            return Err(Error::DowntimeLimit);
        }
        let mut p = self.migration_params.lock();
        if let Some(d) = downtime_limit_ms {
            p.downtime_limit_ms = d;
        }
        if let Some(b) = max_bandwidth {
            p.max_bandwidth = b;
        }
        let [initial, max, rounds, step] = announce;
        let a = &mut p.announce;
        for (field, value) in [
            (&mut a.initial, initial),
            (&mut a.max, max),
            (&mut a.rounds, rounds),
            (&mut a.step, step),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        Ok(())
    }

    /// `query-migrate-capabilities`: QEMU's list, `events` on once a client set it.
    pub fn migration_capabilities(&self) -> Value {
        let events = self
            .events_capability
            .load(std::sync::atomic::Ordering::Acquire);
        Value::List(
            CAPABILITIES
                .iter()
                .map(|c| {
                    Value::map([
                        ("capability", Value::Str((*c).to_owned())),
                        ("state", Value::Bool(*c == "events" && events)),
                    ])
                })
                .collect(),
        )
    }

    /// `migrate-set-capabilities`: `events` only; checked whole before anything changes.
    ///
    /// # Errors
    /// An unknown capability (QEMU's text), or one qomu does not do turned on.
    pub fn set_migration_capabilities(&self, caps: &[(String, bool)]) -> Result<()> {
        for (name, on) in caps {
            if !CAPABILITIES.contains(&name.as_str()) {
                return Err(Error::UnknownCapability { name: name.clone() });
            }
            if *on && name != "events" {
                return Err(Error::UnsupportedCapability { name: name.clone() });
            }
        }
        for (name, on) in caps {
            if name == "events" {
                self.events_capability
                    .store(*on, std::sync::atomic::Ordering::Release);
            }
        }
        Ok(())
    }

    /// `--incoming defer`: the machine waits in `inmigrate` for `migrate-incoming`.
    ///
    /// # Errors
    /// The machine is past prelaunch.
    pub fn defer_incoming(&self, start: bool) -> Result<()> {
        let mut st = self.state.lock();
        if st.run != RunState::Prelaunch || st.launched.is_some() {
            return Err(Error::NotRestorable { state: st.run });
        }
        self.transition(&mut st, RunState::Inmigrate)?;
        *self.deferred_incoming.lock() = Some(Some(start));
        Ok(())
    }

    /// `migrate-incoming {uri}`: where a machine started with `--incoming defer` listens.
    ///
    /// # Errors
    /// No `--incoming defer` (QEMU's text), one already given, a bad URI, or the address
    /// cannot be listened on (the machine goes on waiting for another try).
    pub fn migrate_incoming(self: &Arc<Self>, uri: &str) -> Result<()> {
        let source = Uri::parse(uri)?;
        let mut deferred = self.deferred_incoming.lock();
        let start = match *deferred {
            None => return Err(Error::NotDeferred),
            Some(None) => return Err(Error::IncomingStarted),
            Some(Some(start)) => start,
        };
        if matches!(source, Uri::File(_)) {
            return Err(Error::BadUri {
                uri: uri.to_owned(),
            });
        }
        self.give_the_demo_its_exit_port()?;
        let listening = migration_uri::listen(&source)?;
        *deferred = Some(None);
        drop(deferred);
        self.prepare_incoming(&mut self.state.lock())?;
        self.set_migration(|i| {
            *i = Info {
                status: Some(Status::Setup),
                ..Info::default()
            }
        });
        self.load_on_thread(listening, source.to_string(), start)
    }

    /// Listens at `source` for a migration stream, loaded on its own thread.
    fn listen_incoming(self: &Arc<Self>, source: &Uri, start: bool) -> Result<()> {
        {
            let st = self.state.lock();
            if st.run != RunState::Prelaunch || st.launched.is_some() {
                return Err(Error::NotRestorable { state: st.run });
            }
        }
        self.give_the_demo_its_exit_port()?;
        let listening = migration_uri::listen(source)?;
        {
            let mut st = self.state.lock();
            self.transition(&mut st, RunState::Inmigrate)?;
            self.prepare_incoming(&mut st)?;
        }
        self.set_migration(|i| {
            *i = Info {
                status: Some(Status::Setup),
                ..Info::default()
            }
        });
        self.load_on_thread(listening, source.to_string(), start)
    }

    /// Makes the VM a stream will load into while waiting for it, as QEMU's destination
    /// has its VM before the source connects: its making is then not in the downtime.
    fn prepare_incoming(&self, st: &mut State) -> Result<()> {
        if st.launched.is_none() {
            let l = self.launch()?;
            // Zeroed, as the source's zero pages will not come.
            l.vm.discard_ram()?;
            st.launched = Some(l);
        }
        Ok(())
    }

    /// Takes the stream the source sends to `listening` and loads it, on a thread of its
    /// own; a stream that fails ends this qomu with the reason.
    fn load_on_thread(
        self: &Arc<Self>,
        listening: migration_uri::Listening,
        name: String,
        start: bool,
    ) -> Result<()> {
        let machine = self.clone();
        sandbox::spawn(
            sandbox::Class::Migration,
            "qomu-incoming".into(),
            move || {
                let loaded = listening.accept().and_then(|accepted| {
                    drop(listening);
                    let r = Reader::stream(&name, accepted.stream)?;
                    let loaded = machine.load_stream(r, &name, start, accepted.back);
                    if let Some(mut child) = accepted.child {
                        let _ = child.wait();
                    }
                    loaded
                });
                if let Err(e) = loaded {
                    // Nothing of the guest ran: this qomu ends, saying why.
                    tracing::error!("incoming migration failed: {e}");
                    eprintln!("qomu: incoming migration failed: {e}");
                    machine.shutdown(crate::ShutdownCause::HostError, Some(1));
                }
            },
        )
        .map(drop)
        .map_err(|source| Error::Host {
            what: "the incoming migration thread",
            source,
        })
    }

    /// Checks a snapshot's `config` section against this machine, then loads the rest;
    /// with a way `back` to a source, says it has everything before the guest goes on
    /// (the source keeps its VM until then).
    fn load_stream(
        self: &Arc<Self>,
        mut r: Reader,
        name: &str,
        start: bool,
        mut back: Option<Box<dyn std::io::Write + Send>>,
    ) -> Result<()> {
        let (section, payload) = r.next("header")?;
        if section != "config" {
            return Err(r.unexpected(&section, "config").into());
        }
        let saved: Fingerprint = serde_json::from_slice(&payload)
            .map_err(|e| failed(format!("'{name}': its config section does not parse: {e}")))?;
        let here = self.fingerprint(&stateful_objects(&self.tree().root()), "")?;
        if let Some(why) = saved.mismatch(&here) {
            let e = failed(format!("'{name}' does not fit this machine: {why}"));
            self.set_migration(|i| {
                i.status = Some(Status::Failed);
                i.error = Some(e.to_string());
            });
            return Err(e);
        }
        let _configuration = self.configuration.lock();
        let mut st = self.state.lock();
        match st.run {
            RunState::Prelaunch if st.launched.is_none() => {
                self.transition(&mut st, RunState::Inmigrate)?;
            }
            // Waiting for a stream: the VM may be made already (`prepare_incoming`).
            RunState::Inmigrate => {}
            _ => return Err(Error::NotRestorable { state: st.run }),
        }
        self.set_migration(|i| {
            *i = Info {
                status: Some(Status::Active),
                ..Info::default()
            }
        });
        let started = Instant::now();
        let launched = match st.launched.take() {
            Some(l) => Ok(l),
            None => self.launch().and_then(|l| {
                // Zeroed, as a live stream's zero pages do not come (a file's RAM sections
                // cover it all anyway).
                l.vm.discard_ram()?;
                Ok(l)
            }),
        };
        let loaded = launched.and_then(|l| {
            let result = self.load_sections(&l, &mut r, &here, back.as_mut());
            st.launched = Some(l);
            result
        });
        let bytes = r.bytes_read();
        let mut run_state = saved.run_state.clone();
        match loaded {
            Ok(run) => {
                if let Some(run) = run {
                    run_state = run;
                }
            }
            Err(e) => {
                let e = failed(format!("cannot restore '{name}': {e}"));
                self.published.set_error(Some(&e.to_string()));
                let _ = self.transition(&mut st, RunState::InternalError);
                drop(st);
                self.set_migration(|i| {
                    i.status = Some(Status::Failed);
                    i.error = Some(e.to_string());
                });
                return Err(e);
            }
        }
        if let Some(mut back) = back {
            let told = back
                .write_all(migration_uri::LOADED)
                .and_then(|()| back.flush());
            if let Err(e) = told {
                // The source may have given up meanwhile: this copy must not run too.
                let e = failed(format!("cannot tell the source the stream arrived: {e}"));
                let _ = self.transition(&mut st, RunState::InternalError);
                return Err(e);
            }
        }
        let run = start && run_state == "running";
        if run {
            self.run_guest(&mut st)?;
        } else {
            self.transition(&mut st, RunState::Paused)?;
        }
        // Huge pages again after a switch-over's small ones (see `load_sections`).
        if let Some(l) = &st.launched {
            l.vm.huge_pages(true);
        }
        // Switches learn where the NICs' MACs are now (QEMU announces after every
        // incoming migration too).
        if !self.nics().is_empty() {
            let announce = self.migration_params.lock().announce;
            self.announce_nics(announce);
        }
        drop(st);
        self.set_migration(|i| {
            i.status = Some(Status::Completed);
            i.bytes = bytes;
            i.total_ms = started.elapsed().as_millis() as u64;
        });
        self.create_cpu_objects();
        Ok(())
    }

    /// Loads every section after `config` into the new VM; checks that none is missing.
    /// The vCPUs' state (their TSCs among it) and kvmclock go in last, after the RAM: both
    /// count from the moment they are set, so the time the load takes would otherwise
    /// show in the guest's clocks.
    fn load_sections(
        &self,
        l: &Launched,
        r: &mut Reader,
        here: &Fingerprint,
        mut back: Option<&mut Box<dyn std::io::Write + Send>>,
    ) -> Result<Option<String>> {
        let json_err = |name: &str, e: serde_json::Error| {
            failed(format!("section '{name}' does not parse: {e}"))
        };
        let memory = l.vm.memory();
        let mut wanted: Vec<String> = (0..l.vcpus.len()).map(|i| format!("cpu:{i}")).collect();
        wanted.push("chips".into());
        for (path, _) in &here.objects {
            let obj = self.tree().lookup(path)?;
            for level in obj.class().state_hooks() {
                wanted.push(snapshot::state_section(path, &level.level, level.version));
            }
        }
        for region in memory.iter() {
            wanted.push(format!("ram:{:#x}", region.start_addr().0));
        }
        let mut seen = std::collections::HashSet::new();
        let mut cpus = Vec::new();
        let mut chips = None;
        // A live migration's stream: RAM in `pages:` passes, the run state at the switch.
        let mut paged = false;
        let mut run = None;
        let mut last = String::from("config");
        let mut slow = Instant::now();
        loop {
            let head = r.head(&last)?;
            if slow.elapsed() > std::time::Duration::from_millis(1) {
                tracing::debug!("incoming: '{last}' took {:?}", slow.elapsed());
            }
            slow = Instant::now();
            let name = head.name.clone();
            if !seen.insert(name.clone()) {
                return Err(failed(format!("section '{name}' appears twice")));
            }
            if name == "end" {
                r.payload(head)?;
                tracing::debug!("incoming: end of stream");
                break;
            } else if let Some(index) = name.strip_prefix("cpu:") {
                let v = index
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| l.vcpus.get(i))
                    .ok_or_else(|| failed(format!("section '{name}': no such vCPU here")))?;
                let payload = r.payload(head)?;
                let state: VcpuState =
                    serde_json::from_slice(&payload).map_err(|e| json_err(&name, e))?;
                cpus.push((v, state));
            } else if name.starts_with(PASS_END) {
                r.payload(head)?;
                if let Some(back) = back.as_mut() {
                    back.write_all(migration_uri::PASS_LOADED)
                        .and_then(|()| back.flush())
                        .map_err(|e| {
                            failed(format!("cannot tell the source a pass arrived: {e}"))
                        })?;
                }
            } else if name == SWITCH_OVER {
                // The source has stopped its guest; the last pass follows. Its pages land
                // anywhere, and one landing in RAM not touched yet would fault a whole
                // 2 MiB transparent huge page, zeroed and maybe compacted for: up to 5 ms
                // of the guest's downtime here. They fault 4 KiB at a time instead, and
                // huge pages come back once the guest runs (khugepaged merges the rest).
                // Earlier passes keep huge pages: they run while the guest does, and
                // small faults there only lengthen them.
                r.payload(head)?;
                l.vm.huge_pages(false);
            } else if name.starts_with("pages:") {
                let payload = r.payload(head)?;
                precopy::load(memory, &payload)
                    .map_err(|why| failed(format!("section '{name}': {why}")))?;
                paged = true;
            } else if name == "run" {
                tracing::debug!("incoming: run state");
                let payload = r.payload(head)?;
                run = Some(String::from_utf8_lossy(&payload).into_owned());
            } else if name == "chips" {
                let payload = r.payload(head)?;
                let state: ChipState =
                    serde_json::from_slice(&payload).map_err(|e| json_err(&name, e))?;
                chips = Some(state);
            } else if let Some((path, level, version)) = snapshot::parse_state_section(&name) {
                let payload = r.payload(head)?;
                let obj = self.tree().lookup(path)?;
                let hooks = obj
                    .class()
                    .state_hooks()
                    .iter()
                    .find(|h| &*h.level == level)
                    .cloned()
                    .ok_or_else(|| failed(format!("{path} has no '{level}' state here")))?;
                if hooks.version != version {
                    return Err(failed(format!(
                        "{path}: its '{level}' state is version {version} in the file; this qomu reads version {}",
                        hooks.version
                    )));
                }
                (hooks.load)(&obj, &payload)?;
            } else if let Some(start) = name
                .strip_prefix("ram:0x")
                .and_then(|a| u64::from_str_radix(a, 16).ok())
            {
                let region = memory
                    .iter()
                    .find(|reg| reg.start_addr() == GuestAddress(start))
                    .ok_or_else(|| failed(format!("section '{name}': no RAM there")))?;
                let host = memory
                    .get_host_address(region.start_addr())
                    .map_err(failed)?;
                // SAFETY: the region's mapping is `region.len()` bytes from `host`, owned by
                // the VM borrowed through `l`. No vCPU has run, and the device I/O threads a
                // loaded state started wait paused until the guest runs, so nothing else
                // reads or writes guest memory while this slice lives.
                let ram = unsafe { std::slice::from_raw_parts_mut(host, region.len() as usize) };
                r.payload_into(head, ram)?;
            } else {
                return Err(failed(format!("unknown section '{name}'")));
            }
            last = name;
        }
        if let Some(missing) = wanted
            .iter()
            .filter(|w| !(paged && w.starts_with("ram:")))
            .find(|w| !seen.contains(*w))
        {
            return Err(failed(format!("the file has no section '{missing}'")));
        }
        if r.remaining() != 0 {
            return Err(failed(format!(
                "{} bytes follow the end section",
                r.remaining()
            )));
        }
        let t = Instant::now();
        for (v, state) in &cpus {
            l.vm.load_vcpu(&v.fd().lock(), state)
                .map_err(|e| failed(format!("vCPU {}: {e}", v.index())))?;
        }
        if let Some(chips) = &chips {
            l.vm.load_chips(chips)?;
        }
        tracing::debug!("incoming: vCPUs and chips loaded in {:?}", t.elapsed());
        Ok(run)
    }
}

/// Reads the destination's `word` saying it loaded `what` from the way `back`.
fn await_word(back: &mut dyn std::io::Read, word: &[u8; 8], what: &str) -> Result<()> {
    let mut got = [0u8; 8];
    back.read_exact(&mut got).map_err(|e| {
        failed(format!(
            "the destination did not confirm it loaded {what}: {e}"
        ))
    })?;
    if &got != word {
        return Err(failed("the destination answered something else"));
    }
    Ok(())
}

/// Where a save writes before it is complete.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    path.with_file_name(name)
}

/// A state section's JSON (KVM's structures serialize through kvm-bindings' serde).
fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(failed)
}
