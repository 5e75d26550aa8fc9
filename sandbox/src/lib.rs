//! qomu's sandbox (docs/security.md): a seccomp filter per thread class, applied once the
//! process has opened and spawned what it must; the privilege drop (`--run-as`); and a
//! Landlock limit to the paths the VM was given.
//!
//! Every qomu thread is started with [`spawn`] and a [`Class`]. Filters stack (a thread
//! inherits its spawner's and may only narrow them), so a thread started once the sandbox
//! is locked down is spawned by the *spawner*, a thread whose own filter is the union of
//! all classes': each thread then has exactly its class's allow-list (a class whose list
//! lets it start threads has a thread of its own start them, so they inherit the filter
//! instead of compiling it again). Threads started
//! before [`lockdown`] wait at their first line until it, then apply theirs: by then the
//! privileges are dropped (glibc's `setuid` must reach unfiltered threads) and every
//! descriptor the VM needs at start is open.
//!
//! Where no sandbox is configured (the libraries' own tests, `--sandbox off`), [`spawn`] is
//! `std::thread::Builder::spawn` and nothing is filtered.

mod filters;
mod fs;
mod privileges;
mod syscall_names;
mod trap;

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

pub use fs::{Access, PathRule};
pub use privileges::{RunAs, drop_privileges, group_id};

/// What a forbidden system call does (`--sandbox`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No filter, no Landlock: for debugging.
    Off,
    /// A forbidden call is reported (syscall and thread) and kills the process (SIGSYS).
    On,
    /// A forbidden call is reported and then made: for finding what a new feature needs.
    /// Landlock is not applied (it has no mode that only reports).
    Log,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Mode, String> {
        match text {
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            other => Err(format!("'{other}': expected on, off or log")),
        }
    }
}

/// The kinds of thread qomu runs; each has its own allow-list (filters.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// The process's first thread: starts the front ends, then waits for the end.
    Main,
    /// Starts every thread once the sandbox is locked down.
    Spawner,
    /// Acts on what the vCPUs report (reset, shutdown, panic).
    Control,
    /// Waits for SIGINT/SIGTERM/SIGHUP.
    Signals,
    /// Runs one vCPU (`KVM_RUN` and the exits it serves).
    Vcpu,
    /// A device's I/O thread: virtio queues, a netdev's idle reader.
    DeviceIo,
    /// Feeds standard input to the serial port.
    SerialInput,
    /// Accepts QMP connections.
    QmpListener,
    /// Serves one QMP client: every command runs here.
    QmpClient,
    /// The D-Bus front end and its runtime's helper threads.
    Dbus,
    /// Outgoing and incoming migration, announcements.
    Migration,
    /// qom's subscription timer (rate limits, lingering subscriptions).
    Timer,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 12] = [
        Class::Main,
        Class::Spawner,
        Class::Control,
        Class::Signals,
        Class::Vcpu,
        Class::DeviceIo,
        Class::SerialInput,
        Class::QmpListener,
        Class::QmpClient,
        Class::Dbus,
        Class::Migration,
        Class::Timer,
    ];

    /// The class's name in reports and in `QOMU_TEST_FORBIDDEN_SYSCALL`.
    pub fn name(self) -> &'static str {
        match self {
            Class::Main => "main",
            Class::Spawner => "spawner",
            Class::Control => "control",
            Class::Signals => "signals",
            Class::Vcpu => "vcpu",
            Class::DeviceIo => "device-io",
            Class::SerialInput => "serial-input",
            Class::QmpListener => "qmp-listener",
            Class::QmpClient => "qmp-client",
            Class::Dbus => "dbus",
            Class::Migration => "migration",
            Class::Timer => "timer",
        }
    }

    fn from_index(index: u8) -> Option<Class> {
        Class::ALL.get(usize::from(index)).copied()
    }

    /// Whether the class's list lets it start threads (the control plane's).
    fn starts_threads(self) -> bool {
        matches!(
            self,
            Class::Main | Class::Control | Class::QmpClient | Class::Dbus | Class::Migration
        )
    }

    /// A short name for thread names (15 bytes at most in all).
    fn short(self) -> &'static str {
        match self {
            Class::QmpClient => "qmp",
            Class::Migration => "mig",
            Class::Control => "ctl",
            other => other.name(),
        }
    }

    fn index(self) -> u8 {
        Class::ALL.iter().position(|c| *c == self).unwrap_or(0) as u8
    }
}

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the sandbox is already configured")]
    AlreadyConfigured,
    #[error("cannot build the {class} filter: {source}")]
    Filter {
        class: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot start the spawner thread: {0}")]
    Spawner(std::io::Error),
    #[error("cannot apply the {class} filter: {source}")]
    Apply {
        class: &'static str,
        source: seccompiler::Error,
    },
    #[error("Landlock: {0}")]
    Landlock(String),
    #[error("{0}")]
    RunAs(String),
    #[error("a thread started before the lockdown could not apply its filter")]
    Thread,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Locked,
}

struct Gate {
    phase: Phase,
    /// Threads started before the lockdown that have not applied their filter yet.
    unfiltered: usize,
    failed: bool,
}

struct State {
    mode: Mode,
    programs: BTreeMap<Class, seccompiler::BpfProgram>,
    gate: Mutex<Gate>,
    changed: Condvar,
    /// The Landlock domain for threads started before the lockdown (`On` only).
    ruleset: Mutex<Option<landlock::RulesetCreated>>,
    spawner: Mutex<Option<std::sync::mpsc::Sender<Request>>>,
    /// For the classes that may start threads: a thread of that class that starts the
    /// others (see [`spawn`]).
    class_spawners: Mutex<BTreeMap<Class, std::sync::mpsc::Sender<Request>>>,
    /// Debug builds only: a class whose threads make one forbidden call once filtered.
    test_forbidden: Option<Class>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Sets the sandbox up for this process: builds every class's filter, installs the
/// SIGSYS reporter and starts the spawner. Nothing is filtered until [`lockdown`]. With
/// [`Mode::Off`] it only records the mode.
///
/// `report` is a descriptor the reports are also appended to (`QOMU_SANDBOX_LOG`).
///
/// # Errors
/// Called twice, or a filter cannot be built, or the handler or spawner cannot start.
pub fn configure(mode: Mode, report: Option<std::os::fd::OwnedFd>) -> Result<(), Error> {
    let mut programs = BTreeMap::new();
    if mode != Mode::Off {
        for class in Class::ALL {
            let program = filters::program(class, mode).map_err(|source| Error::Filter {
                class: class.name(),
                source,
            })?;
            programs.insert(class, program);
        }
    }
    let test_forbidden = if cfg!(debug_assertions) {
        std::env::var("QOMU_TEST_FORBIDDEN_SYSCALL")
            .ok()
            .and_then(|name| Class::ALL.into_iter().find(|c| c.name() == name))
    } else {
        None
    };
    let state = State {
        mode,
        programs,
        gate: Mutex::new(Gate {
            phase: Phase::Open,
            unfiltered: 0,
            failed: false,
        }),
        changed: Condvar::new(),
        ruleset: Mutex::new(None),
        spawner: Mutex::new(None),
        class_spawners: Mutex::new(BTreeMap::new()),
        test_forbidden,
    };
    STATE.set(state).map_err(|_| Error::AlreadyConfigured)?;
    if mode == Mode::Off {
        return Ok(());
    }
    trap::install(mode, report).map_err(Error::Handler)?;
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    spawn(Class::Spawner, "qomu-spawner".into(), move || {
        serve_spawns(&rx)
    })
    .map_err(Error::Spawner)?;
    *state_ref()
        .spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(tx);
    Ok(())
}

fn state_ref() -> &'static State {
    STATE.get().expect("configured")
}

/// The configured mode; [`Mode::Off`] where nothing configured the sandbox.
pub fn mode() -> Mode {
    STATE.get().map_or(Mode::Off, |s| s.mode)
}

/// Whether filters are (or will be, at the lockdown) applied.
pub fn active() -> bool {
    mode() != Mode::Off
}

/// Locks the process down, on its main thread: a Landlock domain limited to `paths`
/// (`On` only), then every thread started so far applies its filter, then this thread
/// applies [`Class::Main`]'s. Call it after the privilege drop.
///
/// # Errors
/// Landlock or a filter could not be applied: the caller must not run the guest.
pub fn lockdown(paths: &[PathRule]) -> Result<(), Error> {
    let Some(state) = STATE.get().filter(|s| s.mode != Mode::Off) else {
        return Ok(());
    };
    if state.mode == Mode::On {
        let ruleset = fs::ruleset(paths).map_err(Error::Landlock)?;
        if let Some(ruleset) = ruleset {
            let mine = ruleset
                .try_clone()
                .map_err(|e| Error::Landlock(e.to_string()))?;
            *state.ruleset.lock().unwrap_or_else(|e| e.into_inner()) = Some(ruleset);
            mine.restrict_self()
                .map_err(|e| Error::Landlock(e.to_string()))?;
        }
    }
    let mut gate = state.gate.lock().unwrap_or_else(|e| e.into_inner());
    gate.phase = Phase::Locked;
    state.changed.notify_all();
    while gate.unfiltered > 0 {
        gate = state.changed.wait(gate).unwrap_or_else(|e| e.into_inner());
    }
    let failed = gate.failed;
    drop(gate);
    state
        .ruleset
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if failed {
        return Err(Error::Thread);
    }
    apply(state, Class::Main)
}

/// Whether [`lockdown`] has run.
pub fn locked() -> bool {
    STATE.get().is_some_and(|s| {
        s.mode != Mode::Off
            && s.gate.lock().unwrap_or_else(|e| e.into_inner()).phase == Phase::Locked
    })
}

fn apply(state: &State, class: Class) -> Result<(), Error> {
    let program = &state.programs[&class];
    seccompiler::apply_filter(program).map_err(|source| Error::Apply {
        class: class.name(),
        source,
    })?;
    filtered(state, class);
    Ok(())
}

/// What follows a thread's filter: its class recorded for reports, and the test hook.
fn filtered(state: &State, class: Class) {
    trap::set_class(class);
    if state.test_forbidden == Some(class) {
        trap::make_forbidden_call(class);
    }
}

/// Runs first on a new thread: waits for the lockdown if it has not come, then applies
/// the thread's Landlock domain (for threads older than it) and filter. A thread that
/// cannot be filtered must not run: the process ends.
fn enter(class: Class, born_before_lockdown: bool) {
    let state = state_ref();
    if born_before_lockdown {
        let mut gate = state.gate.lock().unwrap_or_else(|e| e.into_inner());
        while gate.phase == Phase::Open {
            gate = state.changed.wait(gate).unwrap_or_else(|e| e.into_inner());
        }
        drop(gate);
        let ruleset = state
            .ruleset
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(landlock::RulesetCreated::try_clone);
        let landlocked = match ruleset {
            None => Ok(()),
            Some(Ok(r)) => r.restrict_self().map(drop).map_err(|e| e.to_string()),
            Some(Err(e)) => Err(e.to_string()),
        };
        let result = landlocked
            .map_err(Error::Landlock)
            .and_then(|()| apply(state, class));
        let mut gate = state.gate.lock().unwrap_or_else(|e| e.into_inner());
        gate.unfiltered -= 1;
        gate.failed |= result.is_err();
        state.changed.notify_all();
        drop(gate);
        if let Err(e) = result {
            fatal(class, &e);
        }
    } else if let Err(e) = apply(state, class) {
        fatal(class, &e);
    }
}

fn fatal(class: Class, e: &Error) -> ! {
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "qomu: sandbox: a {} thread cannot be sandboxed: {e}",
        class.name()
    );
    std::process::abort();
}

/// A thread started with [`spawn`].
#[derive(Debug)]
pub struct Thread<T> {
    handle: JoinHandle<()>,
    result: Arc<Mutex<Option<T>>>,
}

impl<T> Thread<T> {
    /// Waits for the thread to end, as [`JoinHandle::join`].
    ///
    /// # Errors
    /// The thread panicked: the panic's payload.
    pub fn join(self) -> std::thread::Result<T> {
        self.handle.join()?;
        let value = self.result.lock().unwrap_or_else(|e| e.into_inner()).take();
        value.ok_or_else(|| Box::new("the thread ended without a result") as _)
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub fn thread(&self) -> &std::thread::Thread {
        self.handle.thread()
    }

    pub fn as_pthread_t(&self) -> libc::pthread_t {
        use std::os::unix::thread::JoinHandleExt as _;
        self.handle.as_pthread_t()
    }
}

/// What a new thread runs, as a spawner receives it.
type Body = Box<dyn FnOnce() + Send>;

struct Request {
    name: String,
    body: Body,
    reply: std::sync::mpsc::SyncSender<std::io::Result<JoinHandle<()>>>,
}

fn serve_spawns(requests: &std::sync::mpsc::Receiver<Request>) {
    while let Ok(request) = requests.recv() {
        let spawned = std::thread::Builder::new()
            .name(request.name)
            .spawn(request.body);
        let _ = request.reply.send(spawned);
    }
}

/// Starts a thread of `class` named `name` running `f`, filtered as its class says once
/// the sandbox is on (see the crate's documentation).
///
/// # Errors
/// The thread cannot be created (or the spawner is gone).
pub fn spawn<T, F>(class: Class, name: String, f: F) -> std::io::Result<Thread<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let result = Arc::new(Mutex::new(None));
    let slot = result.clone();
    let run = move || {
        let value = f();
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    };
    let Some(state) = STATE.get().filter(|s| s.mode != Mode::Off) else {
        let handle = std::thread::Builder::new().name(name).spawn(run)?;
        return Ok(Thread { handle, result });
    };
    let mut gate = state.gate.lock().unwrap_or_else(|e| e.into_inner());
    if gate.phase == Phase::Open {
        gate.unfiltered += 1;
        drop(gate);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            enter(class, true);
            run();
        });
        if spawned.is_err() {
            let mut gate = state.gate.lock().unwrap_or_else(|e| e.into_inner());
            gate.unfiltered -= 1;
            state.changed.notify_all();
        }
        return spawned.map(|handle| Thread { handle, result });
    }
    drop(gate);
    // Applying a filter costs the kernel a compilation (hundreds of µs under PVM); a
    // thread inherits its creator's filters for nothing. A class that may start threads
    // has one thread of its own start the others, which then have its filters already.
    if class.starts_threads() {
        let mut body: Body = Box::new(move || {
            filtered(state_ref(), class);
            run();
        });
        for _ in 0..2 {
            let starter = class_spawner(state, class)?;
            match start_through(&starter, name.clone(), body) {
                Ok(handle) => return Ok(Thread { handle, result }),
                // Its thread is gone (it panicked): a new one, once.
                Err(Some(back)) => {
                    body = back;
                    state
                        .class_spawners
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&class);
                }
                Err(None) => return Err(std::io::Error::other("cannot start a thread")),
            }
        }
        return Err(std::io::Error::other(
            "the sandbox's spawner thread is gone",
        ));
    }
    let root = root_spawner(state)?;
    let body = Box::new(move || {
        enter(class, false);
        run();
    });
    let handle = start_through(&root, name, body)
        .map_err(|_| std::io::Error::other("the sandbox's spawner thread is gone"))?;
    Ok(Thread { handle, result })
}

fn root_spawner(state: &State) -> std::io::Result<std::sync::mpsc::Sender<Request>> {
    state
        .spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| std::io::Error::other("the sandbox's spawner thread is gone"))
}

/// The thread of `class` that starts that class's threads, started on first use by the
/// root spawner (so its filters are the union's and its class's, as any thread of it).
fn class_spawner(
    state: &'static State,
    class: Class,
) -> std::io::Result<std::sync::mpsc::Sender<Request>> {
    let mut spawners = state
        .class_spawners
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(tx) = spawners.get(&class) {
        return Ok(tx.clone());
    }
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    let body = Box::new(move || {
        enter(class, false);
        serve_spawns(&rx);
    });
    start_through(
        &root_spawner(state)?,
        format!("qomu-spawn-{}", class.short()),
        body,
    )
    .map_err(|_| std::io::Error::other("the sandbox's spawner thread is gone"))?;
    spawners.insert(class, tx.clone());
    Ok(tx)
}

/// Has `starter` create the thread. `Err(Some(body))`: the starter is gone, the body
/// comes back; `Err(None)`: the thread could not be created.
fn start_through(
    starter: &std::sync::mpsc::Sender<Request>,
    name: String,
    body: Body,
) -> Result<JoinHandle<()>, Option<Body>> {
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    if let Err(std::sync::mpsc::SendError(request)) = starter.send(Request { name, body, reply }) {
        return Err(Some(request.body));
    }
    match answer.recv() {
        Ok(Ok(handle)) => Ok(handle),
        Ok(Err(_)) | Err(_) => Err(None),
    }
}

/// Applies `class`'s filter to the calling thread with forbidden calls failing with
/// `errno` instead of trapping: for tests of the lists, which must not end the test
/// process. Nothing else should call it.
///
/// # Errors
/// The filter cannot be built or applied.
#[doc(hidden)]
pub fn apply_failing_with(class: Class, errno: u32) -> Result<(), Error> {
    let program = filters::program_with(class, Mode::On, seccompiler::SeccompAction::Errno(errno))
        .map_err(|source| Error::Filter {
            class: class.name(),
            source,
        })?;
    seccompiler::apply_filter(&program).map_err(|source| Error::Apply {
        class: class.name(),
        source,
    })
}
