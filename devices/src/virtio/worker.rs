//! A virtio device's I/O thread: it waits on its queues' kick eventfds (KVM ioeventfds on
//! the notify region), serves each descriptor chain the driver made available with the
//! device's [`QueueHandler`], and raises the queue's interrupt when the driver wants one.
//!
//! Decision: one thread per device, not one event loop for all. A slow request of one
//! device (a disk behind a slow file system, `x-delay-ms`) then delays nothing of another
//! (a NIC's receive path), each device pauses and stops on its own (hot-unplug, reset), and
//! each thread has one job for a seccomp filter to allow. The cost, a thread and an epoll
//! per device, is small next to a VM's other threads; cloud-hypervisor made the same choice.
//!
//! Notifications are suppressed while a queue is served, as a driver expects: with
//! EVENT_IDX the device publishes `avail_event` only once it is done (a Linux driver stops
//! notifying otherwise), without it the used ring's NO_NOTIFY flag is set meanwhile, and
//! buffers the driver added meanwhile, about which it may not notify, are served before the
//! thread waits again. A round that serves nothing ends the queue's turn, so a broken ring
//! cannot keep the thread spinning.
//!
//! The machine pauses the thread ([`Worker::pause`]) when the guest stops, before a
//! snapshot, a reset or an unplug: a request being served completes (its used entry is
//! written), no new one starts, and with `wait` the caller knows nothing is in flight.
//! Resumed, the thread serves every queue once, for buffers made available meanwhile.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::GuestMemoryMmap;
use parking_lot::{Condvar, Mutex};
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::interrupt::Signals;
use super::{Interest, QueueHandler};

/// What the device's properties count.
#[derive(Debug, Default)]
pub struct Counters {
    /// Queue notifications from the driver (kick eventfd signals).
    pub notifications: AtomicU64,
    /// Notify writes that exited to a vCPU instead of reaching KVM's ioeventfd (no VM yet,
    /// `ioeventfd=off`, or KVM refused one).
    pub notify_exits: AtomicU64,
    /// Rounds of serving that returned buffers to the driver.
    pub used: AtomicU64,
    /// Chains taken from a queue and not yet returned: being served now (0 or 1, as the
    /// thread serves one chain at a time).
    pub in_flight: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Want {
    Run = 0,
    Pause = 1,
    Stop = 2,
}

struct ControlState {
    want: Want,
    /// The thread has seen `Pause` and waits: nothing is being served.
    paused: bool,
}

struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// `want`, for the serving loop to check between chains without the lock.
    want: AtomicU8,
    /// Wakes the thread out of its epoll wait.
    wake: EventFd,
}

impl Control {
    fn set(&self, state: &mut ControlState, want: Want) {
        state.want = want;
        self.want.store(want as u8, Ordering::Release);
        let _ = self.wake.write(1);
        self.changed.notify_all();
    }

    fn running(&self) -> bool {
        self.want.load(Ordering::Acquire) == Want::Run as u8
    }
}

/// What the thread's loop does next, after looking at its control.
enum Flow {
    Go,
    /// Resumed after a pause: serve every queue once.
    Resumed,
    Stop,
}

/// A device's running I/O thread.
pub struct Worker {
    control: Arc<Control>,
    queues: Arc<Mutex<Vec<Queue>>>,
    thread: Option<sandbox::Thread<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

/// What a worker serves, and with what.
pub struct Job {
    pub handler: Box<dyn QueueHandler>,
    pub queues: Vec<Queue>,
    /// One per queue, in order.
    pub kicks: Vec<Arc<EventFd>>,
    pub signals: Arc<Signals>,
    pub memory: GuestMemoryMmap,
    pub counters: Arc<Counters>,
}

/// The epoll data of the wake eventfd and of the handler's host descriptor (queue kicks
/// carry their index).
const WAKE: u64 = u64::MAX;
const SOURCE: u64 = u64::MAX - 1;

impl Worker {
    /// Starts the thread `name` serving `job`, paused if `paused`.
    ///
    /// # Errors
    /// The eventfd, the epoll or the thread could not be made.
    pub fn start(name: String, job: Job, paused: bool) -> io::Result<Worker> {
        let want = if paused { Want::Pause } else { Want::Run };
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                want,
                paused: false,
            }),
            changed: Condvar::new(),
            want: AtomicU8::new(want as u8),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        });
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            control.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        for (index, kick) in job.kicks.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, index as u64),
            )?;
        }
        let queues = Arc::new(Mutex::new(job.queues));
        let thread = {
            let (control, queues) = (control.clone(), queues.clone());
            let mut thread = Thread {
                control,
                queues,
                handler: job.handler,
                kicks: job.kicks,
                signals: job.signals,
                memory: job.memory,
                counters: job.counters,
                interest: None,
            };
            sandbox::spawn(sandbox::Class::DeviceIo, name, move || thread.run(&epoll))?
        };
        Ok(Worker {
            control,
            queues,
            thread: Some(thread),
        })
    }

    /// Asks the thread to pause: the chain being served completes, no other starts. With
    /// `wait`, returns once it has paused (nothing is in flight then).
    pub fn pause(&self, wait: bool) {
        let mut state = self.control.state.lock();
        if state.want == Want::Stop {
            return;
        }
        self.control.set(&mut state, Want::Pause);
        while wait && !state.paused && self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            self.control.changed.wait(&mut state);
        }
    }

    /// Lets a paused thread go on.
    pub fn resume(&self) {
        let mut state = self.control.state.lock();
        if state.want == Want::Pause {
            self.control.set(&mut state, Want::Run);
        }
    }

    /// Whether the thread is paused (after [`Worker::pause`] with `wait`).
    pub fn is_paused(&self) -> bool {
        self.control.state.lock().paused
    }

    /// The queues' positions, for a snapshot (pause with `wait` first).
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.queues.lock().iter().map(Queue::state).collect()
    }

    /// Stops the thread, after the chain it serves, and waits for it.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        {
            let mut state = self.control.state.lock();
            self.control.set(&mut state, Want::Stop);
        }
        if let Some(t) = self.thread.take() {
            // A panic in a handler ends only its thread; the device stops serving.
            if t.join().is_err() {
                tracing::warn!("virtio: a device's I/O thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// What the thread owns.
struct Thread {
    control: Arc<Control>,
    queues: Arc<Mutex<Vec<Queue>>>,
    handler: Box<dyn QueueHandler>,
    kicks: Vec<Arc<EventFd>>,
    signals: Arc<Signals>,
    memory: GuestMemoryMmap,
    counters: Arc<Counters>,
    /// The handler's host descriptor as registered with the epoll now.
    interest: Option<Interest>,
}

/// A handler's access to its queues, for the queues it serves itself.
pub struct Io<'a> {
    queues: &'a Mutex<Vec<Queue>>,
    memory: &'a GuestMemoryMmap,
    signals: &'a Signals,
    counters: &'a Counters,
    control: &'a Control,
    /// Queues with used buffers the driver has not been told of yet.
    unsignalled: u64,
}

impl<'a> Io<'a> {
    fn new(
        queues: &'a Mutex<Vec<Queue>>,
        memory: &'a GuestMemoryMmap,
        signals: &'a Signals,
        counters: &'a Counters,
        control: &'a Control,
    ) -> Self {
        Io {
            queues,
            memory,
            signals,
            counters,
            control,
            unsignalled: 0,
        }
    }

    pub fn memory(&self) -> &'a GuestMemoryMmap {
        self.memory
    }

    /// Whether the thread may go on (no pause or stop asked for).
    pub fn running(&self) -> bool {
        self.control.running()
    }

    /// The next chain the driver made available on `queue`.
    pub fn pop(&mut self, queue: usize) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
        let mut queues = self.queues.lock();
        let q = queues.get_mut(queue).filter(|q| q.ready())?;
        q.pop_descriptor_chain(self.memory)
    }

    /// Gives the last `n` chains popped from `queue` back, unused, for a later turn.
    pub fn unpop(&mut self, queue: usize, n: u16) {
        if let Some(q) = self.queues.lock().get_mut(queue) {
            let at = q.next_avail();
            q.set_next_avail(at.wrapping_sub(n));
        }
    }

    /// Returns the chain at `head` to the driver with `len` bytes written; false if the
    /// used ring cannot be written.
    pub fn add_used(&mut self, queue: usize, head: u16, len: u32) -> bool {
        let mut queues = self.queues.lock();
        let Some(q) = queues.get_mut(queue) else {
            return false;
        };
        if q.add_used(self.memory, head, len).is_err() {
            tracing::warn!("virtio: queue {queue}'s used ring is not writable");
            return false;
        }
        self.unsignalled |= 1 << queue.min(63);
        true
    }

    /// Asks the driver to notify when it adds buffers to `queue`; true if some came
    /// meanwhile (pop again).
    pub fn enable_notification(&mut self, queue: usize) -> bool {
        self.queues
            .lock()
            .get_mut(queue)
            .and_then(|q| q.enable_notification(self.memory).ok())
            .unwrap_or(false)
    }

    /// Raises the interrupts the driver wants for the buffers returned so far.
    pub fn signal(&mut self) {
        let mut pending = std::mem::take(&mut self.unsignalled);
        while pending != 0 {
            let queue = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            let notify = self
                .queues
                .lock()
                .get_mut(queue)
                .map(|q| q.needs_notification(self.memory).unwrap_or(true))
                .unwrap_or(false);
            if notify {
                self.signals.signal_queue(queue);
            }
            self.counters.used.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Io<'_> {
    fn drop(&mut self) {
        self.signal();
    }
}

impl Thread {
    /// Serves queue `index` its way: chain by chain, or by the handler.
    fn turn(&mut self, index: usize) {
        if self.handler.serves_chains(index) {
            self.serve(index);
        } else {
            let mut io = Io::new(
                &self.queues,
                &self.memory,
                &self.signals,
                &self.counters,
                &self.control,
            );
            self.handler.kicked(index, &mut io);
        }
    }

    /// Registers the handler's host descriptor as it wants it now.
    fn follow_interest(&mut self, epoll: &Epoll) {
        let wanted = self.handler.interest();
        if wanted == self.interest {
            return;
        }
        if let Some(old) = self.interest.take() {
            let _ = epoll.ctl(ControlOperation::Delete, old.fd, EpollEvent::default());
        }
        let Some(new) = wanted else { return };
        let mut set = EventSet::empty();
        if new.read {
            set |= EventSet::IN;
        }
        if new.write {
            set |= EventSet::OUT;
        }
        if set.is_empty() {
            self.interest = Some(new);
            return;
        }
        match epoll.ctl(ControlOperation::Add, new.fd, EpollEvent::new(set, SOURCE)) {
            Ok(()) => self.interest = Some(new),
            Err(e) => tracing::warn!("virtio: cannot wait on the device's host descriptor: {e}"),
        }
    }

    fn run(&mut self, epoll: &Epoll) {
        let mut events = vec![EpollEvent::default(); self.kicks.len() + 2];
        // Buffers may be waiting from before the thread existed (a restored device).
        let mut serve_all = true;
        loop {
            match self.check_control() {
                Flow::Stop => return,
                Flow::Resumed => serve_all = true,
                Flow::Go => {}
            }
            if std::mem::take(&mut serve_all) {
                for index in 0..self.kicks.len() {
                    self.turn(index);
                }
                self.follow_interest(epoll);
                continue;
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio: the I/O thread's epoll failed: {e}; it stops");
                    return;
                }
            };
            for event in &events[..n] {
                let data = event.data();
                if data == WAKE {
                    let _ = self.control.wake.read();
                    continue;
                }
                if data == SOURCE {
                    if self.control.running() {
                        let mut io = Io::new(
                            &self.queues,
                            &self.memory,
                            &self.signals,
                            &self.counters,
                            &self.control,
                        );
                        self.handler.source_ready(&mut io);
                        drop(io);
                        self.follow_interest(epoll);
                    } else {
                        serve_all = true;
                    }
                    continue;
                }
                let index = data as usize;
                let Some(kick) = self.kicks.get(index) else {
                    continue;
                };
                if let Ok(count) = kick.read() {
                    self.counters
                        .notifications
                        .fetch_add(count, Ordering::Relaxed);
                }
                if self.control.running() {
                    self.turn(index);
                    self.follow_interest(epoll);
                } else {
                    // Served when the thread resumes.
                    serve_all = true;
                }
            }
        }
    }

    /// Waits out a pause; what the loop does next.
    fn check_control(&self) -> Flow {
        let mut state = self.control.state.lock();
        match state.want {
            Want::Run => Flow::Go,
            Want::Stop => Flow::Stop,
            Want::Pause => {
                state.paused = true;
                self.control.changed.notify_all();
                while state.want == Want::Pause {
                    self.control.changed.wait(&mut state);
                }
                state.paused = false;
                if state.want == Want::Stop {
                    Flow::Stop
                } else {
                    Flow::Resumed
                }
            }
        }
    }

    /// Serves queue `index` until it is empty or the thread is asked to pause or stop.
    ///
    /// The queue's lock is held for the whole turn: only this thread takes it while the
    /// thread runs (a snapshot reads the queues once the thread is paused), and taking it
    /// three times per chain cost a NIC atomics on every frame (docs/benchmarks.md, `net`).
    fn serve(&mut self, index: usize) {
        let mem = &self.memory;
        let mut queues = self.queues.lock();
        let Some(q) = queues.get_mut(index).filter(|q| q.ready()) else {
            return;
        };
        let mut used_any = false;
        loop {
            let mut served = false;
            let _ = q.disable_notification(mem);
            while self.control.running() {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                // Only this thread writes it: a store, not an atomic add.
                self.counters.in_flight.store(1, Ordering::Relaxed);
                let len = self.handler.serve(index, chain, mem);
                let returned = q.add_used(mem, head, len);
                self.counters.in_flight.store(0, Ordering::Relaxed);
                if returned.is_err() {
                    tracing::warn!("virtio: queue {index}'s used ring is not writable");
                    return;
                }
                served = true;
                used_any = true;
                if q.needs_notification(mem).unwrap_or(true) {
                    self.signals.signal_queue(index);
                }
            }
            let more = q.enable_notification(mem).unwrap_or(false);
            if !(served && more && self.control.running()) {
                break;
            }
        }
        if used_any {
            self.counters.used.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::pci::{Ids, Msix, PciConfig};

    const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    /// Writes `0xab` over each chain's writable buffer, taking `delay` per chain, and
    /// counts the chains it served.
    struct Filler {
        delay: Duration,
        served: Arc<AtomicU64>,
    }

    impl QueueHandler for Filler {
        fn serve(
            &mut self,
            _: usize,
            chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
            mem: &GuestMemoryMmap,
        ) -> u32 {
            std::thread::sleep(self.delay);
            self.served.fetch_add(1, Ordering::SeqCst);
            let mut written = 0;
            for d in chain.writable() {
                let _ = mem.write_slice(&vec![0xab; d.len() as usize], d.addr());
                written += d.len();
            }
            written
        }
    }

    fn signals() -> Arc<Signals> {
        let mut config = PciConfig::new(Ids {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0,
            revision: 1,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let msix = Msix::new(&mut config, 2, 4, 0x4000, 0x5000);
        Arc::new(Signals::new(config, msix, 1))
    }

    struct Setup {
        mem: GuestMemoryMmap,
        worker: Worker,
        kick: Arc<EventFd>,
        served: Arc<AtomicU64>,
        counters: Arc<Counters>,
        signals: Arc<Signals>,
    }

    /// A worker serving one queue of 16, with `chains` one-descriptor chains of 64
    /// writable bytes available.
    fn setup(chains: u16, delay: Duration, paused: bool) -> Setup {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        for i in 0..chains {
            let desc = Descriptor::new(0x8_0000 + u64::from(i) * 64, 64, VRING_DESC_F_WRITE, 0);
            vq.desc_table().store(i, RawDescriptor::from(desc)).unwrap();
            vq.avail().ring().ref_at(usize::from(i)).unwrap().store(i);
        }
        vq.avail().idx().store(chains);
        let queue: Queue = vq.create_queue().unwrap();
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let served = Arc::new(AtomicU64::new(0));
        let counters = Arc::new(Counters::default());
        let signals = signals();
        let worker = Worker::start(
            "test-io".into(),
            Job {
                handler: Box::new(Filler {
                    delay,
                    served: served.clone(),
                }),
                queues: vec![queue],
                kicks: vec![kick.clone()],
                signals: signals.clone(),
                memory: mem.clone(),
                counters: counters.clone(),
            },
            paused,
        )
        .unwrap();
        Setup {
            mem,
            worker,
            kick,
            served,
            counters,
            signals,
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_kick_gets_every_chain_served_and_the_interrupt_raised() {
        let s = setup(3, Duration::ZERO, false);
        // Buffers that were there at start are served without a kick.
        wait_for("served", || s.served.load(Ordering::SeqCst) == 3);
        s.kick.write(2).unwrap();
        wait_for("kicks counted", || {
            s.counters.notifications.load(Ordering::Relaxed) == 2
        });
        let states = s.worker.queue_states();
        assert_eq!(states[0].next_used, 3);
        let mut byte = [0u8; 1];
        s.mem
            .read_slice(&mut byte, GuestAddress(0x8_0000 + 128))
            .unwrap();
        assert_eq!(byte, [0xab]);
        // MSI-X is off: the ISR says a queue has used buffers.
        assert_eq!(s.signals.read_isr(), super::super::interrupt::ISR_QUEUE);
        assert!(s.counters.used.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn a_paused_worker_finishes_its_chain_and_starts_no_other() {
        let s = setup(4, Duration::from_millis(150), false);
        // Into the first chain's 150 ms.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        s.worker.pause(true);
        let waited = t.elapsed();
        assert!(s.worker.is_paused());
        let done = s.served.load(Ordering::SeqCst);
        assert!((1..4).contains(&done), "{done} served at the pause");
        assert!(waited < Duration::from_millis(500), "{waited:?}");
        // Nothing half-done: every chain served has its used entry.
        assert_eq!(u64::from(s.worker.queue_states()[0].next_used), done);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            s.served.load(Ordering::SeqCst),
            done,
            "no chain while paused"
        );
        s.worker.resume();
        wait_for("all served after resume", || {
            s.served.load(Ordering::SeqCst) == 4
        });
    }

    #[test]
    fn a_worker_started_paused_serves_only_once_resumed() {
        let s = setup(2, Duration::ZERO, true);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(s.served.load(Ordering::SeqCst), 0);
        s.kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(s.served.load(Ordering::SeqCst), 0);
        s.worker.resume();
        wait_for("served", || s.served.load(Ordering::SeqCst) == 2);
    }

    #[test]
    fn stop_waits_for_the_chain_in_flight_and_ends_the_thread() {
        let s = setup(3, Duration::from_millis(100), false);
        std::thread::sleep(Duration::from_millis(30));
        let served = s.served.clone();
        let t = Instant::now();
        s.worker.stop();
        assert!(t.elapsed() < Duration::from_millis(400));
        let done = served.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            served.load(Ordering::SeqCst),
            done,
            "nothing after the stop"
        );
    }
}
