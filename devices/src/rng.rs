//! Entropy backends, created with `object-add` (or `--object`) and used by entropy
//! devices: `rng-builtin` (the kernel's getrandom) and `rng-random` (a file, by default
//! /dev/urandom), as QEMU names them.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use qom::{Kind, PhasePolicy, Property, TypeInfo, TypedInfo, Value};

use crate::device::get_string;

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

fn backend(name: &str, parent: &str, source: fn() -> Source) -> TypedInfo<RngBackend> {
    TypedInfo::new(name, parent).constructor(move |_| {
        Ok(RngBackend {
            source: source(),
            bytes: AtomicU64::new(0),
        })
    })
}

pub(crate) fn types() -> Vec<TypeInfo> {
    vec![
        TypedInfo::<RngBackend>::abstract_type(RNG_BACKEND, qom::OBJECT)
            .description("An entropy source for entropy devices")
            .getter(
                Property::new("bytes-read", Kind::uint64())
                    .description("Random bytes handed out so far"),
                |b| Value::UInt(b.bytes.load(Ordering::Relaxed)),
            )
            .build(),
        backend(RNG_BUILTIN, RNG_BACKEND, || Source::Getrandom)
            .implements(qom::USER_CREATABLE)
            .description("Entropy from the host kernel (getrandom)")
            .build(),
        backend(RNG_RANDOM, RNG_BACKEND, || Source::File(Mutex::new(None)))
            .implements(qom::USER_CREATABLE)
            .description("Entropy read from a file or device")
            .property(
                Property::new("filename", Kind::Str)
                    .default("/dev/urandom")
                    .policy(PhasePolicy::BeforeRealize)
                    .description("File to read entropy from"),
            )
            .realize(|backend, o| {
                let path = get_string(o, "filename")?;
                let file = File::open(&path).map_err(|source| crate::Error::Open {
                    path: path.clone(),
                    source,
                })?;
                if let Source::File(slot) = &backend.source {
                    *slot.lock() = Some(file);
                }
                Ok(())
            })
            .unrealize(|backend, _| {
                if let Source::File(slot) = &backend.source {
                    *slot.lock() = None;
                }
            })
            .build(),
    ]
}
