//! The `virtio-blk-pci` type: the image and its options as properties, the counters, and
//! the `io-error` notifier.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qom::{Field, Kind, Notifier, NotifierDecl, PhasePolicy, Property, TypeInfo, Value};

use super::disk::RawImage;
use super::request::{BlkStats, RequestError, SERIAL_MAX};
use super::{Blk, BlkEvents, IDENTITY};
use crate::device::get_string;
use crate::platform::PlatformRef;
use crate::virtio::VirtioObject;
use crate::virtio::qom::virtio_type;

pub const TYPE: &str = "virtio-blk-pci";
/// The longest `x-delay-ms`.
const MAX_DELAY_MS: u64 = 60_000;

/// `io-error`, as the device reports it.
struct IoErrors(Notifier);

impl BlkEvents for IoErrors {
    fn io_error(&self, operation: &'static str, sector: u64, error: &RequestError) {
        self.0.emit(|| {
            Value::map([
                ("operation", Value::Str(operation.to_owned())),
                ("sector", Value::UInt(sector)),
                ("error", Value::Str(error.to_string())),
            ])
        });
    }
}

fn counter(name: &str, description: &str) -> Property {
    Property::new(name, Kind::uint64()).description(description)
}

/// What the device's properties share with its model: the counters it publishes and the
/// test delay a client may change while it runs.
#[derive(Default)]
struct Shared {
    stats: Arc<BlkStats>,
    delay_ms: Arc<AtomicU64>,
}

/// A counter of the device's, read from what it publishes (never waiting for a request).
fn stat(d: &VirtioObject, read: fn(&BlkStats) -> u64) -> qom::Result<Value> {
    Ok(Value::UInt(read(&d.shared::<Shared>()?.stats)))
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    virtio_type(
        TYPE,
        IDENTITY,
        platform,
        || Arc::new(Shared::default()),
        |o, shared| {
            let path = get_string(o, "file")?;
            if path.is_empty() {
                return Err(crate::Error::PropertyNotSet {
                    typename: o.type_name().to_owned(),
                    property: "file",
                }
                .into());
            }
            let read_only = o.get("read-only").ok().and_then(|v| v.as_bool()) == Some(true);
            let image = RawImage::open(&path, read_only)?;
            let serial = o
                .get("serial")
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let events = o
                .notifier("io-error")
                .map_err(|_| crate::Error::NotRealized {
                    path: o.path().to_owned(),
                })?;
            Ok(Arc::new(Blk::new(
                Arc::new(image),
                serial.into_bytes(),
                shared.stats.clone(),
                Arc::new(IoErrors(events)),
                shared.delay_ms.clone(),
            )))
        },
    )
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
                if v.as_str().unwrap_or_default().len() > SERIAL_MAX {
                    return Err(crate::Error::TooLong {
                        typename: o.type_name().to_owned(),
                        property: "serial",
                        max: SERIAL_MAX,
                    }
                    .into());
                }
                Ok(())
            }),
    )
    .accessor(
        Property::new("x-delay-ms", Kind::uint_range(0, MAX_DELAY_MS))
            .policy(PhasePolicy::Always)
            .description(
                "Test only: every request waits this long on the host before it is served, \
                 as QEMU's blkdebug delays do (0: none); may change while the guest runs",
            ),
        |d, _| {
            let ms = d.shared::<Shared>()?.delay_ms.load(Ordering::Relaxed);
            Ok(Value::UInt(ms))
        },
        |d, _, v| {
            let ms = v.as_u64().unwrap_or(0);
            d.shared::<Shared>()?.delay_ms.store(ms, Ordering::Relaxed);
            Ok(())
        },
    )
    .try_getter(
        Property::new("size", Kind::uint64())
            .description("The capacity in bytes (whole 512-byte sectors)"),
        |d, _| stat(d, |s| s.capacity.load(Ordering::Relaxed)),
    )
    .try_getter(counter("read-bytes", "Bytes read by the guest"), |d, _| {
        stat(d, |s| s.read_bytes.load(Ordering::Relaxed))
    })
    .try_getter(
        counter("written-bytes", "Bytes written by the guest"),
        |d, _| stat(d, |s| s.written_bytes.load(Ordering::Relaxed)),
    )
    .try_getter(counter("flushes", "Flush requests served"), |d, _| {
        stat(d, |s| s.flushes.load(Ordering::Relaxed))
    })
    .try_getter(counter("io-errors", "Requests answered IOERR"), |d, _| {
        stat(d, |s| s.io_errors.load(Ordering::Relaxed))
    })
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
    .build()
}
