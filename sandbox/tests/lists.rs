//! The allow-lists on their own, in this test process: each test applies a class's filter
//! to a thread of its own with forbidden calls failing with EPERM (never the whole
//! process, never TSYNC), and checks what that class may and may not do.

use sandbox::Class;

/// Runs `f` on a new thread under `class`'s filter.
fn under<T: Send + 'static>(class: Class, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        sandbox::apply_failing_with(class, libc::EPERM as u32).expect("filter applies");
        f()
    })
    .join()
    .expect("the filtered thread ran")
}

/// The errno of a raw system call, or 0 when it succeeded.
fn errno_of(result: libc::c_long) -> i32 {
    if result == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

fn syslog_size() -> i32 {
    // SAFETY: syslog(SYSLOG_ACTION_SIZE_BUFFER) reads nothing and writes nothing.
    errno_of(unsafe { libc::syscall(libc::SYS_syslog, 10, 0, 0) })
}

fn open_null() -> i32 {
    // SAFETY: opens /dev/null (a valid C string) and closes what it got.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::close(fd);
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }
    }
}

fn socket_of(family: i32) -> i32 {
    // SAFETY: socket with constant arguments; the descriptor is closed.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd >= 0 {
            libc::close(fd);
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }
    }
}

fn execve_true() -> i32 {
    let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: the filter refuses it (the assertion is that it returns); were it to run,
    // this thread's process would become /bin/true, which the test would see fail.
    errno_of(unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) }.into())
}

/// An ioctl with `request` on an invalid descriptor: EPERM where the filter refuses the
/// request, EBADF where it lets it through to the kernel.
fn ioctl_errno(request: u64) -> i32 {
    // SAFETY: the descriptor is invalid: the kernel touches nothing.
    errno_of(unsafe { libc::ioctl(-1, request) }.into())
}

fn getpid_errno() -> i32 {
    // SAFETY: getpid has no preconditions.
    errno_of(unsafe { libc::syscall(libc::SYS_getpid) })
}

fn clone3_errno() -> i32 {
    // SAFETY: clone3 with a null argument only reports how it is refused.
    errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) })
}

fn ptrace_errno() -> i32 {
    // SAFETY: PTRACE_TRACEME, which the filter refuses before it could take effect.
    errno_of(unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) })
}

/// fork: -1 where the filter refuses it; were it not, the child exits at once.
fn fork_result() -> i32 {
    // SAFETY: the child only calls _exit; the parent reaps it.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(0);
        }
        if pid > 0 {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        pid
    }
}

#[test]
fn no_class_may_make_a_call_no_qomu_thread_needs() {
    for class in Class::ALL {
        assert_eq!(under(class, syslog_size), libc::EPERM, "{}", class.name());
        assert_eq!(under(class, execve_true), libc::EPERM, "{}", class.name());
        assert_eq!(under(class, getpid_errno), 0, "{}", class.name());
    }
}

#[test]
fn clone3_fails_with_enosys_so_glibc_falls_back_to_clone_and_threads_start() {
    for class in [
        Class::QmpClient,
        Class::Dbus,
        Class::Spawner,
        Class::Migration,
    ] {
        let (clone3, spawned) = under(class, || {
            let clone3 = clone3_errno();
            let spawned = std::thread::spawn(|| 7).join().ok();
            (clone3, spawned)
        });
        assert_eq!(clone3, libc::ENOSYS, "{}", class.name());
        assert_eq!(spawned, Some(7), "{}", class.name());
    }
}

#[test]
fn a_vcpu_thread_may_not_open_files_sockets_or_start_threads() {
    assert_eq!(under(Class::Vcpu, open_null), libc::EPERM);
    assert_eq!(under(Class::Vcpu, || socket_of(libc::AF_UNIX)), libc::EPERM);
    let spawn_failed = under(Class::Vcpu, || {
        std::thread::Builder::new().spawn(|| ()).is_err()
    });
    assert!(spawn_failed, "a vCPU thread started a thread");
    // An ioctl outside KVM_RUN and the interrupt calls: KVM_CREATE_VM on a bad descriptor
    // is refused by the filter (EPERM) before the kernel could say EBADF.
    let create_vm = under(Class::Vcpu, || ioctl_errno(0xae01));
    assert_eq!(create_vm, libc::EPERM);
    // KVM_RUN: allowed by the filter, EBADF from the kernel.
    let run = under(Class::Vcpu, || ioctl_errno(0xae80));
    assert_eq!(run, libc::EBADF);
    // Nor send on a socket (it wakes the front ends with eventfd writes): refused before
    // the kernel could say EBADF.
    let send = under(Class::Vcpu, || {
        // SAFETY: sendto on a descriptor that is not open reads nothing.
        errno_of(unsafe { libc::syscall(libc::SYS_sendto, -1, 0, 0, 0, 0, 0) })
    });
    assert_eq!(send, libc::EPERM);
}

#[test]
fn device_threads_may_not_open_files_or_sockets() {
    for class in [
        Class::DeviceIo,
        Class::SerialInput,
        Class::Timer,
        Class::Signals,
        Class::QmpListener,
    ] {
        assert_eq!(under(class, open_null), libc::EPERM, "{}", class.name());
        assert_eq!(
            under(class, || socket_of(libc::AF_UNIX)),
            libc::EPERM,
            "{}",
            class.name()
        );
    }
}

#[test]
fn the_control_plane_opens_files_and_ip_and_unix_sockets_but_no_other_family_or_device() {
    for class in [
        Class::Main,
        Class::Control,
        Class::QmpClient,
        Class::Dbus,
        Class::Migration,
    ] {
        let name = class.name();
        assert_eq!(under(class, open_null), 0, "{name}");
        assert_eq!(under(class, || socket_of(libc::AF_UNIX)), 0, "{name}");
        assert_eq!(under(class, || socket_of(libc::AF_INET)), 0, "{name}");
        assert_eq!(
            under(class, || socket_of(libc::AF_PACKET)),
            libc::EPERM,
            "{name}"
        );
        assert_eq!(
            under(class, || socket_of(libc::AF_VSOCK)),
            libc::EPERM,
            "{name}"
        );
        // clone with fork's flags.
        let forked = under(class, fork_result);
        assert_eq!(forked, -1, "{name} forked");
        // A KVM ioctl passes the filter (EBADF), a loop device's does not (EPERM).
        let kvm = under(class, || ioctl_errno(0xae01));
        assert_eq!(kvm, libc::EBADF, "{name}");
        let loop_dev = under(class, || ioctl_errno(0x4c00));
        assert_eq!(loop_dev, libc::EPERM, "{name}");
        let traced = under(class, ptrace_errno);
        assert_eq!(traced, libc::EPERM, "{name}");
    }
}

#[test]
fn a_thread_the_spawner_starts_can_apply_any_class_and_then_has_that_class_only() {
    for class in Class::ALL {
        let (applied, opened) = under(Class::Spawner, move || {
            std::thread::spawn(move || {
                let applied = sandbox::apply_failing_with(class, libc::EPERM as u32).is_ok();
                (applied, open_null())
            })
            .join()
            .unwrap()
        });
        assert!(applied, "{}", class.name());
        // The spawner's own list is the union, which has the control plane's.
        let control = matches!(
            class,
            Class::Main
                | Class::Control
                | Class::QmpClient
                | Class::Dbus
                | Class::Migration
                | Class::Spawner
        );
        assert_eq!(opened == 0, control, "{}", class.name());
    }
}
