//! `virtio-rng-pci`: an entropy device. Each buffer the driver offers on its one queue is
//! filled from the host: the `rng` backend object if one is linked (QEMU's property), else
//! the kernel's getrandom.

use std::io::Write;
use std::sync::Arc;

use qom::{ObjectRef, PhasePolicy, Property, TypeInfo};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Backend, VIRTIO_DEVICE, VirtioPci};
use crate::USER_DEVICE;
use crate::device::get_string;
use crate::platform::PlatformRef;
use crate::rng::{RNG_BACKEND, RngBackend, getrandom};

pub const TYPE: &str = "virtio-rng-pci";
const DEVICE_ID: u16 = 4;
/// Most bytes handed out per buffer (Linux asks for at most a page or so).
const MAX_PER_BUFFER: usize = 64 * 1024;

struct Rng {
    source: Option<Arc<RngBackend>>,
}

impl Rng {
    fn fill(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &self.source {
            Some(backend) => backend.fill(buf),
            None => getrandom(buf),
        }
    }
}

impl Backend for Rng {
    fn device_id(&self) -> u16 {
        DEVICE_ID
    }
    fn class(&self) -> u32 {
        0xff_00_00
    }
    fn queues(&self) -> usize {
        1
    }

    fn realize(&mut self, obj: &ObjectRef) -> qom::Result<()> {
        let path = get_string(obj, "rng")?;
        self.source =
            if path.is_empty() {
                None
            } else {
                let backend = obj.tree().lookup(&path)?.instance::<RngBackend>();
                Some(backend.ok_or_else(|| {
                    qom::Error::failed(format!("'{path}' is not an entropy backend"))
                })?)
            };
        Ok(())
    }

    fn unrealize(&mut self) {
        self.source = None;
    }

    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written = 0u32;
            if let Ok(mut writer) = chain.writer(mem) {
                let mut buf = vec![0u8; writer.available_bytes().min(MAX_PER_BUFFER)];
                match self.fill(&mut buf) {
                    Ok(n) if writer.write_all(&buf[..n]).is_ok() => written = n as u32,
                    Ok(_) => {}
                    Err(e) => tracing::warn!("virtio-rng: the entropy source failed: {e}"),
                }
            }
            // A buffer that is not writable gets nothing, but is returned all the same.
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let p = platform.clone();
    TypeInfo::new(TYPE, VIRTIO_DEVICE)
        .implements(USER_DEVICE)
        .description("virtio entropy device on PCI")
        .property(
            Property::link("rng", RNG_BACKEND)
                .policy(PhasePolicy::BeforeRealize)
                .description("The entropy backend object (rng-builtin, rng-random); none for the host's getrandom"),
        )
        .constructor(move |_| {
            Ok(Arc::new(VirtioPci::new(Box::new(Rng { source: None }), p.clone())))
        })
}
