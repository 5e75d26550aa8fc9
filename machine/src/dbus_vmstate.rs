//! `dbus-vmstate`: carries helper processes' state in snapshots, as QEMU's object of that
//! name does (docs/snapshot.md).
//!
//! Helpers own the well-known name `org.qemu.VMState1` on the bus at `addr` (in a queue,
//! one owner each) and export `/org/qemu/VMState1` with the `org.qemu.VMState1` interface:
//! a string property `Id`, unique among them, and the methods `Save() -> ay` and
//! `Load(ay)`. At save the object lists the name's queued owners, reads their `Id`s and
//! calls `Save` on each; at restore it calls `Load` on the helper with each saved `Id`.
//! Every step fails the snapshot (or restore) with the reason: an unreachable bus, a
//! helper missing from or not in `id-list`, two helpers with one `Id`, a call that takes
//! longer than `timeout-ms`, or more than 1 MiB of state.

use std::collections::BTreeMap;
use std::time::Duration;

use qom::{Error, Kind, ObjectRef, PhasePolicy, Property, Result, TypeInfo};
use zbus::names::{BusName, WellKnownName};

pub const TYPE: &str = "dbus-vmstate";
const NAME: &str = "org.qemu.VMState1";
const PATH: &str = "/org/qemu/VMState1";
const INTERFACE: &str = "org.qemu.VMState1";
/// The most state one helper may hand over (QEMU's limit).
pub const MAX_HELPER_STATE: usize = 1 << 20;

fn failed(e: impl std::fmt::Display) -> Error {
    crate::Error::Helper(format!("dbus-vmstate: {e}")).into()
}

/// The object's settings, read from its properties.
struct Settings {
    addr: String,
    ids: Option<Vec<String>>,
    timeout: Duration,
}

impl Settings {
    fn of(obj: &ObjectRef) -> Result<Settings> {
        let addr = obj.get("addr")?.as_str().unwrap_or_default().to_owned();
        if addr.is_empty() {
            return Err(failed("'addr' (a D-Bus address) is not set"));
        }
        let list = obj.get("id-list")?.as_str().unwrap_or_default().to_owned();
        let ids = (!list.is_empty()).then(|| list.split(',').map(str::to_owned).collect());
        let ms = obj.get("timeout-ms")?.as_u64().unwrap_or(5000);
        Ok(Settings {
            addr,
            ids,
            timeout: Duration::from_millis(ms),
        })
    }
}

/// Runs `f` on a connection to the helpers' bus.
fn with_bus<T>(
    settings: &Settings,
    f: impl AsyncFnOnce(&zbus::Connection) -> Result<T>,
) -> Result<T> {
    let runtime = zruntime::SharedRuntime::new().map_err(failed)?;
    runtime.block_on(async {
        let connection = zbus::connection::Builder::address(settings.addr.as_str())
            .method_timeout(settings.timeout)
            .build()
            .await
            .map_err(|e| failed(format!("cannot connect to '{}': {e}", settings.addr)))?;
        f(&connection).await
    })
}

/// The helpers on the bus: `Id` → a proxy to it. Checks them against `id-list`.
async fn helpers(
    c: &zbus::Connection,
    settings: &Settings,
) -> Result<BTreeMap<String, zbus::Proxy<'static>>> {
    let dbus = zbus::fdo::DBusProxy::new(c).await.map_err(failed)?;
    let name = WellKnownName::try_from(NAME).map_err(failed)?;
    let owners = match dbus.list_queued_owners(name).await {
        Ok(owners) => owners,
        Err(zbus::fdo::Error::NameHasNoOwner(_)) => Vec::new(),
        Err(e) => return Err(failed(format!("cannot list the helpers: {e}"))),
    };
    let mut found = BTreeMap::new();
    for owner in owners {
        let proxy = zbus::Proxy::new(c, BusName::from(owner.clone()), PATH, INTERFACE)
            .await
            .map_err(failed)?;
        let id: String = proxy
            .get_property("Id")
            .await
            .map_err(|e| failed(format!("cannot read the Id of helper {owner}: {e}")))?;
        if let Some(ids) = &settings.ids
            && !ids.contains(&id)
        {
            return Err(failed(format!(
                "helper {owner} has Id '{id}', which is not in id-list"
            )));
        }
        if let Some(other) = found.insert(id.clone(), proxy) {
            return Err(failed(format!(
                "helpers {} and {owner} have the same Id '{id}'",
                other.destination()
            )));
        }
    }
    if let Some(ids) = &settings.ids
        && let Some(missing) = ids.iter().find(|id| !found.contains_key(*id))
    {
        return Err(failed(format!(
            "no helper with Id '{missing}' is on the bus"
        )));
    }
    Ok(found)
}

/// Calls `Save` on every helper: `Id` → its state.
fn save(obj: &ObjectRef) -> Result<BTreeMap<String, Vec<u8>>> {
    let settings = Settings::of(obj)?;
    with_bus(&settings, async |c| {
        let mut saved = BTreeMap::new();
        for (id, proxy) in helpers(c, &settings).await? {
            let data: Vec<u8> = proxy
                .call("Save", &())
                .await
                .map_err(|e| failed(format!("Save on helper '{id}' failed: {e}")))?;
            if data.len() > MAX_HELPER_STATE {
                return Err(failed(format!(
                    "helper '{id}' saved {} bytes; the limit is {MAX_HELPER_STATE}",
                    data.len()
                )));
            }
            saved.insert(id, data);
        }
        Ok(saved)
    })
}

/// Calls `Load` on the helper of each saved `Id`.
fn load(obj: &ObjectRef, saved: BTreeMap<String, Vec<u8>>) -> Result<()> {
    let settings = Settings::of(obj)?;
    if let Some((id, data)) = saved.iter().find(|(_, d)| d.len() > MAX_HELPER_STATE) {
        return Err(failed(format!(
            "the state of helper '{id}' is {} bytes; the limit is {MAX_HELPER_STATE}",
            data.len()
        )));
    }
    with_bus(&settings, async |c| {
        let here = helpers(c, &settings).await?;
        if let Some(id) = saved.keys().find(|id| !here.contains_key(*id)) {
            return Err(failed(format!(
                "the snapshot has state for helper '{id}', which is not on the bus"
            )));
        }
        for (id, data) in &saved {
            here[id]
                .call::<_, _, ()>("Load", &(data.as_slice(),))
                .await
                .map_err(|e| failed(format!("Load on helper '{id}' failed: {e}")))?;
        }
        Ok(())
    })
}

pub(crate) fn register() -> TypeInfo {
    TypeInfo::new(TYPE, qom::OBJECT)
        .implements(qom::USER_CREATABLE)
        .description("Saves and restores helper processes' state (org.qemu.VMState1 on a D-Bus bus) with the VM")
        .property(
            Property::new("addr", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description("The D-Bus address of the helpers' bus, e.g. unix:path=/run/vm/bus"),
        )
        .property(
            Property::new("id-list", Kind::Str)
                .policy(PhasePolicy::BeforeRealize)
                .description("The helpers' Ids, comma-separated: exactly these must be on the bus (empty: whoever is)"),
        )
        .property(
            Property::new("timeout-ms", Kind::uint64())
                .default(5000u64)
                .policy(PhasePolicy::BeforeRealize)
                .description("How long a helper may take to answer (ms)"),
        )
        .state(
            1,
            |o| {
                let saved = save(o)?;
                serde_json::to_vec(&saved).map_err(failed)
            },
            |o, bytes| {
                let saved: BTreeMap<String, Vec<u8>> = serde_json::from_slice(bytes)
                    .map_err(|e| failed(format!("the saved helper state does not parse: {e}")))?;
                load(o, saved)
            },
        )
}
