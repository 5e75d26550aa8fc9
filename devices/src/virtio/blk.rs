//! `virtio-blk-pci`: a block device on a raw image file. Requests: read, write, flush and
//! get-id; anything else is answered UNSUPP. A request past the end of the image or a
//! failed host I/O is answered IOERR and announced by the `io-error` notifier; the VMM
//! goes on.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qom::{Field, Kind, Notifier, NotifierDecl, ObjectRef, PhasePolicy, Property, TypeInfo, Value};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Backend, QUEUE_MAX, VIRTIO_DEVICE, VirtioPci};
use crate::USER_DEVICE;
use crate::bus::read_window;
use crate::device::{get_string, instance};
use crate::platform::PlatformRef;

pub const TYPE: &str = "virtio-blk-pci";
const DEVICE_ID: u16 = 2;
pub const SECTOR: u64 = 512;
/// The longest serial the get-id request can return.
pub const SERIAL_MAX: usize = 20;

pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// The longest `x-delay-ms`.
const MAX_DELAY_MS: u64 = 60_000;

/// Bytes moved per host read or write.
const CHUNK: usize = 128 * 1024;

/// Counters and the capacity, shown as properties: published beside the transport, so that
/// reading them never waits for a request the transport is serving.
#[derive(Default)]
pub struct BlkStats {
    /// In bytes, while realized.
    capacity: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    io_errors: AtomicU64,
}

/// What the device has while realized.
struct Image {
    file: File,
    read_only: bool,
    sectors: u64,
    serial: String,
    io_error: Notifier,
    /// `x-delay-ms`: how long each request waits before it is served.
    delay: std::time::Duration,
}

struct Blk {
    image: Option<Image>,
    stats: Arc<BlkStats>,
}

/// Why a request failed: the status to answer, and for IOERR what to report.
struct Failure {
    status: u8,
    error: Option<String>,
}

impl Failure {
    fn io(error: impl std::fmt::Display) -> Self {
        Failure {
            status: S_IOERR,
            error: Some(error.to_string()),
        }
    }
}

fn operation(kind: u32) -> &'static str {
    match kind {
        T_IN => "read",
        T_OUT => "write",
        T_FLUSH => "flush",
        T_GET_ID => "get-id",
        _ => "unsupported",
    }
}

impl Blk {
    /// Serves one request; the bytes written into the driver's buffers (status included).
    fn request(&self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
        else {
            return 0;
        };
        let mut header = [0u8; 16];
        if writer.available_bytes() == 0 || reader.read_exact(&mut header).is_err() {
            return 0; // no room for a status: nothing can be answered
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let Ok(mut status) = writer.split_at(writer.available_bytes() - 1) else {
            return 0;
        };
        if let Some(image) = &self.image
            && !image.delay.is_zero()
        {
            std::thread::sleep(image.delay);
        }
        let result = match &self.image {
            None => Err(Failure::io("the device has no image")),
            Some(image) => match kind {
                T_IN => self.read(image, sector, &mut writer),
                T_OUT => self.write(image, sector, &mut reader),
                T_FLUSH => image
                    .file
                    .sync_data()
                    .map(|()| {
                        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    })
                    .map_err(Failure::io),
                T_GET_ID => {
                    let mut id = [0u8; SERIAL_MAX];
                    id[..image.serial.len()].copy_from_slice(image.serial.as_bytes());
                    let n = writer.available_bytes().min(SERIAL_MAX);
                    writer.write_all(&id[..n]).map_err(Failure::io)
                }
                _ => Err(Failure {
                    status: S_UNSUPP,
                    error: None,
                }),
            },
        };
        let code = match result {
            Ok(()) => S_OK,
            Err(f) => {
                if let (Some(error), Some(image)) = (f.error, &self.image) {
                    self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        "virtio-blk: {} at sector {sector}: {error}",
                        operation(kind)
                    );
                    image.io_error.emit(|| {
                        Value::map([
                            ("operation", Value::Str(operation(kind).to_owned())),
                            ("sector", Value::UInt(sector)),
                            ("error", Value::Str(error)),
                        ])
                    });
                }
                f.status
            }
        };
        let _ = status.write_all(&[code]);
        (writer.bytes_written() + status.bytes_written()) as u32
    }

    /// Checks `len` bytes from `sector` lie inside the image; their byte offset.
    fn range(image: &Image, sector: u64, len: usize) -> Result<u64, Failure> {
        let end = sector
            .checked_mul(SECTOR)
            .and_then(|start| start.checked_add(len as u64));
        match end {
            Some(end) if end <= image.sectors * SECTOR => Ok(sector * SECTOR),
            _ => Err(Failure::io(format!(
                "{len} bytes at sector {sector} lie past the end ({} sectors)",
                image.sectors
            ))),
        }
    }

    fn read(
        &self,
        image: &Image,
        sector: u64,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> Result<(), Failure> {
        let len = writer.available_bytes();
        let offset = Self::range(image, sector, len)?;
        in_chunks(len, offset, |buf, at| {
            image.file.read_exact_at(buf, at).map_err(Failure::io)?;
            writer.write_all(buf).map_err(Failure::io)
        })?;
        self.stats
            .read_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write(
        &self,
        image: &Image,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_>,
    ) -> Result<(), Failure> {
        if image.read_only {
            return Err(Failure::io("the device is read-only"));
        }
        let len = reader.available_bytes();
        let offset = Self::range(image, sector, len)?;
        in_chunks(len, offset, |buf, at| {
            reader.read_exact(buf).map_err(Failure::io)?;
            image.file.write_all_at(buf, at).map_err(Failure::io)
        })?;
        self.stats
            .written_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Runs `step` over `len` bytes from image offset `offset` in pieces of at most `CHUNK`,
/// each with a buffer of the piece's size and the piece's offset.
fn in_chunks(
    len: usize,
    mut offset: u64,
    mut step: impl FnMut(&mut [u8], u64) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; len.min(CHUNK)];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        step(&mut buf[..n], offset)?;
        offset += n as u64;
        left -= n;
    }
    Ok(())
}

impl Backend for Blk {
    fn device_id(&self) -> u16 {
        DEVICE_ID
    }
    fn class(&self) -> u32 {
        0x01_80_00
    }
    fn features(&self) -> u64 {
        let ro = self.image.as_ref().is_some_and(|i| i.read_only);
        F_SEG_MAX | F_BLK_SIZE | F_FLUSH | if ro { F_RO } else { 0 }
    }
    fn queues(&self) -> usize {
        1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64), size_max (u32), seg_max (u32), geometry (4 bytes), blk_size (u32).
        let mut config = [0u8; 24];
        let sectors = self.image.as_ref().map_or(0, |i| i.sectors);
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_MAX - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        read_window(&config, offset as usize, data);
    }

    fn realize(&mut self, obj: &ObjectRef) -> qom::Result<()> {
        let path = get_string(obj, "file")?;
        if path.is_empty() {
            return Err(qom::Error::failed(format!(
                "{}: file property not set",
                obj.type_name()
            )));
        }
        let read_only = obj.get("read-only")?.as_bool().unwrap_or(false);
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| qom::Error::failed(format!("Could not open '{path}': {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| qom::Error::failed(format!("Could not open '{path}': {e}")))?;
        if !meta.is_file() {
            return Err(qom::Error::failed(format!(
                "Could not open '{path}': not a regular file"
            )));
        }
        let sectors = meta.len() / SECTOR;
        self.stats
            .capacity
            .store(sectors * SECTOR, Ordering::Relaxed);
        self.image = Some(Image {
            file,
            read_only,
            sectors,
            serial: get_string(obj, "serial")?,
            io_error: obj.notifier("io-error")?,
            delay: std::time::Duration::from_millis(obj.get("x-delay-ms")?.as_u64().unwrap_or(0)),
        });
        Ok(())
    }

    fn unrealize(&mut self) {
        self.image = None;
        self.stats.capacity.store(0, Ordering::Relaxed);
    }

    fn published(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        Some(self.stats.clone())
    }

    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.request(chain, mem);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let p = platform.clone();
    let counter = |name: &str, description: &str, read: fn(&BlkStats) -> &AtomicU64| {
        Property::new(name, Kind::uint64())
            .description(description)
            .getter(move |o| {
                let stats = instance::<VirtioPci>(o)?.published::<BlkStats>()?;
                Ok(Value::UInt(read(&stats).load(Ordering::Relaxed)))
            })
    };
    TypeInfo::new(TYPE, VIRTIO_DEVICE)
        .implements(USER_DEVICE)
        .description("virtio block device on PCI, backed by a raw image file")
        .property(
            Property::new("file", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description(
                    "The raw image file (qomu has no block layer: this stands for QEMU's drive)",
                ),
        )
        .property(
            Property::new("read-only", Kind::Bool)
                .policy(PhasePolicy::BeforeRealize)
                .description(
                    "Open the image read-only and offer VIRTIO_BLK_F_RO; writes fail with IOERR",
                ),
        )
        .property(
            Property::new("serial", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description("What the get-id request returns (at most 20 bytes)")
                .validate(|o, v| {
                    let s = v.as_str().unwrap_or_default();
                    if s.len() > SERIAL_MAX {
                        return Err(qom::Error::failed(format!(
                            "Property '{}.serial' takes at most {SERIAL_MAX} bytes",
                            o.type_name()
                        )));
                    }
                    Ok(())
                }),
        )
        .property(
            Property::new("x-delay-ms", Kind::uint_range(0, MAX_DELAY_MS))
                .policy(PhasePolicy::BeforeRealize)
                .description(
                    "Test only: every request waits this long on the host before it is served, \
                     as QEMU's blkdebug delays do (0: none)",
                ),
        )
        .property(
            Property::new("size", Kind::uint64())
                .description("The capacity in bytes (whole 512-byte sectors)")
                .getter(|o| {
                    let stats = instance::<VirtioPci>(o)?.published::<BlkStats>()?;
                    Ok(Value::UInt(stats.capacity.load(Ordering::Relaxed)))
                }),
        )
        .property(counter("read-bytes", "Bytes read by the guest", |s| {
            &s.read_bytes
        }))
        .property(counter(
            "written-bytes",
            "Bytes written by the guest",
            |s| &s.written_bytes,
        ))
        .property(counter("flushes", "Flush requests served", |s| &s.flushes))
        .property(counter("io-errors", "Requests answered IOERR", |s| {
            &s.io_errors
        }))
        .notifier(
            NotifierDecl::new(
                "io-error",
                Kind::structure(
                    "VirtioBlkIoError",
                    vec![
                        Field::new("operation", Kind::Str, "read, write, flush or get-id"),
                        Field::new("sector", Kind::uint64(), "The request's first sector"),
                        Field::new("error", Kind::Str, "What went wrong"),
                    ],
                ),
            )
            .description("A request failed and was answered VIRTIO_BLK_S_IOERR"),
        )
        .constructor(move |_| {
            let blk = Blk {
                image: None,
                stats: Arc::new(BlkStats::default()),
            };
            Ok(Arc::new(VirtioPci::new(Box::new(blk), p.clone())))
        })
}
