//! Guest RAM in a live migration's passes: the pages to send, as runs in `pages:` sections
//! of the snapshot stream, and their loading at the destination.
//!
//! A `pages:PASS:N` section's payload is a sequence of runs, each `gpa` (u64 LE), `count`
//! (u32 LE, pages of 4 KiB) and the pages' bytes. The first pass sends every page that is not
//! all zeros (the destination's RAM starts zeroed; zero pages count as `duplicate`, as
//! QEMU's); later passes send every page written since the pass before, zero or not.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::snapshot::Writer;
use devices::GuestMemoryMmap;

pub const PAGE: usize = 4096;
/// The error a pass ends with when `migrate_cancel` asked it to.
pub const CANCELLED: &str = "the migration was cancelled";
/// Bytes of pages per section (a section is checked whole at the destination).
const SECTION_BYTES: usize = 4 << 20;

/// What one pass sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

/// Pages of a bitmap (one bit per page) that are set.
pub fn count(bits: &[Vec<u64>]) -> u64 {
    bits.iter()
        .flat_map(|r| r.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// ORs `more` into `into`, region by region.
pub fn merge(into: &mut [Vec<u64>], more: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(more) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// The indices of the bits set in `words` (bit `i % 64` of word `i / 64`), in order.
fn set_bits(words: &[u64]) -> impl Iterator<Item = usize> + '_ {
    words.iter().enumerate().flat_map(|(w, &word)| {
        let mut left = word;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let bit = left.trailing_zeros() as usize;
            left &= left - 1;
            Some(w * 64 + bit)
        })
    })
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()) == 0)
}

/// Builds `pages:` sections of one pass and writes them as they fill.
struct Sections<'w> {
    w: &'w mut Writer,
    pass: u32,
    index: u32,
    buf: Vec<u8>,
    /// Where the open run's header is in `buf`, its first page and its page count.
    run: Option<(usize, u64, u32)>,
    started: std::time::Instant,
    sent: u64,
    bandwidth: u64,
    cancel: &'w std::sync::atomic::AtomicBool,
}

impl Sections<'_> {
    fn page(&mut self, gpa: u64, data: &[u8]) -> std::io::Result<()> {
        match &mut self.run {
            Some((_, first, n)) if *first + u64::from(*n) * PAGE as u64 == gpa => *n += 1,
            _ => {
                self.close_run();
                let at = self.buf.len();
                self.buf.extend_from_slice(&gpa.to_le_bytes());
                self.buf.extend_from_slice(&0u32.to_le_bytes());
                self.run = Some((at, gpa, 1));
            }
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SECTION_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn close_run(&mut self) {
        if let Some((at, _, n)) = self.run.take() {
            self.buf[at + 8..at + 12].copy_from_slice(&n.to_le_bytes());
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.close_run();
        if self.buf.is_empty() {
            return Ok(());
        }
        let name = format!("pages:{}:{}", self.pass, self.index);
        self.index += 1;
        if self.cancel.load(std::sync::atomic::Ordering::Acquire) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                CANCELLED,
            ));
        }
        self.w.section(&name, &[&self.buf])?;
        self.sent += self.buf.len() as u64;
        self.buf.clear();
        // Ahead of the bandwidth allowed: wait until the average comes down to it.
        if self.bandwidth != u64::MAX && self.bandwidth > 0 {
            let due = std::time::Duration::from_secs_f64(self.sent as f64 / self.bandwidth as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

/// Sends pass `pass` of `memory`'s pages: every non-zero page when `dirty` is None (the
/// first pass), else every page `dirty` marks; at most `bandwidth` bytes a second
/// (QEMU's `max-bandwidth`), waiting between sections when ahead; `cancel` stops it
/// between sections.
///
/// # Errors
/// A write fails.
pub fn send(
    w: &mut Writer,
    memory: &GuestMemoryMmap,
    dirty: Option<&[Vec<u64>]>,
    pass: u32,
    bandwidth: u64,
    cancel: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Sent> {
    let mut out = Sections {
        w,
        pass,
        index: 0,
        buf: Vec::with_capacity(SECTION_BYTES + PAGE + 12),
        run: None,
        started: std::time::Instant::now(),
        sent: 0,
        bandwidth,
        cancel,
    };
    let mut sent = Sent::default();
    let mut page = vec![0u8; PAGE];
    for (r, region) in memory.iter().enumerate() {
        let start = region.start_addr().0;
        let pages = region.len() as usize / PAGE;
        let wanted: Box<dyn Iterator<Item = usize>> = match dirty {
            None => Box::new(0..pages),
            // The set bits only, a word at a time: a final pass finds its few pages in a
            // 1 GiB guest's 256 Ki bits in microseconds, not the 0.2 ms a test of every bit
            // took (all of it downtime).
            Some(d) => {
                Box::new(set_bits(d.get(r).map_or(&[][..], |b| b)).take_while(move |&i| i < pages))
            }
        };
        for i in wanted {
            let gpa = start + (i * PAGE) as u64;
            // A copy, read through vm-memory: the guest may be writing it meanwhile (it is
            // then dirty again and goes in a later pass).
            if vm_memory::Bytes::read_slice(memory, &mut page, GuestAddress(gpa)).is_err() {
                continue;
            }
            if dirty.is_none() && is_zero(&page) {
                sent.zero_pages += 1;
                continue;
            }
            out.page(gpa, &page)?;
            sent.pages += 1;
            sent.bytes += PAGE as u64;
        }
    }
    out.flush()?;
    Ok(sent)
}

/// Writes a `pages:` section's runs into guest RAM at the destination.
///
/// # Errors
/// A run that is cut short or lies outside guest RAM: the stream is corrupted.
pub fn load(memory: &GuestMemoryMmap, payload: &[u8]) -> Result<(), String> {
    let mut at = 0;
    while at < payload.len() {
        let head = payload
            .get(at..at + 12)
            .ok_or_else(|| "a run's header is cut short".to_owned())?;
        let gpa = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let n = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default()) as usize;
        let len = n
            .checked_mul(PAGE)
            .ok_or_else(|| "a run's length overflows".to_owned())?;
        let data = payload
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| format!("the run at {gpa:#x} is cut short"))?;
        vm_memory::Bytes::write_slice(memory, data, GuestAddress(gpa))
            .map_err(|_| format!("pages at {gpa:#x} ({n} of them) are not guest RAM here"))?;
        at += 12 + len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * PAGE),
            (GuestAddress(1 << 20), 16 * PAGE),
        ])
        .unwrap()
    }

    fn sections(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut r =
            crate::snapshot::Reader::stream("test", Box::new(std::io::Cursor::new(bytes.to_vec())))
                .unwrap();
        let mut out = Vec::new();
        loop {
            let (name, payload) = r.next("x").unwrap();
            if name == "end" {
                return out;
            }
            out.push((name, payload));
        }
    }

    /// A writer into a shared buffer, and the buffer.
    fn writer() -> (Writer, std::sync::Arc<parking_lot::Mutex<Vec<u8>>>) {
        #[derive(Clone)]
        struct Shared(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        (Writer::stream(Box::new(Shared(buf.clone()))).unwrap(), buf)
    }

    #[test]
    fn the_first_pass_skips_zero_pages_and_later_ones_send_what_is_marked() {
        let src = memory();
        vm_memory::Bytes::write_slice(&src, &[7u8; PAGE], GuestAddress(3 * PAGE as u64)).unwrap();
        vm_memory::Bytes::write_slice(&src, &[8u8; 2 * PAGE], GuestAddress(4 * PAGE as u64))
            .unwrap();
        vm_memory::Bytes::write_slice(&src, &[9u8; 10], GuestAddress((1 << 20) + 5)).unwrap();
        let (mut w, buf) = writer();
        let sent = send(&mut w, &src, None, 1, u64::MAX, &Default::default()).unwrap();
        assert_eq!((sent.pages, sent.zero_pages), (4, 76));
        // Page 4 changes and page 10 becomes written, then zero again: both go, as marked.
        vm_memory::Bytes::write_slice(&src, &[1u8; PAGE], GuestAddress(4 * PAGE as u64)).unwrap();
        let mut dirty = vec![vec![0u64; 1], vec![0u64; 1]];
        dirty[0][0] = (1 << 4) | (1 << 10);
        let sent = send(&mut w, &src, Some(&dirty), 2, u64::MAX, &Default::default()).unwrap();
        assert_eq!((sent.pages, sent.zero_pages), (2, 0));
        w.finish().unwrap();
        let dst = memory();
        let got = sections(&buf.lock());
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["pages:1:0", "pages:2:0"]);
        for (_, payload) in &got {
            load(&dst, payload).unwrap();
        }
        let mut page = vec![0u8; PAGE];
        for (gpa, want) in [
            (3 * PAGE, 7u8),
            (4 * PAGE, 1),
            (5 * PAGE, 8),
            (10 * PAGE, 0),
        ] {
            vm_memory::Bytes::read_slice(&dst, &mut page, GuestAddress(gpa as u64)).unwrap();
            assert!(page.iter().all(|&b| b == want), "page at {gpa:#x}");
        }
        vm_memory::Bytes::read_slice(&dst, &mut page[..10], GuestAddress((1 << 20) + 5)).unwrap();
        assert_eq!(&page[..10], &[9u8; 10]);
    }

    #[test]
    fn set_bits_are_found_in_order_across_words() {
        let words = [0b1011, 0, 1 << 63, u64::MAX];
        let found: Vec<usize> = set_bits(&words).collect();
        let mut expected = vec![0, 1, 3, 191];
        expected.extend(192..256);
        assert_eq!(found, expected);
        assert_eq!(set_bits(&[0, 0]).count(), 0);
    }

    #[test]
    fn runs_outside_ram_or_cut_short_are_refused() {
        let dst = memory();
        let mut bad = (1u64 << 40).to_le_bytes().to_vec();
        bad.extend_from_slice(&1u32.to_le_bytes());
        bad.extend_from_slice(&[0u8; PAGE]);
        assert!(load(&dst, &bad).unwrap_err().contains("not guest RAM"));
        let mut short = 0u64.to_le_bytes().to_vec();
        short.extend_from_slice(&2u32.to_le_bytes());
        short.extend_from_slice(&[0u8; PAGE]);
        assert!(load(&dst, &short).unwrap_err().contains("cut short"));
        assert!(load(&dst, &[1, 2, 3]).unwrap_err().contains("cut short"));
    }
}
