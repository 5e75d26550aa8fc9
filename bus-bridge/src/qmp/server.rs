//! The QMP server: Unix sockets (mode 0600), many clients at once, each with its own
//! session.
//!
//! One thread per connection waits (`poll`) on the client's socket and reads and answers
//! its commands. Events go out from one thread for all connections, the event writer
//! (`qmp-events`): a connection's subscriptions wake it, and it writes each idle
//! connection's waiting events without waiting on any socket. One event for a hundred
//! clients is then one wake-up and a hundred short writes on one thread, where it was a
//! hundred threads each woken to write its own (the last of them got a core milliseconds
//! later on a 2-core machine: `event_fanout_100_max`, docs/benchmarks.md). The emitter's
//! part, whatever thread emits (a vCPU among them), is a push to the writer's list and, for
//! the first, one eventfd write.
//!
//! A connection is written by one thread at a time, its own or the writer, which take its
//! `busy` flag. While its thread runs a command, the writer leaves it: events emitted
//! meanwhile go out with the command's reply (QEMU sends the events a command causes
//! before its reply), or right after. A client that stops reading blocks only its own
//! thread: the writer sends without waiting and leaves what the socket did not take to the
//! connection's thread, woken for it, and events wait in the subscriptions' bounded queues
//! and, beyond their limits, are dropped and counted, so no vCPU, tree operation or other
//! client waits for it.

use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
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

/// A connection's subscriptions' waker: puts the connection on the event writer's list.
struct EventWaker {
    conn: Weak<Connection>,
    writer: Arc<EventWriter>,
}

impl Wake for EventWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // A connection being written to, or running a command, looks for events once it
        // is let go (its thread at the top of its loop, the writer after its write): an
        // event emitted meanwhile costs its emitter nothing more.
        if let Some(conn) = self.conn.upgrade()
            && !conn.busy.load(Ordering::Acquire)
        {
            self.writer.enqueue(conn);
        }
    }
}

/// The thread that writes events to idle connections.
struct EventWriter {
    /// Its wake-up: one non-blocking 8-byte write, whatever thread emits.
    wake: EventFd,
    /// Connections with events waiting, each once.
    queue: Mutex<Vec<Arc<Connection>>>,
    stopping: AtomicBool,
}

impl EventWriter {
    fn enqueue(&self, conn: Arc<Connection>) {
        if conn.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let first = {
            let mut queue = self.queue.lock();
            queue.push(conn);
            queue.len() == 1
        };
        if first {
            // Non-blocking: a counter near its limit fails, and a wake-up is pending then.
            let _ = self.wake.write(1);
        }
    }

    fn run(&self) {
        while !self.stopping.load(Ordering::Acquire) {
            if !wait_readable(self.wake.as_raw_fd(), None).0 {
                continue;
            }
            let _ = self.wake.read();
            let conns = std::mem::take(&mut *self.queue.lock());
            for conn in conns {
                conn.queued.store(false, Ordering::Release);
                if conn.closed.load(Ordering::Acquire) || !conn.try_hold() {
                    // Its thread runs a command: the events go out with the reply.
                    continue;
                }
                conn.send_without_waiting();
                conn.release();
                // Events that came while it wrote: the next round (and the waker is
                // registered again when there are none).
                if conn.events_waiting() {
                    self.enqueue(conn);
                }
            }
        }
        // The connections left hold their wakers, which hold the writer.
        self.queue.lock().clear();
    }
}

struct Connection {
    stream: UnixStream,
    /// Its thread or the event writer is writing to the client (or its thread runs a
    /// command): taken by one at a time.
    busy: AtomicBool,
    closed: AtomicBool,
    events: Arc<EventSink>,
    /// What the event writer could not send without waiting: its thread sends it first.
    unsent: Mutex<Vec<u8>>,
    /// Its thread's wake-up (polled beside the socket), for what the writer left.
    wake: EventFd,
    /// On the event writer's list.
    queued: AtomicBool,
    /// Its subscriptions' waker.
    waker: Waker,
}

impl Connection {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn idle(&self) -> bool {
        !self.busy.load(Ordering::Acquire)
            && !self.events.subscriber().has_pending()
            && self.unsent.lock().is_empty()
    }

    fn try_hold(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Takes the connection for its thread, once the event writer is done with it (it
    /// holds it for one write that does not wait).
    fn hold(&self) {
        while !self.try_hold() {
            std::thread::yield_now();
        }
    }

    fn release(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Whether events wait; if none, registers the waker for the next.
    fn events_waiting(&self) -> bool {
        let ready = pin!(self.events.subscriber().ready());
        ready.poll(&mut Context::from_waker(&self.waker)) == Poll::Ready(())
    }

    fn take_events(&self, text: &mut Vec<u8>) {
        if self.events.subscriber().has_pending() {
            for line in self.events.drain() {
                text.extend_from_slice(line.as_bytes());
                text.extend_from_slice(b"\r\n");
            }
        }
    }

    /// From its thread, holding it: writes what the writer left, waiting events, then
    /// `reply` if any, in one write (QEMU sends the events a command causes before its
    /// reply).
    fn send(&self, reply: Option<&str>) {
        let mut text = std::mem::take(&mut *self.unsent.lock());
        self.take_events(&mut text);
        if let Some(reply) = reply {
            text.extend_from_slice(reply.as_bytes());
            text.extend_from_slice(b"\r\n");
        }
        if !text.is_empty() && (&self.stream).write_all(&text).is_err() {
            self.close();
        }
    }

    /// From the event writer, holding it: writes waiting events as far as the socket
    /// takes them now; the rest goes to its thread, woken for it.
    fn send_without_waiting(&self) {
        let mut unsent = self.unsent.lock();
        let mut text = Vec::new();
        self.take_events(&mut text);
        if text.is_empty() {
            return;
        }
        // Behind bytes not sent yet, or to a client that is not reading: its thread's.
        let sent = if unsent.is_empty() {
            send_now(&self.stream, &text)
        } else {
            Ok(0)
        };
        match sent {
            Ok(n) if n == text.len() => {}
            Ok(n) => {
                unsent.extend_from_slice(&text[n..]);
                let _ = self.wake.write(1);
            }
            Err(_) => self.close(),
        }
    }
}

/// Sends what the socket takes without waiting: the bytes sent (0 when it is full).
fn send_now(stream: &UnixStream, text: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `text` is valid for its length for the duration of the call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                text.as_ptr().cast(),
                text.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

struct Shared {
    tree: Tree,
    stopping: AtomicBool,
    next_id: AtomicU64,
    connections: Mutex<Vec<Weak<Connection>>>,
    writer: Arc<EventWriter>,
    /// The event writer's thread, started with the first client (a qomu no client
    /// connects to has none).
    writer_thread: Mutex<Option<sandbox::Thread<()>>>,
}

impl Shared {
    /// Starts the event writer unless it runs.
    ///
    /// # Errors
    /// The thread could not be started.
    fn start_writer(&self) -> io::Result<()> {
        let mut thread = self.writer_thread.lock();
        if thread.is_none() {
            let writer = self.writer.clone();
            *thread = Some(sandbox::spawn(
                sandbox::Class::QmpClient,
                "qmp-events".into(),
                move || writer.run(),
            )?);
        }
        Ok(())
    }
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
        let writer = Arc::new(EventWriter {
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            queue: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let shared = Arc::new(Shared {
            tree,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            connections: Mutex::new(Vec::new()),
            writer,
            writer_thread: Mutex::new(None),
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
        self.shared.writer.stopping.store(true, Ordering::Release);
        let _ = self.shared.writer.wake.write(1);
        if let Some(t) = self.shared.writer_thread.lock().take() {
            let _ = t.join();
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
        // Without the event writer a client would get no events while it is idle.
        if let Err(e) = shared.start_writer() {
            tracing::warn!("QMP: refusing a client: cannot start the event writer: {e}");
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

/// Waits up to a second until `first` or `second` is readable (or closed): which are.
fn wait_readable(first: RawFd, second: Option<RawFd>) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: first,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            // A negative descriptor is left out.
            fd: second.unwrap_or(-1),
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
    let mut session = Session::new(shared.tree.clone(), id);
    let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
    let writer_stream = stream.try_clone()?;
    let conn = Arc::new_cyclic(|conn: &Weak<Connection>| Connection {
        stream: writer_stream,
        busy: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        events: session.event_sink(),
        unsent: Mutex::new(Vec::new()),
        wake,
        queued: AtomicBool::new(false),
        waker: Waker::from(Arc::new(EventWaker {
            conn: conn.clone(),
            writer: shared.writer.clone(),
        })),
    });
    shared.connections.lock().push(Arc::downgrade(&conn));
    conn.hold();
    conn.send(Some(&greeting()));
    conn.release();
    let mut buf = vec![0u8; 64 << 10];
    while !conn.closed.load(Ordering::Acquire) {
        // Events emitted while it ran a command, or what the writer left: sent from here;
        // with none, the waker is registered and the writer sends the next.
        if !conn.unsent.lock().is_empty() || conn.events_waiting() {
            conn.hold();
            conn.send(None);
            conn.release();
            continue;
        }
        let (input, woken) = wait_readable(stream.as_raw_fd(), Some(conn.wake.as_raw_fd()));
        if woken {
            let _ = conn.wake.read();
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
        conn.hold();
        for reply in session.feed(&buf[..n]) {
            conn.send(Some(&reply));
        }
        conn.release();
    }
    conn.close();
    // Dropping the session ends the client's subscriptions.
    drop(session);
    Ok(())
}
