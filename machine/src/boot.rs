//! Booting: load a kernel (64-bit ELF such as Linux `vmlinux` or the test guests, or a
//! Linux `bzImage`) with its initrd and command line, write the Linux zero page, identity
//! page tables and a GDT, and compute the registers the boot vCPU starts with (long mode,
//! `rip` at the kernel's 64-bit entry, `rsi` at the zero page).

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

use crate::layout::*;

/// Errors of loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open '{path}': {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{0}' is neither a 64-bit ELF kernel nor a bzImage")]
    UnknownFormat(String),
    #[error("cannot load kernel '{path}': {source}")]
    Kernel { path: String, source: loader::Error },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("initrd '{path}' ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read initrd '{path}': {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("guest memory: {0}")]
    Memory(String),
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    File(PathBuf),
    /// An image built into qomu (the demo guest).
    Builtin {
        name: &'static str,
        image: &'static [u8],
    },
}

impl KernelSource {
    fn describe(&self) -> String {
        match self {
            KernelSource::File(p) => p.display().to_string(),
            KernelSource::Builtin { name, .. } => format!("(built-in {name})"),
        }
    }
}

/// A kernel, its initrd and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Where the loaded guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub rip: u64,
}

/// Loads the kernel image; returns the loader's result and the 64-bit entry point.
fn load_kernel<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    what: &str,
) -> Result<(loader::KernelLoaderResult, u64), BootError> {
    let mut magic = [0u8; 4];
    if image
        .read_exact(&mut magic)
        .and_then(|()| image.seek(SeekFrom::Start(0)))
        .is_err()
    {
        return Err(BootError::UnknownFormat(what.to_owned()));
    }
    let kernel_err = |source| BootError::Kernel {
        path: what.to_owned(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, image, himem).map_err(kernel_err)?;
        let rip = r.kernel_load.0;
        Ok((r, rip))
    } else {
        let r = BzImage::load(mem, None, image, himem).map_err(|e| match e {
            loader::Error::Bzimage(linux_loader::loader::bzimage::Error::InvalidBzImage) => {
                BootError::UnknownFormat(what.to_owned())
            }
            e => kernel_err(e),
        })?;
        // The 64-bit entry point of the boot protocol is 0x200 past the load address.
        let rip = r.kernel_load.0 + 0x200;
        Ok((r, rip))
    }
}

/// Loads everything into `mem` (RAM of `ram_size` bytes) and writes the zero page.
/// `rsdp` is the ACPI RSDP's address, handed to Linux in the zero page.
///
/// # Errors
/// The kernel or initrd cannot be read, has an unknown format, or does not fit.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    config: &BootConfig,
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    let what = config.kernel.describe();
    let (result, rip) = match &config.kernel {
        KernelSource::File(path) => {
            let mut file = File::open(path).map_err(|source| BootError::Open {
                path: path.clone(),
                source,
            })?;
            load_kernel(mem, &mut file, &what)?
        }
        KernelSource::Builtin { image, .. } => load_kernel(mem, &mut Cursor::new(*image), &what)?,
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&config.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = config.cmdline.len() as u32 + 1;
    params.acpi_rsdp_addr = rsdp;

    if let Some(path) = &config.initrd {
        let (addr, size) = load_initrd(
            mem,
            ram_size,
            path,
            result.kernel_end,
            params.hdr.initrd_addr_max,
        )?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = e820_map(ram_size);
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| BootError::Memory(e.to_string()))?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(BootEntry { rip })
}

/// The e820 map: RAM, the EBDA/BIOS hole (with the ACPI tables) reserved, RAM above 1 MiB
/// and above 4 GiB.
pub fn e820_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    const RAM: u32 = 1;
    const RESERVED: u32 = 2;
    let mut map = vec![
        (0, EBDA_START, RAM),
        (EBDA_START, HIMEM_START - EBDA_START, RESERVED),
    ];
    for (start, size) in ram_regions(ram_size) {
        if start == 0 {
            map.push((HIMEM_START, size - HIMEM_START, RAM));
        } else {
            map.push((start, size, RAM));
        }
    }
    map
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    path: &Path,
    kernel_end: u64,
    addr_max: u32,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: path.to_owned(),
        source,
    })?;
    let size = file.seek(SeekFrom::End(0)).map_err(|e| BootError::Initrd {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::Initrd {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let low_end = ram_regions(ram_size)[0].1;
    let max = if addr_max == 0 {
        0x37ff_ffff
    } else {
        u64::from(addr_max)
    };
    let limit = low_end.min(max + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START));
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::Initrd {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |e: vm_memory::GuestMemoryError| BootError::Memory(e.to_string());
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    for dir in 0..4u64 {
        let pd = PD_ADDR + dir * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + dir * 8))
            .map_err(err)?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((dir * 512 + i) << 21) | 0x83).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd)).map_err(err)?;
    }
    Ok(())
}

/// A GDT descriptor from flags, base and limit (the packed x86 encoding).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// Null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let bytes: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(GDT_ADDR))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|e| BootError::Memory(e.to_string()))
}

/// The segment register KVM wants for GDT entry `index`.
fn segment(index: usize) -> kvm_segment {
    let e = GDT[index];
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = (((e >> 32) & 0x000f_0000) | (e & 0xffff)) as u32;
    let present = ((e >> 47) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 0x3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Long mode with paging on, on top of the vCPU's current special registers.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let (code, data, tss) = (segment(1), segment(2), segment(3));
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// The boot vCPU's general registers.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    kvm_regs {
        rip: entry.rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(1);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.s, cs.type_, cs.selector),
            (1, 0, 1, 1, 0xb, 8)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(2);
        assert_eq!((ds.l, ds.db, ds.type_, ds.selector), (0, 1, 0x3, 16));
    }

    #[test]
    fn e820_reserves_the_bios_area() {
        let map = e820_map(256 << 20);
        assert_eq!(map[0], (0, EBDA_START, 1));
        assert_eq!(map[1].2, 2);
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, 1));
        assert_eq!(e820_map(4 << 30).last(), Some(&(4 << 30, 1 << 30, 1)));
    }

    #[test]
    fn loads_the_demo_guest_and_writes_the_zero_page() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let config = BootConfig {
            kernel: KernelSource::Builtin {
                name: "demo",
                image: qomu_guests::DEMO,
            },
            initrd: None,
            cmdline: "console=ttyS0 exit=3".into(),
        };
        let entry = load(&mem, 64 << 20, &config, ACPI_START).unwrap();
        assert_eq!(entry.rip, HIMEM_START);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(params.e820_entries, 3);
        let mut cmd = [0u8; 20];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 exit=3");
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
    }

    #[test]
    fn unknown_formats_and_missing_files_are_clear_errors() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let bad = BootConfig {
            kernel: KernelSource::Builtin {
                name: "junk",
                image: &[0u8; 4096],
            },
            initrd: None,
            cmdline: String::new(),
        };
        assert!(matches!(
            load(&mem, 16 << 20, &bad, 0),
            Err(BootError::UnknownFormat(_))
        ));
        let missing = BootConfig {
            kernel: KernelSource::File("/nonexistent/kernel".into()),
            initrd: None,
            cmdline: String::new(),
        };
        let err = load(&mem, 16 << 20, &missing, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot open '/nonexistent/kernel': No such file or directory (os error 2)"
        );
    }
}
