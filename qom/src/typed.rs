//! Types declared over their instance: [`TypedInfo<T>`] builds a [`TypeInfo`] whose
//! properties, actions, hooks and constructor are closures over the object's instance, a
//! `T`, rather than over an [`ObjectRef`] that each of them would have to downcast.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use qom::{Action, Kind, Property, Tree, TypedInfo, Value};
//!
//! #[derive(Default)]
//! struct Counter(AtomicU64);
//!
//! let builder = Tree::builder();
//! builder.register(
//!     TypedInfo::<Counter>::new("counter", "object")
//!         .implements("user-creatable")
//!         .getter(Property::new("count", Kind::uint64()), |c| {
//!             Value::UInt(c.0.load(Ordering::Relaxed))
//!         })
//!         .action(Action::declare("bump"), |c, _, _| {
//!             c.0.fetch_add(1, Ordering::Relaxed);
//!             Ok(None)
//!         })
//!         .constructor(|_| Ok(Counter::default()))
//!         .build(),
//! )?;
//! let tree = builder.build()?;
//! tree.create("/objects", "c", "counter", vec![])?;
//! tree.call("/objects/c", "bump", Default::default())?;
//! assert_eq!(tree.get("/objects/c", "count")?, Value::UInt(1));
//! # Ok::<(), qom::Error>(())
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use crate::action::{Action, Args};
use crate::error::{Error, Result};
use crate::notifier::NotifierDecl;
use crate::object::ObjectRef;
use crate::property::Property;
use crate::types::TypeInfo;
use crate::value::Value;

/// The instance of `obj`, a `T`.
///
/// # Errors
/// The object has no instance of that type: its type was registered with another
/// constructor than the code reading it expects (a bug, reported rather than panicked on).
pub fn instance_of<T: Send + Sync + 'static>(obj: &ObjectRef) -> Result<Arc<T>> {
    obj.instance::<T>().ok_or_else(|| {
        Error::failed(format!(
            "'{}' has no {} instance",
            obj.path(),
            std::any::type_name::<T>()
        ))
    })
}

/// A type declaration whose code runs on its objects' instances, of type `T`.
pub struct TypedInfo<T> {
    info: TypeInfo,
    instance: PhantomData<fn(&T)>,
}

impl<T: Send + Sync + 'static> TypedInfo<T> {
    /// A concrete type deriving from `parent`.
    pub fn new(name: &str, parent: &str) -> Self {
        TypedInfo {
            info: TypeInfo::new(name, parent),
            instance: PhantomData,
        }
    }

    /// An abstract type deriving from `parent`: its subtypes' constructors make the `T`.
    pub fn abstract_type(name: &str, parent: &str) -> Self {
        TypedInfo {
            info: TypeInfo::new(name, parent).abstract_type(),
            instance: PhantomData,
        }
    }

    pub fn description(self, text: &str) -> Self {
        self.map(|i| i.description(text))
    }

    pub fn implements(self, interface: &str) -> Self {
        self.map(|i| i.implements(interface))
    }

    /// A property as it is declared (stored ones, or computed without the instance).
    pub fn property(self, property: Property) -> Self {
        self.map(|i| i.property(property))
    }

    pub fn notifier(self, notifier: NotifierDecl) -> Self {
        self.map(|i| i.notifier(notifier))
    }

    /// A read-only property computed from the instance.
    pub fn getter(
        self,
        property: Property,
        get: impl Fn(&T) -> Value + Send + Sync + 'static,
    ) -> Self {
        self.property(property.getter(move |o| Ok(get(&*instance_of::<T>(o)?))))
    }

    /// A read-only property computed from the instance and its object, which may fail.
    pub fn try_getter(
        self,
        property: Property,
        get: impl Fn(&T, &ObjectRef) -> Result<Value> + Send + Sync + 'static,
    ) -> Self {
        self.property(property.getter(move |o| get(&*instance_of::<T>(o)?, o)))
    }

    /// A property read and written through the instance; the value written is already
    /// checked against the property's kind and phase.
    pub fn accessor(
        self,
        property: Property,
        get: impl Fn(&T, &ObjectRef) -> Result<Value> + Send + Sync + 'static,
        set: impl Fn(&T, &ObjectRef, Value) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.property(
            property
                .getter(move |o| get(&*instance_of::<T>(o)?, o))
                .setter(move |o, v| set(&*instance_of::<T>(o)?, o, v)),
        )
    }

    /// An action (declared with [`Action::declare`]) run on the instance.
    pub fn action(
        self,
        action: Action,
        run: impl Fn(&T, &ObjectRef, Args) -> Result<Option<Value>> + Send + Sync + 'static,
    ) -> Self {
        let action = action.bind(move |o, args| run(&*instance_of::<T>(o)?, o, args));
        self.map(|i| i.action(action))
    }

    /// Makes each new object's instance.
    pub fn constructor(
        self,
        make: impl Fn(&ObjectRef) -> Result<T> + Send + Sync + 'static,
    ) -> Self {
        self.map(|i| i.constructor(move |o| Ok(Arc::new(make(o)?))))
    }

    /// Claims the object's resources when it is realized (with the instance's `Arc`, for
    /// code that hands the instance on, to a bus for instance).
    pub fn realize(
        self,
        f: impl Fn(&Arc<T>, &ObjectRef) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.map(|i| i.realize(move |o| f(&instance_of::<T>(o)?, o)))
    }

    /// Releases them when it goes. An object whose instance is missing has nothing to
    /// release.
    pub fn unrealize(self, f: impl Fn(&Arc<T>, &ObjectRef) + Send + Sync + 'static) -> Self {
        self.map(|i| {
            i.unrealize(move |o| {
                if let Ok(t) = instance_of::<T>(o) {
                    f(&t, o);
                }
            })
        })
    }

    /// The state this level carries across a snapshot (see [`crate::StateHooks`]).
    pub fn state(
        self,
        version: u32,
        save: impl Fn(&T, &ObjectRef) -> Result<Vec<u8>> + Send + Sync + 'static,
        load: impl Fn(&T, &ObjectRef, &[u8]) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.map(|i| {
            i.state(
                version,
                move |o| save(&*instance_of::<T>(o)?, o),
                move |o, bytes| load(&*instance_of::<T>(o)?, o, bytes),
            )
        })
    }

    /// The declaration, ready to register.
    pub fn build(self) -> TypeInfo {
        self.info
    }

    fn map(self, f: impl FnOnce(TypeInfo) -> TypeInfo) -> Self {
        TypedInfo {
            info: f(self.info),
            instance: PhantomData,
        }
    }
}

impl<T: Send + Sync + 'static> From<TypedInfo<T>> for TypeInfo {
    fn from(t: TypedInfo<T>) -> TypeInfo {
        t.build()
    }
}
