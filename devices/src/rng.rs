//! Entropy backends, created with `object-add` (or `--object`) and used by entropy
//! devices: `rng-builtin` (the kernel's getrandom) and `rng-random` (a file, by default
//! /dev/urandom), as QEMU names them.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use qom::{Kind, PhasePolicy, Property, TypeInfo, Value};

use crate::device::{get_string, instance};

/// The abstract base of entropy backends.
pub const RNG_BACKEND: &str = "rng-backend";
pub const RNG_BUILTIN: &str = "rng-builtin";
pub const RNG_RANDOM: &str = "rng-random";

/// Fills `buf` from the host kernel's getrandom; how many bytes it filled.
///
/// # Errors
/// getrandom failed.
pub fn getrandom(buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes; getrandom writes at most that many.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Where an entropy backend gets its bytes.
enum Source {
    Getrandom,
    File(Mutex<Option<File>>),
}

/// The state of an `rng-*` object.
pub struct RngBackend {
    source: Source,
    bytes: AtomicU64,
}

impl RngBackend {
    /// Fills `buf` with random bytes; returns how many were filled.
    ///
    /// # Errors
    /// The source cannot be read (a closed file, a getrandom failure).
    pub fn fill(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match &self.source {
            Source::Getrandom => getrandom(buf)?,
            Source::File(file) => match file.lock().as_mut() {
                Some(f) => f.read(buf)?,
                None => return Err(std::io::Error::other("the entropy source is not open")),
            },
        };
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn bytes_property() -> Property {
    Property::new("bytes-read", Kind::uint64())
        .description("Random bytes handed out so far")
        .getter(|o| {
            Ok(Value::UInt(
                instance::<RngBackend>(o)?.bytes.load(Ordering::Relaxed),
            ))
        })
}

pub(crate) fn types() -> Vec<TypeInfo> {
    vec![
        TypeInfo::new(RNG_BACKEND, qom::OBJECT)
            .abstract_type()
            .description("An entropy source for entropy devices")
            .property(bytes_property()),
        TypeInfo::new(RNG_BUILTIN, RNG_BACKEND)
            .implements(qom::USER_CREATABLE)
            .description("Entropy from the host kernel (getrandom)")
            .constructor(|_| {
                Ok(Arc::new(RngBackend {
                    source: Source::Getrandom,
                    bytes: AtomicU64::new(0),
                }))
            }),
        TypeInfo::new(RNG_RANDOM, RNG_BACKEND)
            .implements(qom::USER_CREATABLE)
            .description("Entropy read from a file or device")
            .property(
                Property::new("filename", Kind::Str)
                    .default("/dev/urandom")
                    .policy(PhasePolicy::BeforeRealize)
                    .description("File to read entropy from"),
            )
            .constructor(|_| {
                Ok(Arc::new(RngBackend {
                    source: Source::File(Mutex::new(None)),
                    bytes: AtomicU64::new(0),
                }))
            })
            .realize(|o| {
                let backend = instance::<RngBackend>(o)?;
                let path = get_string(o, "filename")?;
                let file = File::open(&path)
                    .map_err(|e| qom::Error::failed(format!("Could not open '{path}': {e}")))?;
                if let Source::File(slot) = &backend.source {
                    *slot.lock() = Some(file);
                }
                Ok(())
            })
            .unrealize(|o| {
                if let Ok(backend) = instance::<RngBackend>(o)
                    && let Source::File(slot) = &backend.source
                {
                    *slot.lock() = None;
                }
            }),
    ]
}
