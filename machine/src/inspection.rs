//! Reading the guest from outside: its vCPUs' registers and threads, its memory (physical
//! and as a vCPU translates it), its kvmclock. What clients poll reads published copies
//! and never waits for the machine lock (status.rs); dumps read guest RAM without it.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use devices::GuestMemoryMmap;
use qom::Value;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::launch::Launched;
use crate::lifecycle::{pause_all, resume_all};
use crate::machine::Machine;
use crate::runstate::RunState;

impl Machine {
    /// Runs `f` with every vCPU paused (pausing them briefly if the guest runs; no event).
    fn with_vcpus_paused<T>(&self, f: impl FnOnce(&Launched) -> Result<T>) -> Result<T> {
        let st = self.state.lock();
        let Some(l) = &st.launched else {
            return Err(Error::NotStarted {
                what: "its vCPUs and memory do not exist",
            });
        };
        let running = st.run == RunState::Running;
        if running {
            pause_all(&st);
        }
        let result = f(l);
        if running {
            resume_all(&st);
        }
        result
    }

    /// Guest RAM, which exists once the machine has started.
    fn guest_ram(&self) -> Result<&GuestMemoryMmap> {
        self.memory.get().ok_or(Error::NotStarted {
            what: "its memory does not exist",
        })
    }

    /// The host thread id of a vCPU, or -1.
    pub fn vcpu_thread_id(&self, index: u32) -> i64 {
        self.published
            .vcpus()
            .iter()
            .find(|v| v.index == index)
            .map_or(-1, |v| v.thread_id)
    }

    /// vCPU `index`'s TSC rate in Hz as KVM runs it, 0 before launch (QEMU's
    /// `tsc-frequency`).
    pub fn vcpu_tsc_hz(&self, index: u32) -> u64 {
        self.published
            .vcpus()
            .iter()
            .find(|v| v.index == index)
            .map_or(0, |v| u64::from(v.tsc_khz) * 1000)
    }

    /// kvmclock now, in ns, as KVM_GET_CLOCK reads it: it stands still while the guest is
    /// stopped (docs/machine.md, "Run states").
    ///
    /// # Errors
    /// The machine has not started, or KVM refuses.
    pub fn guest_clock_ns(&self) -> Result<u64> {
        let st = self.state.lock();
        let l = st.launched.as_ref().ok_or(Error::NotStarted {
            what: "its clock does not exist",
        })?;
        Ok(l.vm.clock_ns()?)
    }

    /// The registers of every vCPU, as `query-cpus` shows them.
    ///
    /// # Errors
    /// The machine has not started, or KVM refuses to read them.
    pub fn query_cpus(&self) -> Result<Vec<Value>> {
        self.with_vcpus_paused(|l| {
            let mut out = Vec::new();
            for v in &l.vcpus {
                let (regs, sregs) = l.vm.registers(&v.fd().lock())?;
                let r = [
                    ("rax", regs.rax),
                    ("rbx", regs.rbx),
                    ("rcx", regs.rcx),
                    ("rdx", regs.rdx),
                    ("rsi", regs.rsi),
                    ("rdi", regs.rdi),
                    ("rsp", regs.rsp),
                    ("rbp", regs.rbp),
                    ("r8", regs.r8),
                    ("r9", regs.r9),
                    ("r10", regs.r10),
                    ("r11", regs.r11),
                    ("r12", regs.r12),
                    ("r13", regs.r13),
                    ("r14", regs.r14),
                    ("r15", regs.r15),
                    ("rip", regs.rip),
                    ("rflags", regs.rflags),
                    ("cr0", sregs.cr0),
                    ("cr2", sregs.cr2),
                    ("cr3", sregs.cr3),
                    ("cr4", sregs.cr4),
                    ("efer", sregs.efer),
                ];
                out.push(Value::map([
                    ("cpu-index", Value::UInt(v.index().into())),
                    (
                        "qom-path",
                        Value::Str(format!("/machine/unattached/cpu[{}]", v.index())),
                    ),
                    ("thread-id", Value::Int(v.thread_id())),
                    ("registers", Value::map(r.map(|(n, v)| (n, Value::UInt(v))))),
                ]));
            }
            Ok(out)
        })
    }

    /// `query-cpus-fast`: each vCPU's index, QOM path and host thread (once started). Never
    /// waits for the machine lock.
    pub fn query_cpus_fast(&self) -> Vec<Value> {
        self.published
            .vcpus()
            .iter()
            .map(|v| {
                Value::map([
                    ("cpu-index", Value::UInt(v.index.into())),
                    (
                        "qom-path",
                        Value::Str(format!("/machine/unattached/cpu[{}]", v.index)),
                    ),
                    ("thread-id", Value::Int(v.thread_id)),
                    ("target", Value::Enum("x86_64".into())),
                    (
                        "props",
                        Value::map([
                            ("socket-id", Value::Int(v.index.into())),
                            ("core-id", Value::Int(0)),
                            ("thread-id", Value::Int(0)),
                        ]),
                    ),
                ])
            })
            .collect()
    }

    /// `pmemsave`: writes guest physical memory `[addr, addr+size)` to `path`. Guest RAM is
    /// read without the machine lock: a large dump holds up no transition.
    ///
    /// # Errors
    /// The range is not RAM, the file cannot be written, or the machine has not started.
    pub fn pmemsave(&self, addr: u64, size: u64, path: &Path) -> Result<()> {
        let mem = self.guest_ram()?;
        let invalid = || Error::BadAddress {
            addr,
            size: Some(size),
        };
        let end = addr.checked_add(size).ok_or_else(invalid)?;
        let mut file = create(path)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = addr;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            mem.read_slice(&mut buf[..n], GuestAddress(at))
                .map_err(|_| invalid())?;
            write(&mut file, path, &buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// `memsave`: writes guest virtual memory `[addr, addr+size)` as vCPU `cpu` sees it.
    ///
    /// # Errors
    /// An address does not translate, the vCPU does not exist, or the file cannot be
    /// written.
    pub fn memsave(&self, addr: u64, size: u64, path: &Path, cpu: u32) -> Result<()> {
        let physical = self.with_vcpus_paused(|l| {
            let v = l
                .vcpus
                .get(cpu as usize)
                .ok_or(Error::NoSuchCpu { index: cpu })?;
            let fd = v.fd().lock();
            let end = addr
                .checked_add(size)
                .ok_or(Error::BadAddress { addr, size: None })?;
            let mut pieces = Vec::new();
            let mut at = addr;
            while at < end {
                let page_end = ((at | 0xfff) + 1).min(end);
                match fd.translate_gva(at) {
                    Ok(t) if t.valid != 0 => pieces.push((t.physical_address, page_end - at)),
                    _ => {
                        return Err(Error::BadAddress {
                            addr: at,
                            size: None,
                        });
                    }
                }
                at = page_end;
            }
            Ok(pieces)
        })?;
        let mem = self.guest_ram()?;
        let mut file = create(path)?;
        for (phys, len) in physical {
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(phys))
                .map_err(|_| Error::BadAddress {
                    addr: phys,
                    size: None,
                })?;
            write(&mut file, path, &buf)?;
        }
        Ok(())
    }
}

fn create(path: &Path) -> Result<File> {
    File::create(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

fn write(file: &mut File, path: &Path, bytes: &[u8]) -> Result<()> {
    file.write_all(bytes).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}
