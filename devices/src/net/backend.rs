//! A netdev's backend as a NIC drives it: one frame in, one frame out, and the descriptor
//! to wait on. The backend runs on one thread at a time: the netdev's own while no NIC
//! uses it (frames from the host are dropped and counted), the NIC's I/O thread while the
//! guest's driver has the NIC running ([`super::port::Port`] hands it over).

use std::io::{self, IoSlice, IoSliceMut};
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
        loop {
            match self.write_frame(&slices[..n]) {
                Ok(_) => return Ok(true),
                // The tap's queue is full: the frame goes, as a switch port would drop it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
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
