//! The `qomu` command (docs/cli.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use machine::config::{parse_cpus, parse_memory};
use machine::{DeviceSpec, Machine, MachineConfig, ShutdownCause};

/// A KVM virtual machine monitor whose devices form a live object tree, reachable over QMP
/// and D-Bus. With no --kernel it boots a small demo guest that answers on the console.
#[derive(Debug, Parser)]
#[command(name = "qomu", version)]
struct Cli {
    /// Kernel to boot: a 64-bit ELF (Linux vmlinux, the test guests) or a Linux bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "CMDLINE", default_value = "")]
    append: String,
    /// Guest RAM: bytes, or with a k/M/G/T suffix; a bare number below 1M is MiB.
    #[arg(short = 'm', long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    cpus: u32,
    /// Start in prelaunch: build the machine but run nothing until `cont`.
    #[arg(short = 'S', long)]
    paused: bool,
    /// Add a device: DRIVER[,id=ID][,PROP=VALUE...] (repeatable), e.g. isa-debug-exit,iobase=0xf4.
    #[arg(long = "device", value_name = "SPEC")]
    devices: Vec<DeviceSpec>,
    /// Where the first serial port's output goes: stdio, file:PATH or none.
    #[arg(long, value_name = "BACKEND", default_value = "stdio")]
    serial: String,
    /// Name of the VM.
    #[arg(long)]
    name: Option<String>,
    /// On guest shutdown, stop in the 'shutdown' state instead of exiting.
    #[arg(long)]
    no_shutdown: bool,
    /// Start the RTC at host UTC ('utc') or at a date like 2006-06-17T16:01:21.
    #[arg(long, value_name = "BASE", default_value = "utc")]
    rtc_base: String,
    /// QMP server socket: unix:PATH (repeatable); QEMU's ",server=on,wait=off" is accepted.
    #[arg(long, value_name = "unix:PATH", value_parser = parse_qmp)]
    qmp: Vec<PathBuf>,
    /// D-Bus connection: auto, session, system, none or a bus address.
    #[arg(long, value_name = "BUS")]
    dbus: Option<String>,
}

/// Parses `unix:PATH[,server=on][,wait=off]` (QEMU's chardev options are accepted and
/// must say what qomu does anyway: a listening server that does not wait).
fn parse_qmp(text: &str) -> Result<PathBuf, String> {
    let rest = text
        .strip_prefix("unix:")
        .ok_or_else(|| format!("'{text}': only unix:PATH sockets are supported"))?;
    let mut parts = rest.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("'{text}': the socket path is missing"))?;
    for option in parts {
        match option {
            "server" | "server=on" | "nowait" | "wait=off" => {}
            other => {
                return Err(format!(
                    "'{text}': unsupported option '{other}' (qomu listens and does not wait)"
                ));
            }
        }
    }
    Ok(PathBuf::from(path))
}

/// Terminal settings to restore on exit, when the console is a terminal.
struct Terminal(Option<libc::termios>);

impl Terminal {
    /// Turns off echo and line editing on a terminal stdin (the guest echoes and edits),
    /// keeping Ctrl-C as a signal to the VMM.
    fn take(serial_is_stdio: bool) -> Terminal {
        // SAFETY: isatty on fd 0 has no preconditions.
        if !serial_is_stdio || unsafe { libc::isatty(0) } != 1 {
            return Terminal(None);
        }
        // SAFETY: an all-zero termios is a valid value to be filled by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `saved` is a valid termios to write.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Terminal(None);
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ECHO | libc::ICANON);
        raw.c_iflag &= !libc::ICRNL;
        // SAFETY: `raw` is a valid termios derived from the current settings.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Terminal(Some(saved))
    }

    fn restore(&self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores settings read from this terminal by tcgetattr.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialize and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the stop signals in this thread and every thread it starts from now on, so that
/// only the signal thread receives them.
fn block_stop_signals() {
    let set = stop_signal_set();
    // SAFETY: `set` is initialized; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits for SIGINT/SIGTERM/SIGHUP and shuts the machine down as QEMU does.
fn spawn_signal_thread(machine: Arc<Machine>) {
    let spawned = std::thread::Builder::new()
        .name("qomu-signals".into())
        .spawn(move || {
            let set = stop_signal_set();
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is initialized and `signal` is a valid place for the result.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                eprintln!("qomu: terminating on signal {signal}");
                machine.shutdown(ShutdownCause::HostSignal, Some(0));
            }
        });
    if let Err(e) = spawned {
        eprintln!("qomu: cannot watch for signals: {e}");
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QOMU_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    if cli.dbus.as_deref().is_some_and(|d| d != "none") {
        eprintln!("qomu: --dbus: the D-Bus front end is not built yet (only --dbus none)");
        return ExitCode::from(2);
    }
    block_stop_signals();
    let config = MachineConfig {
        memory: cli.memory,
        cpus: cli.cpus,
        kernel: cli.kernel,
        initrd: cli.initrd,
        append: cli.append,
        serial: cli.serial,
        name: cli.name,
        no_shutdown: cli.no_shutdown,
        rtc_base: cli.rtc_base,
        devices: cli.devices,
    };
    let machine = match Machine::new(&config) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("qomu: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut qmp = match bus_bridge::qmp::server::QmpServer::start(machine.tree().clone(), &cli.qmp)
    {
        Ok(server) => server,
        Err(e) => {
            eprintln!("qomu: {e}");
            return ExitCode::FAILURE;
        }
    };
    spawn_signal_thread(machine.clone());
    let terminal = Terminal::take(config.serial == "stdio");
    if !cli.paused
        && let Err(e) = machine.cont()
    {
        qmp.shutdown(std::time::Duration::ZERO);
        terminal.restore();
        eprintln!("qomu: {e}");
        return ExitCode::FAILURE;
    }
    let status = machine.wait_for_exit();
    // Let clients receive the reply to `quit` and the SHUTDOWN event before the sockets go.
    qmp.shutdown(std::time::Duration::from_secs(1));
    terminal.restore();
    ExitCode::from((status & 0xff) as u8)
}
