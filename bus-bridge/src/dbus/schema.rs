//! The D-Bus interfaces of the tree: one `org.qomu.Type.<CamelName>` per qom type, built
//! from the type's own declarations (the properties, actions and notifiers it declares
//! itself), plus the fixed interfaces every object or the root carries. Built once per type
//! and kept: types never change once registered.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use parking_lot::RwLock;
use qom::{Class, Field, Kind, PhasePolicy, Tree};

use super::names::{self, NameTable};
use super::values::signature;

pub const PEER: &str = "org.freedesktop.DBus.Peer";
pub const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
pub const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
pub const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";
pub const OBJECT1: &str = "org.qomu.Object1";
pub const ROOT1: &str = "org.qomu.Root1";
/// Every subscription object's interface: the envelope signal of `envelope` subscriptions.
pub const SUBSCRIPTION1: &str = "org.qomu.Subscription1";
/// Prefix of the per-type interfaces.
pub const TYPE_PREFIX: &str = "org.qomu.Type.";
/// Annotation carrying the qom name of a member.
pub const QOM_NAME: &str = "org.qomu.QomName";

/// A property of a type interface.
#[derive(Debug)]
pub struct PropDef {
    pub qom: String,
    pub dbus: String,
    pub kind: Kind,
    pub writable: bool,
    pub notifying: bool,
}

/// How a notifier's payload travels as signal arguments, after the leading `source`.
#[derive(Debug)]
pub enum SignalArgs {
    /// A struct whose fields are all required: one argument per field.
    Fields(Vec<Field>),
    /// Anything else: one argument, `data`, of the payload's D-Bus type.
    Whole(Kind),
}

/// A notifier of a type interface, as a signal.
#[derive(Debug)]
pub struct SignalDef {
    pub qom: String,
    pub dbus: String,
    pub args: SignalArgs,
}

/// An action of a type interface, as a method.
#[derive(Debug)]
pub struct MethodDef {
    pub qom: String,
    pub dbus: String,
    /// Required arguments, in declaration order.
    pub required: Vec<Field>,
    /// Optional arguments, passed by name in a trailing `options` dictionary.
    pub optional: Vec<Field>,
    pub result: Option<Kind>,
}

impl MethodDef {
    /// The signature a call's body must have.
    pub fn in_signature(&self) -> String {
        let mut s: String = self
            .required
            .iter()
            .map(|f| signature(&f.kind).to_string())
            .collect();
        if !self.optional.is_empty() {
            s.push_str("a{sv}");
        }
        s
    }
}

/// One qom type's D-Bus interface.
#[derive(Debug)]
pub struct TypeIface {
    pub typename: String,
    pub name: String,
    pub props: Vec<PropDef>,
    pub methods: Vec<MethodDef>,
    pub signals: Vec<SignalDef>,
    /// Its `<interface>` element.
    pub xml: String,
    /// The element with its signals only (what a subscription object shows).
    pub signals_xml: String,
}

impl TypeIface {
    pub fn prop(&self, dbus: &str) -> Option<&PropDef> {
        self.props.iter().find(|p| p.dbus == dbus)
    }
    pub fn prop_by_qom(&self, qom: &str) -> Option<&PropDef> {
        self.props.iter().find(|p| p.qom == qom)
    }
    pub fn method(&self, dbus: &str) -> Option<&MethodDef> {
        self.methods.iter().find(|m| m.dbus == dbus)
    }
    pub fn signal_by_qom(&self, qom: &str) -> Option<&SignalDef> {
        self.signals.iter().find(|s| s.qom == qom)
    }
}

/// Every type interface built so far, and the interface names handed out.
#[derive(Default)]
pub struct Schema {
    state: RwLock<SchemaState>,
}

#[derive(Default)]
struct SchemaState {
    iface_names: NameTable,
    by_type: HashMap<String, Arc<TypeIface>>,
    by_name: HashMap<String, Arc<TypeIface>>,
    /// The interfaces of objects of each class, most derived first.
    by_class: HashMap<String, Arc<[Arc<TypeIface>]>>,
}

impl Schema {
    /// The interface of type `typename`.
    ///
    /// # Errors
    /// The type is unknown.
    pub fn type_iface(&self, tree: &Tree, typename: &str) -> qom::Result<Arc<TypeIface>> {
        if let Some(t) = self.state.read().by_type.get(typename) {
            return Ok(t.clone());
        }
        let class = tree.types().get(typename)?;
        let mut st = self.state.write();
        if let Some(t) = st.by_type.get(typename) {
            return Ok(t.clone());
        }
        let name = format!("{TYPE_PREFIX}{}", st.iface_names.name_of(class.name()));
        let iface = Arc::new(build_iface(&class, name));
        st.by_name.insert(iface.name.clone(), iface.clone());
        st.by_type.insert(typename.to_owned(), iface.clone());
        Ok(iface)
    }

    /// The type interfaces of an object of `class`: one per type of its ancestry.
    pub fn class_ifaces(&self, tree: &Tree, class: &Class) -> Arc<[Arc<TypeIface>]> {
        if let Some(list) = self.state.read().by_class.get(class.name()) {
            return list.clone();
        }
        let list: Arc<[Arc<TypeIface>]> = class
            .ancestry()
            .iter()
            .filter_map(|t| self.type_iface(tree, t).ok())
            .collect();
        self.state
            .write()
            .by_class
            .insert(class.name().to_owned(), list.clone());
        list
    }

    /// An interface handed out before, by its D-Bus name.
    pub fn by_name(&self, name: &str) -> Option<Arc<TypeIface>> {
        self.state.read().by_name.get(name).cloned()
    }
}

fn build_iface(class: &Class, name: String) -> TypeIface {
    let own = |declared_by: &str| declared_by == class.name();
    // Properties, methods and signals are separate namespaces in D-Bus: the machine's
    // `stop` action and `STOP` notifier are the method Stop and the signal Stop.
    let (mut prop_names, mut method_names, mut signal_names) = (
        NameTable::default(),
        NameTable::default(),
        NameTable::default(),
    );
    let props: Vec<PropDef> = class
        .properties()
        .iter()
        .filter(|d| own(&d.declared_by))
        .map(|d| {
            let p = &d.item;
            PropDef {
                qom: p.name().to_owned(),
                dbus: prop_names.name_of(p.name()),
                kind: p.kind().clone(),
                writable: p.policy_of() != PhasePolicy::ReadOnly,
                notifying: p.is_notifying(),
            }
        })
        .collect();
    let methods: Vec<MethodDef> = class
        .actions()
        .iter()
        .filter(|d| own(&d.declared_by))
        .map(|d| {
            let a = &d.item;
            let (optional, required) = a.args().iter().cloned().partition(|f| f.optional);
            MethodDef {
                qom: a.name().to_owned(),
                dbus: method_names.name_of(a.name()),
                required,
                optional,
                result: a.result().cloned(),
            }
        })
        .collect();
    let signals: Vec<SignalDef> = class
        .notifiers()
        .iter()
        .filter(|d| own(&d.declared_by))
        .map(|d| {
            let n = &d.item;
            let args = match n.payload() {
                Kind::Struct(s) if s.fields.iter().all(|f| !f.optional) => {
                    SignalArgs::Fields(s.fields.clone())
                }
                k => SignalArgs::Whole(k.clone()),
            };
            SignalDef {
                qom: n.name().to_owned(),
                dbus: signal_names.name_of(n.name()),
                args,
            }
        })
        .collect();

    let descriptions = Descriptions::of(class);
    let mut xml = String::new();
    let mut signals_xml = String::new();
    let _ = writeln!(xml, "  <interface name=\"{name}\">");
    let _ = writeln!(signals_xml, "  <interface name=\"{name}\">");
    for p in &props {
        let emits = match (p.notifying, class.name(), p.qom.as_str()) {
            (true, ..) => "true",
            // An object's type never changes.
            (false, qom::OBJECT, "type") => "const",
            (false, ..) => "false",
        };
        let _ = writeln!(
            xml,
            "    <property name=\"{}\" type=\"{}\" access=\"{}\">",
            p.dbus,
            signature(&p.kind),
            if p.writable { "readwrite" } else { "read" }
        );
        annotation(&mut xml, QOM_NAME, &p.qom);
        annotation(
            &mut xml,
            "org.freedesktop.DBus.Property.EmitsChangedSignal",
            emits,
        );
        if let Some(text) = descriptions.property(&p.qom) {
            annotation(&mut xml, "org.qomu.Description", text);
        }
        if let Kind::Enum(e) = &p.kind {
            annotation(&mut xml, "org.qomu.EnumValues", &e.values.join(" "));
        }
        xml.push_str("    </property>\n");
    }
    for m in &methods {
        let _ = writeln!(xml, "    <method name=\"{}\">", m.dbus);
        annotation(&mut xml, QOM_NAME, &m.qom);
        if let Some(text) = descriptions.action(&m.qom) {
            annotation(&mut xml, "org.qomu.Description", text);
        }
        for f in &m.required {
            arg(
                &mut xml,
                &names::arg_name(&f.name),
                &signature(&f.kind).to_string(),
                Some("in"),
            );
        }
        if !m.optional.is_empty() {
            let listed: Vec<&str> = m.optional.iter().map(|f| f.name.as_str()).collect();
            annotation(&mut xml, "org.qomu.Options", &listed.join(" "));
            arg(&mut xml, "options", "a{sv}", Some("in"));
        }
        if let Some(k) = &m.result {
            arg(&mut xml, "result", &signature(k).to_string(), Some("out"));
        }
        xml.push_str("    </method>\n");
    }
    for s in &signals {
        let mut element = String::new();
        let _ = writeln!(element, "    <signal name=\"{}\">", s.dbus);
        annotation(&mut element, QOM_NAME, &s.qom);
        if let Some(text) = descriptions.notifier(&s.qom) {
            annotation(&mut element, "org.qomu.Description", text);
        }
        arg(&mut element, "source", "o", None);
        match &s.args {
            SignalArgs::Fields(fields) => {
                for f in fields {
                    arg(
                        &mut element,
                        &names::arg_name(&f.name),
                        &signature(&f.kind).to_string(),
                        None,
                    );
                }
            }
            SignalArgs::Whole(k) => arg(&mut element, "data", &signature(k).to_string(), None),
        }
        element.push_str("    </signal>\n");
        xml.push_str(&element);
        signals_xml.push_str(&element);
    }
    xml.push_str("  </interface>\n");
    signals_xml.push_str("  </interface>\n");
    TypeIface {
        typename: class.name().to_owned(),
        name,
        props,
        methods,
        signals,
        xml,
        signals_xml,
    }
}

/// The descriptions of a class's own members, for annotations.
struct Descriptions<'a>(&'a Class);

impl<'a> Descriptions<'a> {
    fn of(class: &'a Class) -> Self {
        Descriptions(class)
    }
    fn property(&self, name: &str) -> Option<&'a str> {
        self.0
            .properties()
            .iter()
            .find(|d| d.item.name() == name)
            .map(|d| d.item.description_text())
            .filter(|t| !t.is_empty())
    }
    fn action(&self, name: &str) -> Option<&'a str> {
        self.0
            .action(name)
            .map(|a| a.description_text())
            .filter(|t| !t.is_empty())
    }
    fn notifier(&self, name: &str) -> Option<&'a str> {
        self.0
            .notifier(name)
            .map(|(_, n)| n.description_text())
            .filter(|t| !t.is_empty())
    }
}

fn annotation(xml: &mut String, name: &str, value: &str) {
    let _ = writeln!(
        xml,
        "      <annotation name=\"{name}\" value=\"{}\"/>",
        xml_escape(value)
    );
}

fn arg(xml: &mut String, name: &str, sig: &str, direction: Option<&str>) {
    match direction {
        Some(d) => {
            let _ = writeln!(
                xml,
                "      <arg name=\"{name}\" type=\"{sig}\" direction=\"{d}\"/>"
            );
        }
        None => {
            let _ = writeln!(xml, "      <arg name=\"{name}\" type=\"{sig}\"/>");
        }
    }
}

pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

pub const XML_HEADER: &str = "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n";

pub const STANDARD_XML: &str = r#"  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg name="machine_uuid" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg name="xml_data" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="props" type="a{sv}" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
"#;

pub const OBJECT_MANAGER_XML: &str = r#"  <interface name="org.freedesktop.DBus.ObjectManager">
    <method name="GetManagedObjects">
      <arg name="object_paths_interfaces_and_properties" type="a{oa{sa{sv}}}" direction="out"/>
    </method>
    <signal name="InterfacesAdded">
      <arg name="object_path" type="o"/>
      <arg name="interfaces_and_properties" type="a{sa{sv}}"/>
    </signal>
    <signal name="InterfacesRemoved">
      <arg name="object_path" type="o"/>
      <arg name="interfaces" type="as"/>
    </signal>
  </interface>
"#;

pub const OBJECT1_XML: &str = r#"  <interface name="org.qomu.Object1">
    <property name="QomPath" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <property name="Type" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <method name="ListProperties">
      <arg name="properties" type="a(ssssb)" direction="out"/>
    </method>
    <method name="GetProperty">
      <arg name="name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="SetProperty">
      <arg name="name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <method name="Subscribe">
      <arg name="notifier" type="s" direction="in"/>
      <arg name="subscription" type="o" direction="out"/>
    </method>
    <method name="SubscribeWithOptions">
      <arg name="notifier" type="s" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="subscription" type="o" direction="out"/>
    </method>
    <method name="SubscribeFull">
      <arg name="notifier" type="s" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="subscription" type="o" direction="out"/>
      <arg name="details" type="a{sv}" direction="out"/>
    </method>
    <method name="Delete"/>
  </interface>
"#;

pub const SUBSCRIPTION1_XML: &str = r#"  <interface name="org.qomu.Subscription1">
    <signal name="Event">
      <arg name="source" type="o"/>
      <arg name="notifier" type="s"/>
      <arg name="sequence" type="t"/>
      <arg name="data" type="a{sv}"/>
    </signal>
  </interface>
"#;

pub const ROOT1_XML: &str = r#"  <interface name="org.qomu.Root1">
    <property name="Version" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <method name="SubscribeType">
      <arg name="type" type="s" direction="in"/>
      <arg name="notifier" type="s" direction="in"/>
      <arg name="subscription" type="o" direction="out"/>
    </method>
    <method name="SubscribeTypeWithOptions">
      <arg name="type" type="s" direction="in"/>
      <arg name="notifier" type="s" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="subscription" type="o" direction="out"/>
    </method>
    <method name="SubscribeTypeFull">
      <arg name="type" type="s" direction="in"/>
      <arg name="notifier" type="s" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="subscription" type="o" direction="out"/>
      <arg name="details" type="a{sv}" direction="out"/>
    </method>
    <method name="Unsubscribe">
      <arg name="subscription" type="o" direction="in"/>
    </method>
    <method name="Adopt">
      <arg name="subscription" type="o" direction="in"/>
      <arg name="token" type="s" direction="in"/>
    </method>
    <method name="ListTypes">
      <arg name="implements" type="s" direction="in"/>
      <arg name="include_abstract" type="b" direction="in"/>
      <arg name="types" type="a(ssb)" direction="out"/>
    </method>
    <method name="AddObject">
      <arg name="type" type="s" direction="in"/>
      <arg name="id" type="s" direction="in"/>
      <arg name="properties" type="a{sv}" direction="in"/>
      <arg name="object" type="o" direction="out"/>
    </method>
  </interface>
"#;
