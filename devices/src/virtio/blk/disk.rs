//! What virtio-blk serves requests from: a raw image file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use super::request::{Disk, SECTOR};

/// A raw image file: sector N at byte N × 512; its size rounded down to whole sectors.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    sectors: u64,
    read_only: bool,
}

impl RawImage {
    /// Opens `path` (read-only if `read_only`).
    ///
    /// # Errors
    /// It cannot be opened, or is not a regular file.
    pub fn open(path: &str, read_only: bool) -> crate::Result<RawImage> {
        let open_error = |source| crate::Error::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        if !meta.is_file() {
            return Err(crate::Error::NotAFile {
                path: path.to_owned(),
            });
        }
        Ok(RawImage {
            file,
            sectors: meta.len() / SECTOR,
            read_only,
        })
    }
}

impl Disk for RawImage {
    fn sectors(&self) -> u64 {
        self.sectors
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
