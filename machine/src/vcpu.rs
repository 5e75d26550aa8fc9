//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches exits to the buses. The
//! control side can pause, resume, kick and stop them at any moment.
//!
//! Kicking: the control side sets the wanted state, then sends the thread `SIGRTMIN`. The
//! signal handler sets `immediate_exit` in the thread's own `kvm_run`, so a kick that lands
//! just before `KVM_RUN` is entered is not lost: the ioctl returns `EINTR` at once.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use devices::{Bus, MachineRequest, ShutdownCause};
use kvm_bindings::{KVM_EXIT_IO_OUT, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::{Condvar, Mutex};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::stats::{Access, Stats};

/// What the control side wants a vCPU thread to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

/// What the thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doing {
    Starting,
    Running,
    Paused,
    Exited,
}

struct Control {
    want: Want,
    doing: Doing,
}

/// `Doing` mirrored in an atomic, so the control side can spin on it briefly instead of
/// sleeping (a sleep costs a cross-CPU wake-up, several times a typical pause).
struct DoingAtomic(std::sync::atomic::AtomicU8);

impl DoingAtomic {
    fn set(&self, d: Doing) {
        self.0.store(d as u8, Ordering::Release);
    }
    fn get(&self) -> Doing {
        match self.0.load(Ordering::Acquire) {
            0 => Doing::Starting,
            1 => Doing::Running,
            2 => Doing::Paused,
            _ => Doing::Exited,
        }
    }
}

/// How long the control side spins on a vCPU's acknowledgement before sleeping.
const SPIN: Duration = Duration::from_micros(200);

/// Events a vCPU reports to the machine (from its own thread; the machine acts on them
/// from its control thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    Request(MachineRequest),
    /// KVM could not run the guest any further.
    InternalError {
        cpu: u32,
        reason: String,
    },
}

/// What every vCPU thread shares with the machine.
pub struct ExitContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stats: Arc<Stats>,
    pub events: std::sync::mpsc::Sender<VcpuEvent>,
}

/// The machine's handle on one vCPU.
pub struct Vcpu {
    index: u32,
    fd: Arc<Mutex<VcpuFd>>,
    control: Arc<(Mutex<Control>, Condvar)>,
    doing: Arc<DoingAtomic>,
    thread_id: Arc<AtomicI64>,
    thread: Option<sandbox::Thread<()>>,
}

thread_local! {
    // The kvm_run of the vCPU running on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU
            // thread before its first KVM_RUN and valid while its VcpuFd lives (which
            // outlives the thread's loop). Only this thread writes the field while it is not
            // in KVM_RUN; the kernel reads it on entry.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick signal handler, once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

impl Vcpu {
    /// Starts the thread for `fd`, paused.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn(index: u32, fd: VcpuFd, ctx: Arc<ExitContext>) -> std::io::Result<Vcpu> {
        let fd = Arc::new(Mutex::new(fd));
        let control = Arc::new((
            Mutex::new(Control {
                want: Want::Pause,
                doing: Doing::Starting,
            }),
            Condvar::new(),
        ));
        let doing = Arc::new(DoingAtomic(std::sync::atomic::AtomicU8::new(
            Doing::Starting as u8,
        )));
        let thread_id = Arc::new(AtomicI64::new(-1));
        let thread = {
            let (fd, control, doing, thread_id) = (
                fd.clone(),
                control.clone(),
                doing.clone(),
                thread_id.clone(),
            );
            sandbox::spawn(sandbox::Class::Vcpu, format!("vcpu{index}"), move || {
                run_loop(index, &fd, &control, &doing, &thread_id, &ctx)
            })?
        };
        let vcpu = Vcpu {
            index,
            fd,
            control,
            doing,
            thread_id,
            thread: Some(thread),
        };
        vcpu.wait_until(|d| d != Doing::Starting);
        Ok(vcpu)
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The host thread id (as `gettid` reports it).
    pub fn thread_id(&self) -> i64 {
        self.thread_id.load(Ordering::Relaxed)
    }

    fn set(&self, want: Want) {
        let (lock, cond) = &*self.control;
        let mut c = lock.lock();
        if c.doing == Doing::Exited {
            return;
        }
        c.want = want;
        cond.notify_all();
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: pthread_kill with a valid pthread_t of a thread we own (not yet
            // joined) and a signal whose handler we installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
        }
    }

    fn wait_until(&self, done: impl Fn(Doing) -> bool) {
        let spin_until = std::time::Instant::now() + SPIN;
        while std::time::Instant::now() < spin_until {
            if done(self.doing.get()) {
                return;
            }
            std::hint::spin_loop();
        }
        let (lock, cond) = &*self.control;
        let mut c = lock.lock();
        while !done(c.doing) {
            // Kick again now and then: a signal can race with a thread entering KVM_RUN
            // only before immediate_exit is set, which the handler covers, but a thread
            // blocked in a long device access learns of the request only when it returns.
            if cond
                .wait_for(&mut c, Duration::from_millis(100))
                .timed_out()
                && c.want != Want::Run
            {
                drop(c);
                self.kick();
                c = lock.lock();
            }
        }
    }

    /// Asks the thread to pause (without waiting).
    pub fn request_pause(&self) {
        self.set(Want::Pause);
        self.kick();
    }

    /// Waits until the thread is paused (or gone).
    pub fn wait_paused(&self) {
        self.wait_until(|d| matches!(d, Doing::Paused | Doing::Exited));
    }

    pub fn resume(&self) {
        self.set(Want::Run);
    }

    /// The vCPU's file descriptor. Lock it only while the vCPU is paused: the thread holds
    /// it while the guest runs.
    pub fn fd(&self) -> &Mutex<VcpuFd> {
        &self.fd
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.set(Want::Exit);
        self.kick();
        self.wait_until(|d| d == Doing::Exited);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_loop(
    index: u32,
    fd: &Mutex<VcpuFd>,
    control: &(Mutex<Control>, Condvar),
    doing: &DoingAtomic,
    thread_id: &AtomicI64,
    ctx: &ExitContext,
) {
    // SAFETY: gettid has no preconditions.
    thread_id.store(i64::from(unsafe { libc::gettid() }), Ordering::Relaxed);
    KVM_RUN.with(|run| run.set(fd.lock().get_kvm_run() as *mut kvm_run));
    let _exited = ExitedOnDrop {
        index,
        control,
        doing,
        ctx,
    };
    let (lock, cond) = control;
    loop {
        {
            let mut c = lock.lock();
            loop {
                match c.want {
                    Want::Run => break,
                    Want::Exit => return,
                    Want::Pause => {
                        if c.doing != Doing::Paused {
                            c.doing = Doing::Paused;
                            doing.set(Doing::Paused);
                            cond.notify_all();
                        }
                        cond.wait(&mut c);
                    }
                }
            }
            c.doing = Doing::Running;
            doing.set(Doing::Running);
        }
        let mut fd = fd.lock();
        if let Some(event) = run_once(index, &mut fd, ctx) {
            drop(fd);
            // The vCPU cannot go on by itself: park it until the machine decides.
            let mut c = lock.lock();
            if c.want == Want::Run {
                c.want = Want::Pause;
            }
            drop(c);
            let _ = ctx.events.send(event);
        }
    }
}

/// Marks the vCPU thread gone however its loop ends, so that nobody waits on it forever.
/// A thread that ends by panicking (a bug) also reports an internal error, which stops the
/// machine as KVM's own internal errors do.
struct ExitedOnDrop<'a> {
    index: u32,
    control: &'a (Mutex<Control>, Condvar),
    doing: &'a DoingAtomic,
    ctx: &'a ExitContext,
}

impl Drop for ExitedOnDrop<'_> {
    fn drop(&mut self) {
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
        let (lock, cond) = self.control;
        let mut c = lock.lock();
        c.doing = Doing::Exited;
        self.doing.set(Doing::Exited);
        cond.notify_all();
        drop(c);
        if std::thread::panicking() {
            let _ = self.ctx.events.send(VcpuEvent::InternalError {
                cpu: self.index,
                reason: "the vCPU thread panicked".to_owned(),
            });
        }
    }
}

/// Runs the guest until one exit is handled. Returns an event when the vCPU must stop.
fn run_once(index: u32, fd: &mut VcpuFd, ctx: &ExitContext) -> Option<VcpuEvent> {
    let exit = fd.run();
    if matches!(exit, Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..))) {
        drop(exit);
        handle_io(fd, ctx);
        return None;
    }
    let internal = |reason: String| Some(VcpuEvent::InternalError { cpu: index, reason });
    match exit {
        Ok(VcpuExit::MmioRead(addr, data)) => {
            ctx.stats.count_exit();
            if !ctx.mmio.read(addr, data) {
                data.fill(0xff);
                ctx.stats.unmapped(Access::MmioRead, addr, data.len());
            }
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            ctx.stats.count_exit();
            if !ctx.mmio.write(addr, data) {
                ctx.stats.unmapped(Access::MmioWrite, addr, data.len());
            }
            None
        }
        // With the in-kernel irqchip KVM handles HLT itself; a stray one is harmless.
        Ok(VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen) => None,
        Ok(VcpuExit::Shutdown) => {
            tracing::warn!("vCPU {index}: triple fault; resetting the machine");
            Some(VcpuEvent::Request(MachineRequest::Reset(
                ShutdownCause::GuestReset,
            )))
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(VcpuEvent::Request(
                MachineRequest::Shutdown(ShutdownCause::GuestShutdown),
            )),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(VcpuEvent::Request(
                MachineRequest::Reset(ShutdownCause::GuestReset),
            )),
            k => internal(format!("KVM system event {k}")),
        },
        Ok(VcpuExit::InternalError) => {
            let run = fd.get_kvm_run();
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
            // active member of the union.
            let info = unsafe { run.__bindgen_anon_1.internal };
            let what = match info.suberror {
                1 => "emulation failure",
                2 => "simultaneous exceptions",
                3 => "delivery event failure",
                4 => "unexpected exit",
                _ => "unknown",
            };
            let rip = fd
                .get_regs()
                .map(|r| format!(" at rip {:#x}", r.rip))
                .unwrap_or_default();
            internal(format!(
                "KVM internal error, suberror {} ({what}){rip}",
                info.suberror
            ))
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => internal(format!(
            "KVM entry failure, hardware reason {reason:#x} on host CPU {cpu}"
        )),
        Ok(other) => internal(format!("unexpected KVM exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            None
        }
        Err(e) => internal(format!("KVM_RUN failed: {e}")),
    }
}

/// Port I/O, including string I/O (`rep outsb`): `count` accesses of `size` bytes each.
fn handle_io(fd: &mut VcpuFd, ctx: &ExitContext) {
    ctx.stats.count_exit();
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_IO (checked by the caller), so `io` is the
    // active member of the union.
    let io = unsafe { run.__bindgen_anon_1.io };
    let (size, count) = (usize::from(io.size), io.count as usize);
    if size == 0 {
        return;
    }
    let base = std::ptr::from_mut(run).cast::<u8>();
    // SAFETY: KVM puts the data of a port I/O exit `data_offset` bytes into the kvm_run
    // mapping, `size * count` bytes long, inside the mapping (the same region kvm-ioctls
    // reads for its IoIn/IoOut exits). The vCPU is not running, so nothing else touches it.
    let data =
        unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), size * count) };
    let port = u64::from(io.port);
    for access in data.chunks_mut(size) {
        if u32::from(io.direction) == KVM_EXIT_IO_OUT {
            if !ctx.pio.write(port, access) {
                ctx.stats.unmapped(Access::PioWrite, port, size);
            }
        } else if !ctx.pio.read(port, access) {
            access.fill(0xff);
            ctx.stats.unmapped(Access::PioRead, port, size);
        }
    }
}
