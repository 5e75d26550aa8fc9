//! What virtio-blk serves requests from: a raw image file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::request::{DataSlice, Disk, SECTOR};

/// Which way a vectored transfer goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// File to guest memory: `preadv`.
    Read,
    /// Guest memory to file: `pwritev`.
    Write,
}

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
    fn read_vectored_at(&self, bufs: &[DataSlice<'_>], offset: u64) -> io::Result<()> {
        self.transfer(Direction::Read, bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[DataSlice<'_>], offset: u64) -> io::Result<()> {
        self.transfer(Direction::Write, bufs, offset)
    }
}

impl RawImage {
    /// Moves the whole of `bufs` from or to the file at `offset`, with `preadv`/`pwritev`
    /// straight on guest memory (std has no positioned vectored I/O), going on after short
    /// transfers and signals.
    fn transfer(
        &self,
        direction: Direction,
        bufs: &[DataSlice<'_>],
        offset: u64,
    ) -> io::Result<()> {
        let guards: Vec<_> = bufs.iter().map(DataSlice::ptr_guard_mut).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            })
            .collect();
        let mut first = 0;
        let mut at = offset;
        // IOV_MAX on Linux; a chain has at most QUEUE_MAX descriptors, but be safe.
        const IOV_MAX: usize = 1024;
        loop {
            // Empty pieces are skipped, so that a zero return means the end of the file.
            while first < iov.len() && iov[first].iov_len == 0 {
                first += 1;
            }
            if first == iov.len() {
                return Ok(());
            }
            let count = (iov.len() - first).min(IOV_MAX) as libc::c_int;
            let at_off = libc::off_t::try_from(at)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: every iovec points into guest memory that `guards` keep mapped for
            // the call (the slices come from the guest memory the caller holds), with its
            // length; the kernel only reads (pwritev) or writes (preadv) those ranges. The
            // guest may touch them meanwhile, as with any DMA.
            let n = unsafe {
                match direction {
                    Direction::Read => {
                        libc::preadv(self.file.as_raw_fd(), iov[first..].as_ptr(), count, at_off)
                    }
                    Direction::Write => {
                        libc::pwritev(self.file.as_raw_fd(), iov[first..].as_ptr(), count, at_off)
                    }
                }
            };
            if n > 0 && direction == Direction::Read {
                mark_dirty(bufs, at - offset, n as u64);
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(match direction {
                    Direction::Read => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the image file ends before the request does",
                    ),
                    Direction::Write => io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the image file took no more bytes",
                    ),
                });
            }
            let mut n = n as usize;
            at += n as u64;
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `n` is less than the iovec's length: the new base stays
                    // inside the same guest buffer.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
    }
}

/// Marks `len` bytes from byte `from` of `bufs` (taken one after the other) as written,
/// in guest memory's dirty bitmap: the host wrote them behind vm-memory's back.
fn mark_dirty(bufs: &[DataSlice<'_>], from: u64, len: u64) {
    use vm_memory::bitmap::Bitmap;
    let (mut skip, mut left) = (from as usize, len as usize);
    for buf in bufs {
        if left == 0 {
            break;
        }
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        let n = (buf.len() - skip).min(left);
        buf.bitmap().mark_dirty(skip, n);
        left -= n;
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use crate::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;

    /// A guest with two memory regions, so that one buffer can span both.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    fn image(bytes: &[u8]) -> (RawImage, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("qomu-raw-{}-{}", std::process::id(), bytes.len()));
        std::fs::write(&path, bytes).unwrap();
        (RawImage::open(path.to_str().unwrap(), false).unwrap(), path)
    }

    #[test]
    fn vectored_reads_and_writes_go_straight_to_guest_memory() {
        let content: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let (disk, path) = image(&content);
        let mem = memory();
        // Three pieces: 100 bytes, an empty one, and 3000 bytes across the region boundary.
        let mut bufs: Vec<DataSlice<'_>> = mem
            .get_slices(GuestAddress(0x10), 100)
            .map(Result::unwrap)
            .collect();
        bufs.extend(mem.get_slices(GuestAddress(0x200), 0).map(Result::unwrap));
        bufs.extend(
            mem.get_slices(GuestAddress(0x800), 3000)
                .map(Result::unwrap),
        );
        assert_eq!(bufs.len(), 3, "the last buffer is two slices");
        disk.read_vectored_at(&bufs, 512).unwrap();
        let mut got = vec![0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x10)).unwrap();
        assert_eq!(got, content[512..612]);
        let mut got = vec![0u8; 3000];
        mem.read_slice(&mut got, GuestAddress(0x800)).unwrap();
        assert_eq!(got, content[612..3612]);

        mem.write_slice(&[0xee; 100], GuestAddress(0x10)).unwrap();
        disk.write_vectored_at(&bufs, 0).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file[..100], [0xee; 100]);
        assert_eq!(file[100..3100], content[612..3612]);
        // Past the end of the file: an error, not a short read taken for data.
        let err = disk.read_vectored_at(&bufs, 4000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(path).unwrap();
    }
}
