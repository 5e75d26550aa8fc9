//! Actions: methods declared by a type, with argument and result schemas.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kind::{Field, Kind};
use crate::object::ObjectRef;
use crate::value::Value;

/// Checked arguments of an action call, by name.
pub type Args = BTreeMap<String, Value>;

/// Runs an action; arguments are already checked against the declaration.
pub type Handler = Arc<dyn Fn(&ObjectRef, Args) -> Result<Option<Value>> + Send + Sync>;

/// A declared action of a type.
#[derive(Clone)]
pub struct Action {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) args: Vec<Field>,
    pub(crate) result: Option<Kind>,
    pub(crate) handler: Handler,
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Action")
            .field("name", &self.name)
            .field("args", &self.args)
            .finish()
    }
}

impl Action {
    /// An action with no arguments and no result, running `handler`.
    pub fn new(
        name: &str,
        handler: impl Fn(&ObjectRef, Args) -> Result<Option<Value>> + Send + Sync + 'static,
    ) -> Self {
        Action {
            name: name.to_owned(),
            description: String::new(),
            args: Vec::new(),
            result: None,
            handler: Arc::new(handler),
        }
    }

    /// An action whose handler its type binds ([`crate::TypedInfo::action`]): until
    /// then, calling it fails.
    pub fn declare(name: &str) -> Self {
        let unbound = name.to_owned();
        Action::new(name, move |_, _| {
            Err(Error::failed(format!(
                "action '{unbound}' is not bound to its type"
            )))
        })
    }

    /// The same declaration, running `handler`.
    pub(crate) fn bind(
        mut self,
        handler: impl Fn(&ObjectRef, Args) -> Result<Option<Value>> + Send + Sync + 'static,
    ) -> Self {
        self.handler = Arc::new(handler);
        self
    }

    pub fn description(mut self, text: &str) -> Self {
        self.description = text.to_owned();
        self
    }

    /// Declares an argument (in call order).
    pub fn arg(mut self, field: Field) -> Self {
        self.args.push(field);
        self
    }

    /// Declares the result's kind.
    pub fn returns(mut self, kind: Kind) -> Self {
        self.result = Some(kind);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn description_text(&self) -> &str {
        &self.description
    }
    pub fn args(&self) -> &[Field] {
        &self.args
    }
    pub fn result(&self) -> Option<&Kind> {
        self.result.as_ref()
    }

    /// Checks call arguments against the declaration, in declaration order, as QEMU's
    /// input visitor does: a missing or mistyped argument first, then unexpected ones.
    ///
    /// # Errors
    /// [`Error::MissingArgument`], [`Error::UnexpectedArgument`], or a kind error naming
    /// the argument.
    pub fn check_args(&self, mut given: Args) -> Result<Args> {
        let mut out = Args::new();
        for field in &self.args {
            match given.remove(&field.name) {
                Some(v) => {
                    out.insert(field.name.clone(), field.kind.check(&field.name, v)?);
                }
                None if field.optional => {}
                None => {
                    return Err(Error::MissingArgument {
                        action: self.name.clone(),
                        argument: field.name.clone(),
                    });
                }
            }
        }
        if let Some(extra) = given.into_keys().next() {
            return Err(Error::UnexpectedArgument {
                action: self.name.clone(),
                argument: extra,
            });
        }
        Ok(out)
    }
}
