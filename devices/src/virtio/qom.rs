//! The qom face of virtio devices: the abstract `virtio-device` type (a `pci-device`) with
//! the transport's state as properties and the `driver-ok` notifier, and what each model's
//! concrete type builds on ([`virtio_type`]).

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use qom::{
    Field, Kind, Notifier, NotifierDecl, ObjectRef, PhasePolicy, Property, TypeInfo, TypedInfo,
    Value,
};

use super::pci::{VirtioEvents, VirtioPci};
use super::{Identity, VirtioDevice};
use crate::USER_DEVICE;
use crate::pci::{self, PCI_DEVICE};
use crate::platform::{PlatformRef, upgrade};
use crate::state::SerdeState;

/// The abstract qom type of virtio devices.
pub const VIRTIO_DEVICE: &str = "virtio-device";

/// Makes a model from its object's properties, when the object is realized.
type ModelFactory = Box<dyn Fn(&ObjectRef) -> qom::Result<Arc<dyn VirtioDevice>> + Send + Sync>;

/// The instance of every `virtio-device` object: the PCI function, how to make its model,
/// and what the model shares with its type's properties (a disk's counters).
pub struct VirtioObject {
    function: Arc<VirtioPci>,
    platform: PlatformRef,
    make_model: ModelFactory,
    shared: Arc<dyn Any + Send + Sync>,
}

impl VirtioObject {
    pub fn function(&self) -> &Arc<VirtioPci> {
        &self.function
    }

    /// What the model shares with its type's properties, if it is a `T`.
    ///
    /// # Errors
    /// It is not (a type registered with another model: a bug).
    pub fn shared<T: Send + Sync + 'static>(&self) -> qom::Result<&T> {
        self.shared
            .downcast_ref::<T>()
            .ok_or_else(|| qom::Error::failed("the virtio device has another model"))
    }
}

/// `driver-ok`, as the function reports it.
struct DriverOk(Notifier);

impl VirtioEvents for DriverOk {
    fn driver_ok(&self, features: u64) {
        self.0.emit_fields(|| [("features", Value::UInt(features))]);
    }
}

/// A concrete virtio device type: a `virtio-device` users may plug, whose function
/// presents `identity`, whose model `make_model` builds from the object's properties when
/// it is realized, sharing `shared` with the type's properties.
pub(crate) fn virtio_type<S: Send + Sync + 'static>(
    name: &str,
    identity: Identity,
    platform: &PlatformRef,
    shared: impl Fn() -> Arc<S> + Send + Sync + 'static,
    make_model: impl Fn(&ObjectRef, &Arc<S>) -> qom::Result<Arc<dyn VirtioDevice>>
    + Send
    + Sync
    + 'static,
) -> TypedInfo<VirtioObject> {
    let make_model = Arc::new(make_model);
    crate::device::device_type(name, VIRTIO_DEVICE, platform, move |platform, _| {
        let shared = shared();
        let make = make_model.clone();
        let for_model = shared.clone();
        Ok(VirtioObject {
            function: Arc::new(VirtioPci::new(identity, platform.clone())?),
            platform,
            make_model: Box::new(move |o| make(o, &for_model)),
            shared,
        })
    })
    .implements(USER_DEVICE)
}

fn counter(name: &str, description: &str) -> Property {
    Property::new(name, Kind::uint64()).description(description)
}

/// The name of a device's I/O thread (at most 15 bytes, as Linux keeps them).
fn thread_name(o: &ObjectRef) -> String {
    let mut name = format!("io-{}", o.name());
    name.truncate(15);
    name
}

/// The abstract `virtio-device` type.
pub(crate) fn base_type() -> TypeInfo {
    TypedInfo::<VirtioObject>::abstract_type(VIRTIO_DEVICE, PCI_DEVICE)
        .description("A virtio device on PCI (virtio 1.x, modern transport)")
        // Version 2: the transport as one structure (version 1 had its fields flat).
        .serde_state(
            2,
            |d| d.function.save(),
            |d, saved| {
                d.function.load(saved).map_err(|why| crate::Error::State {
                    path: VIRTIO_DEVICE.into(),
                    why,
                })
            },
        )
        .getter(
            Property::new("status", Kind::uint8())
                .description("The device status the driver set (4: DRIVER_OK)"),
            |d| Value::UInt(d.function.status().into()),
        )
        .getter(
            Property::new("queue-sizes", Kind::list(Kind::uint16()))
                .description("Each queue's largest size, as the driver reads it"),
            |d| {
                Value::List(
                    d.function
                        .queue_maxes()
                        .into_iter()
                        .map(|m| Value::UInt(m.into()))
                        .collect(),
                )
            },
        )
        .getter(
            counter("host-features", "Feature bits the device offers"),
            |d| Value::UInt(d.function.offered()),
        )
        .getter(
            counter("guest-features", "Feature bits the driver accepted"),
            |d| Value::UInt(d.function.driver_features()),
        )
        .getter(
            counter("notifications", "Queue notifications from the driver"),
            |d| Value::UInt(d.function.counters().notifications.load(Ordering::Relaxed)),
        )
        .getter(
            counter(
                "notify-exits",
                "Queue notifications that exited to a vCPU instead of reaching KVM's \
                 ioeventfd (0 while ioeventfds work)",
            ),
            |d| Value::UInt(d.function.counters().notify_exits.load(Ordering::Relaxed)),
        )
        .getter(
            Property::new("ioeventfd-active", Kind::Bool).description(
                "Whether queue notifications reach the device's I/O thread through KVM \
                 ioeventfds now (false before the VM exists, with ioeventfd=off, or while \
                 the BAR is unmapped)",
            ),
            |d| Value::Bool(d.function.ioevents_registered()),
        )
        .property(
            Property::new("ioeventfd", Kind::Bool)
                .default(true)
                .policy(PhasePolicy::BeforeRealize)
                .description(
                    "Queue notifications through KVM ioeventfds, without a vCPU exit (as \
                     QEMU's virtio-pci ioeventfd property; off: each exits to the vCPU)",
                ),
        )
        .getter(
            counter(
                "in-flight",
                "Requests the device's I/O thread is serving now (taken from a queue, \
                 not yet returned)",
            ),
            |d| Value::UInt(d.function.counters().in_flight.load(Ordering::Relaxed)),
        )
        .getter(
            counter(
                "used-batches",
                "Rounds of serving that returned buffers to the driver",
            ),
            |d| Value::UInt(d.function.counters().used.load(Ordering::Relaxed)),
        )
        .getter(counter("interrupts", "Times the device raised INTx"), |d| {
            Value::UInt(d.function.signals().intx_count())
        })
        .getter(
            counter(
                "msix-messages",
                "MSI-X messages sent (interrupts while the driver has MSI-X on)",
            ),
            |d| Value::UInt(d.function.signals().msix.lock().messages()),
        )
        .notifier(
            NotifierDecl::new(
                "driver-ok",
                Kind::structure(
                    "VirtioDriverOk",
                    vec![Field::new(
                        "features",
                        Kind::uint64(),
                        "The features the driver accepted",
                    )],
                ),
            )
            .description("The guest driver set DRIVER_OK: the device is in use"),
        )
        .realize(|d, o| {
            let platform = upgrade(&d.platform)?;
            let model = (d.make_model)(o)?;
            let function = &d.function;
            let ioeventfd = o.get("ioeventfd").ok().and_then(|v| v.as_bool()) != Some(false);
            function.install(
                model,
                Arc::new(DriverOk(o.notifier("driver-ok")?)),
                thread_name(o),
                ioeventfd,
            );
            let undo = || {
                function.signals().msix.lock().disconnect();
                function.uninstall();
            };
            function
                .signals()
                .msix
                .lock()
                .connect(platform.pci_bus().msi())
                .map_err(|source| {
                    function.uninstall();
                    crate::Error::Host {
                        what: "make MSI-X vectors",
                        source,
                    }
                })?;
            let slot = pci::plug(&d.platform, o, function.clone()).inspect_err(|_| undo())?;
            let line = platform.pci_bus().intx_line(slot, 1);
            function
                .signals()
                .config
                .lock()
                .set_interrupt(1, line.gsi() as u8);
            function.signals().set_intx_line(Some(line));
            Ok(())
        })
        .unrealize(|d, o| {
            // The I/O thread stops (after its request) before the function leaves the bus.
            d.function.uninstall();
            pci::unplug(&d.platform, o);
            d.function.signals().set_intx_line(None);
            d.function.signals().msix.lock().disconnect();
        })
        .build()
}
