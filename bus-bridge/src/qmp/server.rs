//! The QMP server: Unix sockets (mode 0600), many clients at once, each with its own
//! session.
//!
//! One thread per connection waits (`poll`) on the client's socket and on an eventfd
//! registered as the waker of its subscriptions, so both commands and events are handled
//! without handing anything between threads. The eventfd is registered only while the thread
//! waits: an event emitted while it runs a command costs its emitter no system call, and it
//! goes out with that command's reply. A client that stops reading blocks only its own
//! thread: its events wait in its subscriptions' bounded queues and, beyond their limits,
//! are dropped and counted, so no vCPU, tree operation or other client waits for it.

use std::future::Future;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qom::Tree;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::session::{EventSink, Session, greeting};

/// Most clients connected at once; more are closed right after accepting.
pub const MAX_CONNECTIONS: usize = 1024;

/// The connection's wake-up: an eventfd its thread polls beside the socket. Signalling it
/// is one non-blocking 8-byte write, whatever thread emits (a vCPU among them), and costs
/// the emitter less than a socket's write would (no buffer to allocate), which counts when
/// one event goes to hundreds of connections.
struct EventWaker(EventFd);

impl Wake for EventWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Non-blocking: a counter near its limit fails, and a wake-up is pending then.
        let _ = self.0.write(1);
    }
}

struct Connection {
    stream: UnixStream,
    /// A command or events are being handled.
    busy: AtomicBool,
    closed: AtomicBool,
    events: Arc<EventSink>,
}

impl Connection {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn idle(&self) -> bool {
        !self.busy.load(Ordering::Acquire) && !self.events.subscriber().has_pending()
    }

    /// Writes waiting events, then `reply` if any, in one write (QEMU sends the events a
    /// command causes before its reply).
    fn send(&self, mut out: &UnixStream, reply: Option<&str>) {
        let mut text = String::new();
        if self.events.subscriber().has_pending() {
            for line in self.events.drain() {
                text.push_str(&line);
                text.push_str("\r\n");
            }
        }
        if let Some(reply) = reply {
            text.push_str(reply);
            text.push_str("\r\n");
        }
        if !text.is_empty() && out.write_all(text.as_bytes()).is_err() {
            self.close();
        }
    }
}

struct Shared {
    tree: Tree,
    stopping: AtomicBool,
    next_id: AtomicU64,
    connections: Mutex<Vec<Weak<Connection>>>,
}

/// A running QMP server.
pub struct QmpServer {
    shared: Arc<Shared>,
    listeners: Vec<(PathBuf, Option<sandbox::Thread<()>>)>,
}

impl QmpServer {
    /// Listens on every socket of `sockets`.
    ///
    /// # Errors
    /// A path cannot be bound (in use, not a socket, no permission, a group it cannot be
    /// given to).
    pub fn start(tree: Tree, sockets: &[crate::socket::Listen]) -> io::Result<QmpServer> {
        let shared = Arc::new(Shared {
            tree,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            connections: Mutex::new(Vec::new()),
        });
        let mut listeners = Vec::new();
        for socket in sockets {
            let path = &socket.path;
            let listener = crate::socket::bind(socket).map_err(|e| {
                io::Error::new(e.kind(), format!("QMP socket {}: {e}", path.display()))
            })?;
            let s = shared.clone();
            let thread = sandbox::spawn(
                sandbox::Class::QmpListener,
                "qmp-accept".into(),
                move || accept_loop(&s, &listener),
            )?;
            listeners.push((path.clone(), Some(thread)));
        }
        Ok(QmpServer { shared, listeners })
    }

    /// How many clients are connected.
    pub fn connections(&self) -> usize {
        let mut conns = self.shared.connections.lock();
        conns.retain(|c| {
            c.upgrade()
                .is_some_and(|c| !c.closed.load(Ordering::Acquire))
        });
        conns.len()
    }

    /// Stops accepting, lets every client receive what is already on its way (a reply
    /// being written, pending events) for up to `grace`, then closes all connections and
    /// removes the sockets.
    pub fn shutdown(&mut self, grace: Duration) {
        self.shared.stopping.store(true, Ordering::Release);
        for (path, thread) in &mut self.listeners {
            // Wake the accept loop, which sees `stopping` and ends.
            let _ = UnixStream::connect(&*path);
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
            let _ = std::fs::remove_file(&*path);
        }
        let live = || {
            self.shared
                .connections
                .lock()
                .iter()
                .filter_map(Weak::upgrade)
                .collect::<Vec<_>>()
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline
            && !live()
                .iter()
                .all(|c| c.closed.load(Ordering::Acquire) || c.idle())
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in live() {
            c.close();
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let count = {
            let mut conns = shared.connections.lock();
            conns.retain(|c| c.strong_count() > 0);
            conns.len()
        };
        if count >= MAX_CONNECTIONS {
            tracing::warn!("QMP: refusing a client: {MAX_CONNECTIONS} are connected");
            continue;
        }
        let s = shared.clone();
        let spawned = sandbox::spawn(sandbox::Class::QmpClient, format!("qmp{id}"), move || {
            if let Err(e) = serve(&s, stream, id) {
                tracing::debug!("QMP client {id}: {e}");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("QMP: cannot start a thread for a client: {e}");
        }
    }
}

/// Waits until the socket or the wake-up is readable (or the connection is closed).
fn wait_readable(socket: &UnixStream, wake: std::os::fd::RawFd) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
    if n <= 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

/// Most descriptors taken from one message (QEMU's monitor takes one per `getfd`).
const MAX_FDS_PER_MESSAGE: usize = 16;

/// Reads what the client sent, with the file descriptors that came along (SCM_RIGHTS, as
/// `getfd` wants them), close-on-exec.
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const SPACE: usize = MAX_FDS_PER_MESSAGE * std::mem::size_of::<libc::c_int>();
    // Room for one control message of SPACE bytes, aligned as cmsghdr wants.
    let mut control = [0u64; (SPACE + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` and `control`, which outlive the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg filled in, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // Each received descriptor is new and ours alone.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, fds))
}

fn serve(shared: &Shared, stream: UnixStream, id: u64) -> io::Result<()> {
    let wake = Arc::new(EventWaker(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?));
    let waker = Waker::from(wake.clone());
    let mut session = Session::new(shared.tree.clone(), id);
    let conn = Arc::new(Connection {
        stream: stream.try_clone()?,
        busy: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        events: session.event_sink(),
    });
    shared.connections.lock().push(Arc::downgrade(&conn));
    let out = stream.try_clone()?;
    conn.send(&out, Some(&greeting()));
    let mut buf = vec![0u8; 64 << 10];
    while !conn.closed.load(Ordering::Acquire) {
        // Register the wake-up for new events, unless some are already waiting.
        let registered = {
            let ready = pin!(conn.events.subscriber().ready());
            ready.poll(&mut Context::from_waker(&waker)) == Poll::Pending
        };
        if !registered {
            conn.busy.store(true, Ordering::Release);
            conn.send(&out, None);
            conn.busy.store(false, Ordering::Release);
            continue;
        }
        let (input, woken) = wait_readable(&stream, wake.0.as_raw_fd());
        if woken {
            let _ = wake.0.read();
        }
        if !input {
            continue;
        }
        let n = match recv_with_fds(&stream, &mut buf) {
            Ok((0, _)) | Err(_) => break,
            Ok((n, fds)) => {
                session.received_fds(fds);
                n
            }
        };
        conn.busy.store(true, Ordering::Release);
        for reply in session.feed(&buf[..n]) {
            conn.send(&out, Some(&reply));
        }
        conn.busy.store(false, Ordering::Release);
    }
    conn.close();
    // Dropping the session ends the client's subscriptions.
    drop(session);
    Ok(())
}
