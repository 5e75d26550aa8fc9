//! Objects: the per-object state the tree keeps, and [`ObjectRef`], the handle type code
//! and front ends use.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use crate::action::Args;
use crate::error::{Error, Result};
use crate::notifier::{EventSlot, Notifier};
use crate::property::{PropertyInfo, PropertyRole};
use crate::tree::{ObjectKey, Tree, TreeInner};
use crate::types::Class;
use crate::value::Value;

/// The instance state a type's constructor builds; type code gets it back with
/// [`ObjectRef::instance`].
pub type Instance = Arc<dyn Any + Send + Sync>;

/// The value of a stored property.
#[derive(Clone, PartialEq)]
pub(crate) enum Stored {
    Value(Value),
    /// A link: a key, re-checked on every use (a deleted target reads as empty).
    Link(Option<ObjectKey>),
}

/// Where an object is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Life {
    /// Being constructed and realized; not yet reachable by path.
    Constructing = 0,
    /// In the tree.
    Live = 1,
    /// Removed from the tree; unrealize may still be running.
    Gone = 2,
}

/// What the tree keeps per object, shared with every [`ObjectRef`] to it.
pub(crate) struct ObjectCore {
    pub(crate) key: ObjectKey,
    pub(crate) name: Arc<str>,
    pub(crate) class: Arc<Class>,
    /// Also holds the canonical path.
    pub(crate) events: Arc<EventSlot>,
    pub(crate) instance: OnceLock<Instance>,
    pub(crate) stored: Mutex<Vec<Stored>>,
    pub(crate) realized: AtomicBool,
    life: AtomicU8,
}

impl ObjectCore {
    pub(crate) fn new(key: ObjectKey, name: Arc<str>, path: Arc<str>, class: Arc<Class>) -> Self {
        let stored = class
            .properties()
            .iter()
            .filter(|p| p.item.is_stored())
            .map(|p| {
                if p.item.is_link() {
                    Stored::Link(None)
                } else {
                    Stored::Value(p.item.initial_value())
                }
            })
            .collect();
        debug_assert_eq!(
            class.stored_count(),
            class
                .properties()
                .iter()
                .filter(|p| p.item.is_stored())
                .count()
        );
        ObjectCore {
            key,
            name,
            events: Arc::new(EventSlot::new(path, class.name_arc().clone())),
            class,
            instance: OnceLock::new(),
            stored: Mutex::new(stored),
            realized: AtomicBool::new(false),
            life: AtomicU8::new(Life::Constructing as u8),
        }
    }

    pub(crate) fn path(&self) -> &Arc<str> {
        &self.events.path
    }

    pub(crate) fn life(&self) -> Life {
        match self.life.load(Ordering::Acquire) {
            0 => Life::Constructing,
            1 => Life::Live,
            _ => Life::Gone,
        }
    }

    pub(crate) fn set_life(&self, life: Life) {
        self.life.store(life as u8, Ordering::Release);
    }
}

/// A handle on one object. Cheap to clone.
///
/// It stays usable after the object is deleted: reads still work on the object's last
/// state, writes and actions fail with [`Error::NotFound`]. Type code must not store an
/// `ObjectRef` inside its own instance (that would keep the tree alive); store a
/// [`WeakObjectRef`] or [`Notifier`] handles instead.
#[derive(Clone)]
pub struct ObjectRef {
    pub(crate) tree: Tree,
    pub(crate) core: Arc<ObjectCore>,
}

impl fmt::Debug for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectRef")
            .field("path", &self.path())
            .field("type", &self.type_name())
            .finish()
    }
}

impl PartialEq for ObjectRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.core, &other.core)
    }
}

impl ObjectRef {
    /// The canonical path (the chain of `child<>` edges).
    pub fn path(&self) -> &str {
        self.core.path()
    }
    pub fn name(&self) -> &str {
        &self.core.name
    }
    pub fn type_name(&self) -> &str {
        self.core.class.name()
    }
    pub fn class(&self) -> &Arc<Class> {
        &self.core.class
    }
    pub fn tree(&self) -> &Tree {
        &self.tree
    }
    /// True while the object is in the tree.
    pub fn is_alive(&self) -> bool {
        self.core.life() == Life::Live
    }
    pub fn is_realized(&self) -> bool {
        self.core.realized.load(Ordering::Acquire)
    }

    /// The instance state of the given Rust type, if the object has one of that type.
    pub fn instance<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.core
            .instance
            .get()
            .and_then(|i| i.clone().downcast::<T>().ok())
    }

    /// A weak handle that does not keep the object or the tree alive.
    pub fn downgrade(&self) -> WeakObjectRef {
        WeakObjectRef {
            tree: Arc::downgrade(&self.tree.inner),
            core: Arc::downgrade(&self.core),
        }
    }

    /// A handle for emitting on one of the object's notifiers.
    ///
    /// # Errors
    /// [`Error::PropertyNotFound`] if the type declares no such notifier.
    pub fn notifier(&self, name: &str) -> Result<Notifier> {
        let (index, decl) = self
            .core
            .class
            .notifier(name)
            .ok_or_else(|| self.property_not_found(name))?;
        Ok(Notifier {
            slot: self.core.events.clone(),
            index,
            decl: decl.clone(),
        })
    }

    /// Announces a new value of a notifying property computed by the type itself (for
    /// example a run state that changes on its own). Writes through [`ObjectRef::set`]
    /// announce themselves.
    pub fn notify_property_changed(&self, property: &str, value: &Value) {
        self.tree.emit_property_changed(&self.core, property, value);
    }

    /// The object's parent, if it has one and is in the tree.
    pub fn parent(&self) -> Option<ObjectRef> {
        self.tree.parent_of(&self.core)
    }

    /// The object's children, in natural name order.
    pub fn children(&self) -> Vec<ObjectRef> {
        self.tree.children_of(&self.core)
    }

    /// A child by name.
    pub fn child(&self, name: &str) -> Option<ObjectRef> {
        self.tree.child_of(&self.core, name)
    }

    /// Reads a property (declared, child, or link).
    ///
    /// # Errors
    /// [`Error::PropertyNotFound`], [`Error::NeedsSubscriber`] for a notifier, or the
    /// getter's own error.
    pub fn get(&self, property: &str) -> Result<Value> {
        self.tree.get_on(self, property)
    }

    /// Writes a property, checking its phase policy and kind first.
    ///
    /// # Errors
    /// [`Error::PropertyNotFound`], [`Error::ReadOnly`], [`Error::WrongPhase`], a kind
    /// error, or the setter's own error. Nothing changes on error.
    pub fn set(&self, property: &str, value: impl Into<Value>) -> Result<()> {
        self.tree.set_on(self, property, value.into())
    }

    /// Calls an action with arguments checked against its declaration.
    ///
    /// # Errors
    /// [`Error::ActionNotFound`], an argument error, or the action's own error.
    pub fn call(&self, action: &str, args: Args) -> Result<Option<Value>> {
        self.tree.call_on(self, action, args)
    }

    /// `qom-list`: declared properties, notifiers, then children.
    pub fn list_properties(&self) -> Vec<PropertyInfo> {
        self.property_list().iter().cloned().collect()
    }

    /// What `qom-list` shows, without copying the type's part: its declared properties
    /// and notifiers (shared with every object of the type), then the children.
    pub fn property_list(&self) -> PropertyList {
        PropertyList {
            declared: self.core.class.property_infos().clone(),
            children: self
                .children()
                .into_iter()
                .map(|c| PropertyInfo {
                    name: c.name().to_owned(),
                    type_name: format!("child<{}>", c.type_name()),
                    description: None,
                    default: None,
                    policy: crate::PhasePolicy::ReadOnly,
                    notifying: false,
                    declared_by: c.type_name().to_owned(),
                    role: PropertyRole::Child(c.type_name().to_owned()),
                })
                .collect(),
        }
    }

    pub(crate) fn property_not_found(&self, name: &str) -> Error {
        Error::PropertyNotFound {
            typename: self.type_name().to_owned(),
            property: name.to_owned(),
        }
    }

    pub(crate) fn not_found(&self) -> Error {
        Error::NotFound {
            path: self.path().to_owned(),
        }
    }
}

/// An object's properties, notifiers and children, as [`ObjectRef::property_list`] gives
/// them.
#[derive(Debug, Clone)]
pub struct PropertyList {
    declared: Arc<[PropertyInfo]>,
    children: Vec<PropertyInfo>,
}

impl PropertyList {
    pub fn iter(&self) -> impl Iterator<Item = &PropertyInfo> {
        self.declared.iter().chain(&self.children)
    }

    pub fn len(&self) -> usize {
        self.declared.len() + self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A handle that does not keep the object or the tree alive.
#[derive(Clone)]
pub struct WeakObjectRef {
    tree: Weak<TreeInner>,
    core: Weak<ObjectCore>,
}

impl fmt::Debug for WeakObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WeakObjectRef")
    }
}

impl WeakObjectRef {
    /// The object, if it and the tree still exist.
    pub fn upgrade(&self) -> Option<ObjectRef> {
        Some(ObjectRef {
            tree: Tree {
                inner: self.tree.upgrade()?,
            },
            core: self.core.upgrade()?,
        })
    }
}
