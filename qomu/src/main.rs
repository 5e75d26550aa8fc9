//! The `qomu` command (docs/cli.md).

mod private_bus;

/// `eprintln!` that cannot panic: qomu keeps running when its stderr is gone (a closed
/// pipe), and a message it cannot print is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bus_bridge::dbus::{BusAddress, DbusBridge, DbusConfig};
use bus_bridge::socket::{Access, Listen};
use clap::Parser;
use machine::config::{parse_cpus, parse_memory};
use machine::{DeviceSpec, Machine, MachineConfig, ShutdownCause};
use private_bus::PrivateBus;

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
    /// Add a user object: TYPE,id=ID[,PROP=VALUE...] (repeatable), as object-add does, e.g.
    /// dbus-vmstate,id=dv,addr=unix:path=/run/bus,id-list=helper1.
    #[arg(long = "object", value_name = "SPEC")]
    objects: Vec<DeviceSpec>,
    /// Add a host network backend: tap,id=ID[,ifname=NAME] or
    /// stream,id=ID,addr.type=unix,addr.path=PATH[,server=on] (repeatable), as QEMU's -netdev.
    #[arg(long = "netdev", value_name = "SPEC")]
    netdevs: Vec<DeviceSpec>,
    /// Restore a snapshot saved by `migrate file:PATH` into this machine, or wait for a
    /// migration from another qomu at unix:PATH, tcp:HOST:PORT, exec:COMMAND, or `defer`
    /// (then QMP's migrate-incoming says where). The machine must be configured as the
    /// source is: same memory, vCPUs, devices and objects. The guest continues as it was
    /// saved, running or paused (-S keeps it paused).
    #[arg(long, value_name = "URI")]
    incoming: Option<String>,
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
    /// QMP server socket: unix:PATH[,group=GROUP] (repeatable); QEMU's ",server=on,wait=off"
    /// is accepted. Mode 0600, or 0660 owned by GROUP.
    #[arg(long, value_name = "unix:PATH", value_parser = parse_qmp)]
    qmp: Vec<Listen>,
    /// D-Bus bus to serve the tree on: auto (the session bus if configured, else a private
    /// bus qomu starts and prints), session, system, none, or a bus address (unix:path=...).
    #[arg(long, value_name = "BUS", default_value = "auto", value_parser = parse_dbus)]
    dbus: DbusChoice,
    /// Well-known name to own on the bus.
    #[arg(long, value_name = "NAME", default_value = "org.qomu.VM1", value_parser = parse_bus_name)]
    dbus_name: String,
    /// Peer-to-peer D-Bus socket: unix:PATH[,group=GROUP] (repeatable); clients connect
    /// without a bus. Mode 0600, or 0660 owned by GROUP.
    #[arg(long, value_name = "unix:PATH", value_parser = parse_p2p)]
    dbus_p2p: Vec<Listen>,
    /// The sandbox (docs/security.md): on (a seccomp filter per thread, no new privileges,
    /// files limited by Landlock; a forbidden system call ends qomu, saying which), log
    /// (forbidden calls are reported and let through; no Landlock), or off.
    #[arg(
        long,
        value_name = "on|log|off",
        default_value = "on",
        env = "QOMU_SANDBOX"
    )]
    sandbox: sandbox::Mode,
    /// Once what needs root is open, run as USER[:GROUP] (names or numbers; supplementary
    /// groups are cleared).
    #[arg(long, value_name = "USER[:GROUP]")]
    run_as: Option<sandbox::RunAs>,
    /// A file or directory a sandboxed qomu may use beyond those on its command line: for
    /// images hot-plugged later, snapshot and migration targets, sockets
    /// (PATH[,access=ro|rw], rw if not said; repeatable).
    #[arg(long = "sandbox-path", value_name = "PATH[,access=ro|rw]")]
    sandbox_paths: Vec<sandbox::PathRule>,
}

/// The `--dbus` choice.
#[derive(Debug, Clone)]
enum DbusChoice {
    Auto,
    None,
    Bus(BusAddress),
}

fn parse_dbus(text: &str) -> Result<DbusChoice, String> {
    Ok(match text {
        "auto" => DbusChoice::Auto,
        "none" => DbusChoice::None,
        "session" => DbusChoice::Bus(BusAddress::Session),
        "system" => DbusChoice::Bus(BusAddress::System),
        t if t.contains(':') && t.contains('=') => {
            DbusChoice::Bus(BusAddress::Address(t.to_owned()))
        }
        t => {
            return Err(format!(
                "'{t}': expected auto, session, system, none or a D-Bus address such as unix:path=/run/qomu/bus"
            ));
        }
    })
}

fn parse_bus_name(text: &str) -> Result<String, String> {
    bus_bridge::dbus::names::check_bus_name(text)?;
    Ok(text.to_owned())
}

fn parse_p2p(text: &str) -> Result<Listen, String> {
    parse_socket(text, &[])
}

/// Parses `unix:PATH[,group=GROUP]` and any of `accepted`, options that say what qomu
/// does anyway. GROUP is a group's name or number.
fn parse_socket(text: &str, accepted: &[&str]) -> Result<Listen, String> {
    let rest = text
        .strip_prefix("unix:")
        .ok_or_else(|| format!("'{text}': only unix:PATH sockets are supported"))?;
    let mut parts = rest.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("'{text}': the socket path is missing"))?;
    let mut access = Access::Owner;
    for option in parts {
        if let Some(group) = option.strip_prefix("group=") {
            access = Access::Group(
                sandbox::group_id(group).ok_or_else(|| format!("'{text}': no group '{group}'"))?,
            );
        } else if !accepted.contains(&option) {
            return Err(format!(
                "'{text}': unsupported option '{option}' (qomu listens and does not wait)"
            ));
        }
    }
    Ok(Listen {
        path: PathBuf::from(path),
        access,
    })
}

/// Starts the D-Bus front end as `--dbus` asks. A private bus, when one is started, must
/// outlive the bridge.
fn start_dbus(
    choice: &DbusChoice,
    name: &str,
    p2p: &[Listen],
    tree: &qom::Tree,
    early: Option<std::io::Result<PrivateBus>>,
) -> Result<(Option<DbusBridge>, Option<PrivateBus>), String> {
    let config = |bus: Option<BusAddress>| DbusConfig {
        bus,
        name: name.to_owned(),
        p2p: p2p.to_vec(),
    };
    let start = |bus: Option<BusAddress>| {
        DbusBridge::start(tree.clone(), config(bus)).map_err(|e| format!("D-Bus: {e}"))
    };
    let p2p_only = || {
        if p2p.is_empty() {
            Ok((None, None))
        } else {
            start(None).map(|b| (Some(b), None))
        }
    };
    match choice {
        DbusChoice::None => p2p_only(),
        DbusChoice::Bus(bus) => start(Some(bus.clone())).map(|b| (Some(b), None)),
        DbusChoice::Auto => {
            if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|a| !a.is_empty()) {
                match start(Some(BusAddress::Session)) {
                    Ok(b) => return Ok((Some(b), None)),
                    // Another VM owns the name: the user must pick one, not get a private bus.
                    Err(e) if e.contains("cannot own the name") => return Err(e),
                    Err(e) if sandbox::locked() => {
                        say!(
                            "qomu: {e}; going on without D-Bus (the sandbox forbids starting a private bus now: pass --dbus none or a bus that works)"
                        );
                        return p2p_only();
                    }
                    Err(e) => say!("qomu: {e}; starting a private bus instead"),
                }
            }
            match early.unwrap_or_else(PrivateBus::start) {
                Ok(private) => {
                    let bridge = start(Some(BusAddress::Address(private.address().to_owned())))?;
                    say!(
                        "qomu: no session bus; serving {} on a private bus:\n  export DBUS_SESSION_BUS_ADDRESS='{}'",
                        name,
                        private.address()
                    );
                    Ok((Some(bridge), Some(private)))
                }
                Err(e) => {
                    say!(
                        "qomu: D-Bus: no session bus, and dbus-daemon cannot be started ({e}); \
                         going on without D-Bus (install dbus, or pass --dbus none)"
                    );
                    p2p_only()
                }
            }
        }
    }
}

/// Parses `unix:PATH[,server=on][,wait=off][,group=GROUP]` (QEMU's chardev options are
/// accepted and must say what qomu does anyway: a listening server that does not wait).
fn parse_qmp(text: &str) -> Result<Listen, String> {
    parse_socket(text, &["server", "server=on", "nowait", "wait=off"])
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
    let spawned = sandbox::spawn(sandbox::Class::Signals, "qomu-signals".into(), move || {
        let set = stop_signal_set();
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is initialized and `signal` is a valid place for the result.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            say!("qomu: terminating on signal {signal}");
            machine.shutdown(ShutdownCause::HostSignal, Some(0));
        }
    });
    if let Err(e) = spawned {
        say!("qomu: cannot watch for signals: {e}");
    }
}

/// `QOMU_LOG`: a level (`debug`) or a list of `TARGET=LEVEL` with an optional default level
/// (`machine::migration=debug,warn`), `warn` where unset. A `Targets` filter, not an
/// `EnvFilter`: the latter's span and field matching brings a regex engine, which was a
/// fifth of qomu's text and most of what it kept resident in prelaunch.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let warnings = || tracing_subscriber::filter::Targets::new().with_default(tracing::Level::WARN);
    let filter = match std::env::var("QOMU_LOG") {
        Err(_) => warnings(),
        Ok(text) => text.parse().unwrap_or_else(|e| {
            say!("qomu: QOMU_LOG={text:?} is not a log filter ({e}); logging warnings");
            warnings()
        }),
    };
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        // Its default reports a failed write with eprintln!, which panics when stderr is a
        // closed pipe (`qomu | head`): a lost log line must not take a thread down.
        .log_internal_errors(false);
    tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .init();
}

/// The descriptors qomu was started with beyond stdin, stdout and stderr (a tap a
/// manager opened for it, as libvirt hands QEMU `-netdev tap,fd=N`), before qomu opens any
/// of its own.
fn inherited_fds() -> std::collections::BTreeSet<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Default::default();
    };
    let listed: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    // The directory's own descriptor is listed too, and closed by now.
    // SAFETY: F_GETFD only asks whether a descriptor number is open.
    listed
        .into_iter()
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect()
}

/// `--netdev tap,fd=N`: descriptor N, inherited, is handed to the tap through qom's
/// handover table (the token replaces the number, as QMP's `getfd` names do).
fn take_netdev_fds(
    netdevs: &mut [DeviceSpec],
    inherited: &mut std::collections::BTreeSet<i32>,
) -> Result<(), String> {
    use std::os::fd::FromRawFd;
    for spec in netdevs.iter_mut().filter(|s| s.driver == "tap") {
        for (key, value) in spec.props.iter_mut().filter(|(k, _)| k == "fd") {
            let Ok(fd) = value.parse::<i32>() else {
                return Err(format!(
                    "--netdev tap,{key}={value}: a descriptor number qomu was started with"
                ));
            };
            if !inherited.remove(&fd) {
                return Err(format!(
                    "--netdev tap,fd={fd}: qomu was not started with descriptor {fd} open"
                ));
            }
            // SAFETY: an inherited descriptor nothing in qomu uses, taken once (removed
            // from the set above); it is not inherited further.
            let owned = unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                std::os::fd::OwnedFd::from_raw_fd(fd)
            };
            *value = qom::handover::deposit(owned);
        }
    }
    Ok(())
}

/// Where `--dbus auto` will want a private bus: started before the sandbox locks down,
/// since spawning is forbidden after.
fn early_private_bus(choice: &DbusChoice) -> Option<std::io::Result<PrivateBus>> {
    let session = std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|a| !a.is_empty());
    (matches!(choice, DbusChoice::Auto) && !session).then(PrivateBus::start)
}

/// `QOMU_SANDBOX_LOG=FILE`: the sandbox's reports are appended there too (a manager that
/// drops qomu's stderr still has them).
fn sandbox_report_file() -> Option<std::os::fd::OwnedFd> {
    let path = std::env::var_os("QOMU_SANDBOX_LOG").filter(|p| !p.is_empty())?;
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => Some(f.into()),
        Err(e) => {
            say!(
                "qomu: QOMU_SANDBOX_LOG {}: {e}",
                std::path::Path::new(&path).display()
            );
            None
        }
    }
}

/// What a locked-down qomu may reach (docs/security.md): the files of its command line,
/// the directories its sockets are made in, `--sandbox-path`, and what every qomu needs
/// (the KVM and tun devices, name-service files for `tcp:` hosts, the libraries loaded
/// late, such as libgcc_s for a panic's unwinding).
fn sandbox_paths(cli: &Cli) -> Vec<sandbox::PathRule> {
    use sandbox::{Access, PathRule};
    let rule = |path: &std::path::Path, access| PathRule {
        path: path.to_owned(),
        access,
    };
    // A socket or file still to be made: its directory.
    let made_in = |path: &std::path::Path| {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        rule(dir.unwrap_or(std::path::Path::new(".")), Access::ReadWrite)
    };
    let mut rules = Vec::new();
    for path in [&cli.kernel, &cli.initrd].into_iter().flatten() {
        rules.push(rule(path, Access::Read));
    }
    for spec in cli.devices.iter().chain(&cli.objects).chain(&cli.netdevs) {
        let read_only = spec
            .props
            .iter()
            .any(|(k, v)| k == "read-only" && matches!(v.as_str(), "on" | "true" | "yes"));
        for (key, value) in &spec.props {
            if !matches!(key.as_str(), "file" | "filename" | "path" | "addr.path") {
                continue;
            }
            let path = std::path::Path::new(value);
            if path.exists() {
                let access = if read_only {
                    Access::Read
                } else {
                    Access::ReadWrite
                };
                rules.push(rule(path, access));
            } else {
                rules.push(made_in(path));
            }
        }
    }
    if let Some(path) = cli.serial.strip_prefix("file:") {
        rules.push(rule(std::path::Path::new(path), Access::ReadWrite));
    }
    for socket in cli.qmp.iter().chain(&cli.dbus_p2p) {
        rules.push(made_in(&socket.path));
    }
    if let Some(uri) = &cli.incoming {
        if let Some(path) = uri.strip_prefix("file:") {
            rules.push(rule(std::path::Path::new(path), Access::Read));
        } else if let Some(path) = uri.strip_prefix("unix:") {
            rules.push(made_in(std::path::Path::new(path)));
        }
    }
    for path in ["/dev/kvm", "/dev/net/tun", "/dev/null"] {
        rules.push(rule(std::path::Path::new(path), Access::ReadWrite));
    }
    for path in [
        "/dev/urandom",
        "/etc/hosts",
        "/etc/host.conf",
        "/etc/nsswitch.conf",
        "/etc/resolv.conf",
        "/etc/gai.conf",
        "/lib",
        "/usr/lib",
        "/sys/devices/system/cpu",
        "/sys/fs/cgroup",
        "/proc/self",
    ] {
        rules.push(rule(std::path::Path::new(path), Access::Read));
    }
    rules.extend(cli.sandbox_paths.iter().cloned());
    rules
}

fn main() -> ExitCode {
    let mut inherited = inherited_fds();
    let mut cli = Cli::parse();
    init_logging();
    block_stop_signals();
    if let Err(e) = take_netdev_fds(&mut cli.netdevs, &mut inherited) {
        say!("qomu: {e}");
        return ExitCode::FAILURE;
    }
    // Before any thread: each is then started under its class's filter (sandbox crate).
    if let Err(e) = sandbox::configure(cli.sandbox, sandbox_report_file()) {
        say!("qomu: sandbox: {e}");
        return ExitCode::FAILURE;
    }
    let allowed_paths = sandbox_paths(&cli);
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
        objects: cli.objects,
        netdevs: cli.netdevs,
    };
    let machine = match Machine::new(&config) {
        Ok(m) => m,
        Err(e) => {
            say!("qomu: {e}");
            return ExitCode::FAILURE;
        }
    };
    spawn_signal_thread(machine.clone());
    let terminal = Terminal::take(config.serial == "stdio");
    // What needs root or a path outside the sandbox's is opened now; then root is given up,
    // then every thread is filtered (docs/security.md, "Start-up order").
    if sandbox::active() || cli.run_as.is_some() {
        machine::preopen_kvm();
    }
    if let Some(who) = &cli.run_as
        && let Err(e) = sandbox::drop_privileges(who)
    {
        terminal.restore();
        say!("qomu: {e}");
        return ExitCode::FAILURE;
    }
    let early_bus = early_private_bus(&cli.dbus);
    if let Err(e) = sandbox::lockdown(&allowed_paths) {
        terminal.restore();
        say!("qomu: sandbox: {e}");
        return ExitCode::FAILURE;
    }
    // The front ends come up once the guest runs (unless -S), as QEMU's monitor answers
    // only once the VM has started: a client that connects as soon as it can sees the
    // state it asked for on the command line, never a passing prelaunch.
    let started = match &cli.incoming {
        Some(uri) if uri == "defer" => machine.defer_incoming(!cli.paused),
        Some(uri) => machine.incoming(uri, !cli.paused),
        None if !cli.paused => machine.cont(),
        None => Ok(()),
    };
    if let Err(e) = started {
        terminal.restore();
        say!("qomu: {e}");
        return ExitCode::FAILURE;
    }
    let fail = |e: &dyn std::fmt::Display| {
        machine.quit();
        terminal.restore();
        say!("qomu: {e}");
        ExitCode::FAILURE
    };
    let (mut dbus, private_bus) = match start_dbus(
        &cli.dbus,
        &cli.dbus_name,
        &cli.dbus_p2p,
        machine.tree(),
        early_bus,
    ) {
        Ok(started) => started,
        Err(e) => return fail(&e),
    };
    let mut qmp = match bus_bridge::qmp::server::QmpServer::start(machine.tree().clone(), &cli.qmp)
    {
        Ok(server) => server,
        Err(e) => return fail(&e),
    };
    let status = machine.wait_for_exit();
    // Let clients receive the reply to `quit` and the SHUTDOWN event before the sockets go.
    qmp.shutdown(std::time::Duration::from_secs(1));
    if let Some(d) = dbus.as_mut() {
        d.shutdown();
    }
    drop(private_bus);
    terminal.restore();
    ExitCode::from((status & 0xff) as u8)
}
