//! The KVM virtual machine: VM and vCPU file descriptors, guest memory, the in-kernel
//! irqchip and PIT, CPUID from the host's supported set, and the register state vCPUs
//! start (and restart on reset) with.

use std::sync::Arc;

use devices::GuestMemoryMmap;
use devices::IrqLine;
use devices::pci::{IrqChip, MsiChip};
use kvm_bindings::{
    CpuId, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY, KvmIrqRouting, Msrs,
    kvm_fpu, kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_pit_state2, kvm_regs,
    kvm_userspace_memory_region, kvm_vcpu_events,
};
use kvm_bindings::{
    KVM_MAX_MSR_ENTRIES, Xsave, kvm_clock_data, kvm_debugregs, kvm_sregs, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootEntry};
use crate::layout::{TSS_ADDR, ram_regions};

/// Errors creating or resetting the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory { size: u64, reason: String },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A request KVM would refuse before it is made (a list or area that cannot be built).
fn invalid(what: &'static str) -> VmError {
    VmError::Kvm {
        what,
        source: kvm_ioctls::Error::new(libc::EINVAL),
    }
}

/// KVM's MSR list of (index, value) pairs, at most `KVM_MAX_MSR_ENTRIES` of them.
fn msr_list(pairs: &[(u32, u64)]) -> Result<Msrs, VmError> {
    let entries: Vec<_> = pairs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| invalid("build MSR list"))
}

/// The state the in-kernel interrupt controllers and PIT had when the VM was created.
struct InitialChips {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

pub struct Vm {
    kvm: Kvm,
    /// Shared with the PCI bus's INTx lines, which raise and lower GSIs from vCPU threads.
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    ram_size: u64,
    cpuid: CpuId,
    chips: InitialChips,
}

/// Level-triggered lines through `KVM_IRQ_LINE` (the IOAPIC pins are active high here;
/// the DSDT's INTx links say so).
struct KvmIrqChip(Arc<VmFd>);

impl IrqChip for KvmIrqChip {
    fn set_level(&self, gsi: u32, level: bool) {
        if let Err(e) = self.0.set_irq_line(gsi, level) {
            tracing::warn!("cannot set GSI {gsi} to {level}: {e}");
        }
    }
}

impl MsiChip for KvmIrqChip {
    fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> std::io::Result<()> {
        // The table replaces KVM's whole default one: the irqchip's routes go first, as KVM
        // sets them up (GSI 0-15 to the PICs and the IOAPIC, 16-23 to the IOAPIC).
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
            e
        };
        let mut entries = Vec::with_capacity(40 + routes.len());
        for gsi in 0..24 {
            if gsi < 8 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for &(gsi, address, data) in routes {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi = kvm_irq_routing_msi {
                address_lo: address as u32,
                address_hi: (address >> 32) as u32,
                data,
                ..Default::default()
            };
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(std::io::Error::other)?;
        self.0
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.0
            .register_irqfd(fd, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.0
            .unregister_irqfd(fd, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Registers eventfds KVM signals on guest MMIO writes (`KVM_IOEVENTFD`, any length, no
/// data match), so that a write there costs the vCPU no exit.
///
/// Taking one away makes KVM wait for an SRCU grace period, which under load here lasts
/// 1-3 ms (it waits for the vCPUs to leave KVM_RUN's read side): an unplug that must answer
/// fast puts it off ([`IoEvents::unregister_later`]) and does it once it has answered
/// ([`IoEvents::flush`]). Every registration does what was put off first, so an address
/// is always free again before anything is registered there.
#[derive(Clone)]
pub struct IoEvents {
    fd: Arc<VmFd>,
    later: Arc<parking_lot::Mutex<Vec<(EventFd, u64)>>>,
}

impl IoEvents {
    /// # Errors
    /// KVM refuses.
    pub fn register(&self, fd: &EventFd, addr: u64) -> Result<(), VmError> {
        let mut later = self.later.lock();
        self.unregister_all(&mut later);
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err("register ioeventfd"))
    }

    /// Undoes [`IoEvents::register`]; an eventfd not registered there is no error.
    pub fn unregister(&self, fd: &EventFd, addr: u64) {
        let _ = self
            .fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch);
    }

    /// Undoes [`IoEvents::register`] at the next [`IoEvents::flush`] or registration,
    /// keeping a duplicate of `fd` (KVM finds the registration by its eventfd) until then.
    /// Where the duplicate cannot be made, it is undone now.
    pub fn unregister_later(&self, fd: &EventFd, addr: u64) {
        match fd.try_clone() {
            Ok(dup) => self.later.lock().push((dup, addr)),
            Err(_) => self.unregister(fd, addr),
        }
    }

    /// Does what [`IoEvents::unregister_later`] put off.
    pub fn flush(&self) {
        let mut later = self.later.lock();
        self.unregister_all(&mut later);
    }

    fn unregister_all(&self, later: &mut Vec<(EventFd, u64)>) {
        for (fd, addr) in later.drain(..) {
            self.unregister(&fd, addr);
        }
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// `/dev/kvm`, opened before the sandbox locks down (see [`Vm::preopen`]).
static PREOPENED: parking_lot::Mutex<Option<Kvm>> = parking_lot::Mutex::new(None);

impl Vm {
    /// Opens `/dev/kvm` now, for a VM created later: a qomu that drops its privileges
    /// (`--run-as`) or limits its files (Landlock) can still create the VM at the first
    /// `cont`. A failure is kept for then: [`Vm::create`] tries again and reports it.
    pub fn preopen() {
        let mut slot = PREOPENED.lock();
        if slot.is_none() {
            *slot = Kvm::new().ok();
        }
    }

    /// Creates the VM with `ram_size` bytes of RAM, the in-kernel irqchip and PIT.
    ///
    /// # Errors
    /// KVM is missing or refuses, or the memory cannot be mapped.
    pub fn create(ram_size: u64) -> Result<Vm, VmError> {
        let preopened = PREOPENED.lock().take();
        let kvm = match preopened {
            Some(kvm) => kvm,
            None => Kvm::new().map_err(VmError::OpenKvm)?,
        };
        let fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        fd.set_tss_address(TSS_ADDR as usize)
            .map_err(kvm_err("set TSS address"))?;
        fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("create PIT"))?;

        let ranges: Vec<_> = ram_regions(ram_size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
            size: ram_size,
            reason: e.to_string(),
        })?;
        for (slot, region) in memory.iter().enumerate() {
            let host = host_address(&memory, region, ram_size)?;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            advise_huge_pages(host, region.len(), true);
            // SAFETY: the region is a live mmap owned by `memory`, which the Vm keeps for
            // as long as the VM fd exists; the slots do not overlap.
            unsafe { fd.set_user_memory_region(mr) }.map_err(kvm_err("register guest memory"))?;
        }

        let irqchips = read_irqchips(&fd)?;
        let pit = fd.get_pit2().map_err(kvm_err("read PIT state"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read supported CPUID"))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            memory,
            ram_size,
            cpuid,
            chips: InitialChips { irqchips, pit },
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Whether guest RAM faults in huge pages from now on (see [`advise_huge_pages`]);
    /// what is mapped stays as it is.
    pub fn huge_pages(&self, on: bool) {
        for region in self.memory.iter() {
            if let Ok(host) = host_address(&self.memory, region, self.ram_size) {
                advise_huge_pages(host, region.len(), on);
            }
        }
    }

    /// Gives guest RAM back to the kernel, zeroed (`MADV_DONTNEED` on the private
    /// anonymous mapping): a live migration's destination starts from zeroed RAM, since the
    /// source skips its zero pages, whatever booting the VM wrote there.
    ///
    /// # Errors
    /// The kernel refuses.
    pub fn discard_ram(&self) -> Result<(), VmError> {
        for region in self.memory.iter() {
            let host = host_address(&self.memory, region, self.ram_size)?;
            // SAFETY: the region's own live mapping, `len` bytes, private and anonymous:
            // MADV_DONTNEED makes it read as zeros. No vCPU runs (the machine is in
            // inmigrate) and no device I/O thread has started.
            if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTNEED) }
                != 0
            {
                return Err(VmError::Memory {
                    size: self.ram_size,
                    reason: std::io::Error::last_os_error().to_string(),
                });
            }
        }
        Ok(())
    }

    /// What a live migration needs of the VM, usable without the machine lock.
    pub fn dirty_tracker(&self) -> DirtyTracker {
        DirtyTracker {
            fd: self.fd.clone(),
            memory: self.memory.clone(),
            ram_size: self.ram_size,
        }
    }

    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// The in-kernel IOAPIC as level-triggered lines (PCI INTx).
    pub fn irqchip(&self) -> Arc<dyn IrqChip> {
        Arc::new(KvmIrqChip(self.fd.clone()))
    }

    /// MSI routing and irqfds, for the PCI bus's MSI-X vectors.
    pub fn msi_chip(&self) -> Arc<dyn MsiChip> {
        Arc::new(KvmIrqChip(self.fd.clone()))
    }

    /// KVM's ioeventfds, for devices to register their notification eventfds on (from any
    /// thread, without the machine lock).
    pub fn ioevents(&self) -> IoEvents {
        IoEvents {
            fd: self.fd.clone(),
            later: Arc::default(),
        }
    }

    /// Connects an interrupt line: its eventfd injects its GSI.
    ///
    /// # Errors
    /// KVM refuses the irqfd.
    pub fn register_irq(&self, line: &IrqLine) -> Result<(), VmError> {
        self.fd
            .register_irqfd(line.eventfd(), line.gsi())
            .map_err(kvm_err("register irqfd"))
    }

    /// Creates vCPU `index` of `count` with its CPUID. It still needs [`Vm::reset_vcpu`].
    ///
    /// # Errors
    /// KVM refuses.
    pub fn create_vcpu(
        &self,
        index: u32,
        count: u32,
    ) -> Result<(VcpuFd, kvm_lapic_state), VmError> {
        let vcpu = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create vCPU"))?;
        vcpu.set_cpuid2(&self.cpuid_for(index, count))
            .map_err(kvm_err("set CPUID"))?;
        let lapic = vcpu.get_lapic().map_err(kvm_err("read LAPIC"))?;
        Ok((vcpu, lapic))
    }

    /// The host's supported CPUID, with this vCPU's APIC ID and the hypervisor bit.
    fn cpuid_for(&self, index: u32, count: u32) -> CpuId {
        let mut cpuid = self.cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (count.min(255) << 16) | (index << 24);
                    e.ecx |= 1 << 31;
                }
                0xb | 0x1f => e.edx = index,
                _ => {}
            }
        }
        cpuid
    }

    /// Puts a vCPU in its power-on state: the boot vCPU in long mode at `entry`, the
    /// others waiting for the boot vCPU's INIT/SIPI.
    ///
    /// # Errors
    /// KVM refuses a register write.
    pub fn reset_vcpu(
        &self,
        vcpu: &VcpuFd,
        index: u32,
        initial_lapic: &kvm_lapic_state,
        entry: BootEntry,
    ) -> Result<(), VmError> {
        vcpu.set_vcpu_events(&kvm_vcpu_events::default())
            .map_err(kvm_err("clear vCPU events"))?;
        let mut lapic = *initial_lapic;
        set_lvt(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        vcpu.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))?;
        vcpu.set_fpu(&kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        })
        .map_err(kvm_err("set FPU"))?;
        let msrs = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        ];
        let set = vcpu
            .set_msrs(&msr_list(&msrs)?)
            .map_err(kvm_err("set MSRs"))?;
        if set != msrs.len() {
            tracing::debug!("vCPU {index}: KVM set {set} of {} boot MSRs", msrs.len());
        }
        if index == 0 {
            let sregs = vcpu
                .get_sregs()
                .map_err(kvm_err("read special registers"))?;
            vcpu.set_sregs(&boot::long_mode_sregs(sregs))
                .map_err(kvm_err("set special registers"))?;
            vcpu.set_regs(&boot::boot_regs(entry))
                .map_err(kvm_err("set registers"))?;
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("set MP state"))?;
        } else {
            vcpu.set_regs(&kvm_regs {
                rflags: 0x2,
                ..Default::default()
            })
            .map_err(kvm_err("set registers"))?;
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(kvm_err("set MP state"))?;
        }
        Ok(())
    }

    /// Puts the PICs, IOAPIC and PIT back in the state they were created in.
    ///
    /// # Errors
    /// KVM refuses.
    pub fn reset_chips(&self) -> Result<(), VmError> {
        for chip in &self.chips.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("reset irqchip"))?;
        }
        self.fd
            .set_pit2(&self.chips.pit)
            .map_err(kvm_err("reset PIT"))
    }
}

/// A vCPU's whole state, as KVM gives it, for a snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// The XSAVE area (KVM_GET_XSAVE2's size), as 32-bit words.
    xsave: Vec<u32>,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<(u32, u64)>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
}

/// The VM-wide in-kernel state: PICs and IOAPIC, PIT, kvmclock.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ChipState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

impl ChipState {
    /// The state with kvmclock at `ns` instead of where it was read.
    pub fn with_clock(mut self, ns: u64) -> ChipState {
        self.clock.clock = ns;
        self
    }
}

/// Words of `kvm_xsave2`'s flexible array for an XSAVE area of `size` bytes.
fn xsave_extra_words(size: usize) -> usize {
    size.saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(std::mem::size_of::<u32>())
}

impl Vm {
    /// An empty XSAVE area of this host's size (KVM_CAP_XSAVE2's, at least the 4 KiB of
    /// KVM_GET_XSAVE).
    fn new_xsave(&self) -> Result<Xsave, VmError> {
        let size = self.fd.check_extension_int(kvm_ioctls::Cap::Xsave2);
        let size = usize::try_from(size)
            .unwrap_or(0)
            .max(std::mem::size_of::<kvm_xsave>());
        Xsave::new(xsave_extra_words(size)).map_err(|_| invalid("size the XSAVE area"))
    }

    /// Reads a paused vCPU's state. Completes an I/O exit the guest is still waiting on
    /// first, so that the saved registers hold its result (KVM's documented way:
    /// `KVM_RUN` with `immediate_exit` set finishes it and returns at once).
    ///
    /// # Errors
    /// KVM refuses a read.
    pub fn save_vcpu(&self, vcpu: &mut VcpuFd) -> Result<VcpuState, VmError> {
        vcpu.set_kvm_immediate_exit(1);
        let finished = vcpu.run().map(drop);
        vcpu.set_kvm_immediate_exit(0);
        if let Err(e) = finished
            && e.errno() != libc::EINTR
        {
            return Err(kvm_err("finish pending I/O")(e));
        }
        let mut xsave = self.new_xsave()?;
        // SAFETY: `xsave` was allocated for the size KVM_CAP_XSAVE2 reports, which is what
        // KVM_GET_XSAVE2 writes.
        unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(kvm_err("read XSAVE"))?;
        let mut words: Vec<u32> = xsave.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm_err("read registers"))?,
            sregs: vcpu
                .get_sregs()
                .map_err(kvm_err("read special registers"))?,
            xsave: words,
            xcrs: vcpu.get_xcrs().map_err(kvm_err("read XCRs"))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("read LAPIC"))?,
            msrs: self.read_msrs(vcpu)?,
            mp_state: vcpu.get_mp_state().map_err(kvm_err("read MP state"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("read vCPU events"))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("read debug registers"))?,
        })
    }

    /// Every MSR KVM lists that this vCPU lets us read.
    fn read_msrs(&self, vcpu: &VcpuFd) -> Result<Vec<(u32, u64)>, VmError> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("list MSRs"))?;
        let mut out = Vec::new();
        let mut rest: &[u32] = list.as_slice();
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let indices: Vec<_> = chunk.iter().map(|&index| (index, 0)).collect();
            let mut msrs = msr_list(&indices)?;
            let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("read MSRs"))?;
            out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
            // KVM stops at the first MSR it cannot read: skip that one and go on.
            rest = rest.get(read + 1..).unwrap_or_default();
        }
        Ok(out)
    }

    /// Puts a saved state into a vCPU of a new VM (before it first runs).
    ///
    /// # Errors
    /// KVM refuses a write, or the state does not fit this host.
    pub fn load_vcpu(&self, vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VmError> {
        vcpu.set_regs(&state.regs)
            .map_err(kvm_err("set registers"))?;
        let base = std::mem::size_of::<kvm_xsave>() / 4;
        if state.xsave.len() < base {
            return Err(invalid("load a saved XSAVE area shorter than 4 KiB"));
        }
        let mut xsave = self.new_xsave()?;
        if state.xsave.len() - base > xsave.as_slice().len() {
            return Err(invalid("load a saved XSAVE area larger than this host's"));
        }
        // SAFETY: as_mut_fam_struct gives the header; `len` is not changed.
        unsafe { xsave.as_mut_fam_struct() }
            .xsave
            .region
            .copy_from_slice(&state.xsave[..base]);
        xsave.as_mut_slice()[..state.xsave.len() - base].copy_from_slice(&state.xsave[base..]);
        // SAFETY: the area has the size KVM_CAP_XSAVE2 reports, which KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave2(&xsave) }.map_err(kvm_err("set XSAVE"))?;
        vcpu.set_xcrs(&state.xcrs).map_err(kvm_err("set XCRs"))?;
        vcpu.set_sregs(&state.sregs)
            .map_err(kvm_err("set special registers"))?;
        vcpu.set_lapic(&state.lapic).map_err(kvm_err("set LAPIC"))?;
        let mut rest: &[(u32, u64)] = &state.msrs;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let set = vcpu
                .set_msrs(&msr_list(chunk)?)
                .map_err(kvm_err("set MSRs"))?;
            if set < chunk.len() {
                tracing::debug!("KVM refused saved MSR {:#x}", chunk[set].0);
            }
            rest = rest.get(set + 1..).unwrap_or_default();
        }
        vcpu.set_mp_state(state.mp_state)
            .map_err(kvm_err("set MP state"))?;
        vcpu.set_vcpu_events(&state.events)
            .map_err(kvm_err("set vCPU events"))?;
        vcpu.set_debug_regs(&state.debugregs)
            .map_err(kvm_err("set debug registers"))?;
        Ok(())
    }

    /// A vCPU's general and special registers (pause it first).
    ///
    /// # Errors
    /// KVM refuses.
    pub fn registers(&self, vcpu: &VcpuFd) -> Result<(kvm_regs, kvm_sregs), VmError> {
        Ok((
            vcpu.get_regs().map_err(kvm_err("read registers"))?,
            vcpu.get_sregs()
                .map_err(kvm_err("read special registers"))?,
        ))
    }

    /// kvmclock, in ns (KVM_GET_CLOCK).
    ///
    /// # Errors
    /// KVM refuses.
    pub fn clock_ns(&self) -> Result<u64, VmError> {
        Ok(self.fd.get_clock().map_err(kvm_err("read kvmclock"))?.clock)
    }

    /// Sets kvmclock to `ns` (KVM_SET_CLOCK); it counts on from there.
    ///
    /// # Errors
    /// KVM refuses.
    pub fn set_clock_ns(&self, ns: u64) -> Result<(), VmError> {
        let clock = kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(kvm_err("set kvmclock"))
    }

    /// Reads the interrupt controllers, the PIT and kvmclock.
    ///
    /// # Errors
    /// KVM refuses.
    pub fn save_chips(&self) -> Result<ChipState, VmError> {
        Ok(ChipState {
            irqchips: read_irqchips(&self.fd)?,
            pit: self.fd.get_pit2().map_err(kvm_err("read PIT state"))?,
            clock: self.fd.get_clock().map_err(kvm_err("read kvmclock"))?,
        })
    }

    /// Loads what [`Vm::save_chips`] read. kvmclock continues from the saved value: the
    /// guest does not see the time the VM spent saved.
    ///
    /// # Errors
    /// KVM refuses.
    pub fn load_chips(&self, state: &ChipState) -> Result<(), VmError> {
        for chip in &state.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("set irqchip state"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("set PIT state"))?;
        self.set_clock_ns(state.clock.clock)
    }
}

/// The state of the PICs and the IOAPIC.
fn read_irqchips(fd: &VmFd) -> Result<Vec<kvm_irqchip>, VmError> {
    [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ]
    .into_iter()
    .map(|chip_id| {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip)
            .map_err(kvm_err("read irqchip state"))?;
        Ok(chip)
    })
    .collect()
}

fn set_lvt(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = lapic.regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// KVM's dirty log of a VM's RAM slots and the devices' dirty bitmap, for a live
/// migration's passes.
pub struct DirtyTracker {
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    ram_size: u64,
}

impl DirtyTracker {
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Registers every RAM slot again with KVM's dirty logging on or off (the flags alone
    /// change; KVM splits huge pages while it logs, so it is on only for a migration).
    /// Turning it on also clears the devices' dirty bitmap: from now on both say what
    /// changed.
    ///
    /// # Errors
    /// KVM refuses a slot (the ones before it stay as they are now).
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let host = host_address(&self.memory, region, self.ram_size)?;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            };
            // SAFETY: the same slot, mapping and size as registered at creation; only the
            // flags change.
            unsafe { self.fd.set_user_memory_region(mr) }
                .map_err(kvm_err("change dirty logging"))?;
            if on {
                (**region).bitmap().reset();
            }
        }
        Ok(())
    }

    /// The pages written since the last call (or since logging went on), per RAM region in
    /// order: KVM's log of the vCPUs' writes ORed with the devices' bitmap, one bit per
    /// 4 KiB page; both are reset.
    ///
    /// # Errors
    /// KVM refuses the log.
    pub fn take_dirty(&self) -> Result<Vec<Vec<u64>>, VmError> {
        let mut out = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let mut bits = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm_err("read the dirty log"))?;
            let devices = (**region).bitmap().get_and_reset();
            for (b, d) in bits.iter_mut().zip(devices) {
                *b |= d;
            }
            out.push(bits);
        }
        Ok(out)
    }
}

/// Where RAM region `region` of `memory` is mapped in this process.
fn host_address(
    memory: &GuestMemoryMmap,
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
    ram_size: u64,
) -> Result<*mut u8, VmError> {
    memory
        .get_host_address(region.start_addr())
        .map_err(|e| VmError::Memory {
            size: ram_size,
            reason: e.to_string(),
        })
}

/// Transparent huge pages for the `len` bytes of guest RAM at `host`, where the host allows
/// them (as QEMU asks for guest RAM): fewer page faults and TLB misses for the guest, and
/// RAM restored from a snapshot fills 2 MiB at a time. Off: faults take 4 KiB pages (a live
/// migration's last pass, where a 2 MiB fault would lengthen the downtime). Only advice: a
/// refusal changes nothing.
fn advise_huge_pages(host: *mut u8, len: u64, on: bool) {
    let advice = if on {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: madvise on a live mapping of guest RAM, `len` bytes long; advice only.
    unsafe {
        libc::madvise(host.cast(), len as usize, advice);
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::Vm;

    /// A VM, or None where /dev/kvm cannot be used and neither CI nor QOMU_REQUIRE_KVM
    /// demands it (the skip says why). The rule is qomu_tests::skips_are_failures', which
    /// this crate cannot call (qomu-tests depends on it).
    fn vm() -> Option<Vm> {
        match Vm::create(2 << 20) {
            Ok(vm) => Some(vm),
            Err(e) => {
                let set = |name: &str| {
                    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
                };
                let required = set("CI") || set("QOMU_REQUIRE_KVM");
                assert!(!required, "KVM is required here: {e}");
                eprintln!("SKIPPED: no VM ({e})");
                None
            }
        }
    }

    /// An ioeventfd taken away later still frees its address before the next
    /// registration there, which KVM would refuse while the old one stands.
    #[test]
    fn a_put_off_teardown_frees_its_address_before_the_next_registration() {
        let Some(vm) = vm() else { return };
        let io = vm.ioevents();
        let at = 0xd000_0000;
        let (a, b) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        io.register(&a, at).unwrap();
        assert!(io.register(&b, at).is_err(), "KVM took two at one address");
        io.unregister_later(&a, at);
        // The duplicate kept for later is what KVM finds the registration by.
        drop(a);
        io.register(&b, at)
            .expect("the teardown put off went first");
        io.unregister_later(&b, at);
        io.flush();
        let c = EventFd::new(EFD_NONBLOCK).unwrap();
        io.register(&c, at).expect("flushed");
        io.unregister(&c, at);
    }
}
