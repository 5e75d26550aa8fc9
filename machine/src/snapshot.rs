//! The snapshot file: a header, then named sections, each with its length and a CRC-32 that
//! covers its name, length and payload, ending with an `end` section (docs/snapshot.md).
//!
//! ```text
//! header   "QOMUSNAP" (8 bytes), format version (u32 LE), flags (u32 LE, 0)
//! section  name length (u16 LE), name (UTF-8), payload length (u64 LE), payload,
//!          CRC-32 (u32 LE) of everything before it in the section
//! ```
//!
//! Sections, in order: `config` (what the file was saved from, JSON), `cpu:N` and `chips`
//! (KVM state, JSON), `state:PATH:LEVEL:VERSION` (one per device type level, JSON), then
//! `ram:ADDRESS` (each guest RAM region, raw) and `end`.
//!
//! The same stream goes over a socket or a pipe for a migration between processes
//! (machine/src/migration.rs): a reader of a stream knows no length ahead, so a stream that
//! ends early is found truncated where it ends. A live migration's RAM goes in passes
//! instead of `ram:` sections: `pages:PASS:N` sections, an empty `pass-end:PASS` after each
//! pass but the last, an empty `switch-over` once the guest has stopped, then the last pass
//! and the state (docs/migration.md).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"QOMUSNAP";
/// The format version this qomu writes and reads.
pub const VERSION: u32 = 1;
/// Largest payload of a section that is not RAM (device and vCPU state are kilobytes).
const MAX_STATE_SECTION: u64 = 64 << 20;
/// Sections at least twice this size are read and checked in a pipeline of such chunks.
const PIPELINE_CHUNK: usize = 4 << 20;

/// What a snapshot was taken of: checked against the restoring machine before anything
/// is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub memory_size: u64,
    pub cpus: u32,
    /// Every object with state: its path and type.
    pub objects: Vec<(String, String)>,
    /// The run state at save: `running` or `paused`.
    pub run_state: String,
    /// The qomu that wrote it.
    pub writer: String,
}

impl Fingerprint {
    /// Why a machine described by `here` cannot load a snapshot of `self`.
    pub fn mismatch(&self, here: &Fingerprint) -> Option<String> {
        if self.memory_size != here.memory_size {
            return Some(format!(
                "the snapshot is of a machine with {} MiB of memory; this one has {} MiB",
                self.memory_size >> 20,
                here.memory_size >> 20
            ));
        }
        if self.cpus != here.cpus {
            return Some(format!(
                "the snapshot is of a machine with {} vCPUs; this one has {}",
                self.cpus, here.cpus
            ));
        }
        for (path, ty) in &self.objects {
            match here.objects.iter().find(|(p, _)| p == path) {
                None => {
                    return Some(format!(
                        "the snapshot has {path} ({ty}), which this machine does not: add it with the same id (--device/--object)"
                    ));
                }
                Some((_, t)) if t != ty => {
                    return Some(format!(
                        "{path} is a {ty} in the snapshot and a {t} in this machine"
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some((path, ty)) = here
            .objects
            .iter()
            .find(|(p, _)| !self.objects.iter().any(|(q, _)| q == p))
        {
            return Some(format!(
                "this machine has {path} ({ty}), which the snapshot does not"
            ));
        }
        None
    }
}

/// Why a snapshot file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("'{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{0}' is not a qomu snapshot")]
    NotSnapshot(PathBuf),
    #[error("'{path}' is a snapshot of format version {found}; this qomu reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("'{path}' is truncated: it ends inside section '{section}'")]
    Truncated { path: PathBuf, section: String },
    #[error("'{path}' is corrupted: section '{section}' fails its checksum")]
    Checksum { path: PathBuf, section: String },
    #[error("'{path}' is corrupted: {what}")]
    Corrupted { path: PathBuf, what: String },
}

/// Writes a snapshot, to a file or a stream, section by section.
pub struct Writer {
    out: BufWriter<Box<dyn Write + Send>>,
    /// The file, to sync at the end (none for a stream).
    file: Option<File>,
    written: u64,
}

impl Writer {
    /// Creates `path` (replacing it) and writes the header.
    ///
    /// # Errors
    /// The file cannot be created or written.
    pub fn create(path: &Path) -> std::io::Result<Writer> {
        let file = File::create(path)?;
        let sync = file.try_clone()?;
        Writer::start(Box::new(file), Some(sync))
    }

    /// Writes the header to `out`, a socket or a pipe.
    ///
    /// # Errors
    /// The write fails.
    pub fn stream(out: Box<dyn Write + Send>) -> std::io::Result<Writer> {
        Writer::start(out, None)
    }

    fn start(out: Box<dyn Write + Send>, file: Option<File>) -> std::io::Result<Writer> {
        let mut w = Writer {
            out: BufWriter::with_capacity(1 << 20, out),
            file,
            written: 0,
        };
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Writes one section whose payload is `parts` in order (RAM goes straight from the
    /// guest's mapping, without a copy).
    ///
    /// # Errors
    /// A write fails.
    pub fn section(&mut self, name: &str, parts: &[&[u8]]) -> std::io::Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut head = Vec::with_capacity(2 + name.len() + 8);
        head.extend_from_slice(&(name.len() as u16).to_le_bytes());
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        self.put(&head)?;
        for part in parts {
            crc.update(part);
            self.put(part)?;
        }
        self.put(&crc.finalize().to_le_bytes())
    }

    /// Sends what is buffered on its way (a live migration's pass: the destination loads it
    /// while the guest still runs, not in the downtime).
    ///
    /// # Errors
    /// A write fails.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// Writes `end`, flushes, and syncs a file to disk. Returns the bytes written.
    ///
    /// # Errors
    /// A write or the sync fails.
    pub fn finish(mut self) -> std::io::Result<u64> {
        self.section("end", &[])?;
        self.out.flush()?;
        if let Some(file) = &self.file {
            file.sync_all()?;
        }
        Ok(self.written)
    }
}

/// A section's name and length, read before its payload.
pub struct SectionHead {
    pub name: String,
    pub len: u64,
    crc: crc32fast::Hasher,
}

impl std::fmt::Debug for SectionHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectionHead")
            .field("name", &self.name)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Reads a snapshot, from a file or a stream, section by section, checking each.
pub struct Reader {
    /// The file, or the stream's URI, as errors name it.
    path: PathBuf,
    input: BufReader<Box<dyn Read + Send>>,
    /// Bytes left in a file (a stream's length is not known ahead).
    remaining: Option<u64>,
    /// Bytes read so far.
    read: u64,
}

impl Reader {
    /// Opens `path` read-only and checks its header.
    ///
    /// # Errors
    /// The file cannot be read, is not a snapshot, or has another format version.
    pub fn open(path: &Path) -> Result<Reader, FormatError> {
        let io = |source| FormatError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size < 16 {
            return Err(FormatError::NotSnapshot(path.to_owned()));
        }
        Reader::start(path.to_owned(), Box::new(file), Some(size))
    }

    /// Reads the header from `input`, a socket or a pipe named `name` in errors.
    ///
    /// # Errors
    /// It ends before a header, is not a snapshot, or has another format version.
    pub fn stream(name: &str, input: Box<dyn Read + Send>) -> Result<Reader, FormatError> {
        Reader::start(PathBuf::from(name), input, None)
    }

    fn start(
        path: PathBuf,
        input: Box<dyn Read + Send>,
        size: Option<u64>,
    ) -> Result<Reader, FormatError> {
        let mut r = Reader {
            path,
            input: BufReader::with_capacity(1 << 20, input),
            remaining: size,
            read: 0,
        };
        let mut header = [0u8; 16];
        if r.input.read_exact(&mut header).is_err() || &header[..8] != MAGIC {
            return Err(FormatError::NotSnapshot(r.path.clone()));
        }
        r.count(16);
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != VERSION {
            return Err(FormatError::Version {
                path: r.path.clone(),
                found: version,
            });
        }
        Ok(r)
    }

    fn count(&mut self, n: u64) {
        self.read += n;
        if let Some(r) = &mut self.remaining {
            *r -= n;
        }
    }

    fn truncated(&self, section: &str) -> FormatError {
        FormatError::Truncated {
            path: self.path.clone(),
            section: section.to_owned(),
        }
    }

    fn corrupted(&self, what: String) -> FormatError {
        FormatError::Corrupted {
            path: self.path.clone(),
            what,
        }
    }

    fn take(&mut self, buf: &mut [u8], section: &str) -> Result<(), FormatError> {
        if self.remaining.is_some_and(|r| buf.len() as u64 > r) {
            return Err(self.truncated(section));
        }
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            // A stream that ends early (a file's length is checked above).
            std::io::ErrorKind::UnexpectedEof => self.truncated(section),
            _ => FormatError::Io {
                path: self.path.clone(),
                source: e,
            },
        })?;
        self.count(buf.len() as u64);
        Ok(())
    }

    /// Reads the next section's name and length.
    ///
    /// # Errors
    /// The file ends, or the name is not text.
    pub fn head(&mut self, after: &str) -> Result<SectionHead, FormatError> {
        let mut crc = crc32fast::Hasher::new();
        let mut len = [0u8; 2];
        self.take(&mut len, after)?;
        let mut name = vec![0u8; usize::from(u16::from_le_bytes(len))];
        self.take(&mut name, after)?;
        let mut size = [0u8; 8];
        self.take(&mut size, after)?;
        crc.update(&len);
        crc.update(&name);
        crc.update(&size);
        let name = String::from_utf8(name)
            .map_err(|_| self.corrupted(format!("a section after '{after}' has no valid name")))?;
        let len = u64::from_le_bytes(size);
        if self.remaining.is_some_and(|r| len > r) {
            return Err(self.truncated(&name));
        }
        Ok(SectionHead { name, len, crc })
    }

    /// Reads a small section's payload and checks it.
    ///
    /// # Errors
    /// Too large for state, truncated, or its checksum fails.
    pub fn payload(&mut self, head: SectionHead) -> Result<Vec<u8>, FormatError> {
        if head.len > MAX_STATE_SECTION {
            return Err(
                self.corrupted(format!("section '{}' claims {} bytes", head.name, head.len))
            );
        }
        let mut buf = vec![0u8; head.len as usize];
        self.payload_into(head, &mut buf)?;
        Ok(buf)
    }

    /// Reads a section's payload into `buf` (exactly its length) and checks it.
    ///
    /// # Errors
    /// Truncated, or its checksum fails.
    pub fn payload_into(
        &mut self,
        mut head: SectionHead,
        buf: &mut [u8],
    ) -> Result<(), FormatError> {
        if buf.len() as u64 != head.len {
            return Err(self.corrupted(format!(
                "section '{}' has {} bytes where {} belong",
                head.name,
                head.len,
                buf.len()
            )));
        }
        if buf.len() < PIPELINE_CHUNK * 2 {
            self.take(buf, &head.name)?;
            head.crc.update(buf);
        } else {
            // RAM: the checksum runs on another thread, a chunk behind the reads.
            let mut crc = head.crc.clone();
            std::thread::scope(|scope| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<&[u8]>(4);
                let hasher = scope.spawn(move || {
                    for chunk in rx {
                        crc.update(chunk);
                    }
                    crc
                });
                for chunk in buf.chunks_mut(PIPELINE_CHUNK) {
                    self.take(chunk, &head.name)?;
                    if tx.send(chunk).is_err() {
                        break;
                    }
                }
                drop(tx);
                head.crc = hasher
                    .join()
                    .map_err(|_| self.corrupted("the checksum thread failed".into()))?;
                Ok::<(), FormatError>(())
            })?;
        }
        let mut stored = [0u8; 4];
        self.take(&mut stored, &head.name)?;
        if head.crc.finalize() != u32::from_le_bytes(stored) {
            return Err(FormatError::Checksum {
                path: self.path.clone(),
                section: head.name,
            });
        }
        Ok(())
    }

    /// Reads the next section whole (name and checked payload).
    ///
    /// # Errors
    /// As [`Reader::head`] and [`Reader::payload`].
    pub fn next(&mut self, after: &str) -> Result<(String, Vec<u8>), FormatError> {
        let head = self.head(after)?;
        let name = head.name.clone();
        Ok((name, self.payload(head)?))
    }

    /// A section that should be there is not.
    pub fn unexpected(&self, found: &str, wanted: &str) -> FormatError {
        self.corrupted(format!("found section '{found}' where '{wanted}' belongs"))
    }

    /// Bytes of a file not read yet (0 for a stream).
    pub fn remaining(&self) -> u64 {
        self.remaining.unwrap_or(0)
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

/// The section name of one type level's state of the object at `path`.
pub fn state_section(path: &str, level: &str, version: u32) -> String {
    format!("state:{path}:{level}:{version}")
}

/// Splits a state section name into path, level and version.
pub fn parse_state_section(name: &str) -> Option<(&str, &str, u32)> {
    let rest = name.strip_prefix("state:")?;
    let mut parts = rest.rsplitn(3, ':');
    let version = parts.next()?.parse().ok()?;
    let level = parts.next()?;
    let path = parts.next()?;
    Some((path, level, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("qomu-snapshot-{}-{name}", std::process::id()))
    }

    #[test]
    fn sections_round_trip_and_damage_is_found() {
        let path = temp("rt");
        let mut w = Writer::create(&path).unwrap();
        w.section("config", &[b"{}"]).unwrap();
        w.section("ram:0x0", &[&[7u8; 100], &[8u8; 28]]).unwrap();
        let size = w.finish().unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let mut r = Reader::open(&path).unwrap();
        assert_eq!(r.next("header").unwrap(), ("config".into(), b"{}".to_vec()));
        let head = r.head("config").unwrap();
        assert_eq!((head.name.as_str(), head.len), ("ram:0x0", 128));
        let mut ram = vec![0u8; 128];
        r.payload_into(head, &mut ram).unwrap();
        assert_eq!(&ram[..100], &[7u8; 100]);
        assert_eq!(r.next("ram").unwrap().0, "end");
        assert_eq!(r.remaining(), 0);

        let good = std::fs::read(&path).unwrap();
        // A flipped byte in the payload, and one in a length.
        let mut bad = good.clone();
        bad[16 + 2 + 6 + 8 + 1] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = Reader::open(&path).unwrap().next("header").unwrap_err();
        assert!(
            matches!(err, FormatError::Checksum { ref section, .. } if section == "config"),
            "{err}"
        );
        // Truncated inside RAM.
        std::fs::write(&path, &good[..good.len() - 40]).unwrap();
        let mut r = Reader::open(&path).unwrap();
        r.next("header").unwrap();
        let err = r.head("config").unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // Another version, and not a snapshot at all.
        let mut other = good.clone();
        other[8] = 9;
        std::fs::write(&path, &other).unwrap();
        assert!(matches!(
            Reader::open(&path),
            Err(FormatError::Version { found: 9, .. })
        ));
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(
            Reader::open(&path),
            Err(FormatError::NotSnapshot(_))
        ));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn state_section_names_split_back() {
        let name = state_section("/machine/peripheral/disk[0]", "virtio-device", 3);
        assert_eq!(
            parse_state_section(&name),
            Some(("/machine/peripheral/disk[0]", "virtio-device", 3))
        );
        assert_eq!(parse_state_section("ram:0x0"), None);
    }

    #[test]
    fn fingerprints_name_the_difference() {
        let f = Fingerprint {
            memory_size: 256 << 20,
            cpus: 1,
            objects: vec![("/machine/peripheral/d".into(), "virtio-blk-pci".into())],
            run_state: "running".into(),
            writer: "qomu".into(),
        };
        assert_eq!(f.mismatch(&f.clone()), None);
        let mut g = f.clone();
        g.memory_size = 128 << 20;
        assert!(f.mismatch(&g).unwrap().contains("256 MiB"));
        let mut g = f.clone();
        g.objects.clear();
        assert!(f.mismatch(&g).unwrap().contains("/machine/peripheral/d"));
        let mut g = f.clone();
        g.objects[0].1 = "virtio-rng-pci".into();
        assert!(f.mismatch(&g).unwrap().contains("virtio-rng-pci"));
    }
}
