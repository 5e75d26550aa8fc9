//! `virtio-net-pci`: a network card on a netdev's backend, with one receive and one
//! transmit queue and a control queue.
//!
//! - this file: the model (features, the configuration structure, the link) and the
//!   handler that runs on the device's I/O thread: it takes the backend from the netdev
//!   ([`crate::net::port::Port::lend`]) and waits on its descriptor beside the queues'
//!   kicks. Receive fills the driver's buffers as frames come, transmit sends each chain
//!   the driver makes available, the control queue programs the receive filter. A vCPU
//!   never touches the backend, and a backend that stops taking frames makes them drop
//!   (counted), never waits.
//! - [`filter`]: the receive filter (RX modes, MAC tables, VLANs) and MAC addresses.
//! - [`qom`]: the `virtio-net-pci` type.
//!
//! Frames from the host are copied once, through a buffer of the handler's: a frame the
//! driver has no room for yet then waits in that buffer (and the backend is not read)
//! until the driver adds buffers, and the filter sees the whole frame before any of it
//! reaches guest memory. Frames from the guest go to a tap straight from guest memory
//! (one gathering write: [`crate::net::backend::Gathered`] says why), to a stream through
//! the handler's buffer.

pub mod filter;
mod qom;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::GuestMemoryMmap;
use parking_lot::Mutex;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend};

use self::filter::{Mac, Outcome, RxFilter};
pub(crate) use self::qom::register;
pub use self::qom::{TYPE, announce, announcement, rx_filter_info};
use super::worker::Io;
use super::{Identity, Interest, QueueHandler, VirtioDevice, feature};
use crate::net::backend::{Gathered, NetBackend};
use crate::net::port::{NetCounters, Port};
use crate::net::tap::VNET_HDR_LEN;

/// What the PCI function shows: a network controller with three queues.
pub const IDENTITY: Identity = Identity {
    device_id: VIRTIO_ID_NET as u16,
    class: 0x02_00_00,
    queues: 3,
};

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const CTRL: usize = 2;

/// The longest frame either way: a 64 KiB GSO frame, its VLAN tag and header.
const FRAME_MAX: usize = 65536 + 18;

pub const F_CSUM: u64 = feature(VIRTIO_NET_F_CSUM);
pub const F_GUEST_CSUM: u64 = feature(VIRTIO_NET_F_GUEST_CSUM);
pub const F_MTU: u64 = feature(VIRTIO_NET_F_MTU);
pub const F_MAC: u64 = feature(VIRTIO_NET_F_MAC);
pub const F_GUEST_TSO4: u64 = feature(VIRTIO_NET_F_GUEST_TSO4);
pub const F_GUEST_TSO6: u64 = feature(VIRTIO_NET_F_GUEST_TSO6);
pub const F_GUEST_ECN: u64 = feature(VIRTIO_NET_F_GUEST_ECN);
pub const F_HOST_TSO4: u64 = feature(VIRTIO_NET_F_HOST_TSO4);
pub const F_HOST_TSO6: u64 = feature(VIRTIO_NET_F_HOST_TSO6);
pub const F_HOST_ECN: u64 = feature(VIRTIO_NET_F_HOST_ECN);
pub const F_MRG_RXBUF: u64 = feature(VIRTIO_NET_F_MRG_RXBUF);
pub const F_STATUS: u64 = feature(VIRTIO_NET_F_STATUS);
pub const F_CTRL_VQ: u64 = feature(VIRTIO_NET_F_CTRL_VQ);
pub const F_CTRL_RX: u64 = feature(VIRTIO_NET_F_CTRL_RX);
pub const F_CTRL_VLAN: u64 = feature(VIRTIO_NET_F_CTRL_VLAN);
pub const F_CTRL_RX_EXTRA: u64 = feature(VIRTIO_NET_F_CTRL_RX_EXTRA);
pub const F_CTRL_MAC_ADDR: u64 = feature(VIRTIO_NET_F_CTRL_MAC_ADDR);
/// The features that need a peer with vnet headers (a tap): QEMU clears them otherwise.
pub const F_NEED_VNET_HDR: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN;

/// The tap offloads (`TUN_F_*`) for the guest's acked receive features: the kernel may
/// only hand over frames the guest can take.
pub fn tap_offloads(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & F_GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        if acked & F_GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & F_GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        if acked & F_GUEST_ECN != 0 && acked & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

/// What the NIC tells its owner (the qom face turns it into notifiers).
pub trait NetEvents: Send + Sync {
    /// The driver changed the receive filter (QMP's NIC_RX_FILTER_CHANGED).
    fn rx_filter_changed(&self);
}

/// What the NIC's model shares with its qom properties and its handler.
pub struct NetState {
    pub filter: Mutex<RxFilter>,
    /// The MAC the NIC was given (the filter's may change at the driver's request).
    pub mac: Mac,
    pub counters: Arc<NetCounters>,
    /// Frames from the host the receive filter kept from the guest.
    pub rx_filtered: std::sync::atomic::AtomicU64,
    /// The NIC's link, when it has no netdev (with one it shares the netdev's).
    own_link: AtomicBool,
}

impl NetState {
    pub fn new(mac: Mac) -> Self {
        NetState {
            filter: Mutex::new(RxFilter::new(mac)),
            mac,
            counters: Arc::default(),
            rx_filtered: Default::default(),
            own_link: AtomicBool::new(true),
        }
    }
}

/// The queue sizes QEMU allows a NIC (`rx_queue_size`, `tx_queue_size`): a power of 2
/// in this range; 256 by default.
pub const QUEUE_SIZES: std::ops::RangeInclusive<u16> = 256..=1024;
/// The control queue's size (QEMU's).
const CTRL_QUEUE_SIZE: u16 = 64;

/// The network device's model.
pub struct Net {
    state: Arc<NetState>,
    port: Option<Arc<Port>>,
    offered: u64,
    mtu: u16,
    /// The receive and transmit queues' sizes.
    sizes: (u16, u16),
    events: Arc<dyn NetEvents>,
}

impl Net {
    /// A NIC on `port` (None: a NIC with no netdev, whose frames go nowhere), offering
    /// `features` (those needing vnet headers are dropped for a backend without them),
    /// with MTU `mtu` (0: none offered) and receive and transmit queues of `sizes`.
    pub fn new(
        state: Arc<NetState>,
        port: Option<Arc<Port>>,
        mut features: u64,
        mtu: u16,
        sizes: (u16, u16),
        events: Arc<dyn NetEvents>,
    ) -> Self {
        let vnet_hdr = port
            .as_ref()
            .and_then(|p| p.with_backend(|b| b.vnet_hdr()))
            .unwrap_or(false);
        if !vnet_hdr {
            features &= !F_NEED_VNET_HDR;
        }
        if mtu == 0 {
            features &= !F_MTU;
        }
        if features & F_CTRL_VQ == 0 {
            features &= !(F_CTRL_RX | F_CTRL_VLAN | F_CTRL_RX_EXTRA | F_CTRL_MAC_ADDR);
        }
        Net {
            state,
            port,
            offered: features,
            mtu,
            sizes,
            events,
        }
    }

    pub fn link_up(&self) -> bool {
        match &self.port {
            Some(p) => p.link().is_up(),
            None => self.state.own_link.load(Ordering::Acquire),
        }
    }
}

impl VirtioDevice for Net {
    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_max(&self, queue: usize) -> u16 {
        match queue {
            RX => self.sizes.0,
            TX => self.sizes.1,
            _ => CTRL_QUEUE_SIZE,
        }
    }

    /// `virtio_net_config`: mac, status, max_virtqueue_pairs, mtu (speed and duplex
    /// unknown: zero, as their feature is not offered).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 24];
        config[..6].copy_from_slice(&self.state.filter.lock().mac);
        let status = if self.link_up() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        crate::bus::read_window(&config, offset as usize, data);
    }

    fn activate(&self, features: u64) -> Box<dyn QueueHandler> {
        self.state
            .filter
            .lock()
            .features_acked(features & F_CTRL_VLAN != 0);
        let header_in_backend = if let Some(port) = &self.port {
            port.lend();
            let _ = port.with_backend(|b| b.set_offload(tap_offloads(features)));
            port.with_backend(|b| b.vnet_hdr()).unwrap_or(false)
        } else {
            false
        };
        Box::new(NetHandler {
            state: self.state.clone(),
            port: self.port.clone(),
            port_counters: self.port.as_ref().map(|p| p.counters().clone()),
            mergeable: features & F_MRG_RXBUF != 0,
            header_in_backend,
            rx: vec![0; VNET_HDR_LEN + FRAME_MAX].into_boxed_slice(),
            tx: vec![0; VNET_HDR_LEN + FRAME_MAX].into_boxed_slice(),
            pending: None,
            rx_blocked: false,
            events: self.events.clone(),
        })
    }

    fn reset(&self) {
        *self.state.filter.lock() = RxFilter::new(self.state.mac);
    }
}

/// The NIC's queues, on its I/O thread.
struct NetHandler {
    state: Arc<NetState>,
    port: Option<Arc<Port>>,
    /// The netdev's counters, counted beside the NIC's own.
    port_counters: Option<Arc<NetCounters>>,
    mergeable: bool,
    /// Whether the backend's frames carry the vnet header (a tap), or it is added and
    /// taken off here (a stream).
    header_in_backend: bool,
    /// A frame from the host, behind its vnet header.
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    /// The length (header included) of a frame in `rx` waiting for room.
    pending: Option<usize>,
    /// The driver has no receive buffers: the backend is not read until it adds some.
    rx_blocked: bool,
    events: Arc<dyn NetEvents>,
}

impl Drop for NetHandler {
    fn drop(&mut self) {
        if let Some(port) = &self.port {
            let _ = port.with_backend(|b| b.set_offload(0));
            port.give_back();
        }
    }
}

impl NetHandler {
    /// Adds `n` to a counter of the NIC's and the same of its netdev's.
    fn count(&self, field: fn(&NetCounters) -> &std::sync::atomic::AtomicU64, n: u64) {
        NetCounters::add(field(&self.state.counters), n);
        if let Some(c) = &self.port_counters {
            NetCounters::add(field(c), n);
        }
    }

    fn link_up(&self) -> bool {
        match &self.port {
            Some(p) => p.link().is_up(),
            None => self.state.own_link.load(Ordering::Acquire),
        }
    }

    /// Reads the next frame from the backend into `rx` (behind a header); its length with
    /// the header, or None when nothing waits (or there is no backend).
    fn read_frame(&mut self) -> Option<usize> {
        let port = self.port.as_ref()?;
        let at = if self.header_in_backend {
            0
        } else {
            VNET_HDR_LEN
        };
        let buf = &mut self.rx[at..];
        let room = buf.len();
        match port.with_backend(|b| b.recv(buf))? {
            Ok(Some(n)) if n <= room && n + at >= VNET_HDR_LEN => {
                if at > 0 {
                    self.rx[..VNET_HDR_LEN].fill(0);
                }
                Some(n + at)
            }
            Ok(Some(_)) => {
                // Too long for any buffer, or shorter than its own header.
                self.count(|c| &c.rx_dropped, 1);
                Some(0)
            }
            Ok(None) => None,
            Err(_) => {
                NetCounters::add(&port.counters().errors, 1);
                None
            }
        }
    }

    /// Moves frames from the backend into the driver's receive buffers while there are
    /// both.
    fn receive(&mut self, io: &mut Io<'_>) {
        while io.running() {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(0) => continue,
                    Some(len) => len,
                    None => break,
                },
            };
            if !self.link_up() {
                self.count(|c| &c.rx_dropped, 1);
                continue;
            }
            if !self
                .state
                .filter
                .lock()
                .accepts(&self.rx[VNET_HDR_LEN..len])
            {
                self.state.rx_filtered.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match self.deliver(io, len) {
                Delivery::Done => {
                    self.count(|c| &c.rx_packets, 1);
                    self.count(|c| &c.rx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Delivery::NoRoom => {
                    // Wait for the driver's buffers, asking it to say when it adds some
                    // (and looking once more, for buffers added meanwhile).
                    if io.enable_notification(RX) {
                        self.pending = Some(len);
                        continue;
                    }
                    self.pending = Some(len);
                    self.rx_blocked = true;
                    break;
                }
                Delivery::TooSmall => self.count(|c| &c.rx_dropped, 1),
            }
        }
    }

    /// Writes the frame in `rx[..len]` into one receive chain, or several with
    /// MRG_RXBUF (`num_buffers` in the header says how many).
    fn deliver(&mut self, io: &mut Io<'_>, len: usize) -> Delivery {
        let mem = io.memory();
        let mut chains: Vec<(DescriptorChain<&GuestMemoryMmap>, usize)> = Vec::new();
        let mut room = 0;
        while room < len {
            let Some(chain) = io.pop(RX) else {
                io.unpop(RX, chains.len() as u16);
                return Delivery::NoRoom;
            };
            let writable: usize = chain.clone().writable().map(|d| d.len() as usize).sum();
            room += writable;
            chains.push((chain, writable));
            if !self.mergeable {
                break;
            }
        }
        if room < len {
            io.unpop(RX, chains.len() as u16);
            return Delivery::TooSmall;
        }
        let count = chains.len() as u16;
        self.rx[10..12].copy_from_slice(&count.to_le_bytes());
        let mut at = 0;
        for (chain, writable) in chains {
            let head = chain.head_index();
            let take = writable.min(len - at);
            let mut written = 0;
            for d in chain.writable() {
                let part = (d.len() as usize).min(take - written);
                if part == 0 {
                    break;
                }
                if mem
                    .write_slice(&self.rx[at + written..at + written + part], d.addr())
                    .is_err()
                {
                    break;
                }
                written += part;
            }
            at += take;
            io.add_used(RX, head, written as u32);
        }
        Delivery::Done
    }

    /// Sends one transmit chain's frame; its used length is 0. A tap takes it from guest
    /// memory ([`Gathered`]); a frame in more pieces than that holds, or one crossing a
    /// memory region, and a stream's frames, go through `tx`.
    fn transmit(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) {
        if self.header_in_backend {
            let mut frame = Gathered::new();
            if gather(&chain, mem, self.tx.len(), &mut frame)
                && self.send(frame.len(), |b| b.send_gathered(&frame))
            {
                return;
            }
        }
        let mut len = 0;
        for d in chain.readable() {
            let part = (d.len() as usize).min(self.tx.len() - len);
            if part == 0
                || mem
                    .read_slice(&mut self.tx[len..len + part], d.addr())
                    .is_err()
            {
                break;
            }
            len += part;
        }
        let frame = if self.header_in_backend {
            &self.tx[..len]
        } else {
            &self.tx[VNET_HDR_LEN..len.max(VNET_HDR_LEN)]
        };
        self.send(len, |b| Some(b.send(&[frame])));
    }

    /// Sends a frame of `len` bytes (its header with it) with `send`, unless it is too
    /// short to be one or the link is down, and counts what became of it. False if `send`
    /// could not send it at all (None: a backend that takes no frame from guest memory).
    fn send(
        &self,
        len: usize,
        send: impl FnOnce(&mut (dyn NetBackend + 'static)) -> Option<std::io::Result<bool>>,
    ) -> bool {
        if len <= VNET_HDR_LEN || !self.link_up() {
            self.count(|c| &c.tx_dropped, 1);
            return true;
        }
        // Counted before the backend is let go (Port::settle): a script that reads
        // `tx-packets` after the peer got the frame finds it counted.
        let sent = self.port.as_ref().and_then(|p| {
            p.with_backend(|b| {
                let sent = send(b)?;
                if let Ok(true) = sent {
                    self.count(|c| &c.tx_packets, 1);
                    self.count(|c| &c.tx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Some(sent)
            })
        });
        let sent = match sent {
            Some(None) => return false,
            Some(Some(sent)) => Some(sent),
            None => None,
        };
        match sent {
            Some(Ok(true)) => {}
            Some(Err(_)) => {
                if let Some(c) = &self.port_counters {
                    NetCounters::add(&c.errors, 1);
                }
                self.count(|c| &c.tx_dropped, 1);
            }
            _ => self.count(|c| &c.tx_dropped, 1),
        }
        true
    }

    /// Serves one control command: its ack byte's length (1), or 0 for a chain too short.
    fn control(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => return 0,
        };
        let mut command = vec![0u8; reader.available_bytes().min(4096)];
        let ack =
            if std::io::Read::read_exact(&mut reader, &mut command).is_ok() && command.len() >= 2 {
                let outcome =
                    self.state
                        .filter
                        .lock()
                        .command(command[0], command[1], &command[2..]);
                match outcome {
                    Outcome::Ok { changed } => {
                        if changed {
                            self.events.rx_filter_changed();
                        }
                        VIRTIO_NET_OK as u8
                    }
                    Outcome::Err => VIRTIO_NET_ERR as u8,
                }
            } else {
                VIRTIO_NET_ERR as u8
            };
        match std::io::Write::write_all(&mut writer, &[ack]) {
            Ok(()) => 1,
            Err(_) => 0,
        }
    }
}

/// A chain's readable descriptors as pieces of guest memory, at most `room` bytes in all
/// (as a copy into a buffer of `room` would take); false if they do not all fit in
/// `frame`, or one crosses from one memory region into the next.
fn gather<'m>(
    chain: &DescriptorChain<&'m GuestMemoryMmap>,
    mem: &'m GuestMemoryMmap,
    room: usize,
    frame: &mut Gathered<'m>,
) -> bool {
    for d in chain.clone().readable() {
        let part = (d.len() as usize).min(room - frame.len());
        if part == 0 {
            break;
        }
        match mem.get_slice(d.addr(), part) {
            Ok(slice) if frame.push(&slice) => {}
            _ => return false,
        }
    }
    true
}

enum Delivery {
    Done,
    NoRoom,
    /// Without MRG_RXBUF, the next buffer cannot hold the frame.
    TooSmall,
}

impl QueueHandler for NetHandler {
    fn serve(
        &mut self,
        queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        match queue {
            TX => {
                self.transmit(chain, mem);
                0
            }
            CTRL => self.control(chain, mem),
            _ => 0,
        }
    }

    fn serves_chains(&self, queue: usize) -> bool {
        queue != RX
    }

    fn kicked(&mut self, queue: usize, io: &mut Io<'_>) {
        if queue == RX {
            self.rx_blocked = false;
            self.receive(io);
        }
    }

    fn interest(&self) -> Option<Interest> {
        let wait = self.port.as_ref()?.with_backend(|b| b.wait())??;
        Some(Interest {
            fd: wait.fd,
            read: !self.rx_blocked,
            write: wait.write,
        })
    }

    fn source_ready(&mut self, io: &mut Io<'_>) {
        if let Some(port) = &self.port
            && port
                .with_backend(|b| b.writable())
                .is_some_and(|r| r.is_err())
        {
            NetCounters::add(&port.counters().errors, 1);
        }
        if !self.rx_blocked {
            self.receive(io);
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;

    use super::*;
    use crate::net::backend::GATHER_MAX;

    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

    /// Memory of two regions, 0..1 MiB and 1..2 MiB, with one chain of `parts` (address,
    /// length) readable descriptors made available.
    fn chain_of(parts: &[(u64, u32)]) -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
        ])
        .unwrap();
        let vq = MockSplitQueue::new(&mem, 32);
        for (i, &(addr, len)) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let flags = if last { 0 } else { NEXT };
            let desc = Descriptor::new(addr, len, flags, i as u16 + 1);
            vq.desc_table()
                .store(i as u16, RawDescriptor::from(desc))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let q = vq.create_queue().unwrap();
        (mem, q)
    }

    #[test]
    fn a_chain_is_gathered_as_its_pieces_of_guest_memory() {
        let (mem, mut q) = chain_of(&[(0x8000, 12), (0x9000, 100), (0xa000, 1414)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let mut frame = Gathered::new();
        assert!(gather(&chain, &mem, 65536, &mut frame));
        assert_eq!(frame.len(), 12 + 100 + 1414);
    }

    #[test]
    fn a_chain_longer_than_the_room_is_cut_where_a_copy_would_be() {
        let (mem, mut q) = chain_of(&[(0x8000, 12), (0x9000, 3000)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let mut frame = Gathered::new();
        assert!(gather(&chain, &mem, 1000, &mut frame));
        assert_eq!(frame.len(), 1000);
    }

    #[test]
    fn a_piece_across_two_regions_or_too_many_pieces_leave_it_to_the_copy() {
        let (mem, mut q) = chain_of(&[(0x8000, 12), (0x0f_ff00, 0x200)]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert!(!gather(&chain, &mem, 65536, &mut Gathered::new()));
        // The copy takes the same chain whole.
        let mut buf = vec![0u8; 0x200];
        assert!(mem.read_slice(&mut buf, GuestAddress(0x0f_ff00)).is_ok());

        let many: Vec<(u64, u32)> = (0..=GATHER_MAX as u64)
            .map(|i| (0x8000 + i * 64, 64))
            .collect();
        let (mem, mut q) = chain_of(&many);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert!(!gather(&chain, &mem, 65536, &mut Gathered::new()));
    }
}
