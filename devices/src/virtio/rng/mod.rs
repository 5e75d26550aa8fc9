//! `virtio-rng-pci`: an entropy device. Each buffer the driver offers on its one queue is
//! filled from the host: the `rng` backend object if one is linked (QEMU's property), else
//! the kernel's getrandom.
//!
//! - this file: the model and the handler filling buffers on the device's I/O thread;
//! - [`qom`]: the `virtio-rng-pci` type.

mod qom;

use std::io::Write;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;

pub use self::qom::TYPE;
pub(crate) use self::qom::register;
use super::{Identity, QueueHandler, VirtioDevice};
use crate::rng::{RngBackend, getrandom};

/// What the PCI function shows: an "other" device with one queue.
pub const IDENTITY: Identity = Identity {
    device_id: VIRTIO_ID_RNG as u16,
    class: 0xff_00_00,
    queues: 1,
};

/// Most bytes handed out per buffer (Linux asks for at most a page or so).
pub const MAX_PER_BUFFER: usize = 64 * 1024;

/// Where entropy comes from.
#[derive(Clone)]
pub enum Source {
    Getrandom,
    Backend(Arc<RngBackend>),
}

impl Source {
    fn fill(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Backend(backend) => backend.fill(buf),
            Source::Getrandom => getrandom(buf),
        }
    }
}

/// The entropy device.
pub struct Rng {
    source: Source,
}

impl Rng {
    pub fn new(source: Source) -> Self {
        Rng { source }
    }
}

impl VirtioDevice for Rng {
    fn activate(&self, _features: u64) -> Box<dyn QueueHandler> {
        Box::new(RngHandler {
            source: self.source.clone(),
        })
    }
}

/// Fills the driver's buffers, on the device's I/O thread.
struct RngHandler {
    source: Source,
}

impl QueueHandler for RngHandler {
    fn serve(
        &mut self,
        _queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        // A buffer that is not writable gets nothing, but is returned all the same.
        let Ok(mut writer) = chain.writer(mem) else {
            return 0;
        };
        let mut buf = vec![0u8; writer.available_bytes().min(MAX_PER_BUFFER)];
        match self.source.fill(&mut buf) {
            Ok(n) if writer.write_all(&buf[..n]).is_ok() => n as u32,
            Ok(_) => 0,
            Err(e) => {
                tracing::warn!("virtio-rng: the entropy source failed: {e}");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn writable_buffers_are_filled_and_others_returned_empty() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut handler = Rng::new(Source::Getrandom).activate(0);
        let chain = |flags: u16| {
            vq.build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x8000, 64, flags, 0))])
                .unwrap()
        };
        mem.write_slice(&[0u8; 64], GuestAddress(0x8000)).unwrap();
        assert_eq!(handler.serve(0, chain(VRING_DESC_F_WRITE as u16), &mem), 64);
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert!(got.iter().any(|&b| b != 0), "random bytes, not zeros");
        assert_eq!(handler.serve(0, chain(0), &mem), 0, "read-only buffer");
    }
}
