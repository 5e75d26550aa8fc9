//! The `virtio-net-pci` type: QEMU's property names (`mac`, `netdev`, `host_mtu`, a
//! boolean per offload and control feature), the link as a notifying property, the
//! counters, the receive filter (`rx-filter`, QMP's query-rx-filter), and QEMU's default
//! MACs (52:54:00:12:34:56, counting up per NIC, free again when the NIC goes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use qom::{Field, Kind, Notifier, NotifierDecl, ObjectRef, PhasePolicy, Property, TypeInfo, Value};

use super::filter::RxFilter;
use super::filter::{Mac, format_mac, parse_mac};
use super::{
    F_CSUM, F_CTRL_MAC_ADDR, F_CTRL_RX, F_CTRL_RX_EXTRA, F_CTRL_VLAN, F_CTRL_VQ, F_GUEST_CSUM,
    F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_ECN, F_HOST_TSO4, F_HOST_TSO6, F_MAC,
    F_MRG_RXBUF, F_MTU, F_STATUS, IDENTITY, Net, NetEvents, NetState,
};
use crate::device::get_string;
use crate::net::netdev::Netdev;
use crate::net::port::{Port, Side};
use crate::platform::PlatformRef;
use crate::state::SerdeState;
use crate::virtio::VirtioObject;
use crate::virtio::qom::virtio_type;

pub const TYPE: &str = "virtio-net-pci";
/// The name QEMU's texts give the device behind the PCI function.
const QEMU_DEVICE: &str = "virtio-net-device";

/// The last bytes of default MACs in use (QEMU's `mac_table`, 0x56 upwards).
static DEFAULT_MACS: Mutex<[bool; 256]> = Mutex::new([false; 256]);

/// A free default MAC, marked used.
fn take_default_mac() -> Option<Mac> {
    let mut used = DEFAULT_MACS.lock();
    let last = (0x56..0xff).find(|&i| !used[i])?;
    used[last] = true;
    Some([0x52, 0x54, 0, 0x12, 0x34, last as u8])
}

/// A MAC of the default range, given explicitly, is marked used too (as QEMU does).
fn mark_mac(mac: &Mac, used: bool) {
    if mac[..5] == [0x52, 0x54, 0, 0x12, 0x34] {
        DEFAULT_MACS.lock()[usize::from(mac[5])] = used;
    }
}

/// The features a boolean property turns off, by property (all on by default, as QEMU).
/// QEMU's `status` (VIRTIO_NET_F_STATUS) is not among them: `status` is every virtio
/// device's status byte here, and the link state is always offered.
const FEATURE_PROPERTIES: [(&str, u64, &str); 14] = [
    (
        "csum",
        F_CSUM,
        "Checksum offload of sent frames (VIRTIO_NET_F_CSUM)",
    ),
    (
        "guest_csum",
        F_GUEST_CSUM,
        "Received frames may carry partial checksums (GUEST_CSUM)",
    ),
    (
        "host_tso4",
        F_HOST_TSO4,
        "TCPv4 segmentation offload of sent frames (HOST_TSO4)",
    ),
    (
        "host_tso6",
        F_HOST_TSO6,
        "TCPv6 segmentation offload of sent frames (HOST_TSO6)",
    ),
    (
        "host_ecn",
        F_HOST_ECN,
        "TSO with ECN of sent frames (HOST_ECN)",
    ),
    (
        "guest_tso4",
        F_GUEST_TSO4,
        "The guest takes TCPv4 GSO frames (GUEST_TSO4)",
    ),
    (
        "guest_tso6",
        F_GUEST_TSO6,
        "The guest takes TCPv6 GSO frames (GUEST_TSO6)",
    ),
    (
        "guest_ecn",
        F_GUEST_ECN,
        "The guest takes GSO frames with ECN (GUEST_ECN)",
    ),
    (
        "mrg_rxbuf",
        F_MRG_RXBUF,
        "A received frame may span buffers (MRG_RXBUF)",
    ),
    ("ctrl_vq", F_CTRL_VQ, "The control queue (CTRL_VQ)"),
    (
        "ctrl_rx",
        F_CTRL_RX,
        "RX modes over the control queue (CTRL_RX)",
    ),
    (
        "ctrl_vlan",
        F_CTRL_VLAN,
        "The VLAN filter over the control queue (CTRL_VLAN)",
    ),
    (
        "ctrl_rx_extra",
        F_CTRL_RX_EXTRA,
        "More RX modes (CTRL_RX_EXTRA)",
    ),
    (
        "ctrl_mac_addr",
        F_CTRL_MAC_ADDR,
        "Setting the MAC over the control queue (CTRL_MAC_ADDR)",
    ),
];

/// What the type's properties share with the model.
#[derive(Default)]
struct Shared {
    state: Mutex<Option<Arc<NetState>>>,
    port: Mutex<Option<Arc<Port>>>,
    /// NIC_RX_FILTER_CHANGED may go out (QEMU's `rxfilter_notify_enabled`): once, until
    /// query-rx-filter re-arms it.
    rx_notify: Arc<AtomicBool>,
    /// The default MAC this NIC took, given back when it goes.
    default_mac: Mutex<Option<Mac>>,
}

/// What a snapshot keeps of a NIC beyond its transport: the receive filter (and the MAC
/// the driver set) and the link. Frames in flight are not kept.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    filter: RxFilter,
    link: bool,
}

/// NIC_RX_FILTER_CHANGED and the NIC's own `rx-filter-changed`.
struct FilterEvents {
    own: Notifier,
    machine: Option<Notifier>,
    armed: Arc<AtomicBool>,
    id: Option<String>,
    path: String,
}

impl NetEvents for FilterEvents {
    fn rx_filter_changed(&self) {
        self.own
            .emit_fields(|| [("path", Value::Str(self.path.clone()))]);
        if self.armed.swap(false, Ordering::AcqRel)
            && let Some(n) = &self.machine
        {
            n.emit(|| {
                let mut fields = vec![("path", Value::Str(self.path.clone()))];
                if let Some(id) = &self.id {
                    fields.push(("name", Value::Str(id.clone())));
                }
                Value::map(fields)
            });
        }
    }
}

fn shared(d: &VirtioObject) -> qom::Result<&Shared> {
    d.shared::<Shared>()
}

fn state(d: &VirtioObject) -> qom::Result<Option<Arc<NetState>>> {
    Ok(shared(d)?.state.lock().clone())
}

fn counter(name: &str, description: &str) -> Property {
    Property::new(name, Kind::uint64()).description(description)
}

/// A counter, read once no frame is between the backend and its count.
fn stat(d: &VirtioObject, read: fn(&NetState) -> u64) -> qom::Result<Value> {
    let shared = shared(d)?;
    if let Some(port) = shared.port.lock().clone() {
        port.settle();
    }
    let state = shared.state.lock().clone();
    Ok(Value::UInt(state.map_or(0, |s| read(&s))))
}

/// The netdev `id` names, taken for the NIC at `o`.
fn claim_netdev(o: &ObjectRef, id: &str) -> qom::Result<Arc<Port>> {
    let port = o
        .tree()
        .lookup(&format!("/netdev/{id}"))
        .ok()
        .and_then(|n| n.instance::<Netdev>())
        .and_then(|n| n.port())
        .ok_or_else(|| crate::Error::NoSuchNetdev {
            typename: QEMU_DEVICE.into(),
            id: id.to_owned(),
        })?;
    port.claim(o.path())
        .map_err(|_| crate::Error::NetdevInUse {
            typename: QEMU_DEVICE.into(),
            id: id.to_owned(),
            nic: port.nic().unwrap_or_else(|| "a NIC".into()),
        })?;
    Ok(port)
}

/// Builds the model when the object is realized.
fn make_model(
    o: &ObjectRef,
    shared: &Arc<Shared>,
) -> qom::Result<Arc<dyn crate::virtio::VirtioDevice>> {
    let text = get_string(o, "mac")?;
    let mac = if text.is_empty() {
        let mac = take_default_mac().ok_or_else(|| crate::Error::BadValue {
            typename: QEMU_DEVICE.into(),
            property: "mac",
            value: String::new(),
            why: "every default MAC is in use",
        })?;
        *shared.default_mac.lock() = Some(mac);
        // qom-get shows the MAC given, as QEMU's does.
        o.set("mac", Value::Str(format_mac(&mac)))?;
        mac
    } else {
        // Checked by the property's validator; a default-range MAC is marked used.
        let mac = parse_mac(&text).unwrap_or_default();
        mark_mac(&mac, true);
        *shared.default_mac.lock() = Some(mac);
        mac
    };
    let netdev = get_string(o, "netdev")?;
    let port = if netdev.is_empty() {
        None
    } else {
        match claim_netdev(o, &netdev) {
            Ok(p) => Some(p),
            Err(e) => {
                release_mac(shared);
                return Err(e);
            }
        }
    };
    let mut features = F_MAC | F_STATUS;
    for (name, bit, _) in FEATURE_PROPERTIES {
        if o.get(name)?.as_bool() != Some(false) {
            features |= bit;
        }
    }
    let mtu = o.get("host_mtu")?.as_u64().unwrap_or(0) as u16;
    if mtu != 0 {
        features |= F_MTU;
    }
    let size = |name| o.get(name).ok().and_then(|v| v.as_u64()).unwrap_or(256) as u16;
    let sizes = (size("rx_queue_size"), size("tx_queue_size"));
    let state = Arc::new(NetState::new(mac));
    let events = Arc::new(FilterEvents {
        own: o.notifier("rx-filter-changed")?,
        machine: o
            .tree()
            .lookup("/machine")
            .ok()
            .and_then(|m| m.notifier("NIC_RX_FILTER_CHANGED").ok()),
        armed: shared.rx_notify.clone(),
        id: o
            .parent()
            .filter(|p| p.path().starts_with("/machine/peripheral"))
            .map(|_| o.name().to_owned())
            .filter(|_| !o.path().starts_with("/machine/peripheral-anon")),
        path: o.path().to_owned(),
    });
    shared.rx_notify.store(true, Ordering::Release);
    if let Some(port) = &port {
        // A link change shows on the NIC: its property, and the configuration interrupt
        // the driver reads the new status after.
        let weak = o.downgrade();
        port.link().watch(
            Side::Nic,
            Some(Box::new(move |up, own| {
                if let Some(o) = weak.upgrade() {
                    if let Some(d) = o.instance::<VirtioObject>() {
                        d.function().config_changed();
                    }
                    if !own {
                        o.notify_property_changed("link", &Value::Bool(up));
                    }
                }
            })),
        );
    }
    *shared.state.lock() = Some(state.clone());
    *shared.port.lock() = port.clone();
    Ok(Arc::new(Net::new(
        state, port, features, mtu, sizes, events,
    )))
}

fn release_mac(shared: &Shared) {
    if let Some(mac) = shared.default_mac.lock().take() {
        mark_mac(&mac, false);
    }
}

/// The frame QEMU's self-announcement sends for a NIC (`qemu_announce_self`): a RARP
/// request, broadcast, from and about `mac`, padded to the Ethernet minimum.
pub fn announcement(mac: &Mac) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, reverse request
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

/// Sends the NIC's announcement out of its netdev (after a migration: switches learn
/// where its MAC is now); false if it has no open netdev or the link is down.
pub fn announce(o: &ObjectRef) -> bool {
    let Some(d) = o.instance::<VirtioObject>() else {
        return false;
    };
    let Ok(shared) = shared(&d) else {
        return false;
    };
    let (Some(port), Some(state)) = (shared.port.lock().clone(), shared.state.lock().clone())
    else {
        return false;
    };
    if !port.link().is_up() {
        return false;
    }
    let frame = announcement(&state.filter.lock().mac);
    let header = [0u8; crate::net::tap::VNET_HDR_LEN];
    port.with_backend(|b| {
        let parts: &[&[u8]] = if b.vnet_hdr() {
            &[&header, &frame]
        } else {
            &[&frame]
        };
        b.send(parts).unwrap_or(false)
    })
    .unwrap_or(false)
}

/// What query-rx-filter shows of the NIC, in QEMU's `RxFilterInfo` shape.
pub fn rx_filter_info(o: &ObjectRef) -> qom::Result<Value> {
    let d = o
        .instance::<VirtioObject>()
        .ok_or_else(|| qom::Error::failed("not a virtio device"))?;
    let shared = shared(&d)?;
    let state = shared.state.lock().clone();
    let filter = state.map_or_else(
        || super::filter::RxFilter::new([0; 6]),
        |s| s.filter.lock().clone(),
    );
    let mode = |none: bool, all: bool| {
        Value::Str(
            if none {
                "none"
            } else if all {
                "all"
            } else {
                "normal"
            }
            .into(),
        )
    };
    let macs = |t: &[Mac]| Value::List(t.iter().map(|m| Value::Str(format_mac(m))).collect());
    // The query re-arms the event (QEMU's once-until-queried rule).
    shared.rx_notify.store(true, Ordering::Release);
    Ok(Value::map([
        ("name", Value::Str(o.name().to_owned())),
        ("promiscuous", Value::Bool(filter.promisc)),
        ("multicast", mode(filter.nomulti, filter.allmulti)),
        ("unicast", mode(filter.nouni, filter.alluni)),
        (
            "vlan",
            Value::Str(
                if filter.vlan_filtering {
                    "normal"
                } else {
                    "all"
                }
                .into(),
            ),
        ),
        // QEMU reports its `nobcast` flag under this name.
        ("broadcast-allowed", Value::Bool(filter.nobcast)),
        ("multicast-overflow", Value::Bool(filter.multi_overflow)),
        ("unicast-overflow", Value::Bool(filter.uni_overflow)),
        ("main-mac", Value::Str(format_mac(&filter.mac))),
        (
            "vlan-table",
            Value::List(
                filter
                    .vlan_table()
                    .into_iter()
                    .map(|v| Value::UInt(v.into()))
                    .collect(),
            ),
        ),
        ("unicast-table", macs(&filter.unicast)),
        ("multicast-table", macs(&filter.multicast)),
    ]))
}

/// `rx_queue_size` or `tx_queue_size`: a power of 2 from 256 to 1024, refused otherwise
/// with QEMU's text (which ends in `end`: QEMU's has a full stop for one and not the other).
fn queue_size(name: &'static str, what: &str, end: &'static str) -> Property {
    Property::new(name, Kind::uint16())
        .default(256u32)
        .policy(PhasePolicy::BeforeRealize)
        .description(&format!(
            "{what}: a power of 2 from 256 to 1024 (QEMU's; qomu honours it with every backend)"
        ))
        .validate(move |_, v| {
            let size = v.as_u64().unwrap_or(0);
            let ok = u16::try_from(size)
                .is_ok_and(|s| s.is_power_of_two() && super::QUEUE_SIZES.contains(&s));
            if ok {
                return Ok(());
            }
            Err(qom::Error::failed(format!(
                "Invalid {name} (= {size}), must be a power of 2 between {} and {}{end}",
                super::QUEUE_SIZES.start(),
                super::QUEUE_SIZES.end()
            )))
        })
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let mut info = virtio_type(
        TYPE,
        IDENTITY,
        platform,
        || Arc::new(Shared::default()),
        make_model,
    )
    .description("virtio network card on PCI, on a netdev (tap or stream)")
    .serde_state(
        1,
        |d| {
            let shared = shared(d).ok();
            let state = shared.and_then(|s| s.state.lock().clone());
            let link = match shared.and_then(|s| s.port.lock().clone()) {
                Some(p) => p.link().is_up(),
                None => state
                    .as_ref()
                    .is_none_or(|s| s.own_link.load(Ordering::Acquire)),
            };
            Saved {
                filter: state.map_or_else(|| RxFilter::new([0; 6]), |s| s.filter.lock().clone()),
                link,
            }
        },
        |d, saved: Saved| {
            let shared = shared(d).map_err(|_| crate::Error::NotRealized { path: TYPE.into() })?;
            if let Some(s) = shared.state.lock().clone() {
                *s.filter.lock() = saved.filter;
                s.own_link.store(saved.link, Ordering::Release);
            }
            if let Some(p) = shared.port.lock().clone() {
                p.link().set(saved.link, None);
            }
            Ok(())
        },
    )
    .property(
        Property::new("mac", Kind::Str)
            .policy(PhasePolicy::BeforeRealize)
            .description("The MAC address (default: 52:54:00:12:34:56 and up, per NIC)")
            .validate(|_, v| {
                let text = v.as_str().unwrap_or_default();
                if text.is_empty() || parse_mac(text).is_some() {
                    return Ok(());
                }
                Err(crate::Error::BadValue {
                    typename: QEMU_DEVICE.into(),
                    property: "mac",
                    value: text.to_owned(),
                    why: "not a MAC address (six hex pairs, colon-separated)",
                }
                .into())
            }),
    )
    .property(
        Property::new("netdev", Kind::Str)
            .policy(PhasePolicy::BeforeRealize)
            .description("The netdev's id (netdev_add, --netdev); none: frames go nowhere"),
    )
    .property(queue_size("rx_queue_size", "The receive queue's size", "."))
    .property(queue_size("tx_queue_size", "The transmit queue's size", ""))
    .property(
        Property::new("host_mtu", Kind::uint_range(0, 65535))
            .policy(PhasePolicy::BeforeRealize)
            .description("The MTU the device advises (VIRTIO_NET_F_MTU); 0: none"),
    )
    .accessor(
        Property::new("link", Kind::Bool)
            .policy(PhasePolicy::Always)
            .notifying()
            .description(
                "Whether the link is up (QMP's set_link; with a netdev, its link too); the \
                     guest sees a change through the configuration interrupt",
            ),
        |d, _| {
            let link = match shared(d)?.port.lock().as_ref() {
                Some(p) => p.link().is_up(),
                None => state(d)?.is_none_or(|s| s.own_link.load(Ordering::Acquire)),
            };
            Ok(Value::Bool(link))
        },
        |d, _, v| {
            let up = v.as_bool().unwrap_or(true);
            let port = shared(d)?.port.lock().clone();
            match port {
                // The watcher raises the interrupt (and tells the netdev's side).
                Some(p) => {
                    p.link().set(up, Some(Side::Nic));
                }
                None => {
                    if let Some(s) = state(d)?
                        && s.own_link.swap(up, Ordering::AcqRel) != up
                    {
                        d.function().config_changed();
                    }
                }
            }
            Ok(())
        },
    )
    .try_getter(
        Property::new("mac-address", Kind::Str)
            .description("The MAC the guest's driver uses now (it may set another)"),
        |d, _| {
            Ok(Value::Str(state(d)?.map_or_else(String::new, |s| {
                format_mac(&s.filter.lock().mac)
            })))
        },
    )
    .try_getter(
        counter("rx-packets", "Frames given to the guest"),
        |d, _| stat(d, |s| s.counters.rx_packets.load(Ordering::Relaxed)),
    )
    .try_getter(counter("rx-bytes", "Bytes of those frames"), |d, _| {
        stat(d, |s| s.counters.rx_bytes.load(Ordering::Relaxed))
    })
    .try_getter(
        counter(
            "rx-dropped",
            "Frames from the host dropped: link down, or no guest buffer could hold them",
        ),
        |d, _| stat(d, |s| s.counters.rx_dropped.load(Ordering::Relaxed)),
    )
    .try_getter(
        counter(
            "rx-filtered",
            "Frames from the host the guest's receive filter refused",
        ),
        |d, _| stat(d, |s| s.rx_filtered.load(Ordering::Relaxed)),
    )
    .try_getter(counter("tx-packets", "Frames the guest sent"), |d, _| {
        stat(d, |s| s.counters.tx_packets.load(Ordering::Relaxed))
    })
    .try_getter(counter("tx-bytes", "Bytes of those frames"), |d, _| {
        stat(d, |s| s.counters.tx_bytes.load(Ordering::Relaxed))
    })
    .try_getter(
        counter(
            "tx-dropped",
            "Frames the guest sent that went nowhere: link down, no netdev, or refused",
        ),
        |d, _| stat(d, |s| s.counters.tx_dropped.load(Ordering::Relaxed)),
    )
    .notifier(
        NotifierDecl::new(
            "rx-filter-changed",
            Kind::structure(
                "VirtioNetRxFilterChanged",
                vec![Field::new("path", Kind::Str, "The NIC's path")],
            ),
        )
        .description(
            "The guest's driver changed the receive filter (every change; the machine's \
                 NIC_RX_FILTER_CHANGED goes once until query-rx-filter)",
        ),
    )
    .unrealize(|d, _| {
        if let Ok(shared) = shared(d) {
            if let Some(port) = shared.port.lock().take() {
                port.release();
            }
            release_mac(shared);
        }
    });
    for (name, _, description) in FEATURE_PROPERTIES {
        info = info.property(
            Property::new(name, Kind::Bool)
                .default(true)
                .policy(PhasePolicy::BeforeRealize)
                .description(description),
        );
    }
    info.build()
}
