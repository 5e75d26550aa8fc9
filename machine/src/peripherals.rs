//! Devices clients add and remove: `--device`, `device_add`, `device_del`, and the guest's
//! eject that ends a hot-unplug. The hotplug protocol itself (events, the controller's
//! registers, the GED) is the devices' (`devices::pci::hotplug`); this file decides what
//! may be added or removed, where it goes in the tree, and holds the configuration lock
//! around each change (docs/hotplug.md).

use std::sync::atomic::Ordering;

use devices::{DEVICE, USER_DEVICE};
use qom::{ObjectRef, Value};

use crate::error::{Error, Result};
use crate::machine::Machine;

impl Machine {
    /// The bundled demo guest (no kernel configured) documents `exit N`: at its first start
    /// it gets the `isa-debug-exit` port that needs, unless the machine has one. Added then,
    /// not when the machine is built, so that a machine configured later (a kernel set over
    /// QMP or D-Bus in prelaunch, examples/configure.py) has only the devices it was given.
    ///
    /// # Errors
    /// The port cannot be added (another device holds 0x501).
    pub(crate) fn give_the_demo_its_exit_port(&self) -> Result<()> {
        let _deciding = self.demo_exit.lock();
        let kernel = self.object.get("kernel")?;
        if self.published.launched() || kernel.as_str().is_some_and(|k| !k.is_empty()) {
            return Ok(());
        }
        let has_one = ["/machine/peripheral", "/machine/peripheral-anon"]
            .iter()
            .filter_map(|p| self.tree.lookup(p).ok())
            .flat_map(|p| p.children())
            .any(|d| d.type_name() == devices::debug_exit::TYPE);
        if !has_one {
            self.add_device(devices::debug_exit::TYPE, None, vec![])?;
        }
        Ok(())
    }

    /// The registered type `driver`, if it is a device type.
    fn device_class(&self, driver: &str) -> Result<std::sync::Arc<qom::Class>> {
        let not_a_device = || Error::NotADeviceType {
            driver: driver.to_owned(),
        };
        let class = self.tree.types().get(driver).map_err(|_| not_a_device())?;
        if class.implements(DEVICE) {
            Ok(class)
        } else {
            Err(not_a_device())
        }
    }

    /// Adds a device (`--device`, `device_add`): `/machine/peripheral/<id>`, or
    /// `/machine/peripheral-anon/device[N]` without an id. A PCI device added to a machine
    /// that has started is hot-plugged: the guest is told through the hotplug controller.
    ///
    /// # Errors
    /// Not a device type clients may add, a bad or taken id, a refused property, or the
    /// device cannot be hot-plugged into a machine that has started.
    pub fn add_device(
        &self,
        driver: &str,
        id: Option<&str>,
        props: Vec<(String, Value)>,
    ) -> Result<ObjectRef> {
        let class = self.device_class(driver)?;
        if class.is_abstract() {
            return Err(Error::AbstractDeviceType {
                driver: driver.to_owned(),
            });
        }
        let pci = class.implements(devices::pci::PCI_DEVICE);
        let hot = self.published.launched();
        if !class.implements(USER_DEVICE) || (hot && !pci) {
            return Err(Error::NotPluggable {
                driver: driver.to_owned(),
                running: hot,
            });
        }
        let _configuration = self.configuration_for("device_add")?;
        let (parent, name) = match id {
            Some(id) => {
                qom::path::check_id(id).map_err(|_| Error::InvalidId { id: id.to_owned() })?;
                ("/machine/peripheral", id.to_owned())
            }
            None => (
                "/machine/peripheral-anon",
                format!(
                    "device[{}]",
                    self.anon_devices.fetch_add(1, Ordering::Relaxed)
                ),
            ),
        };
        let dev = self
            .tree
            .create(parent, &name, driver, props)
            .map_err(|e| match e {
                qom::Error::DuplicateName { name, .. } => Error::DuplicateId { id: name },
                e => e.into(),
            })?;
        if pci && let Some(h) = self.hotplug.get() {
            h.plugged(&dev, hot);
        }
        Ok(dev)
    }

    /// `device_add` from a front end: property values may be JSON values or, as QEMU's
    /// keyval parser allows, text ("0x2f8" for an integer): `Class::coerce`.
    ///
    /// # Errors
    /// As [`Machine::add_device`]; a `bus` other than the PCI root bus `pci.0` (for PCI
    /// devices), which is where PCI devices go anyway.
    pub fn device_add(
        &self,
        driver: &str,
        id: Option<&str>,
        bus: Option<&str>,
        props: &Value,
    ) -> Result<ObjectRef> {
        let class = self.device_class(driver)?;
        match bus {
            None => {}
            Some(devices::pci::ROOT_BUS) if class.implements(devices::pci::PCI_DEVICE) => {}
            Some(devices::pci::ROOT_BUS) => {
                return Err(Error::NotOnPci {
                    driver: driver.to_owned(),
                });
            }
            Some(bus) => {
                return Err(Error::BusNotFound {
                    bus: bus.to_owned(),
                });
            }
        }
        let values = class.coerce_all(
            props
                .as_map()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.to_owned(), v.clone())),
        )?;
        self.add_device(driver, id, values)
    }

    /// `device_del`: removes a device added by a client, by id or QOM path. Until the guest
    /// has started this deletes it at once (DEVICE_DELETED); afterwards the device must
    /// support hot-unplug, and this is a request the guest answers by ejecting it.
    ///
    /// # Errors
    /// No such device (`Device 'x' not found`), one that cannot be unplugged, or one whose
    /// unplug is under way already.
    pub fn device_del(&self, id: &str) -> Result<()> {
        let dev = if id.starts_with('/') {
            self.tree.lookup(id).ok()
        } else {
            self.tree
                .lookup("/machine/peripheral")
                .ok()
                .and_then(|p| p.child(id))
        };
        let dev = dev
            .filter(|d| d.class().implements(DEVICE))
            .ok_or_else(|| qom::Error::NotFound {
                path: id.to_owned(),
            })?;
        let user_added = dev.parent().is_some_and(|p| {
            matches!(p.path(), "/machine/peripheral" | "/machine/peripheral-anon")
        });
        let pci = dev.class().implements(devices::pci::PCI_DEVICE);
        let hot = self.published.launched();
        if !user_added || (hot && !pci) {
            return Err(Error::NotUnpluggable {
                typename: dev.type_name().to_owned(),
                running: hot,
            });
        }
        let _configuration = self.configuration_for("device_del")?;
        if !hot {
            return self.remove_device(&dev);
        }
        let hotplug = self.hotplug.get().ok_or(Error::NoHotplugController)?;
        Ok(hotplug.request_unplug(&dev)?)
    }

    /// The configuration lock, for a change of the set of devices by `command`; refused
    /// while a save or a restore runs (QEMU's text), where waiting for it could take
    /// seconds.
    fn configuration_for(&self, command: &str) -> Result<parking_lot::MutexGuard<'_, ()>> {
        if self.migration_running() {
            return Err(Error::Migrating {
                command: command.to_owned(),
            });
        }
        Ok(self.configuration.lock())
    }

    /// The guest ejected `slot`: the device there goes, with `unplugged` and DEVICE_DELETED.
    /// Its queues' ioeventfds are taken from KVM after DEVICE_DELETED is out (KVM's grace
    /// period is most of an unplug's time); any registration does that first, so nothing
    /// plugged later can find the addresses taken.
    pub(crate) fn eject(&self, slot: u8, removal: devices::pci::hotplug::controller::Removal) {
        let configuration = self.configuration.lock();
        let Some(dev) = self.hotplug.get().and_then(|h| h.ejected(slot, removal)) else {
            return;
        };
        if let Err(e) = crate::platform::deferring_ioevent_teardown(|| self.remove_device(&dev)) {
            tracing::warn!("cannot remove {} after its eject: {e}", dev.path());
        }
        drop(configuration);
        if let Some(ioevents) = self.ioevents.get() {
            ioevents.flush();
        }
    }

    /// Deletes a device and announces DEVICE_DELETED.
    fn remove_device(&self, dev: &ObjectRef) -> Result<()> {
        let device = dev
            .path()
            .starts_with("/machine/peripheral/")
            .then(|| dev.name().to_owned());
        self.tree.delete_subtree(dev)?;
        self.notifiers.device_deleted.emit(|| {
            let mut fields = vec![("path", Value::Str(dev.path().to_owned()))];
            if let Some(d) = device {
                fields.push(("device", Value::Str(d)));
            }
            Value::map(fields)
        });
        Ok(())
    }
}
