//! What a netdev and the NIC it serves share: the backend, its counters and the link.
//!
//! The backend lives behind the port's lock and is run by one thread at a time: the
//! netdev's own (`net-<id>`), which drops what the host sends while no NIC takes frames
//! (counted as `rx-dropped`, as QEMU drops frames for a netdev without a running peer), or
//! the NIC's I/O thread while the guest's driver has the NIC running ([`Port::lend`],
//! [`Port::give_back`]). Deleting the netdev ([`Port::close`]) closes the backend at once,
//! whoever runs it, as QEMU's `netdev_del` closes a tap that a NIC still uses.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::backend::NetBackend;

/// A backend's counters.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub errors: AtomicU64,
}

impl NetCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Which end of a link a watcher is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Netdev = 0,
    Nic = 1,
}

/// What an end does on a change: told the new state, and whether the change came through
/// that end's own `link` property (whose write the tree announces already).
type Watcher = Box<dyn Fn(bool, bool) + Send + Sync>;

/// A link state both ends see (QEMU's `set_link` on either sets both), with what each end
/// does when it changes.
pub struct Link {
    up: AtomicBool,
    watchers: Mutex<[Option<Watcher>; 2]>,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            up: AtomicBool::new(true),
            watchers: Mutex::new([None, None]),
        }
    }
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Sets the link, through `by`'s property if it came from one; both ends' watchers
    /// hear of a change. True if it changed.
    pub fn set(&self, up: bool, by: Option<Side>) -> bool {
        let watchers = self.watchers.lock();
        let changed = self.up.swap(up, Ordering::AcqRel) != up;
        if changed {
            for (i, w) in watchers.iter().enumerate() {
                if let Some(w) = w {
                    w(up, by.is_some_and(|s| s as usize == i));
                }
            }
        }
        changed
    }

    /// What `side` does on a change from now on (None: nothing).
    pub fn watch(&self, side: Side, watcher: Option<Watcher>) {
        self.watchers.lock()[side as usize] = watcher;
    }
}

/// Why a NIC cannot take a netdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InUse;

struct Idle {
    stop: Arc<EventFd>,
    thread: sandbox::Thread<()>,
}

struct Inner {
    /// The NIC that took the netdev (its path).
    nic: Option<String>,
    /// The netdev's own thread, while it runs the backend.
    idle: Option<Idle>,
    /// Lent to a NIC's I/O thread.
    lent: bool,
    /// The netdev was deleted: the backend is closed.
    closed: bool,
}

/// A netdev's shared side.
pub struct Port {
    id: String,
    counters: Arc<NetCounters>,
    link: Arc<Link>,
    backend: Mutex<Option<Box<dyn NetBackend>>>,
    inner: Mutex<Inner>,
}

impl Port {
    /// The port of netdev `id` with `backend`, which its own thread starts serving.
    ///
    /// # Errors
    /// The thread or its eventfd cannot be made.
    pub fn new(
        id: &str,
        counters: Arc<NetCounters>,
        backend: Box<dyn NetBackend>,
    ) -> std::io::Result<Arc<Port>> {
        let port = Arc::new(Port {
            id: id.to_owned(),
            counters,
            link: Arc::default(),
            backend: Mutex::new(Some(backend)),
            inner: Mutex::new(Inner {
                nic: None,
                idle: None,
                lent: false,
                closed: false,
            }),
        });
        let idle = port.start_idle()?;
        port.inner.lock().idle = Some(idle);
        Ok(port)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn counters(&self) -> &Arc<NetCounters> {
        &self.counters
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// The NIC using the netdev, if any (its path).
    pub fn nic(&self) -> Option<String> {
        self.inner.lock().nic.clone()
    }

    /// Whether the netdev was deleted.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// The NIC at `path` takes the netdev.
    ///
    /// # Errors
    /// [`InUse`]: another NIC has it (or it was deleted).
    pub fn claim(&self, path: &str) -> Result<(), InUse> {
        let mut inner = self.inner.lock();
        if inner.nic.is_some() || inner.closed {
            return Err(InUse);
        }
        inner.nic = Some(path.to_owned());
        Ok(())
    }

    /// The NIC went: another may take the netdev.
    pub fn release(&self) {
        self.inner.lock().nic = None;
        self.link.watch(Side::Nic, None);
    }

    /// The NIC's I/O thread runs the backend from now on: the netdev's thread stops.
    pub fn lend(&self) {
        let idle = {
            let mut inner = self.inner.lock();
            inner.lent = true;
            inner.idle.take()
        };
        if let Some(idle) = idle {
            stop_idle(idle);
        }
    }

    /// The NIC's I/O thread stopped running the backend: the netdev's thread takes it
    /// again (unless the netdev was deleted meanwhile).
    pub fn give_back(self: &Arc<Self>) {
        let mut inner = self.inner.lock();
        inner.lent = false;
        if inner.closed || inner.idle.is_some() {
            return;
        }
        match self.start_idle() {
            Ok(idle) => inner.idle = Some(idle),
            Err(e) => tracing::warn!("netdev {}: cannot restart its thread: {e}", self.id),
        }
    }

    /// The netdev is deleted: its thread stops and the backend closes, whoever ran it; a
    /// NIC that had it sees its link go down.
    pub fn close(&self) {
        let idle = {
            let mut inner = self.inner.lock();
            inner.closed = true;
            inner.idle.take()
        };
        if let Some(idle) = idle {
            stop_idle(idle);
        }
        drop(self.backend.lock().take());
        self.link.set(false, None);
    }

    /// Runs `f` on the backend, if it is still open.
    pub fn with_backend<R>(
        &self,
        f: impl FnOnce(&mut (dyn NetBackend + 'static)) -> R,
    ) -> Option<R> {
        let mut backend = self.backend.lock();
        backend.as_mut().map(|b| f(b.as_mut()))
    }

    /// Waits until no thread is running the backend (a send or a receive takes it for
    /// one call), so that counters read next count every frame the backend's peer has
    /// seen: the NIC counts a frame it sent before it lets go of the backend.
    pub fn settle(&self) {
        drop(self.backend.lock());
    }

    fn start_idle(self: &Arc<Self>) -> std::io::Result<Idle> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?);
        let thread = sandbox::spawn(sandbox::Class::DeviceIo, format!("net-{}", self.id), {
            let (port, stop) = (self.clone(), stop.clone());
            move || port.serve_idle(&stop)
        })?;
        Ok(Idle { stop, thread })
    }

    /// Drops what the host sends until stopped.
    fn serve_idle(&self, stop: &EventFd) {
        let mut buf = vec![0u8; 65536 + 64];
        loop {
            let Some(wait) = self.with_backend(|b| b.wait()).flatten() else {
                // No descriptor (a stream whose peer went): wait for the stop alone.
                let _ = wait_ready(None, false, stop);
                return;
            };
            if !wait_ready(Some(wait.fd), wait.write, stop) {
                return;
            }
            let counters = &self.counters;
            self.with_backend(|b| {
                if wait.write && b.writable().is_err() {
                    NetCounters::add(&counters.errors, 1);
                }
                loop {
                    match b.recv(&mut buf) {
                        Ok(Some(_)) => NetCounters::add(&counters.rx_dropped, 1),
                        Ok(None) => break,
                        Err(_) => {
                            NetCounters::add(&counters.errors, 1);
                            break;
                        }
                    }
                }
            });
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Some(idle) = self.inner.get_mut().idle.take() {
            stop_idle(idle);
        }
    }
}

fn stop_idle(idle: Idle) {
    let _ = idle.stop.write(1);
    // The thread holds the port: joining from its own drop would wait forever.
    if idle.thread.thread().id() != std::thread::current().id() {
        let _ = idle.thread.join();
    }
}

/// Waits until `fd` is ready (readable, or writable too if `write`) or `stop` fires;
/// false when stopping.
fn wait_ready(fd: Option<i32>, write: bool, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: fd.unwrap_or(-1),
            events: libc::POLLIN | if write { libc::POLLOUT } else { 0 },
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds (a negative fd is ignored by poll), their count, and no
        // timeout.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return r > 0 && fds[0].revents == 0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// Tells `peer` it has a frame, then takes a while to return, as a sender preempted
    /// right after its write would.
    struct SlowToReturn {
        peer: mpsc::Sender<()>,
    }

    impl NetBackend for SlowToReturn {
        fn vnet_hdr(&self) -> bool {
            false
        }
        fn wait(&self) -> Option<super::super::backend::Wait> {
            None
        }
        fn recv(&mut self, _: &mut [u8]) -> std::io::Result<Option<usize>> {
            Ok(None)
        }
        fn send(&mut self, _: &[&[u8]]) -> std::io::Result<bool> {
            let _ = self.peer.send(());
            std::thread::sleep(Duration::from_millis(50));
            Ok(true)
        }
    }

    /// A counter read after the peer has a frame counts it, when the sender counts before
    /// it lets go of the backend and the reader settles the port first.
    #[test]
    fn a_frame_the_peer_has_is_counted_once_the_port_settles() {
        let (peer, got) = mpsc::channel();
        let counters = Arc::new(NetCounters::default());
        let port = Port::new("t", counters.clone(), Box::new(SlowToReturn { peer })).unwrap();
        let sender = std::thread::spawn({
            let port = port.clone();
            move || {
                port.with_backend(|b| {
                    if let Ok(true) = b.send(&[b"frame"]) {
                        NetCounters::add(&port.counters().tx_packets, 1);
                    }
                })
            }
        });
        got.recv_timeout(Duration::from_secs(5)).unwrap();
        port.settle();
        assert_eq!(counters.tx_packets.load(Ordering::Relaxed), 1);
        sender.join().unwrap();
        port.close();
    }
}
