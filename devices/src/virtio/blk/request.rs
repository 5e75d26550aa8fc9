//! virtio-blk requests as plain logic: a descriptor chain parsed into a [`Request`] (its
//! 16-byte header: type and sector), executed against a [`Disk`], answered with a status
//! byte in the chain's last writable byte. No qom, no threads: what went wrong comes back
//! as a [`RequestError`] for the caller to count and report.
//!
//! The shape is Firecracker's (`block/virtio/request.rs`). The header, the status byte and
//! get-id's answer go through virtio-queue's `Reader`/`Writer`, which walk a chain's
//! descriptors (indirect tables included) and check every address against guest memory.
//! Data moves between the disk and the guest's buffers themselves, as one vectored host
//! read or write per request ([`Disk::read_vectored_at`]): no copy through a bounce
//! buffer (docs/benchmarks.md, `blk`, has the figures before and after).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;

/// Bytes per sector, in requests and in the capacity.
pub const SECTOR: u64 = 512;
/// The longest serial the get-id request returns.
pub const SERIAL_MAX: usize = VIRTIO_BLK_ID_BYTES as usize;
/// A piece of a request's data in guest memory (with the dirty bitmap's slice: a disk
/// read marks what it writes).
pub type DataSlice<'m> = VolatileSlice<'m, Ram<'m>>;
/// The chain's reader and writer over guest memory.
type Ram<'m> = vm_memory::bitmap::BS<'m, vm_memory::bitmap::AtomicBitmap>;
type ChainReader<'m> = virtio_queue::Reader<'m, Ram<'m>>;
type ChainWriter<'m> = virtio_queue::Writer<'m, Ram<'m>>;

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(kind: u32) -> Self {
        match kind {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }

    /// How `io-error` events name it.
    pub fn name(self) -> &'static str {
        match self {
            RequestType::In => "read",
            RequestType::Out => "write",
            RequestType::Flush => "flush",
            RequestType::GetId => "get-id",
            RequestType::Unsupported(_) => "unsupported",
        }
    }
}

/// A request's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
}

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain has no device-writable byte for the status: nothing can be answered.
    #[error("the request has no room for its status byte")]
    NoStatus,
    /// Fewer than 16 device-readable bytes: no header.
    #[error("the request header is shorter than 16 bytes")]
    ShortHeader,
    /// The chain's buffers are not all in guest memory.
    #[error("the request's buffers are not all in guest memory")]
    BadChain,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("the device is read-only")]
    ReadOnly,
    #[error("{len} bytes at sector {sector} lie past the end ({sectors} sectors)")]
    PastEnd {
        len: usize,
        sector: u64,
        sectors: u64,
    },
    /// The image's host I/O failed, or the guest's buffers could not be copied.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl RequestError {
    /// The status the guest gets.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// Whether this is a failure to report (IOERR with a reason), not a request the
    /// device simply does not do.
    pub fn is_failure(&self) -> bool {
        !matches!(self, RequestError::Unsupported(_))
    }
}

/// What the requests are served from: a raw image, here.
pub trait Disk: Send + Sync {
    /// The capacity in whole sectors.
    fn sectors(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at byte `offset`.
    ///
    /// # Errors
    /// The host's.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at byte `offset`.
    ///
    /// # Errors
    /// The host's.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads into the guest buffers `bufs`, one after the other, from byte `offset`. By
    /// default through [`Disk::read_at`] and a copy; a disk that can do better (a vectored
    /// host read straight into guest memory) says so.
    ///
    /// # Errors
    /// The host's.
    fn read_vectored_at(&self, bufs: &[DataSlice<'_>], mut offset: u64) -> io::Result<()> {
        for buf in bufs {
            let mut bytes = vec![0u8; buf.len()];
            self.read_at(&mut bytes, offset)?;
            buf.copy_from(&bytes);
            offset += buf.len() as u64;
        }
        Ok(())
    }
    /// Writes the guest buffers `bufs`, one after the other, from byte `offset` (by default
    /// through a copy and [`Disk::write_at`]).
    ///
    /// # Errors
    /// The host's.
    fn write_vectored_at(&self, bufs: &[DataSlice<'_>], mut offset: u64) -> io::Result<()> {
        for buf in bufs {
            let mut bytes = vec![0u8; buf.len()];
            buf.copy_to(&mut bytes);
            self.write_at(&bytes, offset)?;
            offset += buf.len() as u64;
        }
        Ok(())
    }
    /// Makes what was written durable.
    ///
    /// # Errors
    /// The host's.
    fn flush(&self) -> io::Result<()>;
}

/// Counters, and the capacity: published beside the transport, so that reading them
/// never waits for a request being served.
#[derive(Debug, Default)]
pub struct BlkStats {
    /// In bytes, while realized.
    pub capacity: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub io_errors: AtomicU64,
}

/// A chain served: the used length, and how it went (the request, if its header could
/// be read, and the error, if it failed).
#[derive(Debug)]
pub struct Served {
    pub used: u32,
    pub request: Option<Request>,
    pub result: Result<(), RequestError>,
}

/// Serves one chain against `disk`: parses its header, executes it, writes the status
/// into the chain's last writable byte, and counts it in `stats`.
pub fn serve(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &dyn Disk,
    serial: &[u8],
    stats: &BlkStats,
) -> Served {
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.clone().writer(mem))
    else {
        return Served {
            used: 0,
            request: None,
            result: Err(RequestError::BadChain),
        };
    };
    if writer.available_bytes() == 0 {
        return Served {
            used: 0,
            request: None,
            result: Err(RequestError::NoStatus),
        };
    }
    let Ok(mut status) = writer.split_at(writer.available_bytes() - 1) else {
        return Served {
            used: 0,
            request: None,
            result: Err(RequestError::NoStatus),
        };
    };
    let (request, result) = match parse(&mut reader) {
        Ok(request) => {
            let data = Data {
                chain: &chain,
                mem,
                readable: reader.available_bytes(),
                writable: writer.available_bytes(),
            };
            (
                Some(request),
                execute(request, &data, &mut writer, disk, serial, stats),
            )
        }
        Err(e) => (None, Err(e)),
    };
    let data_written = match (&result, request.map(|r| r.kind)) {
        (Ok(()), Some(RequestType::In)) => writer.available_bytes(),
        _ => writer.bytes_written(),
    };
    let code = match &result {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(e) => {
            if e.is_failure() {
                stats.io_errors.fetch_add(1, Ordering::Relaxed);
            }
            e.status()
        }
    };
    // The status descriptor was checked writable by the Writer: this cannot fail short.
    let _ = status.write_all(&[code]);
    Served {
        used: (data_written + status.bytes_written()) as u32,
        request,
        result,
    }
}

/// Where a request's data lies: the chain's readable bytes after the header (a write's
/// data), or its writable bytes before the status byte (a read's), as `Reader` and
/// `Writer` counted them.
pub struct Data<'c, 'm> {
    chain: &'c DescriptorChain<&'m GuestMemoryMmap>,
    mem: &'m GuestMemoryMmap,
    /// Readable bytes after the header.
    readable: usize,
    /// Writable bytes before the status byte.
    writable: usize,
}

impl<'m> Data<'_, 'm> {
    /// The guest buffers holding the data: for a read (`device_writes`) the first
    /// `writable` device-writable bytes, else the last `readable` readable bytes before the
    /// first writable descriptor (the header comes first), as guest memory slices (a
    /// buffer across two memory regions is two).
    fn slices(&self, device_writes: bool) -> Result<Vec<DataSlice<'m>>, RequestError> {
        let descriptors = self.chain.clone();
        let pieces: Vec<(GuestAddress, usize)> = if device_writes {
            descriptors
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect()
        } else {
            descriptors
                .take_while(|d| !d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect()
        };
        let total: usize = pieces.iter().map(|p| p.1).sum();
        let (mut skip, mut left) = if device_writes {
            (0, self.writable)
        } else {
            (total.saturating_sub(self.readable), self.readable)
        };
        let mut slices = Vec::new();
        for (addr, len) in pieces {
            if left == 0 {
                break;
            }
            let from = skip.min(len);
            skip -= from;
            let take = (len - from).min(left);
            if take == 0 {
                continue;
            }
            left -= take;
            for slice in self.mem.get_slices(addr.unchecked_add(from as u64), take) {
                slices.push(slice.map_err(|_| RequestError::BadChain)?);
            }
        }
        Ok(slices)
    }
}

/// Reads the request header: type (u32), reserved (u32), sector (u64), little-endian.
///
/// # Errors
/// Fewer than 16 readable bytes.
pub fn parse(reader: &mut ChainReader<'_>) -> Result<Request, RequestError> {
    let mut header = [0u8; 16];
    reader
        .read_exact(&mut header)
        .map_err(|_| RequestError::ShortHeader)?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    Ok(Request {
        kind: RequestType::from_raw(kind),
        sector: u64::from_le_bytes(sector),
    })
}

/// Executes `request`: its data comes from `reader` (writes) or goes to `writer` (reads,
/// get-id); the status byte is not part of either.
///
/// # Errors
/// The request is unsupported, reaches past the end, writes a read-only disk, or the host
/// or the guest's buffers fail.
pub fn execute(
    request: Request,
    data: &Data<'_, '_>,
    writer: &mut ChainWriter<'_>,
    disk: &dyn Disk,
    serial: &[u8],
    stats: &BlkStats,
) -> Result<(), RequestError> {
    let sector = request.sector;
    match request.kind {
        RequestType::In => {
            let len = data.writable;
            let offset = range(disk, sector, len)?;
            let slices = data.slices(true)?;
            disk.read_vectored_at(&slices, offset)?;
            // Written behind vm-memory's back: a dirty bitmap, where guest memory has one
            // (live migration), learns of it here.
            for slice in &slices {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            stats.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
            Ok(())
        }
        RequestType::Out => {
            if disk.read_only() {
                return Err(RequestError::ReadOnly);
            }
            let len = data.readable;
            let offset = range(disk, sector, len)?;
            disk.write_vectored_at(&data.slices(false)?, offset)?;
            stats.written_bytes.fetch_add(len as u64, Ordering::Relaxed);
            Ok(())
        }
        RequestType::Flush => {
            disk.flush()?;
            stats.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        RequestType::GetId => {
            let mut id = [0u8; SERIAL_MAX];
            let n = serial.len().min(SERIAL_MAX);
            id[..n].copy_from_slice(&serial[..n]);
            let n = writer.available_bytes().min(SERIAL_MAX);
            writer.write_all(&id[..n])?;
            Ok(())
        }
        RequestType::Unsupported(kind) => Err(RequestError::Unsupported(kind)),
    }
}

/// Checks `len` bytes from `sector` lie inside the disk; their byte offset.
fn range(disk: &dyn Disk, sector: u64, len: usize) -> Result<u64, RequestError> {
    let end = sector
        .checked_mul(SECTOR)
        .and_then(|start| start.checked_add(len as u64));
    match end {
        Some(end) if end <= disk.sectors() * SECTOR => Ok(sector * SECTOR),
        _ => Err(RequestError::PastEnd {
            len,
            sector,
            sectors: disk.sectors(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    /// A disk in memory, which can be made to fail.
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        read_only: bool,
        fail: Option<io::ErrorKind>,
        flushed: AtomicU64,
    }

    impl MemDisk {
        fn new(sectors: u64) -> Self {
            let data = (0..sectors * SECTOR).map(|i| (i / SECTOR) as u8).collect();
            MemDisk {
                data: Mutex::new(data),
                read_only: false,
                fail: None,
                flushed: AtomicU64::new(0),
            }
        }
        fn check(&self) -> io::Result<()> {
            self.fail.map_or(Ok(()), |k| Err(io::Error::from(k)))
        }
    }

    impl Disk for MemDisk {
        fn sectors(&self) -> u64 {
            self.data.lock().unwrap().len() as u64 / SECTOR
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.check()?;
            let data = self.data.lock().unwrap();
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.check()?;
            let mut data = self.data.lock().unwrap();
            data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.check()?;
            self.flushed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Writes a request header at `HEADER`.
    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Serves the chain of `descs` (address, length, flags) against `disk`.
    fn run(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
        disk: &dyn Disk,
        serial: &[u8],
        stats: &BlkStats,
    ) -> Served {
        let vq = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, flags)| RawDescriptor::from(Descriptor::new(addr, len, flags, 0)))
            .collect();
        let chain = vq.build_desc_chain(&raw).unwrap();
        serve(chain, mem, disk, serial, stats)
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn reads_writes_flushes_and_get_id() {
        let mem = memory();
        let disk = MemDisk::new(8);
        let stats = BlkStats::default();
        // Read sectors 2 and 3 into two buffers.
        header(&mem, VIRTIO_BLK_T_IN, 2);
        let served = run(
            &mem,
            &[
                (HEADER, 16, 0),
                (DATA, 512, W),
                (DATA + 0x1000, 512, W),
                (STATUS, 1, W),
            ],
            &disk,
            b"",
            &stats,
        );
        assert!(served.result.is_ok(), "{served:?}");
        assert_eq!(served.used, 1025);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x1000)).unwrap(), 3);
        assert_eq!(stats.read_bytes.load(Ordering::Relaxed), 1024);

        // Write sector 5.
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 5);
        let served = run(
            &mem,
            &[(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
            &disk,
            b"",
            &stats,
        );
        assert!(served.result.is_ok());
        assert_eq!(served.used, 1);
        assert_eq!(disk.data.lock().unwrap()[5 * 512], 0x5a);
        assert_eq!(stats.written_bytes.load(Ordering::Relaxed), 512);

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let served = run(&mem, &[(HEADER, 16, 0), (STATUS, 1, W)], &disk, b"", &stats);
        assert!(served.result.is_ok());
        assert_eq!(disk.flushed.load(Ordering::Relaxed), 1);
        assert_eq!(stats.flushes.load(Ordering::Relaxed), 1);

        // get-id: the serial, NUL-padded to 20 bytes (or as much as the buffer holds).
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let served = run(
            &mem,
            &[(HEADER, 16, 0), (DATA, 20, W), (STATUS, 1, W)],
            &disk,
            b"SN-1",
            &stats,
        );
        assert!(served.result.is_ok());
        assert_eq!(served.used, 21);
        let mut id = [0xffu8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..4], b"SN-1");
        assert!(id[4..].iter().all(|&b| b == 0));
        assert_eq!(stats.io_errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn data_sharing_a_descriptor_with_the_header_or_the_status_is_found() {
        let mem = memory();
        let disk = MemDisk::new(8);
        let stats = BlkStats::default();
        // A write whose header and data are one 528-byte buffer.
        let mut buffer = vec![0u8; 16 + 512];
        buffer[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        buffer[8..16].copy_from_slice(&6u64.to_le_bytes());
        buffer[16..].fill(0x66);
        mem.write_slice(&buffer, GuestAddress(HEADER)).unwrap();
        let served = run(
            &mem,
            &[(HEADER, 528, 0), (STATUS, 1, W)],
            &disk,
            b"",
            &stats,
        );
        assert!(served.result.is_ok(), "{served:?}");
        assert_eq!(disk.data.lock().unwrap()[6 * 512..7 * 512], [0x66; 512]);
        // A read of sector 1 into a 200-byte piece and a 313-byte one whose last byte is
        // the status.
        header(&mem, VIRTIO_BLK_T_IN, 1);
        let served = run(
            &mem,
            &[(HEADER, 16, 0), (DATA, 200, W), (DATA + 0x1000, 313, W)],
            &disk,
            b"",
            &stats,
        );
        assert!(served.result.is_ok(), "{served:?}");
        assert_eq!(served.used, 513);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 199)).unwrap(), 1);
        let mut got = vec![0u8; 313];
        mem.read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(got[..312], [1; 312], "the rest of sector 1");
        assert_eq!(got[312], VIRTIO_BLK_S_OK as u8, "the status, last");
    }

    #[test]
    fn unsupported_requests_are_answered_unsupp_without_a_failure() {
        let mem = memory();
        let disk = MemDisk::new(8);
        let stats = BlkStats::default();
        header(&mem, 11, 0); // VIRTIO_BLK_T_WRITE_ZEROES, not offered
        let served = run(&mem, &[(HEADER, 16, 0), (STATUS, 1, W)], &disk, b"", &stats);
        assert!(matches!(served.result, Err(RequestError::Unsupported(11))));
        assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(stats.io_errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn past_the_end_read_only_and_host_failures_are_ioerr() {
        let mem = memory();
        let stats = BlkStats::default();
        let disk = MemDisk::new(8);
        // The last sector and one more.
        header(&mem, VIRTIO_BLK_T_IN, 7);
        let served = run(
            &mem,
            &[(HEADER, 16, 0), (DATA, 1024, W), (STATUS, 1, W)],
            &disk,
            b"",
            &stats,
        );
        assert!(matches!(
            served.result,
            Err(RequestError::PastEnd { sector: 7, .. })
        ));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        // A sector number whose byte offset overflows.
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX / 8);
        let served = run(
            &mem,
            &[(HEADER, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
            &disk,
            b"",
            &stats,
        );
        assert!(matches!(served.result, Err(RequestError::PastEnd { .. })));

        let ro = MemDisk {
            read_only: true,
            ..MemDisk::new(8)
        };
        header(&mem, VIRTIO_BLK_T_OUT, 1);
        let served = run(
            &mem,
            &[(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
            &ro,
            b"",
            &stats,
        );
        assert!(matches!(served.result, Err(RequestError::ReadOnly)));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(ro.data.lock().unwrap()[512], 1, "nothing written");

        let broken = MemDisk {
            fail: Some(io::ErrorKind::Other),
            ..MemDisk::new(8)
        };
        for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH] {
            header(&mem, kind, 0);
            let data_flags = if kind == VIRTIO_BLK_T_IN { W } else { 0 };
            let served = run(
                &mem,
                &[(HEADER, 16, 0), (DATA, 512, data_flags), (STATUS, 1, W)],
                &broken,
                b"",
                &stats,
            );
            assert!(matches!(served.result, Err(RequestError::Io(_))), "{kind}");
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        }
        assert_eq!(stats.io_errors.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn bad_and_short_chains_never_panic() {
        let mem = memory();
        let disk = MemDisk::new(8);
        let stats = BlkStats::default();
        // No writable byte at all: nothing can be answered.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let served = run(&mem, &[(HEADER, 16, 0)], &disk, b"", &stats);
        assert!(matches!(served.result, Err(RequestError::NoStatus)));
        assert_eq!(served.used, 0);
        assert_eq!(status(&mem), 0xff, "untouched");
        // A header shorter than 16 bytes: IOERR.
        let served = run(&mem, &[(HEADER, 8, 0), (STATUS, 1, W)], &disk, b"", &stats);
        assert!(matches!(served.result, Err(RequestError::ShortHeader)));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(served.used, 1);
        // A buffer outside guest memory.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let served = run(
            &mem,
            &[(HEADER, 16, 0), (0x4000_0000, 512, W), (STATUS, 1, W)],
            &disk,
            b"",
            &stats,
        );
        assert!(served.result.is_err());
        assert_eq!(served.used, 0);
        // A write whose data is in a device-writable buffer (the guest got it backwards):
        // there is no data to write, and the request is answered all the same.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let served = run(
            &mem,
            &[(HEADER, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
            &disk,
            b"",
            &stats,
        );
        assert!(served.result.is_ok());
        assert_eq!(stats.written_bytes.load(Ordering::Relaxed), 0);
    }
}
