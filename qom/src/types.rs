//! The type registry: types declared at run time, resolved into classes.
//!
//! A type lists its parent (inheritance is by declaration, not struct layout), the interfaces
//! it implements, and its own properties, actions and notifiers. Registering it resolves a
//! [`Class`]: the flattened view an object of that type has (everything inherited included),
//! which objects share through an `Arc`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::action::Action;
use crate::error::{Error, Result};
use crate::kind::Kind;
use crate::notifier::NotifierDecl;
use crate::object::{Instance, ObjectRef};
use crate::property::{Access, PhasePolicy, Property, PropertyInfo, PropertyRole};
use crate::value::Value;

/// Builds the instance state of a new object (runs before its properties are set).
pub type Constructor = Arc<dyn Fn(&ObjectRef) -> Result<Instance> + Send + Sync>;
/// Claims a new object's resources; on error it must leave nothing claimed.
pub type RealizeHook = Arc<dyn Fn(&ObjectRef) -> Result<()> + Send + Sync>;
/// Releases what realize claimed. It cannot fail.
pub type UnrealizeHook = Arc<dyn Fn(&ObjectRef) + Send + Sync>;
/// Saves one type level's part of a realized object's state (a snapshot section).
pub type SaveState = Arc<dyn Fn(&ObjectRef) -> Result<Vec<u8>> + Send + Sync>;
/// Loads what [`SaveState`] saved into a realized object of the same configuration. On
/// error the object may be half-loaded: the machine then does not start.
pub type LoadState = Arc<dyn Fn(&ObjectRef, &[u8]) -> Result<()> + Send + Sync>;

/// The state one type level carries across a snapshot: its own part, named after the level,
/// with a version the level bumps when the format changes.
#[derive(Clone)]
pub struct StateHooks {
    pub level: Arc<str>,
    pub version: u32,
    pub save: SaveState,
    pub load: LoadState,
}

/// The declaration of a type, built with its builder methods and then registered.
#[derive(Clone)]
pub struct TypeInfo {
    name: String,
    parent: Option<String>,
    is_abstract: bool,
    is_interface: bool,
    interfaces: Vec<String>,
    description: String,
    deletable: Option<bool>,
    internal: bool,
    properties: Vec<Property>,
    actions: Vec<Action>,
    notifiers: Vec<NotifierDecl>,
    constructor: Option<Constructor>,
    realize: Option<RealizeHook>,
    unrealize: Option<UnrealizeHook>,
    state: Option<(u32, SaveState, LoadState)>,
}

impl TypeInfo {
    /// A concrete type deriving from `parent`.
    pub fn new(name: &str, parent: &str) -> Self {
        TypeInfo {
            name: name.to_owned(),
            parent: Some(parent.to_owned()),
            is_abstract: false,
            is_interface: false,
            interfaces: Vec::new(),
            description: String::new(),
            deletable: None,
            internal: false,
            properties: Vec::new(),
            actions: Vec::new(),
            notifiers: Vec::new(),
            constructor: None,
            realize: None,
            unrealize: None,
            state: None,
        }
    }

    /// An interface type (always abstract); `parent` is another interface or `interface`.
    pub fn interface(name: &str, parent: &str) -> Self {
        TypeInfo {
            is_interface: true,
            is_abstract: true,
            ..TypeInfo::new(name, parent)
        }
    }

    /// A root type with no parent (only the object model's own `object` and `interface`).
    pub(crate) fn root(name: &str) -> Self {
        TypeInfo {
            parent: None,
            is_abstract: true,
            ..TypeInfo::new(name, "")
        }
    }

    /// Makes a root type an interface root (only the object model's own `interface`).
    pub(crate) fn interface_root(mut self) -> Self {
        self.is_interface = true;
        self
    }

    pub fn abstract_type(mut self) -> Self {
        self.is_abstract = true;
        self
    }
    pub fn description(mut self, text: &str) -> Self {
        self.description = text.to_owned();
        self
    }
    pub fn implements(mut self, interface: &str) -> Self {
        self.interfaces.push(interface.to_owned());
        self
    }
    /// Whether clients may delete objects of this type (inherited when not said).
    pub fn deletable(mut self, deletable: bool) -> Self {
        self.deletable = Some(deletable);
        self
    }
    /// Objects of this type are made only by the object model itself (subscriptions).
    pub(crate) fn internal(mut self) -> Self {
        self.internal = true;
        self
    }
    pub fn property(mut self, property: Property) -> Self {
        self.properties.push(property);
        self
    }
    pub fn action(mut self, action: Action) -> Self {
        self.actions.push(action);
        self
    }
    pub fn notifier(mut self, notifier: NotifierDecl) -> Self {
        self.notifiers.push(notifier);
        self
    }
    pub fn constructor(
        mut self,
        f: impl Fn(&ObjectRef) -> Result<Instance> + Send + Sync + 'static,
    ) -> Self {
        self.constructor = Some(Arc::new(f));
        self
    }
    pub fn realize(mut self, f: impl Fn(&ObjectRef) -> Result<()> + Send + Sync + 'static) -> Self {
        self.realize = Some(Arc::new(f));
        self
    }
    pub fn unrealize(mut self, f: impl Fn(&ObjectRef) + Send + Sync + 'static) -> Self {
        self.unrealize = Some(Arc::new(f));
        self
    }
    /// The state this level carries across a snapshot (see [`StateHooks`]).
    pub fn state(
        mut self,
        version: u32,
        save: impl Fn(&ObjectRef) -> Result<Vec<u8>> + Send + Sync + 'static,
        load: impl Fn(&ObjectRef, &[u8]) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.state = Some((version, Arc::new(save), Arc::new(load)));
        self
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A declared member together with the type that declared it.
#[derive(Clone)]
pub struct Declared<T> {
    pub declared_by: Arc<str>,
    pub item: Arc<T>,
}

/// A registered type, resolved: its own declarations plus everything inherited.
pub struct Class {
    name: Arc<str>,
    parent: Option<Arc<Class>>,
    is_abstract: bool,
    is_interface: bool,
    internal: bool,
    deletable: bool,
    description: String,
    /// This type, its ancestors, then every interface implemented (with their ancestors).
    ancestry: Vec<Arc<str>>,
    interfaces: Vec<Arc<str>>,
    properties: Vec<Declared<Property>>,
    property_index: HashMap<Arc<str>, usize>,
    /// Index of each stored property's slot in an object's value table.
    stored_slot: Vec<Option<usize>>,
    stored_count: usize,
    link_names: Vec<Arc<str>>,
    notifiers: Vec<Declared<NotifierDecl>>,
    notifier_index: HashMap<Arc<str>, u16>,
    actions: Vec<Declared<Action>>,
    constructor: Option<Constructor>,
    /// Realize/unrealize pairs of every level that has one, base first.
    hooks: Vec<LevelHooks>,
    /// Snapshot state of every level that has some, base first.
    state: Vec<StateHooks>,
    /// [`Class::property_infos`].
    infos: Arc<[PropertyInfo]>,
}

/// The realize and unrealize hooks one type level declares.
#[derive(Clone)]
pub(crate) struct LevelHooks {
    pub(crate) realize: Option<RealizeHook>,
    pub(crate) unrealize: Option<UnrealizeHook>,
}

impl fmt::Debug for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Class")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Class {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }
    pub fn parent(&self) -> Option<&Arc<Class>> {
        self.parent.as_ref()
    }
    pub fn is_abstract(&self) -> bool {
        self.is_abstract
    }
    pub fn is_interface(&self) -> bool {
        self.is_interface
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    pub(crate) fn is_internal(&self) -> bool {
        self.internal
    }
    /// Whether clients may delete objects of this type.
    pub fn is_deletable(&self) -> bool {
        self.deletable
    }

    /// True if this type is `typename`, derives from it, or implements it.
    pub fn implements(&self, typename: &str) -> bool {
        self.ancestry.iter().any(|t| &**t == typename)
    }

    /// This type and its ancestors, most derived first (interfaces not included).
    pub fn lineage(&self) -> impl Iterator<Item = &Class> {
        std::iter::successors(Some(self), |c| c.parent.as_deref())
    }

    /// This type, its ancestors, then every interface it implements.
    pub fn ancestry(&self) -> &[Arc<str>] {
        &self.ancestry
    }

    /// The interfaces this type implements, directly or through its ancestors.
    pub fn interfaces(&self) -> &[Arc<str>] {
        &self.interfaces
    }

    /// Every property, inherited ones first.
    pub fn properties(&self) -> &[Declared<Property>] {
        &self.properties
    }
    pub fn property(&self, name: &str) -> Option<&Arc<Property>> {
        self.property_index
            .get(name)
            .map(|&i| &self.properties[i].item)
    }
    /// A value a client gave for property `name` of this type, as the property takes it:
    /// text, where the property's kind is not itself text (a command line's `iobase=0x2f8`,
    /// or a JSON string for an integer, as QEMU's keyval parser allows), is parsed with the
    /// kind's text syntax ([`crate::Kind::parse_text`]); any other value is passed on for
    /// the kind's own check when it is set. The one rule of `--device`, `--object`,
    /// `device_add` and `object-add` (docs/object-model.md, "Values from clients").
    ///
    /// # Errors
    /// The type has no such property, or the text does not parse as its kind.
    pub fn coerce(&self, name: &str, value: Value) -> Result<Value> {
        let property = self.property(name).ok_or_else(|| Error::PropertyNotFound {
            typename: self.name.to_string(),
            property: name.to_owned(),
        })?;
        match value {
            Value::Str(text)
                if !matches!(property.kind(), Kind::Str | Kind::Enum(_) | Kind::Any) =>
            {
                property.kind().parse_text(name, &text)
            }
            value => Ok(value),
        }
    }

    /// [`Class::coerce`] of every `(name, value)` pair, in order.
    ///
    /// # Errors
    /// As [`Class::coerce`], for the first pair refused.
    pub fn coerce_all(
        &self,
        values: impl IntoIterator<Item = (String, Value)>,
    ) -> Result<Vec<(String, Value)>> {
        values
            .into_iter()
            .map(|(name, value)| Ok((name.clone(), self.coerce(&name, value)?)))
            .collect()
    }

    pub(crate) fn property_slot(&self, name: &str) -> Option<(usize, &Arc<Property>)> {
        self.property_index
            .get(name)
            .map(|&i| (i, &self.properties[i].item))
    }
    pub(crate) fn stored_slot(&self, property_index: usize) -> Option<usize> {
        self.stored_slot[property_index]
    }
    pub(crate) fn stored_count(&self) -> usize {
        self.stored_count
    }
    /// Names of the type's `link<>` properties.
    pub(crate) fn link_names(&self) -> &[Arc<str>] {
        &self.link_names
    }

    /// Every notifier, inherited ones first.
    pub fn notifiers(&self) -> &[Declared<NotifierDecl>] {
        &self.notifiers
    }
    pub fn notifier(&self, name: &str) -> Option<(u16, &Arc<NotifierDecl>)> {
        self.notifier_index
            .get(name)
            .map(|&i| (i, &self.notifiers[usize::from(i)].item))
    }

    /// Every action, inherited ones first.
    pub fn actions(&self) -> &[Declared<Action>] {
        &self.actions
    }
    pub fn action(&self, name: &str) -> Option<&Arc<Action>> {
        self.actions
            .iter()
            .rev()
            .find(|a| a.item.name == name)
            .map(|a| &a.item)
    }

    pub(crate) fn constructor(&self) -> Option<&Constructor> {
        self.constructor.as_ref()
    }
    /// Realize/unrealize hooks per level, base first.
    pub(crate) fn hooks(&self) -> &[LevelHooks] {
        &self.hooks
    }
    /// The snapshot state of every level that declares some, base first.
    pub fn state_hooks(&self) -> &[StateHooks] {
        &self.state
    }

    /// What `qom-list-properties` shows for the type: properties then notifiers. Made
    /// once, with the class: `qom-list` answers from it without building anything.
    pub fn property_infos(&self) -> &Arc<[PropertyInfo]> {
        &self.infos
    }

    fn build_property_infos(&self) -> Arc<[PropertyInfo]> {
        let props = self.properties.iter().map(|d| PropertyInfo {
            name: d.item.name.clone(),
            type_name: d.item.kind.type_name(),
            description: Some(d.item.description.clone()).filter(|s| !s.is_empty()),
            default: d.item.default.clone(),
            policy: d.item.policy,
            notifying: d.item.notifying,
            declared_by: d.declared_by.to_string(),
            role: PropertyRole::Value(d.item.kind.clone()),
        });
        let notifiers = self.notifiers.iter().map(|d| PropertyInfo {
            name: d.item.name.to_string(),
            type_name: format!("notifier<{}>", d.item.payload.type_name()),
            description: Some(d.item.description.clone()).filter(|s| !s.is_empty()),
            default: None,
            policy: PhasePolicy::ReadOnly,
            notifying: false,
            declared_by: d.declared_by.to_string(),
            role: PropertyRole::Notifier(d.item.payload.clone()),
        });
        props.chain(notifiers).collect()
    }

    /// Resolves `info` against its already-resolved parent and interfaces.
    fn resolve(
        info: TypeInfo,
        parent: Option<Arc<Class>>,
        interfaces: Vec<Arc<Class>>,
    ) -> Result<Class> {
        let name: Arc<str> = info.name.as_str().into();
        let invalid = |reason: String| Error::InvalidType {
            typename: info.name.clone(),
            reason,
        };

        let mut ancestry = vec![name.clone()];
        let mut iface_names: Vec<Arc<str>> = Vec::new();
        if let Some(p) = &parent {
            ancestry.extend(p.lineage().map(|c| c.name.clone()));
            iface_names.extend(p.interfaces.iter().cloned());
        }
        for iface in &interfaces {
            for t in iface.ancestry.iter() {
                if !iface_names.contains(t) {
                    iface_names.push(t.clone());
                }
            }
        }
        ancestry.extend(
            iface_names
                .iter()
                .filter(|t| !ancestry.contains(t))
                .cloned()
                .collect::<Vec<_>>(),
        );

        let mut properties = parent
            .as_ref()
            .map(|p| p.properties.clone())
            .unwrap_or_default();
        let mut notifiers = parent
            .as_ref()
            .map(|p| p.notifiers.clone())
            .unwrap_or_default();
        let mut actions = parent
            .as_ref()
            .map(|p| p.actions.clone())
            .unwrap_or_default();
        // Notifiers declared by interfaces become part of every implementing class.
        for iface in &interfaces {
            for n in &iface.notifiers {
                if !notifiers.iter().any(|m| m.item.name == n.item.name) {
                    notifiers.push(n.clone());
                }
            }
        }

        for p in info.properties {
            if properties.iter().any(|q| q.item.name == p.name)
                || notifiers.iter().any(|n| *n.item.name == *p.name)
            {
                return Err(invalid(format!("property '{}' is declared twice", p.name)));
            }
            check_property(&p).map_err(invalid)?;
            properties.push(Declared {
                declared_by: name.clone(),
                item: Arc::new(p),
            });
        }
        for n in info.notifiers {
            if notifiers.iter().any(|m| m.item.name == n.name)
                || properties.iter().any(|p| *p.item.name == *n.name)
            {
                return Err(invalid(format!("notifier '{}' is declared twice", n.name)));
            }
            notifiers.push(Declared {
                declared_by: name.clone(),
                item: Arc::new(n),
            });
        }
        for a in info.actions {
            // A subtype may override an inherited action, but not declare one twice itself.
            if actions
                .iter()
                .any(|b| b.item.name == a.name && *b.declared_by == *name)
            {
                return Err(invalid(format!("action '{}' is declared twice", a.name)));
            }
            actions.push(Declared {
                declared_by: name.clone(),
                item: Arc::new(a),
            });
        }
        if notifiers.len() > usize::from(u16::MAX) {
            return Err(invalid("too many notifiers".into()));
        }

        let property_index = properties
            .iter()
            .enumerate()
            .map(|(i, p)| (p.item.name.as_str().into(), i))
            .collect();
        let mut stored_count = 0;
        let stored_slot = properties
            .iter()
            .map(|p| {
                p.item.is_stored().then(|| {
                    stored_count += 1;
                    stored_count - 1
                })
            })
            .collect();
        let link_names = properties
            .iter()
            .filter(|p| p.item.is_link())
            .map(|p| p.item.name.as_str().into())
            .collect();
        let notifier_index = notifiers
            .iter()
            .enumerate()
            .map(|(i, n)| (n.item.name.clone(), i as u16))
            .collect();

        let mut hooks = parent.as_ref().map(|p| p.hooks.clone()).unwrap_or_default();
        if info.realize.is_some() || info.unrealize.is_some() {
            hooks.push(LevelHooks {
                realize: info.realize.clone(),
                unrealize: info.unrealize.clone(),
            });
        }

        let mut state = parent.as_ref().map(|p| p.state.clone()).unwrap_or_default();
        if let Some((version, save, load)) = info.state {
            state.push(StateHooks {
                level: name.clone(),
                version,
                save,
                load,
            });
        }

        let mut class = Class {
            parent: parent.clone(),
            is_abstract: info.is_abstract,
            is_interface: info.is_interface,
            internal: info.internal || parent.as_ref().is_some_and(|p| p.internal),
            // Objects clients create (object-add) are theirs to delete.
            deletable: info.deletable.unwrap_or_else(|| {
                parent.as_ref().is_some_and(|p| p.deletable)
                    || iface_names.iter().any(|i| &**i == crate::USER_CREATABLE)
            }),
            description: info.description,
            ancestry,
            interfaces: iface_names,
            properties,
            property_index,
            stored_slot,
            stored_count,
            link_names,
            notifiers,
            notifier_index,
            actions,
            constructor: info
                .constructor
                .or_else(|| parent.as_ref().and_then(|p| p.constructor.clone())),
            hooks,
            state,
            name,
            infos: Arc::from([]),
        };
        class.infos = class.build_property_infos();
        Ok(class)
    }
}

/// Checks a property declaration on its own.
fn check_property(p: &Property) -> std::result::Result<(), String> {
    if p.name.is_empty() || p.name.contains('/') {
        return Err(format!("'{}' is not a valid property name", p.name));
    }
    if let Some(d) = &p.default
        && !p.kind.accepts(d)
    {
        return Err(format!(
            "default of '{}' is not {}",
            p.name,
            p.kind.describe()
        ));
    }
    match &p.access {
        Access::Computed { set: None, .. } if p.policy != PhasePolicy::ReadOnly => Err(format!(
            "computed property '{}' has no setter but is {}",
            p.name, p.policy
        )),
        Access::Computed { .. } if p.is_link() => {
            Err(format!("link '{}' cannot be computed", p.name))
        }
        _ if matches!(p.kind, Kind::Child(_)) => {
            Err(format!("'{}': children are added, not declared", p.name))
        }
        _ => Ok(()),
    }
}

/// A summary of a type, as `qom-list-types` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSummary {
    pub name: String,
    pub is_abstract: bool,
    pub parent: Option<String>,
}

/// All registered types.
#[derive(Default)]
pub struct TypeRegistry {
    classes: RwLock<Registry>,
}

#[derive(Default)]
struct Registry {
    by_name: HashMap<Arc<str>, Arc<Class>>,
    order: Vec<Arc<Class>>,
}

impl TypeRegistry {
    /// Registers a type. Its parent and interfaces must be registered already.
    ///
    /// # Errors
    /// [`Error::InvalidType`] for a duplicate name, an unknown parent or interface, a
    /// non-interface listed as interface, or an inconsistent declaration.
    pub fn register(&self, info: TypeInfo) -> Result<Arc<Class>> {
        let invalid = |reason: String| Error::InvalidType {
            typename: info.name.clone(),
            reason,
        };
        if info.name.is_empty() {
            return Err(invalid("the name is empty".into()));
        }
        let mut reg = self.classes.write();
        if reg.by_name.contains_key(info.name.as_str()) {
            return Err(invalid("a type of this name exists".into()));
        }
        let parent = match &info.parent {
            None => None,
            Some(p) => {
                let class = reg
                    .by_name
                    .get(p.as_str())
                    .ok_or_else(|| invalid(format!("parent '{p}' is not registered")))?;
                if class.is_interface != info.is_interface {
                    return Err(invalid(format!(
                        "parent '{p}' is {}an interface",
                        if class.is_interface { "" } else { "not " }
                    )));
                }
                Some(class.clone())
            }
        };
        let mut interfaces = Vec::new();
        for i in &info.interfaces {
            let class = reg
                .by_name
                .get(i.as_str())
                .ok_or_else(|| invalid(format!("interface '{i}' is not registered")))?;
            if !class.is_interface {
                return Err(invalid(format!("'{i}' is not an interface")));
            }
            interfaces.push(class.clone());
        }
        let class = Arc::new(Class::resolve(info, parent, interfaces)?);
        reg.by_name.insert(class.name.clone(), class.clone());
        reg.order.push(class.clone());
        Ok(class)
    }

    /// Every registered class, in registration order.
    pub fn classes(&self) -> Vec<Arc<Class>> {
        self.classes.read().order.clone()
    }

    /// The class of a type.
    ///
    /// # Errors
    /// [`Error::TypeNotFound`].
    pub fn get(&self, name: &str) -> Result<Arc<Class>> {
        self.classes
            .read()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| Error::TypeNotFound {
                typename: name.to_owned(),
            })
    }

    /// `qom-list-types`: types that are, derive from or implement `implements` (every type
    /// when `None`), abstract ones only if `include_abstract`. As in QEMU, an unknown
    /// `implements` yields an empty list.
    pub fn list(&self, implements: Option<&str>, include_abstract: bool) -> Vec<TypeSummary> {
        self.classes
            .read()
            .order
            .iter()
            .filter(|c| include_abstract || !c.is_abstract)
            .filter(|c| implements.is_none_or(|t| c.implements(t)))
            .map(|c| TypeSummary {
                name: c.name.to_string(),
                is_abstract: c.is_abstract,
                parent: c.parent.as_ref().map(|p| p.name.to_string()),
            })
            .collect()
    }
}
