//! What each thread class may call. A call not listed traps (trap.rs). To find what a new
//! feature needs, run it with `--sandbox log`: every call a filter refuses is reported
//! with its thread and first arguments, and made anyway; add it to its class here, with an
//! argument check where the call is dangerous with other arguments (docs/security.md).

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, sock_filter,
};

use crate::{Class, Mode};

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// One allowed call: any arguments, or one of several argument patterns.
struct Allow {
    call: i64,
    /// Empty: any arguments. Otherwise the call is allowed when all conditions of one of
    /// these patterns hold.
    when: Vec<Vec<(u8, SeccompCmpArgLen, SeccompCmpOp, u64)>>,
}

fn any(calls: &[i64]) -> impl Iterator<Item = Allow> + '_ {
    calls.iter().map(|&call| Allow {
        call,
        when: Vec::new(),
    })
}

/// `call` with argument `arg` (32-bit) equal to one of `values`.
fn arg_in(call: i64, arg: u8, values: &[u64]) -> Allow {
    Allow {
        call,
        when: values
            .iter()
            .map(|&v| vec![(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)])
            .collect(),
    }
}

/// The flags glibc's pthread_create passes to clone: a thread, never a process.
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

fn thread_clone() -> Allow {
    Allow {
        call: libc::SYS_clone,
        when: vec![vec![(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::Eq,
            THREAD_CLONE_FLAGS,
        )]],
    }
}

/// What every thread does: memory, futexes, time, signals to itself, its own name, the
/// Rust runtime's start and end of a thread, and writing (stderr, eventfds, pipes).
fn common() -> Vec<Allow> {
    let mut list: Vec<Allow> = any(&[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
        libc::SYS_restart_syscall,
        libc::SYS_poll,
        libc::SYS_ppoll,
        // Refused with ENOSYS before any list is read (see `program`), so glibc falls back
        // to clone, which the lists check.
        libc::SYS_clone3,
    ])
    .collect();
    list.push(arg_in(
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64],
    ));
    // Rust's debug builds check a descriptor before closing it; std sets close-on-exec.
    list.push(arg_in(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_DUPFD_CLOEXEC as u64,
        ],
    ));
    list
}

/// `ioctl` whose request is of one of these types (the request's bits 8-15: `0xae` KVM,
/// `0x54` ('T') terminals and tun, `0x89` socket configuration).
fn ioctl_types(types: &[u64]) -> Allow {
    Allow {
        call: libc::SYS_ioctl,
        when: types
            .iter()
            .map(|&t| {
                vec![(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(0xff00),
                    t << 8,
                )]
            })
            .collect(),
    }
}

/// `socket`/`socketpair` of these address families only.
fn sockets(families: &[i32]) -> Vec<Allow> {
    let families: Vec<u64> = families.iter().map(|&f| f as u64).collect();
    vec![
        arg_in(libc::SYS_socket, 0, &families),
        arg_in(libc::SYS_socketpair, 0, &families),
    ]
}

/// Threads that run the tree's operations: whatever a QMP command, a D-Bus call or the
/// machine's own reaction can do (build and launch the VM, hot-plug, open images and taps,
/// snapshot, migrate, serve sockets). What they may not do is what no operation needs:
/// start programs, trace, mount, change credentials or namespaces, load code into the
/// kernel, open sockets other than unix, IP and netlink, or ioctls other than KVM's, tun's,
/// terminals' and sockets'.
fn control_plane() -> Vec<Allow> {
    let mut list: Vec<Allow> = any(&[
        libc::SYS_openat,
        libc::SYS_open,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_faccessat2,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_getdents64,
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rename,
        libc::SYS_renameat2,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_rmdir,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        // A listening socket given to a group (`--qmp unix:PATH,group=G`).
        libc::SYS_chown,
        libc::SYS_fchownat,
        libc::SYS_getcwd,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_uname,
        libc::SYS_sysinfo,
        libc::SYS_getrusage,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_membarrier,
        libc::SYS_kill,
        // Reaping the private dbus-daemon qomu started (before the lockdown) at the end.
        libc::SYS_wait4,
        libc::SYS_prlimit64,
    ])
    .collect();
    list.push(thread_clone());
    // zbus's peer-to-peer server reads the capability bounding set (authentication).
    list.push(arg_in(libc::SYS_prctl, 0, &[libc::PR_CAPBSET_READ as u64]));
    list.extend(sockets(&[
        libc::AF_UNIX,
        libc::AF_INET,
        libc::AF_INET6,
        libc::AF_NETLINK,
    ]));
    list.push(ioctl_types(&[0xae, 0x54, 0x89]));
    list
}

fn class_list(class: Class) -> Vec<Allow> {
    let mut list = common();
    match class {
        Class::Spawner => {
            // The union of all classes (`rules`); its own work is clone, and its children
            // make these two calls to apply their filter while still under its.
            list.push(thread_clone());
            list.push(arg_in(
                libc::SYS_prctl,
                0,
                &[libc::PR_SET_NO_NEW_PRIVS as u64],
            ));
            list.push(arg_in(
                libc::SYS_seccomp,
                0,
                &[u64::from(libc::SECCOMP_SET_MODE_FILTER)],
            ));
        }
        Class::Main | Class::Control | Class::QmpClient | Class::Dbus | Class::Migration => {
            list.extend(control_plane());
        }
        Class::Vcpu => {
            // A device the guest starts (virtio DRIVER_OK) gets its eventfds and epoll
            // here, and its tap the offloads the guest acked. Events a vCPU emits wake the
            // front ends with eventfd writes (`write`, in the common list).
            list.push(arg_in(libc::SYS_ioctl, 1, &vcpu_ioctls()));
            list.extend(any(&[
                libc::SYS_eventfd2,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
            ]));
        }
        Class::DeviceIo => {
            list.extend(any(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_sendto,
                libc::SYS_recvfrom,
                libc::SYS_sendmsg,
                libc::SYS_recvmsg,
                // A stream netdev's server accepts its peer; a netdev makes its stop eventfd.
                libc::SYS_accept4,
                libc::SYS_eventfd2,
            ]));
            list.push(arg_in(
                libc::SYS_ioctl,
                1,
                &[KVM_IRQ_LINE, TUNSETOFFLOAD, libc::FIONBIO],
            ));
        }
        Class::SerialInput | Class::Timer => {
            // Events wake QMP clients.
            list.extend(any(&[libc::SYS_sendto]));
        }
        Class::Signals => {
            // It shuts the machine down, whose SHUTDOWN event wakes QMP clients.
            list.extend(any(&[libc::SYS_rt_sigtimedwait, libc::SYS_sendto]));
        }
        Class::QmpListener => {
            list.extend(any(&[libc::SYS_accept4]));
        }
    }
    list
}

/// What a vCPU thread may ask of KVM: run, and what the exits it serves do (interrupts,
/// ioeventfds of a device the guest starts).
fn vcpu_ioctls() -> Vec<u64> {
    use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE, ioctl_expr};
    const KVMIO: u32 = 0xae;
    let io = |nr| ioctl_expr(_IOC_NONE, KVMIO, nr, 0);
    let iow = |nr, size: usize| ioctl_expr(_IOC_WRITE, KVMIO, nr, size as u32);
    let iowr = |nr, size: usize| ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size as u32);
    vec![
        io(0x80),                                                        // KVM_RUN
        iow(0xa5, std::mem::size_of::<kvm_bindings::kvm_msi>()),         // KVM_SIGNAL_MSI
        iowr(0x67, std::mem::size_of::<kvm_bindings::kvm_irq_level>()),  // KVM_IRQ_LINE_STATUS
        iow(0x79, std::mem::size_of::<kvm_bindings::kvm_ioeventfd>()),   // KVM_IOEVENTFD
        iow(0x76, std::mem::size_of::<kvm_bindings::kvm_irqfd>()),       // KVM_IRQFD
        iow(0x6a, std::mem::size_of::<kvm_bindings::kvm_irq_routing>()), // KVM_SET_GSI_ROUTING
        KVM_IRQ_LINE,
        TUNSETOFFLOAD,
        libc::FIONBIO,
    ]
}

/// `_IOW(KVMIO, 0x61, struct kvm_irq_level)`: an INTx line.
const KVM_IRQ_LINE: u64 = 0x4008_ae61;
/// `_IOW('T', 208, unsigned int)`: the offloads the guest acked, on a tap.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

fn to_rules(list: Vec<Allow>) -> Result<Rules, BackendError> {
    let mut rules = Rules::new();
    for allow in list {
        let entry = rules.entry(allow.call);
        let unconditional = allow.when.is_empty();
        let mut patterns = Vec::new();
        for pattern in allow.when {
            let conditions = pattern
                .into_iter()
                .map(|(arg, len, op, value)| SeccompCondition::new(arg, len, op, value))
                .collect::<Result<Vec<_>, _>>()?;
            patterns.push(SeccompRule::new(conditions)?);
        }
        match entry {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(if unconditional { Vec::new() } else { patterns });
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                // An empty list means any arguments: it absorbs the patterns.
                if unconditional {
                    o.get_mut().clear();
                } else if !o.get().is_empty() {
                    o.get_mut().extend(patterns);
                }
            }
        }
    }
    Ok(rules)
}

fn rules(class: Class) -> Result<Rules, BackendError> {
    if class != Class::Spawner {
        return to_rules(class_list(class));
    }
    // Threads inherit the spawner's filter: it must let through what any class may do.
    let mut all = Vec::new();
    for c in Class::ALL {
        all.extend(class_list(c));
    }
    to_rules(all)
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The class's BPF program for `mode` (`On` or `Log`): what seccompiler builds from the
/// list, behind two checks it cannot express: in `log` mode a call from the reporter's
/// escape instruction is allowed, and `clone3` fails with ENOSYS (glibc then uses clone,
/// whose flags a filter can read; clone3's are behind a pointer).
pub(crate) fn program(class: Class, mode: Mode) -> Result<BpfProgram, BackendError> {
    program_with(class, mode, SeccompAction::Trap)
}

/// As [`program`], with `mismatch` for a call not on the list (tests use ERRNO, which
/// fails the call instead of ending the process).
pub(crate) fn program_with(
    class: Class,
    mode: Mode,
    mismatch: SeccompAction,
) -> Result<BpfProgram, BackendError> {
    let filter = SeccompFilter::new(
        rules(class)?,
        mismatch,
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into()?,
    )?;
    let body: BpfProgram = filter.try_into()?;
    let mut program = Vec::new();
    if mode == Mode::Log {
        let ip = crate::trap::escape_address();
        // seccomp_data: nr at 0, arch at 4, instruction_pointer at 8 (low word first).
        program.extend([
            insn(BPF_LD_W_ABS, 0, 0, 8),
            insn(BPF_JEQ_K, 0, 3, ip as u32),
            insn(BPF_LD_W_ABS, 0, 0, 12),
            insn(BPF_JEQ_K, 0, 1, (ip >> 32) as u32),
            insn(BPF_RET_K, 0, 0, RET_ALLOW),
        ]);
    }
    program.extend([
        insn(BPF_LD_W_ABS, 0, 0, 0),
        insn(BPF_JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        insn(BPF_RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32),
    ]);
    program.extend(body);
    Ok(program)
}
