//! Objects with all their interfaces and properties, serialized straight from the tree
//! into a message body: GetManagedObjects of 10,000 objects builds no intermediate maps.

use std::sync::Arc;

use qom::ObjectRef;
use serde::ser::{Serialize, SerializeMap, SerializeTuple, Serializer};
use zbus::wire::{DynamicType, Signature};
use zbus::{ObjectPath, Variant};

use super::bridge::Bridge;
use super::schema::{OBJECT1, ROOT1, SUBSCRIPTION1, TypeIface};

/// `a{sv}`, `a{sa{sv}}`, `a{oa{sa{sv}}}`.
fn props_signature() -> Signature {
    Signature::dict(Signature::Str, Signature::Variant)
}
fn interfaces_signature() -> Signature {
    Signature::dict(Signature::Str, props_signature())
}

/// One object's interfaces: `org.qomu.Object1`, `org.qomu.Root1` on the root, one per type
/// of its ancestry, and for a subscription the interface whose signal it emits (with no
/// properties). Serializes as `a{sa{sv}}`; properties whose getter fails are left out.
pub struct ObjectInterfaces<'a> {
    bridge: &'a Bridge,
    obj: ObjectRef,
    types: Arc<[Arc<TypeIface>]>,
    signals_only: Option<Arc<TypeIface>>,
}

impl<'a> ObjectInterfaces<'a> {
    pub fn new(bridge: &'a Bridge, obj: ObjectRef) -> Self {
        let types = bridge.schema.class_ifaces(&bridge.tree, obj.class());
        let signals_only = bridge
            .subscription_signal_iface(&obj)
            .filter(|s| !types.iter().any(|t| t.name == s.name));
        ObjectInterfaces {
            bridge,
            obj,
            types,
            signals_only,
        }
    }

    /// Calls `f` with each interface's name and its properties.
    pub fn for_each(
        &self,
        mut f: impl FnMut(&str, &mut dyn Iterator<Item = (&str, Variant<'static>)>),
    ) {
        f(
            OBJECT1,
            &mut self.bridge.object1_props(&self.obj).into_iter(),
        );
        if self.obj.path() == "/" {
            f(ROOT1, &mut super::bridge::root1_props().into_iter());
        }
        for t in self.types.iter() {
            f(&t.name, &mut self.type_props(t));
        }
        if self.obj.class().implements(qom::SUBSCRIPTION) {
            f(SUBSCRIPTION1, &mut std::iter::empty());
        }
        if let Some(t) = &self.signals_only {
            f(&t.name, &mut std::iter::empty());
        }
    }

    fn type_props<'t>(
        &'t self,
        t: &'t TypeIface,
    ) -> impl Iterator<Item = (&'t str, Variant<'static>)> + 't {
        t.props.iter().filter_map(|p| {
            let value = self.obj.get(&p.qom).ok()?;
            Some((
                p.dbus.as_str(),
                self.bridge.codec.to_variant(&p.kind, &value)?,
            ))
        })
    }

    /// Whether it has an interface for signals only (it is a subscription).
    pub fn has_signals_only(&self) -> bool {
        self.signals_only.is_some()
    }

    /// Every interface name.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.for_each(|name, _| out.push(name.to_owned()));
        out
    }
}

impl Serialize for ObjectInterfaces<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let mut result = Ok(());
        self.for_each(|name, props| {
            if result.is_ok() {
                result = map.serialize_entry(name, &Props(std::cell::RefCell::new(props)));
            }
        });
        result?;
        map.end()
    }
}

impl DynamicType for ObjectInterfaces<'_> {
    fn signature(&self) -> Signature {
        interfaces_signature()
    }
}

/// Properties as `a{sv}`, read from an iterator once.
struct Props<'i, 'x>(std::cell::RefCell<&'i mut dyn Iterator<Item = (&'x str, Variant<'static>)>>);

impl Serialize for Props<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (name, value) in &mut *self.0.borrow_mut() {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
}

/// GetManagedObjects' reply: every object below the root.
pub struct ManagedObjects<'a> {
    pub bridge: &'a Bridge,
}

impl Serialize for ManagedObjects<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let mut stack = self.bridge.tree.root().children();
        while let Some(obj) = stack.pop() {
            let path = self.bridge.object_path(obj.path());
            stack.extend(obj.children());
            map.serialize_entry(&path, &ObjectInterfaces::new(self.bridge, obj))?;
        }
        map.end()
    }
}

impl DynamicType for ManagedObjects<'_> {
    fn signature(&self) -> Signature {
        Signature::dict(Signature::ObjectPath, interfaces_signature())
    }
}

/// InterfacesAdded's arguments: `(o, a{sa{sv}})`.
pub struct InterfacesAdded<'a> {
    pub path: ObjectPath<'static>,
    pub interfaces: ObjectInterfaces<'a>,
}

impl Serialize for InterfacesAdded<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&self.path)?;
        t.serialize_element(&self.interfaces)?;
        t.end()
    }
}

impl DynamicType for InterfacesAdded<'_> {
    fn signature(&self) -> Signature {
        Signature::structure([Signature::ObjectPath, interfaces_signature()])
    }
}
