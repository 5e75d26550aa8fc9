//! Host network backends clients add and remove: `--netdev`, `netdev_add`, `netdev_del`;
//! and what QEMU's net commands do across netdevs and NICs: `set_link`, `query-rx-filter`.
//! Each netdev is an object at `/netdev/<id>` of a type implementing `netdev`
//! (devices/src/net/), opened when it is created and closed when it is deleted; a NIC
//! (`virtio-net-pci`) is a device under `/machine/peripheral` naming one.

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

    /// Deletes the netdev `id`, closing its backend. A NIC using it keeps its place with
    /// its link forced down (QEMU's rule); the id may be used again at once.
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

    /// The NIC of device id `name`, if there is one.
    fn nic(&self, name: &str) -> Option<ObjectRef> {
        self.tree
            .lookup("/machine/peripheral")
            .ok()?
            .child(name)
            .filter(|o| o.class().implements(devices::virtio::net::TYPE))
    }

    /// Every NIC, in tree order (named ones first).
    pub(crate) fn nics(&self) -> Vec<ObjectRef> {
        ["/machine/peripheral", "/machine/peripheral-anon"]
            .into_iter()
            .filter_map(|p| self.tree.lookup(p).ok())
            .flat_map(|c| c.children())
            .filter(|o| o.class().implements(devices::virtio::net::TYPE))
            .collect()
    }

    /// QMP's `set_link`: `name` is a NIC's device id or a netdev's id; either way the
    /// link both share goes up or down (the guest sees it through the configuration
    /// interrupt, if the driver took VIRTIO_NET_F_STATUS).
    ///
    /// # Errors
    /// Neither a NIC nor a netdev of that name.
    pub fn set_link(&self, name: &str, up: bool) -> Result<()> {
        let target = self.nic(name).or_else(|| {
            self.tree
                .lookup(NETDEV_ROOT)
                .ok()
                .and_then(|r| r.child(name))
        });
        let target = target.ok_or_else(|| qom::Error::NotFound {
            path: name.to_owned(),
        })?;
        target.set("link", Value::Bool(up))?;
        Ok(())
    }

    /// QMP's `query-rx-filter`: the receive filter of the NIC `name`, or of every NIC,
    /// in QEMU's `RxFilterInfo` shape. Querying a NIC lets its next NIC_RX_FILTER_CHANGED
    /// go out.
    ///
    /// # Errors
    /// `name` is a netdev, or nothing.
    pub fn query_rx_filter(&self, name: Option<&str>) -> Result<Value> {
        let nics = match name {
            Some(name) => match self.nic(name) {
                Some(nic) => vec![nic],
                None => {
                    let netdev = self
                        .tree
                        .lookup(NETDEV_ROOT)
                        .ok()
                        .and_then(|r| r.child(name));
                    return Err(if netdev.is_some() {
                        Error::NotANic {
                            name: name.to_owned(),
                        }
                    } else {
                        Error::NoNetClient {
                            name: name.to_owned(),
                        }
                    });
                }
            },
            None => self.nics(),
        };
        let infos = nics
            .iter()
            .map(devices::virtio::net::rx_filter_info)
            .collect::<qom::Result<Vec<_>>>()?;
        Ok(Value::List(infos))
    }
}
