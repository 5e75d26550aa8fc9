//! The tree: the object arena, path resolution, and every operation front ends use.
//!
//! # Locking
//!
//! Locks are taken in this order, and never the other way round:
//!
//! 1. `TreeInner::state` (the arena, name indexes, subscription registry);
//! 2. an object's stored values (`ObjectCore::stored`);
//! 3. an object's subscription list (`EventSlot::subs`);
//! 4. a subscriber's mailbox (`Mailbox::state`).
//!
//! The type registry's lock and the machine-state lock are never held while another lock is
//! taken. Type code (constructors, realize/unrealize hooks, getters, setters, validators,
//! actions) is always called with **no** object-model lock held, so it may call back into the
//! tree freely and take its own locks. Emitting takes only locks 3 and 4, for a few
//! instructions each, so a vCPU thread never waits on a client.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::RwLock;
use slotmap::SlotMap;

use crate::action::Args;
use crate::builtin;
use crate::error::{Error, Result};
use crate::kind::Kind;
use crate::object::{Instance, Life, ObjectCore, ObjectRef, Stored};
use crate::path::{self, check_name, components, natural_cmp};
use crate::property::{Access, PhasePolicy, Property, PropertyInfo};
use crate::subscription::Subscription;
use crate::types::{Class, TypeInfo, TypeRegistry, TypeSummary};
use crate::value::Value;

slotmap::new_key_type! {
    /// Generational key of an object in the arena; a key of a deleted object never matches
    /// a new one.
    pub struct ObjectKey;
}

pub(crate) struct Node {
    pub(crate) core: Arc<ObjectCore>,
    pub(crate) parent: Option<ObjectKey>,
    pub(crate) children: HashMap<Arc<str>, ObjectKey>,
    /// False while the object is being constructed: it is not reachable by path yet.
    pub(crate) attached: bool,
}

pub(crate) struct TreeState {
    pub(crate) nodes: SlotMap<ObjectKey, Node>,
    pub(crate) root: ObjectKey,
    /// Attached objects by their own name: the starting points of partial paths.
    by_name: HashMap<Arc<str>, Vec<ObjectKey>>,
    /// Attached objects having a `link<>` property of a name (partial paths may start there).
    link_holders: HashMap<Arc<str>, Vec<ObjectKey>>,
    attached: usize,
    /// Type subscriptions by the type they target.
    pub(crate) type_subs: HashMap<Arc<str>, Vec<Arc<Subscription>>>,
    /// Subtree subscriptions (few; each new object is checked against every one).
    pub(crate) subtree_subs: Vec<Arc<Subscription>>,
    /// Every live subscription by id.
    pub(crate) subs: HashMap<u64, Arc<Subscription>>,
    pub(crate) next_sub_id: u64,
}

struct MachineState {
    prelaunch: bool,
    name: Arc<str>,
}

pub(crate) struct TreeInner {
    types: TypeRegistry,
    pub(crate) state: RwLock<TreeState>,
    machine: RwLock<MachineState>,
    pub(crate) next_mailbox: AtomicU64,
}

/// The object tree. Cheap to clone; all clones are the same tree.
#[derive(Clone)]
pub struct Tree {
    pub(crate) inner: Arc<TreeInner>,
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tree")
            .field("objects", &self.object_count())
            .finish()
    }
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

/// Sets up a tree: register the program's types, choose the machine type, build.
pub struct TreeBuilder {
    types: TypeRegistry,
    machine_type: String,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        TreeBuilder::new()
    }
}

impl TreeBuilder {
    /// A builder whose registry holds the object model's own types.
    pub fn new() -> Self {
        let types = TypeRegistry::default();
        builtin::register_types(&types);
        TreeBuilder {
            types,
            machine_type: builtin::NONE_MACHINE.to_owned(),
        }
    }

    /// Registers a type (see [`TypeRegistry::register`]).
    ///
    /// # Errors
    /// As [`TypeRegistry::register`].
    pub fn register(&self, info: TypeInfo) -> Result<Arc<Class>> {
        self.types.register(info)
    }

    /// The type of `/machine` (it must derive from `machine`); `none-machine` by default.
    pub fn machine_type(mut self, typename: &str) -> Self {
        self.machine_type = typename.to_owned();
        self
    }

    /// Builds the tree with its well-known containers: `/machine` (with `peripheral`,
    /// `peripheral-anon` and `unattached`), `/objects` and `/subscriptions`.
    ///
    /// # Errors
    /// The machine type is unknown, not a machine, or its constructor or realize failed.
    pub fn build(self) -> Result<Tree> {
        let machine_class = self.types.get(&self.machine_type)?;
        if !machine_class.implements(builtin::MACHINE) {
            return Err(Error::InvalidType {
                typename: self.machine_type,
                reason: "it is not a machine type".into(),
            });
        }
        let container = self.types.get(builtin::CONTAINER)?;
        let mut nodes = SlotMap::with_key();
        let root = nodes.insert_with_key(|key| {
            let core = ObjectCore::new(key, "".into(), "/".into(), container.clone());
            core.realized
                .store(true, std::sync::atomic::Ordering::Release);
            core.set_life(Life::Live);
            Node {
                core: Arc::new(core),
                parent: None,
                children: HashMap::new(),
                attached: true,
            }
        });
        let tree = Tree {
            inner: Arc::new(TreeInner {
                types: self.types,
                state: RwLock::new(TreeState {
                    nodes,
                    root,
                    by_name: HashMap::new(),
                    link_holders: HashMap::new(),
                    attached: 1,
                    type_subs: HashMap::new(),
                    subtree_subs: Vec::new(),
                    subs: HashMap::new(),
                    next_sub_id: 0,
                }),
                machine: RwLock::new(MachineState {
                    prelaunch: true,
                    name: "prelaunch".into(),
                }),
                next_mailbox: AtomicU64::new(1),
            }),
        };
        let root = tree.root();
        let machine = tree.create_object(&root, "machine", machine_class, None, Vec::new())?;
        for name in ["peripheral", "peripheral-anon", "unattached"] {
            tree.create_object(&machine, name, container.clone(), None, Vec::new())?;
        }
        tree.create_object(&root, "objects", container.clone(), None, Vec::new())?;
        tree.create_object(&root, "subscriptions", container, None, Vec::new())?;
        Ok(tree)
    }
}

impl Tree {
    /// A tree with only the object model's own types and a `none-machine` at `/machine`.
    pub fn new() -> Tree {
        match TreeBuilder::new().build() {
            Ok(tree) => tree,
            // The built-in types are fixed; failing here is a bug in this crate.
            Err(e) => unreachable!("the built-in tree must build: {e}"),
        }
    }

    pub fn builder() -> TreeBuilder {
        TreeBuilder::new()
    }

    /// The type registry (types may be registered at any time).
    pub fn types(&self) -> &TypeRegistry {
        &self.inner.types
    }

    /// `qom-list-types`.
    pub fn list_types(&self, implements: Option<&str>, include_abstract: bool) -> Vec<TypeSummary> {
        self.inner.types.list(implements, include_abstract)
    }

    /// `qom-list-properties`: what objects of a type have (children excluded).
    ///
    /// # Errors
    /// [`Error::TypeNotFound`].
    pub fn type_properties(&self, typename: &str) -> Result<Vec<PropertyInfo>> {
        Ok(self.inner.types.get(typename)?.property_infos().to_vec())
    }

    /// Number of objects in the tree (the root included).
    pub fn object_count(&self) -> usize {
        self.inner.state.read().attached
    }

    /// Tells the tree the machine's run state; `prelaunch` decides whether properties with
    /// [`PhasePolicy::Prelaunch`] may be written.
    pub fn set_machine_state(&self, state: &str, prelaunch: bool) {
        *self.inner.machine.write() = MachineState {
            prelaunch,
            name: state.into(),
        };
    }

    /// The run state last set with [`Tree::set_machine_state`], and whether it is prelaunch.
    pub fn machine_state(&self) -> (String, bool) {
        let m = self.inner.machine.read();
        (m.name.to_string(), m.prelaunch)
    }

    pub fn root(&self) -> ObjectRef {
        let st = self.inner.state.read();
        self.object(st.nodes[st.root].core.clone())
    }

    fn object(&self, core: Arc<ObjectCore>) -> ObjectRef {
        ObjectRef {
            tree: self.clone(),
            core,
        }
    }

    /// Resolves an absolute path (following links) or a partial path (a unique match at any
    /// depth), as QEMU does.
    ///
    /// # Errors
    /// [`Error::NotFound`] or [`Error::Ambiguous`].
    pub fn lookup(&self, path: &str) -> Result<ObjectRef> {
        let st = self.inner.state.read();
        let key = st.resolve(path)?;
        Ok(self.object(st.nodes[key].core.clone()))
    }

    /// `qom-list`.
    ///
    /// # Errors
    /// As [`Tree::lookup`].
    pub fn list(&self, path: &str) -> Result<Vec<PropertyInfo>> {
        Ok(self.lookup(path)?.list_properties())
    }

    /// `qom-get` of a value property or child.
    ///
    /// # Errors
    /// As [`Tree::lookup`] and [`ObjectRef::get`].
    pub fn get(&self, path: &str, property: &str) -> Result<Value> {
        self.lookup(path)?.get(property)
    }

    /// `qom-set`.
    ///
    /// # Errors
    /// As [`Tree::lookup`] and [`ObjectRef::set`].
    pub fn set(&self, path: &str, property: &str, value: Value) -> Result<()> {
        self.lookup(path)?.set(property, value)
    }

    /// Calls an action of the object at `path`.
    ///
    /// # Errors
    /// As [`Tree::lookup`] and [`ObjectRef::call`].
    pub fn call(&self, path: &str, action: &str, args: Args) -> Result<Option<Value>> {
        self.lookup(path)?.call(action, args)
    }

    /// Creates an object of `typename` as child `name` of the object at `parent`: constructs
    /// it, sets `properties` (creation arguments), realizes it and only then makes it
    /// visible. If anything fails, the tree is left exactly as before.
    ///
    /// # Errors
    /// An unknown, abstract or internal type, an invalid or taken name, a refused property,
    /// or the type's constructor or realize error.
    pub fn create(
        &self,
        parent: &str,
        name: &str,
        typename: &str,
        properties: Vec<(String, Value)>,
    ) -> Result<ObjectRef> {
        let parent = self.lookup(parent)?;
        let class = self.inner.types.get(typename)?;
        if class.is_abstract() {
            return Err(Error::AbstractType {
                typename: typename.to_owned(),
            });
        }
        if class.is_internal() {
            return Err(Error::InvalidState(format!(
                "objects of type '{typename}' cannot be created directly"
            )));
        }
        self.create_object(&parent, name, class, None, properties)
    }

    /// `object-add`: creates a client object of a `user-creatable` type at `/objects/<id>`.
    ///
    /// # Errors
    /// [`Error::TypeNotFound`], [`Error::NotUserCreatable`], [`Error::AbstractType`],
    /// [`Error::InvalidName`] (not an identifier), [`Error::DuplicateName`], or what
    /// creating it reports.
    pub fn add_user_object(
        &self,
        typename: &str,
        id: &str,
        properties: Vec<(String, Value)>,
    ) -> Result<ObjectRef> {
        let class = self.inner.types.get(typename)?;
        if !class.implements(builtin::USER_CREATABLE) {
            return Err(Error::NotUserCreatable {
                typename: typename.to_owned(),
            });
        }
        if class.is_abstract() {
            return Err(Error::AbstractType {
                typename: typename.to_owned(),
            });
        }
        path::check_id(id)?;
        self.create("/objects", id, typename, properties)
    }

    /// `object-del`: deletes the client object `/objects/<id>`.
    ///
    /// # Errors
    /// [`Error::NotFound`] (the path is the id), or what deleting reports.
    pub fn delete_user_object(&self, id: &str) -> Result<()> {
        let objects = self.lookup("/objects")?;
        let obj = objects.child(id).ok_or_else(|| Error::NotFound {
            path: id.to_owned(),
        })?;
        self.delete_object(&obj, true)
    }

    /// Deletes the object at `path` for a client: its type must allow it and it must have no
    /// children. Its unrealize hooks run, and its parent emits `child-removed`.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::NotDeletable`], [`Error::HasChildren`].
    pub fn delete(&self, path: &str) -> Result<()> {
        let obj = self.lookup(path)?;
        self.delete_object(&obj, true)
    }

    /// Deletes an object and everything below it, children first, whatever their types
    /// allow clients to do (for the owning code: a device with parts, machine teardown).
    ///
    /// # Errors
    /// [`Error::NotFound`] if `obj` is no longer in the tree.
    pub fn delete_subtree(&self, obj: &ObjectRef) -> Result<()> {
        for child in obj.children() {
            // A child deleted meanwhile by someone else is fine.
            let _ = self.delete_subtree(&child);
        }
        self.delete_object(obj, false)
    }

    pub(crate) fn create_object(
        &self,
        parent: &ObjectRef,
        name: &str,
        class: Arc<Class>,
        instance: Option<Instance>,
        properties: Vec<(String, Value)>,
    ) -> Result<ObjectRef> {
        check_name(name)?;
        let core = {
            let mut st = self.inner.state.write();
            st.check_free_name(parent.core.key, name)?;
            let path: Arc<str> = path::join(parent.path(), name).into();
            let name: Arc<str> = name.into();
            let key = st.nodes.insert_with_key(|key| Node {
                core: Arc::new(ObjectCore::new(key, name, path, class.clone())),
                parent: Some(parent.core.key),
                children: HashMap::new(),
                attached: false,
            });
            st.nodes[key].core.clone()
        };
        let obj = self.object(core);
        let realized_levels = match self.construct_and_realize(&obj, instance, properties) {
            Ok(levels) => levels,
            Err(e) => {
                self.discard(&obj);
                return Err(e);
            }
        };
        let attached = {
            let mut st = self.inner.state.write();
            st.attach(obj.core.key)
                .map(|()| st.attach_type_subscriptions(&obj.core))
        };
        if let Err(e) = attached {
            self.unrealize(&obj, realized_levels);
            self.discard(&obj);
            return Err(e);
        }
        builtin::emit_child_event(&parent.core, builtin::CHILD_ADDED, &obj.core);
        Ok(obj)
    }

    /// Runs the constructor, applies creation properties, runs realize hooks base first.
    /// Returns how many hook levels ran; on error, undoes the realized levels.
    fn construct_and_realize(
        &self,
        obj: &ObjectRef,
        instance: Option<Instance>,
        properties: Vec<(String, Value)>,
    ) -> Result<usize> {
        let class = obj.core.class.clone();
        let instance = match (instance, class.constructor()) {
            (Some(i), _) => Some(i),
            (None, Some(ctor)) => Some(ctor(obj)?),
            (None, None) => None,
        };
        if let Some(i) = instance {
            // The core is new and private to this call, so the cell is empty.
            let _ = obj.core.instance.set(i);
        }
        for (name, value) in properties {
            self.set_on(obj, &name, value)?;
        }
        let hooks = class.hooks();
        for (done, level) in hooks.iter().enumerate() {
            if let Some(realize) = &level.realize
                && let Err(e) = realize(obj)
            {
                self.unrealize(obj, done);
                return Err(e);
            }
        }
        obj.core
            .realized
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(hooks.len())
    }

    /// Runs the unrealize hooks of the first `levels` levels, most derived first.
    fn unrealize(&self, obj: &ObjectRef, levels: usize) {
        for level in obj.core.class.hooks()[..levels].iter().rev() {
            if let Some(unrealize) = &level.unrealize {
                unrealize(obj);
            }
        }
        obj.core
            .realized
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Drops an object that never became visible.
    fn discard(&self, obj: &ObjectRef) {
        self.inner.state.write().nodes.remove(obj.core.key);
        obj.core.set_life(Life::Gone);
    }

    pub(crate) fn delete_object(&self, obj: &ObjectRef, by_client: bool) -> Result<()> {
        let parent = {
            let mut st = self.inner.state.write();
            let node = match st.nodes.get(obj.core.key) {
                Some(n) if n.attached && Arc::ptr_eq(&n.core, &obj.core) => n,
                _ => return Err(obj.not_found()),
            };
            if by_client && !obj.core.class.is_deletable() {
                return Err(Error::NotDeletable {
                    path: obj.path().to_owned(),
                });
            }
            if let Some(child) = node.children.keys().min_by(|a, b| natural_cmp(a, b)) {
                return Err(Error::HasChildren {
                    path: obj.path().to_owned(),
                    child: child.to_string(),
                });
            }
            let parent = node
                .parent
                .and_then(|p| st.nodes.get(p))
                .map(|n| n.core.clone());
            st.detach(obj.core.key);
            obj.core.set_life(Life::Gone);
            parent
        };
        self.unrealize(obj, obj.core.class.hooks().len());
        if let Some(parent) = parent {
            builtin::emit_child_event(&parent, builtin::CHILD_REMOVED, &obj.core);
        }
        Ok(())
    }

    pub(crate) fn parent_of(&self, core: &ObjectCore) -> Option<ObjectRef> {
        let st = self.inner.state.read();
        let parent = st.nodes.get(core.key)?.parent?;
        Some(self.object(st.nodes.get(parent)?.core.clone()))
    }

    pub(crate) fn children_of(&self, core: &ObjectCore) -> Vec<ObjectRef> {
        let st = self.inner.state.read();
        let Some(node) = st.nodes.get(core.key) else {
            return Vec::new();
        };
        let mut children: Vec<_> = node.children.iter().collect();
        children.sort_by(|a, b| natural_cmp(a.0, b.0));
        children
            .into_iter()
            .filter_map(|(_, k)| st.nodes.get(*k))
            .map(|n| self.object(n.core.clone()))
            .collect()
    }

    pub(crate) fn child_of(&self, core: &ObjectCore, name: &str) -> Option<ObjectRef> {
        let st = self.inner.state.read();
        let key = *st.nodes.get(core.key)?.children.get(name)?;
        Some(self.object(st.nodes.get(key)?.core.clone()))
    }

    /// The canonical path of a live object, or "" (a link to a deleted object reads empty).
    fn path_of_key(&self, key: Option<ObjectKey>) -> String {
        let st = self.inner.state.read();
        key.and_then(|k| st.nodes.get(k))
            .filter(|n| n.attached)
            .map(|n| n.core.path().to_string())
            .unwrap_or_default()
    }

    pub(crate) fn get_on(&self, obj: &ObjectRef, name: &str) -> Result<Value> {
        let class = &obj.core.class;
        if let Some((index, prop)) = class.property_slot(name) {
            return match &prop.access {
                Access::Computed { get, .. } => get(obj),
                Access::Stored { .. } => {
                    let slot = stored_slot(class, index, name)?;
                    let stored = obj.core.stored.lock()[slot].clone();
                    Ok(match stored {
                        Stored::Value(v) => v,
                        Stored::Link(key) => Value::Path(self.path_of_key(key)),
                    })
                }
            };
        }
        if let Some(child) = self.child_of(&obj.core, name) {
            return Ok(Value::Path(child.path().to_owned()));
        }
        if class.notifier(name).is_some() {
            return Err(Error::NeedsSubscriber {
                property: name.to_owned(),
            });
        }
        Err(obj.property_not_found(name))
    }

    fn check_phase(&self, obj: &ObjectRef, prop: &Property) -> Result<()> {
        let wrong_phase = |current: String| Error::WrongPhase {
            path: obj.path().to_owned(),
            typename: obj.type_name().to_owned(),
            property: prop.name.clone(),
            policy: prop.policy,
            current,
        };
        match prop.policy {
            PhasePolicy::Always => Ok(()),
            PhasePolicy::ReadOnly => Err(Error::ReadOnly {
                path: obj.path().to_owned(),
                typename: obj.type_name().to_owned(),
                property: prop.name.clone(),
            }),
            PhasePolicy::BeforeRealize if obj.is_realized() => {
                Err(wrong_phase("the object is realized".into()))
            }
            PhasePolicy::BeforeRealize => Ok(()),
            PhasePolicy::Prelaunch => {
                let m = self.inner.machine.read();
                if m.prelaunch {
                    Ok(())
                } else {
                    Err(wrong_phase(format!("the machine is {}", m.name)))
                }
            }
        }
    }

    pub(crate) fn set_on(&self, obj: &ObjectRef, name: &str, value: Value) -> Result<()> {
        if obj.core.life() == Life::Gone {
            return Err(obj.not_found());
        }
        let class = obj.core.class.clone();
        let Some((index, prop)) = class.property_slot(name) else {
            if class.notifier(name).is_some() || self.child_of(&obj.core, name).is_some() {
                return Err(Error::ReadOnly {
                    path: obj.path().to_owned(),
                    typename: obj.type_name().to_owned(),
                    property: name.to_owned(),
                });
            }
            return Err(obj.property_not_found(name));
        };
        self.check_phase(obj, prop)?;
        let value = prop.kind.check(name, value)?;
        match &prop.access {
            Access::Computed { set: None, .. } => Err(Error::ReadOnly {
                path: obj.path().to_owned(),
                typename: obj.type_name().to_owned(),
                property: name.to_owned(),
            }),
            Access::Computed {
                get,
                set: Some(set),
            } => {
                let old = if prop.notifying { get(obj).ok() } else { None };
                set(obj, value.clone())?;
                if prop.notifying && old.as_ref() != Some(&value) {
                    self.emit_property_changed(&obj.core, name, &value);
                }
                Ok(())
            }
            Access::Stored { validator } => {
                let slot = stored_slot(&class, index, name)?;
                let new = match &prop.kind {
                    Kind::Link(target_type) => {
                        Stored::Link(self.link_target(name, target_type, &value)?)
                    }
                    _ => {
                        if let Some(validate) = validator {
                            validate(obj, &value)?;
                        }
                        Stored::Value(value.clone())
                    }
                };
                let changed = {
                    let mut stored = obj.core.stored.lock();
                    // The phase may have moved on while the validator ran.
                    self.check_phase(obj, prop)?;
                    let old = std::mem::replace(&mut stored[slot], new);
                    old != stored[slot]
                };
                if prop.notifying && changed {
                    self.emit_property_changed(&obj.core, name, &value);
                }
                Ok(())
            }
        }
    }

    /// Resolves the target of a link write: "" clears it; otherwise the object must exist
    /// and be of the link's type.
    fn link_target(
        &self,
        property: &str,
        target_type: &str,
        value: &Value,
    ) -> Result<Option<ObjectKey>> {
        let path = value.as_str().unwrap_or_default();
        if path.is_empty() {
            return Ok(None);
        }
        let target = self.lookup(path)?;
        if !target.class().implements(target_type) {
            return Err(Error::LinkTypeMismatch {
                property: property.to_owned(),
                expected: target_type.to_owned(),
                target: target.path().to_owned(),
                actual: target.type_name().to_owned(),
            });
        }
        Ok(Some(target.core.key))
    }

    pub(crate) fn emit_property_changed(&self, core: &ObjectCore, property: &str, value: &Value) {
        builtin::emit_property_changed(core, property, value);
    }

    pub(crate) fn call_on(&self, obj: &ObjectRef, name: &str, args: Args) -> Result<Option<Value>> {
        if !obj.is_alive() {
            return Err(obj.not_found());
        }
        let action = obj
            .core
            .class
            .action(name)
            .ok_or_else(|| Error::ActionNotFound {
                typename: obj.type_name().to_owned(),
                action: name.to_owned(),
            })?
            .clone();
        let args = action.check_args(args)?;
        let result = (action.handler)(obj, args)?;
        debug_assert!(
            match (&action.result, &result) {
                (Some(kind), Some(v)) => kind.accepts(v),
                (None, None) => true,
                _ => false,
            },
            "action {}.{} returned {result:?}, declared {:?}",
            obj.type_name(),
            name,
            action.result
        );
        Ok(result)
    }
}

fn stored_slot(class: &Class, index: usize, name: &str) -> Result<usize> {
    class.stored_slot(index).ok_or_else(|| {
        Error::Failed(format!(
            "internal error: stored property '{name}' has no slot"
        ))
    })
}

impl TreeState {
    /// Resolves an absolute or partial path to a live object.
    pub(crate) fn resolve(&self, path: &str) -> Result<ObjectKey> {
        if path.starts_with('/') {
            return self
                .resolve_from(self.root, components(path))
                .ok_or_else(|| Error::NotFound {
                    path: path.to_owned(),
                });
        }
        let mut parts = components(path);
        let Some(first) = parts.next() else {
            // Every object matches the empty partial path.
            return if self.attached == 1 {
                Ok(self.root)
            } else {
                Err(Error::Ambiguous {
                    path: path.to_owned(),
                })
            };
        };
        // QEMU resolves the path from every object of the tree and wants exactly one
        // success. A resolution from N can only succeed if N has a child or a link named
        // like the first component, so those are the only starting points to try.
        let children = self.by_name.get(first).into_iter().flatten().copied();
        let links = self
            .link_holders
            .get(first)
            .into_iter()
            .flatten()
            .filter_map(|&holder| self.component(holder, first));
        let mut found = None;
        for start in children.chain(links) {
            if let Some(key) = self.resolve_from(start, parts.clone()) {
                if found.is_some() {
                    return Err(Error::Ambiguous {
                        path: path.to_owned(),
                    });
                }
                found = Some(key);
            }
        }
        found.ok_or_else(|| Error::NotFound {
            path: path.to_owned(),
        })
    }

    fn resolve_from<'a>(
        &self,
        start: ObjectKey,
        parts: impl Iterator<Item = &'a str>,
    ) -> Option<ObjectKey> {
        parts
            .into_iter()
            .try_fold(start, |key, part| self.component(key, part))
    }

    /// Follows one path component from `key`: a child, or a link to a live object.
    fn component(&self, key: ObjectKey, name: &str) -> Option<ObjectKey> {
        let node = self.nodes.get(key)?;
        if let Some(&child) = node.children.get(name) {
            return Some(child);
        }
        let (index, prop) = node.core.class.property_slot(name)?;
        if !prop.is_link() {
            return None;
        }
        let slot = node.core.class.stored_slot(index)?;
        let target = match node.core.stored.lock().get(slot) {
            Some(Stored::Link(Some(k))) => *k,
            _ => return None,
        };
        self.nodes
            .get(target)
            .filter(|n| n.attached)
            .map(|_| target)
    }

    fn check_free_name(&self, parent: ObjectKey, name: &str) -> Result<()> {
        let node = self
            .nodes
            .get(parent)
            .filter(|n| n.attached)
            .ok_or_else(|| Error::NotFound {
                path: "(parent)".into(),
            })?;
        let class = &node.core.class;
        if node.children.contains_key(name)
            || class.property(name).is_some()
            || class.notifier(name).is_some()
        {
            return Err(Error::DuplicateName {
                path: node.core.path().to_string(),
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    /// Makes a constructed object reachable: its parent's child, and in the indexes.
    fn attach(&mut self, key: ObjectKey) -> Result<()> {
        let (parent, name, core) = match self.nodes.get(key) {
            Some(Node {
                parent: Some(p),
                core,
                ..
            }) => (*p, core.name.clone(), core.clone()),
            _ => {
                return Err(Error::Failed(
                    "internal error: attaching an unknown object".into(),
                ));
            }
        };
        if !self.nodes.get(parent).is_some_and(|n| n.attached) {
            return Err(Error::NotFound {
                path: path_parent(core.path()).to_owned(),
            });
        }
        self.check_free_name(parent, &name)?;
        if let Some(p) = self.nodes.get_mut(parent) {
            p.children.insert(name.clone(), key);
        }
        self.by_name.entry(name).or_default().push(key);
        for link in core.class.link_names() {
            self.link_holders.entry(link.clone()).or_default().push(key);
        }
        if let Some(n) = self.nodes.get_mut(key) {
            n.attached = true;
        }
        self.attached += 1;
        core.set_life(Life::Live);
        Ok(())
    }

    /// Removes an object from the arena and every index.
    fn detach(&mut self, key: ObjectKey) {
        let Some(node) = self.nodes.remove(key) else {
            return;
        };
        if !node.attached {
            return;
        }
        self.attached -= 1;
        let name = &node.core.name;
        if let Some(p) = node.parent.and_then(|p| self.nodes.get_mut(p)) {
            p.children.remove(name);
        }
        remove_from_index(&mut self.by_name, name, key);
        for link in node.core.class.link_names() {
            remove_from_index(&mut self.link_holders, link, key);
        }
    }

    /// Attaches the type subscriptions that match a new object's type or ancestors, and the
    /// subtree subscriptions it is in.
    fn attach_type_subscriptions(&self, core: &ObjectCore) {
        for typename in core.class.ancestry() {
            for sub in self.type_subs.get(typename).into_iter().flatten() {
                if let Some(index) = sub.index_on(&core.class) {
                    sub.attach_to(&core.events, index);
                }
            }
        }
        for sub in self.subtree_subs.iter().filter(|s| s.covers(core.path())) {
            if let Some(index) = sub.index_on(&core.class) {
                sub.attach_to(&core.events, index);
            }
        }
    }
}

fn remove_from_index(index: &mut HashMap<Arc<str>, Vec<ObjectKey>>, name: &str, key: ObjectKey) {
    if let Some(keys) = index.get_mut(name) {
        keys.retain(|k| *k != key);
        if keys.is_empty() {
            index.remove(name);
        }
    }
}

fn path_parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => path,
    }
}
