//! QEMU's `-netdev stream` framing: on a stream socket, each Ethernet frame is preceded by
//! its length as a 4-byte big-endian number, and nothing else (no vnet header). passt
//! speaks it (Debian's `passt -s SOCKET`), which makes it the backend that needs no root.
//!
//! The reader and writer work on nonblocking sockets: a frame may arrive or leave in any
//! number of pieces.

use std::io::{self, Read, Write};

/// Longest frame accepted: QEMU's `NET_BUFSIZE` (4096 + 65536). A longer length is a
/// broken peer: the connection is given up.
pub const MAX_FRAME: usize = 4096 + 65536;

/// Most bytes waiting to be written before new frames are dropped (counted by the caller):
/// a peer that stops reading never makes qomu buffer without bound.
pub const MAX_BACKLOG: usize = 1 << 20;

/// What [`FrameReader::next_frame`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A frame of this length, copied out.
    Frame(usize),
    /// A frame of this length, longer than the buffer offered: skipped.
    TooLong(usize),
    /// No complete frame yet.
    Nothing,
}

/// Why a stream has no more frames.
#[derive(Debug)]
pub enum Gone {
    /// The peer closed its end (or went with unread data); every complete frame before
    /// was handed out.
    Closed,
    /// The socket failed, or the peer sent a length past [`MAX_FRAME`] (or zero).
    Broken(io::Error),
}

/// Frames out of a stream of bytes.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader::default()
    }

    /// The next complete frame, copied into `out`, reading the socket only when none is
    /// buffered (so a receiver with no room leaves the rest in the socket).
    ///
    /// # Errors
    /// [`Gone`]: the peer closed, the socket failed, or the peer broke the framing.
    pub fn next_frame(&mut self, socket: &mut impl Read, out: &mut [u8]) -> Result<Next, Gone> {
        loop {
            if let Some(head) = self.buf.get(..4) {
                let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
                if len == 0 || len > MAX_FRAME {
                    return Err(Gone::Broken(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the peer sent a frame length of {len} (at most {MAX_FRAME})"),
                    )));
                }
                if let Some(body) = self.buf.get(4..4 + len) {
                    let next = match out.get_mut(..len) {
                        Some(to) => {
                            to.copy_from_slice(body);
                            Next::Frame(len)
                        }
                        None => Next::TooLong(len),
                    };
                    self.buf.drain(..4 + len);
                    return Ok(next);
                }
            }
            let mut chunk = [0u8; 16384];
            match socket.read(&mut chunk) {
                Ok(0) => return Err(Gone::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Nothing),
                // A peer that went with unread data is as gone as one that closed.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(Gone::Closed),
                Err(e) => return Err(Gone::Broken(e)),
            }
        }
    }
}

/// Frames into a stream of bytes, keeping what the socket did not take yet.
#[derive(Debug, Default)]
pub struct FrameWriter {
    pending: Vec<u8>,
    written: usize,
}

impl FrameWriter {
    pub fn new() -> Self {
        FrameWriter::default()
    }

    /// Queues a frame made of `parts`. False (and nothing queued) when it is empty, longer
    /// than [`MAX_FRAME`], or [`MAX_BACKLOG`] bytes already wait.
    pub fn queue(&mut self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len == 0 || len > MAX_FRAME || self.waiting() + 4 + len > MAX_BACKLOG {
            return false;
        }
        self.pending.extend_from_slice(&(len as u32).to_be_bytes());
        for p in parts {
            self.pending.extend_from_slice(p);
        }
        true
    }

    /// Bytes queued and not written yet.
    pub fn waiting(&self) -> usize {
        self.pending.len() - self.written
    }

    /// Writes what waits, as far as the socket takes it; true once nothing waits.
    ///
    /// # Errors
    /// The socket's error (not `WouldBlock`, which leaves the rest waiting).
    pub fn flush(&mut self, socket: &mut impl Write) -> io::Result<bool> {
        while self.written < self.pending.len() {
            match socket.write(&self.pending[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.pending.clear();
        self.written = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Whether the peer is still there after [`read_from`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Peer {
        Open,
        Closed,
    }

    /// Hands every frame the socket has now to `frame`.
    fn read_from(
        reader: &mut FrameReader,
        socket: &mut impl Read,
        mut frame: impl FnMut(&[u8]),
    ) -> io::Result<Peer> {
        let mut out = vec![0u8; MAX_FRAME];
        loop {
            match reader.next_frame(socket, &mut out) {
                Ok(Next::Frame(n)) => frame(&out[..n]),
                Ok(Next::TooLong(_)) => unreachable!("every frame fits MAX_FRAME"),
                Ok(Next::Nothing) => return Ok(Peer::Open),
                Err(Gone::Closed) => return Ok(Peer::Closed),
                Err(Gone::Broken(e)) => return Err(e),
            }
        }
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn frames_arrive_whole_whatever_pieces_the_bytes_come_in() {
        let (mut a, mut b) = pair();
        let mut bytes = Vec::new();
        for f in [&b"first frame"[..], &[7u8; 1500][..], b"x"] {
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(f);
        }
        let mut reader = FrameReader::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        // One byte at a time: every split point of the length and the body.
        for byte in &bytes {
            a.write_all(std::slice::from_ref(byte)).unwrap();
            let peer = read_from(&mut reader, &mut b, |f| got.push(f.to_vec())).unwrap();
            assert_eq!(peer, Peer::Open);
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], b"first frame");
        assert_eq!(got[1], vec![7u8; 1500]);
        assert_eq!(got[2], b"x");
        drop(a);
        // Another test's child, forked but not yet exec'd, may hold a copy of `a` for a
        // moment: the end is seen once that copy is gone too (bounded).
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while read_from(&mut reader, &mut b, |_| panic!()).unwrap() == Peer::Open {
            assert!(
                std::time::Instant::now() < end,
                "the closed end is never seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The framing against a real peer: passt, run in a namespace this test made (a veth
    /// pair inside it, 192.0.2.2/24 with a default route via 192.0.2.1, reaching nothing
    /// outside). An ARP request for the gateway, sent as a guest would through `-netdev
    /// stream`, gets passt's reply. Bounded waits; passt ends with the connection (`-1`).
    #[test]
    fn passt_answers_a_frame_sent_in_the_stream_framing() {
        use std::time::{Duration, Instant};

        use crate::net::test_netns::{Netns, arp_request, can_make_taps, have_program};
        if !can_make_taps() || !have_program("passt", "passt") {
            return;
        }
        let ns = Netns::new("passt-unit");
        ns.routed_veth("192.0.2.2/24", "192.0.2.1");
        let dir = std::env::temp_dir().join(format!("qomu-passt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // passt started as root runs as nobody: the socket's directory must let it write.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let socket = dir.join("passt.socket");
        let mut passt = ns.spawn("passt", &["-f", "-q", "-1", "-s", socket.to_str().unwrap()]);
        let end = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    let _ = passt.kill();
                    let out = passt.wait_with_output().unwrap();
                    panic!(
                        "passt did not listen: {e}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        };
        stream.set_nonblocking(true).unwrap();
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mut writer = FrameWriter::new();
        assert!(writer.queue(&[&arp_request(mac, [192, 0, 2, 2], [192, 0, 2, 1])]));
        let mut reader = FrameReader::new();
        let mut reply = None;
        while reply.is_none() && Instant::now() < end {
            writer.flush(&mut stream).unwrap();
            let peer = read_from(&mut reader, &mut stream, |f| {
                // An ARP reply (op 2) from 192.0.2.1 to the guest's MAC.
                if f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] {
                    reply = Some(f.to_vec());
                }
            })
            .unwrap();
            assert_eq!(peer, Peer::Open);
            std::thread::sleep(Duration::from_millis(10));
        }
        let reply = reply.expect("passt's ARP reply within 10 s");
        assert_eq!(reply[0..6], mac);
        assert_eq!(reply[28..32], [192, 0, 2, 1]);
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while passt.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = passt.kill();
        let _ = passt.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_length_past_the_limit_or_zero_gives_the_connection_up() {
        for len in [0u32, (MAX_FRAME + 1) as u32, u32::MAX] {
            let (mut a, mut b) = pair();
            a.write_all(&len.to_be_bytes()).unwrap();
            let e = read_from(&mut FrameReader::new(), &mut b, |_| {}).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{len}");
        }
    }

    #[test]
    fn written_frames_read_back_and_a_peer_that_stops_reading_costs_bounded_memory() {
        let (mut a, mut b) = pair();
        let mut writer = FrameWriter::new();
        assert!(writer.queue(&[b"head", b"+body"]));
        assert!(!writer.queue(&[]), "an empty frame");
        assert!(!writer.queue(&[&vec![0u8; MAX_FRAME + 1]]), "too long");
        assert!(writer.flush(&mut a).unwrap());
        let mut got = Vec::new();
        read_from(&mut FrameReader::new(), &mut b, |f| got.push(f.to_vec())).unwrap();
        assert_eq!(got, [b"head+body".to_vec()]);
        // Nobody reads b: the socket fills, the rest waits, then new frames are refused.
        let frame = vec![1u8; 60000];
        let mut queued = 0;
        while writer.queue(&[&frame]) {
            queued += 1;
            let _ = writer.flush(&mut a).unwrap();
            assert!(queued < 1000, "the backlog is bounded");
        }
        assert!(writer.waiting() <= MAX_BACKLOG);
        assert!(!writer.flush(&mut a).unwrap(), "the socket is full");
        // Reading on the other side lets everything through, in order and whole.
        let mut reader = FrameReader::new();
        let mut count = 0;
        for _ in 0..10_000 {
            read_from(&mut reader, &mut b, |f| {
                assert_eq!(f.len(), 60000);
                count += 1;
            })
            .unwrap();
            if writer.flush(&mut a).unwrap() && count == queued {
                break;
            }
        }
        read_from(&mut reader, &mut b, |_| count += 1).unwrap();
        assert_eq!(count, queued);
    }
}
