//! Property declarations: kind, description, default, phase policy, notifying flag, and
//! where the value lives (stored in the tree, or computed by the owning type).

use std::fmt;
use std::sync::Arc;

use crate::error::Result;
use crate::kind::Kind;
use crate::object::ObjectRef;
use crate::value::Value;

/// When a property may be written. Declared per property and shown by introspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhasePolicy {
    /// Never written from outside; the owning type may still change it.
    ReadOnly,
    /// Writable at any time.
    Always,
    /// Writable only while the object is not yet realized (creation arguments).
    BeforeRealize,
    /// Writable only while the machine is in `prelaunch` (RAM size, vCPU count, ...).
    Prelaunch,
}

impl PhasePolicy {
    /// The policy's name as introspection shows it.
    pub fn name(self) -> &'static str {
        match self {
            PhasePolicy::ReadOnly => "read-only",
            PhasePolicy::Always => "always",
            PhasePolicy::BeforeRealize => "before-realize",
            PhasePolicy::Prelaunch => "prelaunch",
        }
    }

    /// "while the machine is in prelaunch", for error messages.
    pub fn describe_when(self) -> &'static str {
        match self {
            PhasePolicy::ReadOnly => "by its owner",
            PhasePolicy::Always => "at any time",
            PhasePolicy::BeforeRealize => "before the object is realized",
            PhasePolicy::Prelaunch => "while the machine is in prelaunch",
        }
    }

    /// True if a client may ever write the property.
    pub fn is_writable(self) -> bool {
        self != PhasePolicy::ReadOnly
    }
}

impl fmt::Display for PhasePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads a computed property.
pub type Getter = Arc<dyn Fn(&ObjectRef) -> Result<Value> + Send + Sync>;
/// Writes a computed property; the value is already checked against the property's kind.
/// It must leave everything unchanged when it returns an error.
pub type Setter = Arc<dyn Fn(&ObjectRef, Value) -> Result<()> + Send + Sync>;
/// Vets a value for a stored property before it is written.
pub type Validator = Arc<dyn Fn(&ObjectRef, &Value) -> Result<()> + Send + Sync>;

#[derive(Clone)]
pub(crate) enum Access {
    /// The tree keeps the value (links keep a checked object key).
    Stored { validator: Option<Validator> },
    /// The owning type computes the value.
    Computed { get: Getter, set: Option<Setter> },
}

/// A declared property of a type.
#[derive(Clone)]
pub struct Property {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) description: String,
    pub(crate) default: Option<Value>,
    pub(crate) policy: PhasePolicy,
    pub(crate) notifying: bool,
    pub(crate) access: Access,
}

impl fmt::Debug for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Property")
            .field("name", &self.name)
            .field("kind", &self.kind.type_name())
            .field("policy", &self.policy)
            .field("notifying", &self.notifying)
            .finish()
    }
}

impl Property {
    /// A property stored in the tree, writable at any time, with the kind's zero value
    /// as default unless [`Property::default`] says otherwise.
    pub fn new(name: &str, kind: Kind) -> Self {
        Property {
            name: name.to_owned(),
            kind,
            description: String::new(),
            default: None,
            policy: PhasePolicy::Always,
            notifying: false,
            access: Access::Stored { validator: None },
        }
    }

    /// A `link<T>` property (stored, checked on write, re-checked on use).
    pub fn link(name: &str, target_type: &str) -> Self {
        Property::new(name, Kind::link(target_type))
    }

    pub fn description(mut self, text: &str) -> Self {
        self.description = text.to_owned();
        self
    }

    /// The initial value; it must fit the kind (checked when the type is registered).
    pub fn default(mut self, value: impl Into<Value>) -> Self {
        self.default = Some(value.into());
        self
    }

    pub fn policy(mut self, policy: PhasePolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn read_only(self) -> Self {
        self.policy(PhasePolicy::ReadOnly)
    }

    /// Changes of this property are announced on the object's `property-changed` notifier.
    pub fn notifying(mut self) -> Self {
        self.notifying = true;
        self
    }

    /// A stored property whose writes are vetted by `validator` first.
    pub fn validate(
        mut self,
        validator: impl Fn(&ObjectRef, &Value) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.access = Access::Stored {
            validator: Some(Arc::new(validator)),
        };
        self
    }

    /// A property computed by the owning type; read-only unless [`Property::setter`] is given.
    pub fn getter(
        mut self,
        get: impl Fn(&ObjectRef) -> Result<Value> + Send + Sync + 'static,
    ) -> Self {
        let set = match &self.access {
            Access::Computed { set, .. } => set.clone(),
            Access::Stored { .. } => None,
        };
        if set.is_none() && self.policy == PhasePolicy::Always {
            self.policy = PhasePolicy::ReadOnly;
        }
        self.access = Access::Computed {
            get: Arc::new(get),
            set,
        };
        self
    }

    /// The writer of a computed property (call after [`Property::getter`]); it makes the
    /// property writable ([`PhasePolicy::Always`]) unless a policy was chosen already.
    pub fn setter(
        mut self,
        set: impl Fn(&ObjectRef, Value) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        if let Access::Computed { set: slot, .. } = &mut self.access {
            *slot = Some(Arc::new(set));
            if self.policy == PhasePolicy::ReadOnly {
                self.policy = PhasePolicy::Always;
            }
        }
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn kind(&self) -> &Kind {
        &self.kind
    }
    pub fn description_text(&self) -> &str {
        &self.description
    }
    pub fn policy_of(&self) -> PhasePolicy {
        self.policy
    }
    pub fn is_notifying(&self) -> bool {
        self.notifying
    }
    pub fn is_link(&self) -> bool {
        matches!(self.kind, Kind::Link(_))
    }
    pub(crate) fn is_stored(&self) -> bool {
        matches!(self.access, Access::Stored { .. })
    }

    /// The value a stored property starts with.
    pub(crate) fn initial_value(&self) -> Value {
        self.default
            .clone()
            .unwrap_or_else(|| zero_value(&self.kind))
    }
}

/// The value a stored property of `kind` holds when no default is declared.
fn zero_value(kind: &Kind) -> Value {
    match kind {
        Kind::Bool => Value::Bool(false),
        Kind::Int(k) => Value::Int(0.clamp(k.min, k.max)),
        Kind::UInt(k) => Value::UInt(k.min),
        Kind::Str | Kind::Any => Value::Str(String::new()),
        Kind::Enum(e) => Value::Enum(e.values.first().cloned().unwrap_or_default()),
        Kind::Path | Kind::Link(_) | Kind::Child(_) => Value::Path(String::new()),
        Kind::List(_) => Value::List(Vec::new()),
        Kind::Struct(_) => Value::Map(Default::default()),
    }
}

/// What a listed property is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyRole {
    /// A declared value property (links included).
    Value(Kind),
    /// An owned child object of the given type.
    Child(String),
    /// A notifier; its payload has this kind.
    Notifier(Kind),
}

/// One entry of `qom-list` / `qom-list-properties`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyInfo {
    pub name: String,
    /// QEMU's type string: `bool`, `uint32`, `str`, `link<T>`, `child<T>`, `notifier<T>`, ...
    pub type_name: String,
    pub description: Option<String>,
    pub default: Option<Value>,
    pub policy: PhasePolicy,
    pub notifying: bool,
    /// The type whose declaration this is (for children: the child's type).
    pub declared_by: String,
    pub role: PropertyRole,
}
