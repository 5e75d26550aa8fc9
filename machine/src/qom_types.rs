//! The qom types the machine declares: `/machine` itself and its vCPUs.
//!
//! Their closures hold the machine weakly: the machine owns the tree, so the tree's types
//! must not own the machine.

use std::path::Path;
use std::sync::{Arc, Weak};

use devices::ShutdownCause;
use qom::{
    Action, Args, Error, Field, Kind, NotifierDecl, ObjectRef, PhasePolicy, Property, Result,
    TreeBuilder, TypeInfo, Value,
};

use crate::layout::{MAX_CPUS, MAX_MEMORY, MIN_MEMORY};
use crate::machine::{MACHINE_TYPE, Machine};
use crate::runstate::RunState;

/// The type of the vCPU objects, `/machine/unattached/cpu[N]`.
pub const CPU_TYPE: &str = "x86_64-cpu";
/// The type of `/machine/migration`: the last (or current) migration, watchable.
pub const MIGRATION_TYPE: &str = "migration";

fn upgrade(weak: &Weak<Machine>) -> Result<Arc<Machine>> {
    weak.upgrade()
        .ok_or_else(|| Error::failed("the machine is shutting down"))
}

/// An action running `f` on the machine.
fn machine_action(
    weak: &Weak<Machine>,
    name: &str,
    f: impl Fn(&Machine, &Args) -> crate::Result<Option<Value>> + Send + Sync + 'static,
) -> Action {
    let weak = weak.clone();
    Action::new(name, move |_, args| Ok(f(&*upgrade(&weak)?, &args)?))
}

/// A read-only property computed from the machine.
fn machine_property(
    weak: &Weak<Machine>,
    name: &str,
    kind: Kind,
    f: impl Fn(&Machine) -> Value + Send + Sync + 'static,
) -> Property {
    let weak = weak.clone();
    Property::new(name, kind).getter(move |_| Ok(f(&*upgrade(&weak)?)))
}

fn run_states() -> Kind {
    let names: Vec<&str> = RunState::ALL.iter().map(|s| s.name()).collect();
    Kind::enumeration("RunState", &names)
}

fn shutdown_causes() -> Kind {
    let names: Vec<&str> = ShutdownCause::ALL.iter().map(|c| c.name()).collect();
    Kind::enumeration("ShutdownCause", &names)
}

fn file_exists(what: &str, v: &Value) -> Result<()> {
    let path = v.as_str().unwrap_or_default();
    if path.is_empty() || Path::new(path).is_file() {
        Ok(())
    } else {
        Err(Error::failed(format!(
            "{what} '{path}' is not a readable file"
        )))
    }
}

fn u64_arg(args: &Args, name: &str) -> u64 {
    args.get(name).and_then(Value::as_u64).unwrap_or(0)
}

fn str_arg<'a>(args: &'a Args, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// `/machine/migration`'s type: what query-migrate says, as properties (`status` notifies
/// on every change), and a `pass` notifier, for D-Bus clients to watch.
fn migration_type(weak: &Weak<Machine>) -> TypeInfo {
    let info =
        |name: &str, kind: Kind, description: &str, f: fn(&crate::migration::Info) -> Value| {
            machine_property(weak, name, kind, move |m| f(&m.migration_info()))
                .description(description)
        };
    TypeInfo::new(MIGRATION_TYPE, "object")
        .description("The last or current migration (or snapshot): QMP's query-migrate as properties")
        .property(
            info("status", Kind::Str, "none, setup, active, cancelling, cancelled, completed or failed", |i| {
                Value::Str(i.status.map_or("none", |s| s.name()).to_owned())
            })
            .notifying(),
        )
        .property(info("transferred", Kind::uint64(), "Bytes sent (or written, read)", |i| Value::UInt(i.bytes)))
        .property(info("remaining", Kind::uint64(), "Bytes the last pass left dirty", |i| Value::UInt(i.remaining)))
        .property(info("total", Kind::uint64(), "Guest RAM, bytes", |i| Value::UInt(i.ram_total)))
        .property(info("passes", Kind::uint64(), "Passes over RAM so far", |i| Value::UInt(i.passes)))
        .property(info(
            "progress",
            Kind::uint64(),
            "Per cent of RAM sent in the first pass, then of the last pass's dirty pages sent (100 when completed)",
            |i| Value::UInt(i.progress()),
        ))
        .property(info("expected-downtime", Kind::uint64(), "ms, while active", |i| {
            Value::UInt(i.expected_downtime_ms)
        }))
        .property(info("downtime", Kind::uint64(), "ms the guest was stopped, when completed", |i| {
            Value::UInt(i.downtime_ms)
        }))
        .property(info("total-time", Kind::uint64(), "ms from start to end", |i| Value::UInt(i.total_ms)))
        .property(info("error", Kind::Str, "Why it failed", |i| {
            Value::Str(i.error.clone().unwrap_or_default())
        }))
        .notifier(
            NotifierDecl::new(
                "pass",
                Kind::structure(
                    "MigrationPassStarted",
                    vec![Field::new("pass", Kind::uint64(), "The pass that starts, from 1")],
                ),
            )
            .description("A pass over the guest's RAM starts"),
        )
}

pub(crate) fn register(builder: &TreeBuilder, weak: &Weak<Machine>) -> Result<()> {
    builder.register(migration_type(weak))?;
    let reason_payload = |name: &str| {
        Kind::structure(
            name,
            vec![
                Field::new("guest", Kind::Bool, "True if the guest asked for it"),
                Field::new("reason", shutdown_causes(), "Why"),
            ],
        )
    };
    let empty = |name: &str| Kind::structure(name, vec![]);
    let machine = TypeInfo::new(MACHINE_TYPE, qom::MACHINE)
        .description("An x86-64 KVM machine with ACPI, a 16550 serial port, an i8042 and a CMOS RTC")
        .property(machine_property(weak, "status", run_states(), |m| Value::Enum(m.run_state().name().to_owned())).notifying().description("The run state"))
        .property(
            Property::new("memory-size", Kind::size())
                .default(256u64 << 20)
                .policy(PhasePolicy::Prelaunch)
                .notifying()
                .description("Guest RAM in bytes (a multiple of 1 MiB)")
                .validate(|_, v| {
                    let size = v.as_u64().unwrap_or(0);
                    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || size % (1 << 20) != 0 {
                        return Err(Error::failed(format!(
                            "memory-size must be a multiple of 1 MiB between {} MiB and {} GiB, got {size}",
                            MIN_MEMORY >> 20,
                            MAX_MEMORY >> 30
                        )));
                    }
                    Ok(())
                }),
        )
        .property(Property::new("cpus", Kind::uint_range(1, MAX_CPUS)).default(1u32).policy(PhasePolicy::Prelaunch).notifying().description("Number of vCPUs"))
        .property(
            Property::new("kernel", Kind::Str)
                .policy(PhasePolicy::Prelaunch)
                .notifying()
                .description("Kernel to boot: a 64-bit ELF (vmlinux) or a bzImage; empty for the built-in demo guest")
                .validate(|_, v| file_exists("kernel", v)),
        )
        .property(
            Property::new("initrd", Kind::Str)
                .policy(PhasePolicy::Prelaunch)
                .notifying()
                .description("Initial ramdisk; empty for none")
                .validate(|_, v| file_exists("initrd", v)),
        )
        .property(Property::new("append", Kind::Str).policy(PhasePolicy::Prelaunch).notifying().description("Kernel command line"))
        .property(Property::new("name", Kind::Str).notifying().description("The VM's name"))
        .property(Property::new("no-shutdown", Kind::Bool).notifying().description("On guest shutdown, stop in 'shutdown' instead of ending the VMM"))
        .property(machine_property(weak, "error", Kind::Str, |m| Value::Str(m.error().unwrap_or_default())).description("Why the machine stopped in internal-error"))
        .property(
            machine_property(weak, "exit-status", Kind::int32(), |m| Value::Int(m.exit_status().map_or(-1, i64::from)))
                .description("The VMM's exit status once it is ending, else -1"),
        )
        .property(machine_property(weak, "exits", Kind::uint64(), |m| Value::UInt(m.stats().exits())).description("vCPU exits handled (port I/O and MMIO)"))
        .property(
            machine_property(weak, "unmapped-pio-accesses", Kind::uint64(), |m| Value::UInt(m.stats().unmapped_pio()))
                .description("Guest port accesses no device answered"),
        )
        .property(
            machine_property(weak, "unmapped-mmio-accesses", Kind::uint64(), |m| Value::UInt(m.stats().unmapped_mmio()))
                .description("Guest MMIO accesses no device answered"),
        )
        .notifier(NotifierDecl::new("STOP", empty("Stop")).description("The guest stopped"))
        .notifier(NotifierDecl::new("RESUME", empty("Resume")).description("The guest resumed"))
        .notifier(NotifierDecl::new("RESET", reason_payload("Reset")).description("The machine was reset"))
        .notifier(NotifierDecl::new("SHUTDOWN", reason_payload("Shutdown")).description("The guest shut down, or the VMM is ending"))
        .notifier(NotifierDecl::new("POWERDOWN", empty("Powerdown")).description("The power button was pressed (system_powerdown)"))
        .notifier(
            NotifierDecl::new(
                "DEVICE_DELETED",
                Kind::structure(
                    "DeviceDeleted",
                    vec![
                        Field::optional("device", Kind::Str, "The device's id, if it has one"),
                        Field::new("path", Kind::Str, "The device's QOM path"),
                    ],
                ),
            )
            .description("A device is gone"),
        )
        .notifier(
            NotifierDecl::new(
                "NETDEV_STREAM_CONNECTED",
                Kind::structure(
                    "NetdevStreamConnected",
                    vec![
                        Field::new("netdev-id", Kind::Str, "The stream netdev's id"),
                        Field::new("addr", Kind::Any, "The peer's address: {type: unix, path}"),
                    ],
                ),
            )
            .description("A stream netdev's peer connected"),
        )
        .notifier(
            NotifierDecl::new(
                "NETDEV_STREAM_DISCONNECTED",
                Kind::structure(
                    "NetdevStreamDisconnected",
                    vec![Field::new("netdev-id", Kind::Str, "The stream netdev's id")],
                ),
            )
            .description("A stream netdev's peer went away"),
        )
        .notifier(
            NotifierDecl::new(
                "MIGRATION_PASS",
                Kind::structure(
                    "MigrationPass",
                    vec![Field::new("pass", Kind::uint64(), "The pass that starts, from 1")],
                ),
            )
            .description("A live migration starts a pass over the guest's RAM (QEMU's MIGRATION_PASS)"),
        )
        .notifier(
            NotifierDecl::new(
                "NIC_RX_FILTER_CHANGED",
                Kind::structure(
                    "NicRxFilterChanged",
                    vec![
                        Field::optional("name", Kind::Str, "The NIC's id, if it has one"),
                        Field::new("path", Kind::Str, "The NIC's QOM path"),
                    ],
                ),
            )
            .description(
                "A NIC's guest driver changed its receive filter; once until query-rx-filter \
                 is asked for that NIC, as QEMU",
            ),
        )
        .notifier(
            NotifierDecl::new(
                "MIGRATION",
                Kind::structure(
                    "Migration",
                    vec![Field::new(
                        "status",
                        Kind::enumeration("MigrationStatus", &["setup", "active", "completed", "failed", "cancelling", "cancelled"]),
                        "The migration's new status",
                    )],
                ),
            )
            .description("A snapshot (migrate file:PATH) or restore changed status"),
        )
        .action({
            let weak = weak.clone();
            Action::new("migrate", move |_, a| {
                if a.get("resume").and_then(Value::as_bool) == Some(true) {
                    return Err(Error::failed("qomu cannot resume a migration: start a new one"));
                }
                Ok(upgrade(&weak)?.migrate(str_arg(&a, "uri")).map(|()| None)?)
            })
            .description("Save the whole VM to a file (file:PATH) or send it to another qomu (unix:, tcp:, exec:, fd:); follow it with query-migrate or the MIGRATION events")
            .arg(Field::new("uri", Kind::Str, "Where to: file:PATH, unix:PATH, tcp:HOST:PORT, exec:COMMAND, fd:NAME"))
            .arg(Field::optional("detach", Kind::Bool, "Ignored, as in QEMU (the command always returns at once)"))
            .arg(Field::optional("resume", Kind::Bool, "Resume a paused migration: not supported"))
        })
        .action(
            machine_action(weak, "migrate-cancel", |m, _| {
                m.migrate_cancel();
                Ok(None)
            })
            .description("Stop the migration under way, the guest going on as it was (QEMU's migrate_cancel)"),
        )
        .action(
            machine_action(weak, "migrate-set-parameters", |m, a| {
                let u = |name: &str| a.get(name).and_then(Value::as_u64);
                m.set_migration_parameters(
                    u("downtime-limit"),
                    u("max-bandwidth"),
                    [u("announce-initial"), u("announce-max"), u("announce-rounds"), u("announce-step")],
                )
                .map(|()| None)
            })
            .description("Set migration parameters (QEMU's downtime-limit, max-bandwidth, announce-*)")
            .arg(Field::optional("downtime-limit", Kind::uint64(), "The downtime aimed for, ms (0 to 2000000; 300)"))
            .arg(Field::optional("max-bandwidth", Kind::uint64(), "Bytes a second a migration may send (128 MiB/s)"))
            .arg(Field::optional("announce-initial", Kind::uint64(), "ms before the NICs' first self-announcement after a migration (50)"))
            .arg(Field::optional("announce-max", Kind::uint64(), "Longest gap between announcements, ms (550)"))
            .arg(Field::optional("announce-rounds", Kind::uint64(), "Announcements (5)"))
            .arg(Field::optional("announce-step", Kind::uint64(), "How much longer each gap is than the one before, ms (100)")),
        )
        .action({
            let weak = weak.clone();
            Action::new("announce-self", move |_, a| {
                let m = upgrade(&weak)?;
                let mut announce = m.migration_params.lock().announce;
                let u = |name: &str| a.get(name).and_then(Value::as_u64);
                for (field, name) in [
                    (&mut announce.initial, "initial"),
                    (&mut announce.max, "max"),
                    (&mut announce.rounds, "rounds"),
                    (&mut announce.step, "step"),
                ] {
                    if let Some(v) = u(name) {
                        *field = v;
                    }
                }
                m.announce_nics(announce);
                Ok(None)
            })
            .description("Announce every NIC's MAC out of its netdev (RARP), as after a migration (QEMU's announce-self)")
            .arg(Field::optional("initial", Kind::uint64(), "ms before the first"))
            .arg(Field::optional("max", Kind::uint64(), "Longest gap, ms"))
            .arg(Field::optional("rounds", Kind::uint64(), "How many"))
            .arg(Field::optional("step", Kind::uint64(), "Each gap this much longer, ms"))
        })
        .action(
            machine_action(weak, "query-migrate-parameters", |m, _| Ok(Some(m.migration_parameters())))
                .description("The migration parameters")
                .returns(Kind::Any),
        )
        .action(
            machine_action(weak, "migrate-set-capabilities", |m, a| {
                let caps: Vec<(String, bool)> = match a.get("capabilities") {
                    Some(Value::List(items)) => items
                        .iter()
                        .map(|c| {
                            (
                                c.field("capability").and_then(Value::as_str).unwrap_or_default().to_owned(),
                                c.field("state").and_then(Value::as_bool).unwrap_or(false),
                            )
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                m.set_migration_capabilities(&caps).map(|()| None)
            })
            .description("Set migration capabilities: [{capability, state}] (only events can be on)")
            .arg(Field::new("capabilities", Kind::list(Kind::Any), "The capabilities and their states")),
        )
        .action(
            machine_action(weak, "query-migrate-capabilities", |m, _| Ok(Some(m.migration_capabilities())))
                .description("QEMU's migration capabilities and their states")
                .returns(Kind::list(Kind::Any)),
        )
        .action({
            let weak = weak.clone();
            Action::new("migrate-incoming", move |_, a| {
                Ok(upgrade(&weak)?.migrate_incoming(str_arg(&a, "uri")).map(|()| None)?)
            })
            .description("Where a qomu started with --incoming defer takes the migration stream (unix:, tcp:, exec:, fd:)")
            .arg(Field::new("uri", Kind::Str, "Where to listen"))
        })
        .action(
            machine_action(weak, "query-migrate", |m, _| Ok(Some(m.query_migrate())))
                .description("The status of the last snapshot or restore (QEMU's MigrationInfo; {} before any)")
                .returns(Kind::Any),
        )
        .action(machine_action(weak, "stop", |m, _| m.stop().map(|()| None)).description("Pause the guest"))
        .action(machine_action(weak, "cont", |m, _| m.cont().map(|()| None)).description("Start or resume the guest"))
        .action(
            machine_action(weak, "system-reset", |m, _| m.reset(ShutdownCause::HostQmpSystemReset).map(|()| None))
                .description("Reset the machine: the guest restarts from its kernel"),
        )
        .action(
            machine_action(weak, "system-powerdown", |m, _| {
                m.powerdown();
                Ok(None)
            })
            .description("Press the ACPI power button"),
        )
        .action(
            machine_action(weak, "quit", |m, _| {
                m.quit();
                Ok(None)
            })
            .description("End the VMM"),
        )
        .action(
            machine_action(weak, "pmemsave", |m, a| {
                m.pmemsave(u64_arg(a, "val"), u64_arg(a, "size"), Path::new(str_arg(a, "filename"))).map(|()| None)
            })
            .description("Save guest physical memory to a file")
            .arg(Field::new("val", Kind::uint64(), "Physical start address"))
            .arg(Field::new("size", Kind::uint64(), "Bytes"))
            .arg(Field::new("filename", Kind::Str, "File to write")),
        )
        .action(
            machine_action(weak, "memsave", |m, a| {
                let cpu = a.get("cpu-index").and_then(Value::as_u64).unwrap_or(0) as u32;
                m.memsave(u64_arg(a, "val"), u64_arg(a, "size"), Path::new(str_arg(a, "filename")), cpu).map(|()| None)
            })
            .description("Save guest virtual memory, as a vCPU sees it, to a file")
            .arg(Field::new("val", Kind::uint64(), "Virtual start address"))
            .arg(Field::new("size", Kind::uint64(), "Bytes"))
            .arg(Field::new("filename", Kind::Str, "File to write"))
            .arg(Field::optional("cpu-index", Kind::uint32(), "vCPU whose page tables translate (default 0)")),
        )
        .action(
            machine_action(weak, "device-add", |m, a| {
                let props = a.get("properties").cloned().unwrap_or(Value::Map(Default::default()));
                let id = a.get("id").and_then(Value::as_str);
                let bus = a.get("bus").and_then(Value::as_str);
                m.device_add(str_arg(a, "driver"), id, bus, &props).map(|_| None)
            })
            .description("Add a device: /machine/peripheral/<id>, or peripheral-anon without an id")
            .arg(Field::new("driver", Kind::Str, "The device type"))
            .arg(Field::optional("id", Kind::Str, "The device's id"))
            .arg(Field::optional("bus", Kind::Str, "The bus to plug it into"))
            .arg(Field::optional("properties", Kind::Any, "The device's properties, by name")),
        )
        .action(
            machine_action(weak, "netdev-add", |m, a| {
                let props = a.get("properties").cloned().unwrap_or(Value::Map(Default::default()));
                let id = a.get("id").and_then(Value::as_str);
                m.netdev_add_coerced(str_arg(a, "type"), id, &props).map(|_| None)
            })
            .description("Add a host network backend at /netdev/<id>: tap or stream")
            .arg(Field::new("type", Kind::Str, "The netdev type: tap or stream"))
            .arg(Field::optional("id", Kind::Str, "The netdev's id"))
            .arg(Field::optional("properties", Kind::Any, "The netdev's properties, by name")),
        )
        .action(
            machine_action(weak, "netdev-del", |m, a| m.netdev_del(str_arg(a, "id")).map(|()| None))
                .description("Remove a netdev, closing its backend")
                .arg(Field::new("id", Kind::Str, "The netdev's id")),
        )
        .action(
            machine_action(weak, "set-link", |m, a| {
                let up = a.get("up").and_then(Value::as_bool).unwrap_or(true);
                m.set_link(str_arg(a, "name"), up).map(|()| None)
            })
            .description("Set a link up or down: a NIC's id or a netdev's (both ends follow)")
            .arg(Field::new("name", Kind::Str, "The NIC's device id or the netdev's id"))
            .arg(Field::new("up", Kind::Bool, "Up (true) or down")),
        )
        .action(
            machine_action(weak, "query-rx-filter", |m, a| {
                m.query_rx_filter(a.get("name").and_then(Value::as_str)).map(Some)
            })
            .description("The receive filters NICs' drivers set (QEMU's RxFilterInfo list)")
            .arg(Field::optional("name", Kind::Str, "One NIC's id; none: every NIC"))
            .returns(Kind::list(Kind::Any)),
        )
        .action(
            machine_action(weak, "device-del", |m, a| m.device_del(str_arg(a, "id")).map(|()| None))
                .description("Remove a device added by a client, by id or QOM path")
                .arg(Field::new("id", Kind::Str, "The device's id or QOM path")),
        )
        .action(
            machine_action(weak, "query-cpus-fast", |m, _| Ok(Some(Value::List(m.query_cpus_fast()))))
                .description("Each vCPU's index, QOM path and host thread, without stopping the guest")
                .returns(Kind::list(Kind::Any)),
        )
        .action(
            machine_action(weak, "query-cpus", |m, _| m.query_cpus().map(|cpus| Some(Value::List(cpus))))
                .description("Every vCPU with its registers (the guest is paused for the moment of reading)")
                .returns(Kind::list(Kind::Any)),
        );
    builder.register(machine)?;

    let w = weak.clone();
    let cpu = TypeInfo::new(CPU_TYPE, devices::DEVICE)
        .description("An x86-64 vCPU")
        .property(
            Property::new("cpu-index", Kind::uint32())
                .policy(PhasePolicy::BeforeRealize)
                .description("Index of the vCPU"),
        )
        .property(
            Property::new("thread-id", Kind::int64())
                .description("Host thread running the vCPU")
                .getter(move |o: &ObjectRef| {
                    let index = o.get("cpu-index")?.as_u64().unwrap_or(0) as u32;
                    Ok(Value::Int(upgrade(&w)?.vcpu_thread_id(index)))
                }),
        )
        .property({
            let w = weak.clone();
            Property::new("tsc-frequency", Kind::int64())
                .description(
                    "The guest's TSC rate in Hz as KVM runs this vCPU (0 before the guest \
                     first runs), as QEMU's x86 CPU property of the name",
                )
                .getter(move |o: &ObjectRef| {
                    let index = o.get("cpu-index")?.as_u64().unwrap_or(0) as u32;
                    Ok(Value::Int(upgrade(&w)?.vcpu_tsc_hz(index) as i64))
                })
        });
    builder.register(cpu)?;
    builder.register(crate::dbus_vmstate::register())?;
    Ok(())
}
