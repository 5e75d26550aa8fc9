//! Host network backends clients add and remove: `--netdev`, `netdev_add`, `netdev_del`.
//! Each is an object at `/netdev/<id>` of a type implementing `netdev` (devices/src/net/),
//! opened when it is created and closed when it is deleted.

use qom::{ObjectRef, Value};

use crate::config::DeviceSpec;
use crate::error::{Error, Result};
use crate::machine::Machine;

/// Where netdevs live in the tree.
pub const NETDEV_ROOT: &str = "/netdev";

impl Machine {
    /// Adds a netdev of `typename` (`tap`, `stream`) at `/netdev/<id>` with `props`, opening
    /// its backend.
    ///
    /// # Errors
    /// No id, not an id, an id taken, a type that is no netdev, a property the type does not
    /// have or take, or the backend cannot be opened; nothing is left behind.
    pub fn netdev_add(
        &self,
        typename: &str,
        id: Option<&str>,
        props: Vec<(String, Value)>,
    ) -> Result<ObjectRef> {
        let class = self
            .tree
            .types()
            .get(typename)
            .ok()
            .filter(|c| c.implements(devices::net::netdev::NETDEV) && !c.is_abstract())
            .ok_or_else(|| Error::NotANetdevType {
                typename: typename.to_owned(),
            })?;
        let id = id.ok_or(Error::MissingId)?;
        qom::path::check_id(id).map_err(|_| Error::InvalidId { id: id.to_owned() })?;
        self.tree
            .create(NETDEV_ROOT, id, class.name(), props)
            .map_err(|e| match e {
                qom::Error::DuplicateName { name, .. } => Error::DuplicateNetdevId { id: name },
                e => e.into(),
            })
    }

    /// `netdev_add` from a front end: values may be JSON values or text, as for devices.
    ///
    /// # Errors
    /// As [`Machine::netdev_add`], and a value the property's kind does not take.
    pub fn netdev_add_coerced(
        &self,
        typename: &str,
        id: Option<&str>,
        props: &Value,
    ) -> Result<ObjectRef> {
        let props = match self.tree.types().get(typename) {
            Ok(class) => class.coerce_all(
                props
                    .as_map()
                    .into_iter()
                    .flat_map(|m| m.iter())
                    .map(|(k, v)| (k.to_owned(), v.clone())),
            )?,
            Err(_) => Vec::new(),
        };
        self.netdev_add(typename, id, props)
    }

    /// `--netdev TYPE,id=ID,...` in QEMU's syntax: a stream's `addr.type=unix,addr.path=P`
    /// becomes its `path`.
    ///
    /// # Errors
    /// As [`Machine::netdev_add`], and an address type other than `unix`.
    pub(crate) fn netdev_from_spec(&self, spec: &DeviceSpec) -> Result<ObjectRef> {
        let mut props = Vec::new();
        for (key, value) in &spec.props {
            match key.as_str() {
                "addr.path" => props.push(("path".to_owned(), Value::Str(value.clone()))),
                "addr.type" if value == "unix" => {}
                "addr.type" => {
                    return Err(Error::BadNetdevOption {
                        option: format!("addr.type={value}"),
                        why: "qomu's stream netdev takes unix addresses",
                    });
                }
                _ => props.push((key.clone(), Value::Str(value.clone()))),
            }
        }
        let props = match self.tree.types().get(&spec.driver) {
            Ok(class) => class.coerce_all(props)?,
            Err(_) => Vec::new(),
        };
        self.netdev_add(&spec.driver, spec.id.as_deref(), props)
    }

    /// Deletes the netdev `id`, closing its backend.
    ///
    /// # Errors
    /// No netdev of that id.
    pub fn netdev_del(&self, id: &str) -> Result<()> {
        let netdev = self
            .tree
            .lookup(NETDEV_ROOT)
            .ok()
            .and_then(|r| r.child(id))
            .ok_or_else(|| qom::Error::NotFound {
                path: id.to_owned(),
            })?;
        self.tree.delete_subtree(&netdev)?;
        Ok(())
    }
}
