//! A netdev's backend as a NIC drives it: one frame in, one frame out, and the descriptor
//! to wait on. The backend runs on one thread at a time: the netdev's own while no NIC
//! uses it (frames from the host are dropped and counted), the NIC's I/O thread while the
//! guest's driver has the NIC running ([`super::port::Port`] hands it over).

use std::io::{self, IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use super::stream::{FrameReader, FrameWriter, Gone, Next};
use super::tap::{Tap, VNET_HDR_LEN};

/// What a backend waits for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub fd: RawFd,
    /// Something waits to be written (a stream whose peer was slow to read).
    pub write: bool,
}

/// The most pieces a frame may come in to be sent from where it lies: a Linux guest's
/// largest, a header and a linear part and 17 page fragments, fits.
pub const GATHER_MAX: usize = 24;

/// A frame to the host as it lies in memory the backend does not own (the guest's), in
/// pieces: a tap takes it in one gathering write, the kernel copying it once.
///
/// Decision: a tap's transmit path sends from guest memory rather than through a buffer
/// of the NIC's. The copy into the buffer was a third of the device's own work per frame
/// (`scripts/bench net`, docs/benchmarks.md), and nothing here needs the frame still: the
/// kernel reads the vnet header and the frame into its own memory before it looks at
/// them, so a guest changing them meanwhile changes only what its own frame says. The
/// receive path keeps its buffer, where the filter sees the whole frame before the guest
/// does.
pub struct Gathered<'a> {
    iov: [libc::iovec; GATHER_MAX],
    /// What keeps each piece mapped while the frame exists (vm-memory's guard).
    guards: [Option<vm_memory::volatile_memory::PtrGuard>; GATHER_MAX],
    n: usize,
    len: usize,
    _memory: PhantomData<&'a [u8]>,
}

impl<'a> Gathered<'a> {
    pub fn new() -> Self {
        Gathered {
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; GATHER_MAX],
            guards: std::array::from_fn(|_| None),
            n: 0,
            len: 0,
            _memory: PhantomData,
        }
    }

    /// Adds `slice` as the next piece; false when the frame has no room for another.
    pub fn push<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        slice: &vm_memory::VolatileSlice<'a, B>,
    ) -> bool {
        if self.n == GATHER_MAX {
            return false;
        }
        let guard = slice.ptr_guard();
        self.iov[self.n] = libc::iovec {
            iov_base: guard.as_ptr().cast_mut().cast(),
            iov_len: guard.len(),
        };
        self.guards[self.n] = Some(guard);
        self.n += 1;
        self.len += slice.len();
        true
    }

    /// The frame's length, its pieces together.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iovecs(&self) -> &[libc::iovec] {
        &self.iov[..self.n]
    }
}

impl Default for Gathered<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// A host network backend.
pub trait NetBackend: Send {
    /// Whether frames carry a `virtio_net_hdr_v1` first (a tap: yes; a stream: no).
    fn vnet_hdr(&self) -> bool;

    /// The descriptor to wait on; None when there is none (a stream whose peer went).
    fn wait(&self) -> Option<Wait>;

    /// One frame from the host into `buf` (behind its vnet header where the backend has
    /// them): its length, or None when nothing more waits now. A frame longer than `buf`
    /// is cut short by the kernel (a tap), or skipped with its length returned (a
    /// stream): a length past `buf`'s means the frame was dropped.
    ///
    /// # Errors
    /// The host's error.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// One frame to the host, gathered from `parts` (its vnet header first where the
    /// backend has them). False when the host did not take it (full, no peer): the
    /// caller counts it dropped.
    ///
    /// # Errors
    /// The host's error.
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<bool>;

    /// Sends `frame` from where it lies, as [`NetBackend::send`] would; None if this
    /// backend cannot (the caller copies the frame and sends it with `send`).
    fn send_gathered(&mut self, _frame: &Gathered<'_>) -> Option<io::Result<bool>> {
        None
    }

    /// The descriptor became writable: goes on with what waits.
    ///
    /// # Errors
    /// The host's error.
    fn writable(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// The offloads the kernel may hand frames with (`TUN_F_*`), as the guest acked them.
    ///
    /// # Errors
    /// The kernel's refusal.
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

impl NetBackend for Tap {
    fn vnet_hdr(&self) -> bool {
        true
    }

    fn wait(&self) -> Option<Wait> {
        Some(Wait {
            fd: self.as_raw_fd(),
            write: false,
        })
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.read_frame(&mut [IoSliceMut::new(buf)]) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, parts: &[&[u8]]) -> io::Result<bool> {
        // Two parts at most (header, frame): no allocation per frame.
        let mut slices = [IoSlice::new(&[]), IoSlice::new(&[])];
        let n = parts.len().min(slices.len());
        for (slice, part) in slices.iter_mut().zip(parts) {
            *slice = IoSlice::new(part);
        }
        sent(|| self.write_frame(&slices[..n]))
    }

    fn send_gathered(&mut self, frame: &Gathered<'_>) -> Option<io::Result<bool>> {
        let iov = frame.iovecs();
        // SAFETY: each piece is mapped while `frame`'s guards live, past the call.
        Some(sent(|| unsafe {
            self.write_iovecs(iov.as_ptr(), iov.len())
        }))
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }
}

/// A tap write's outcome as [`NetBackend::send`] gives it, the write retried when a
/// signal cut it short.
fn sent(mut write: impl FnMut() -> io::Result<usize>) -> io::Result<bool> {
    loop {
        match write() {
            Ok(_) => return Ok(true),
            // The tap's queue is full: the frame goes, as a switch port would drop it.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What a stream netdev tells of its peer coming and going.
pub trait StreamEvents: Send + Sync {
    fn changed(&self, connected: bool);
}

/// QEMU's `-netdev stream` on a unix socket: a client of one peer, or a server taking one
/// peer at a time.
pub struct StreamBackend {
    listener: Option<UnixListener>,
    peer: Option<UnixStream>,
    reader: FrameReader,
    writer: FrameWriter,
    events: Arc<dyn StreamEvents>,
}

impl StreamBackend {
    /// A client connected to `peer` (nonblocking); says so to `events`.
    pub fn client(peer: UnixStream, events: Arc<dyn StreamEvents>) -> Self {
        events.changed(true);
        StreamBackend {
            listener: None,
            peer: Some(peer),
            reader: FrameReader::new(),
            writer: FrameWriter::new(),
            events,
        }
    }

    /// A server listening on `listener` (nonblocking) for its peer.
    pub fn server(listener: UnixListener, events: Arc<dyn StreamEvents>) -> Self {
        StreamBackend {
            listener: Some(listener),
            peer: None,
            reader: FrameReader::new(),
            writer: FrameWriter::new(),
            events,
        }
    }

    fn drop_peer(&mut self) {
        if self.peer.take().is_some() {
            self.reader = FrameReader::new();
            self.writer = FrameWriter::new();
            self.events.changed(false);
        }
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let Ok((peer, _)) = listener.accept() else {
            return;
        };
        if peer.set_nonblocking(true).is_ok() {
            self.peer = Some(peer);
            self.events.changed(true);
        }
    }
}

impl Drop for StreamBackend {
    fn drop(&mut self) {
        self.drop_peer();
    }
}

impl NetBackend for StreamBackend {
    fn vnet_hdr(&self) -> bool {
        false
    }

    fn wait(&self) -> Option<Wait> {
        match (&self.peer, &self.listener) {
            (Some(peer), _) => Some(Wait {
                fd: peer.as_raw_fd(),
                write: self.writer.waiting() > 0,
            }),
            (None, Some(listener)) => Some(Wait {
                fd: listener.as_raw_fd(),
                write: false,
            }),
            (None, None) => None,
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(peer) = &mut self.peer else {
            self.accept();
            return Ok(None);
        };
        match self.reader.next_frame(peer, buf) {
            Ok(Next::Frame(n)) => Ok(Some(n)),
            // Longer than the NIC can take: dropped, as the caller sees.
            Ok(Next::TooLong(n)) => Ok(Some(n)),
            Ok(Next::Nothing) => Ok(None),
            Err(Gone::Closed) => {
                self.drop_peer();
                Ok(None)
            }
            Err(Gone::Broken(e)) => {
                tracing::warn!("netdev stream: giving the peer up: {e}");
                self.drop_peer();
                Err(e)
            }
        }
    }

    fn send(&mut self, parts: &[&[u8]]) -> io::Result<bool> {
        let Some(peer) = &mut self.peer else {
            return Ok(false);
        };
        if !self.writer.queue(parts) {
            return Ok(false);
        }
        if let Err(e) = self.writer.flush(peer) {
            self.drop_peer();
            return Err(e);
        }
        Ok(true)
    }

    fn writable(&mut self) -> io::Result<()> {
        let Some(peer) = &mut self.peer else {
            return Ok(());
        };
        if let Err(e) = self.writer.flush(peer) {
            self.drop_peer();
            return Err(e);
        }
        Ok(())
    }
}

/// The length of a vnet header where `backend` has one.
pub fn header_len(backend: &dyn NetBackend) -> usize {
    if backend.vnet_hdr() { VNET_HDR_LEN } else { 0 }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::GuestMemoryMmap;
    use crate::net::test_netns::{Netns, arp_request, can_make_taps};

    /// A frame lying in guest memory in three pieces, its header in the first, goes out
    /// whole in one write: the namespace's kernel answers the ARP request it is.
    #[test]
    fn a_tap_sends_a_frame_gathered_from_guest_memory() {
        if !can_make_taps() {
            return;
        }
        let ns = Netns::new("gather");
        let mut tap = Tap::open(&ns.tap_name()).expect("open a tap");
        ns.take_tap(tap.ifname(), "10.0.2.2/24");
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
        let request = arp_request(mac, [10, 0, 2, 15], [10, 0, 2, 2]);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let pieces = [
            (0x1000, vec![0u8; VNET_HDR_LEN]),
            (0x3000, request[..20].to_vec()),
            (0x2000, request[20..].to_vec()),
        ];
        let mut frame = Gathered::new();
        for (addr, bytes) in &pieces {
            mem.write_slice(bytes, GuestAddress(*addr)).unwrap();
            assert!(frame.push(&mem.get_slice(GuestAddress(*addr), bytes.len()).unwrap()));
        }
        assert_eq!(frame.len(), VNET_HDR_LEN + request.len());
        let sent = tap
            .send_gathered(&frame)
            .expect("a tap sends from where a frame lies");
        assert!(sent.expect("the write"));
        let reply = ns.wait_frame(&tap, |f| {
            f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
        });
        assert_eq!(reply[0..6], mac);
        assert_eq!(reply[28..32], [10, 0, 2, 2]);
    }

    #[test]
    fn a_gathered_frame_takes_no_more_pieces_than_it_has_room_for() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let slice = mem.get_slice(GuestAddress(0), 8).unwrap();
        let mut frame = Gathered::new();
        for _ in 0..GATHER_MAX {
            assert!(frame.push(&slice));
        }
        assert!(!frame.push(&slice));
        assert_eq!(frame.len(), 8 * GATHER_MAX);
    }
}
