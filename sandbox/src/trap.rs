//! The SIGSYS reporter: a forbidden call traps (SECCOMP_RET_TRAP) into this handler, which
//! writes what was called and by which thread, then either ends the process with SIGSYS
//! (`on`) or makes the call itself and returns its result (`log`).
//!
//! Everything here runs in a signal handler: no allocation, no locks, only system calls
//! every filter allows (write, gettid, getpid, prctl(PR_GET_NAME), tgkill) or, in `log`
//! mode, the escape below.

use std::cell::Cell;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use crate::{Class, Mode};

thread_local! {
    /// The thread's class plus one; 0 for a thread a library started (it inherits a filter).
    static CLASS: Cell<u8> = const { Cell::new(0) };
}

static MODE: AtomicU8 = AtomicU8::new(0);
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

pub(crate) fn set_class(class: Class) {
    CLASS.with(|c| c.set(class.index() + 1));
}

pub(crate) fn class() -> Option<Class> {
    CLASS.with(|c| c.get().checked_sub(1).and_then(Class::from_index))
}

/// The forbidden call the test hook makes: `syslog(SYSLOG_ACTION_SIZE_BUFFER)` changes
/// nothing and no thread of qomu needs it.
pub(crate) fn make_forbidden_call(class: Class) {
    say_line(&[
        "qomu: sandbox: test hook: a ",
        class.name(),
        " thread calls syslog\n",
    ]);
    // SAFETY: syslog(10, NULL, 0) only returns the kernel log's size.
    unsafe { libc::syscall(libc::SYS_syslog, 10, 0, 0) };
}

pub(crate) fn install(mode: Mode, report: Option<OwnedFd>) -> std::io::Result<()> {
    MODE.store(if mode == Mode::Log { 2 } else { 1 }, Ordering::Relaxed);
    if let Some(fd) = report {
        REPORT_FD.store(fd.into_raw_fd(), Ordering::Relaxed);
    }
    // SAFETY: an all-zero sigaction is valid to fill; the handler is an extern "C" fn
    // with the SA_SIGINFO signature and is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handle_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if mode == Mode::On {
            // Back to the default action once in the handler, and not blocked there: the
            // handler's own tgkill then ends the process with SIGSYS.
            action.sa_flags |= libc::SA_NODEFER | libc::SA_RESETHAND;
        }
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A system call made from one known instruction: in `log` mode every filter allows calls
/// made from here (filters.rs checks the instruction pointer), so the handler can make the
/// call the guest-facing code was refused. Never used in `on` mode, where filters do not
/// have the exception.
#[unsafe(naked)]
unsafe extern "C" fn escape(nr: i64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    core::arch::naked_asm!(
        "mov rax, rdi",
        "mov rdi, rsi",
        "mov rsi, rdx",
        "mov rdx, rcx",
        "mov r10, r8",
        "mov r8, r9",
        "mov r9, [rsp + 8]",
        "syscall",
        ".globl qomu_sandbox_escape_return",
        "qomu_sandbox_escape_return:",
        "ret",
    )
}

unsafe extern "C" {
    static qomu_sandbox_escape_return: u8;
}

/// The address the kernel reports as the instruction pointer of the escape's call.
pub(crate) fn escape_address() -> u64 {
    &raw const qomu_sandbox_escape_return as u64
}

fn raw_write(fd: i32, bytes: &[u8]) {
    // SAFETY: writes from a valid buffer; in log mode through the escape so the write
    // cannot trap again.
    unsafe {
        if MODE.load(Ordering::Relaxed) == 2 {
            escape(
                libc::SYS_write,
                fd as u64,
                bytes.as_ptr() as u64,
                bytes.len() as u64,
                0,
                0,
                0,
            );
        } else {
            libc::syscall(libc::SYS_write, fd, bytes.as_ptr(), bytes.len());
        }
    }
}

/// Writes the pieces as one line to stderr and the report file.
fn say_line(pieces: &[&str]) {
    let mut buf = [0u8; 512];
    let mut len = 0;
    for piece in pieces {
        for &b in piece.as_bytes() {
            if len < buf.len() {
                buf[len] = b;
                len += 1;
            }
        }
    }
    raw_write(2, &buf[..len]);
    let report = REPORT_FD.load(Ordering::Relaxed);
    if report >= 0 {
        raw_write(report, &buf[..len]);
    }
}

/// Formats `value` in decimal or (with `hex`) as 0x-prefixed hex into `buf`.
fn number(value: u64, hex: bool, buf: &mut [u8; 24]) -> &str {
    let base = if hex { 16 } else { 10 };
    let mut digits = [0u8; 20];
    let mut n = value;
    let mut count = 0;
    loop {
        digits[count] = b"0123456789abcdef"[(n % base) as usize];
        n /= base;
        count += 1;
        if n == 0 {
            break;
        }
    }
    let mut len = 0;
    if hex {
        buf[..2].copy_from_slice(b"0x");
        len = 2;
    }
    for i in (0..count).rev() {
        buf[len] = digits[i];
        len += 1;
    }
    std::str::from_utf8(&buf[..len]).unwrap_or("?")
}

fn syscall_name(nr: u32) -> &'static str {
    crate::syscall_names::NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or("unknown", |(_, name)| name)
}

extern "C" fn handle_sigsys(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo and ucontext for an SA_SIGINFO handler;
    // for SIGSYS the siginfo's union holds the call address (offset 16), the system
    // call number (24) and the audit architecture (28).
    let (nr, ctx) = unsafe {
        let nr = *((info as *const u8).add(24) as *const libc::c_int) as u32;
        (nr, &mut *(context as *mut libc::ucontext_t))
    };
    let regs = &mut ctx.uc_mcontext.gregs;
    let args = [
        regs[libc::REG_RDI as usize] as u64,
        regs[libc::REG_RSI as usize] as u64,
        regs[libc::REG_RDX as usize] as u64,
        regs[libc::REG_R10 as usize] as u64,
        regs[libc::REG_R8 as usize] as u64,
        regs[libc::REG_R9 as usize] as u64,
    ];
    let mut comm = [0u8; 17];
    let log = MODE.load(Ordering::Relaxed) == 2;
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the 17-byte buffer; gettid has no
    // arguments. Both are allowed in every filter (and go through the escape in log mode).
    let tid = unsafe {
        if log {
            escape(
                libc::SYS_prctl,
                libc::PR_GET_NAME as u64,
                comm.as_mut_ptr() as u64,
                0,
                0,
                0,
                0,
            );
            escape(libc::SYS_gettid, 0, 0, 0, 0, 0, 0)
        } else {
            libc::syscall(libc::SYS_prctl, libc::PR_GET_NAME, comm.as_mut_ptr());
            libc::syscall(libc::SYS_gettid)
        }
    };
    let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(16);
    let comm = std::str::from_utf8(&comm[..comm_len]).unwrap_or("?");
    let class = class().map_or("inherited", Class::name);
    let (mut b0, mut b1, mut b2, mut b3, mut b4) = ([0; 24], [0; 24], [0; 24], [0; 24], [0; 24]);
    let outcome = if log {
        "; let through (--sandbox log)\n"
    } else {
        "; stopping qomu (--sandbox on)\n"
    };
    say_line(&[
        "qomu: sandbox: forbidden system call ",
        syscall_name(nr),
        " (",
        number(u64::from(nr), false, &mut b0),
        ", args ",
        number(args[0], true, &mut b1),
        ", ",
        number(args[1], true, &mut b2),
        ", ",
        number(args[2], true, &mut b3),
        ") on thread ",
        comm,
        " (",
        number(tid as u64, false, &mut b4),
        ", class ",
        class,
        ")",
        outcome,
    ]);
    if log {
        // SAFETY: the call the thread made, with its own arguments, from the escape's
        // instruction (which the log-mode filters let through).
        let result = unsafe {
            escape(
                i64::from(nr),
                args[0],
                args[1],
                args[2],
                args[3],
                args[4],
                args[5],
            )
        };
        regs[libc::REG_RAX as usize] = result;
        return;
    }
    // SAFETY: SA_RESETHAND made SIGSYS's action the default (end the process) and
    // SA_NODEFER left it unblocked: this ends qomu with SIGSYS, as a parent sees it.
    unsafe {
        let pid = libc::syscall(libc::SYS_getpid);
        libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSYS);
    }
}
