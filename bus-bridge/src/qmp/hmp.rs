//! `human-monitor-command`: the few HMP commands clients still send, answered from the
//! tree (QEMU's text forms, lines ending in CRLF).

use std::fmt::Write as _;

use qom::{ObjectRef, PropertyRole, Value};

use super::session::{QEMU_VERSION, Session, package};

/// Runs one HMP command line; the result is the text HMP would print.
pub fn run(session: &mut Session, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let text = match words.as_slice() {
        ["info", "status"] => info_status(session),
        ["info", "qtree"] => info_qtree(session),
        ["info", "version"] => {
            let (major, minor, micro) = QEMU_VERSION;
            format!("{major}.{minor}.{micro} ({})\n", package())
        }
        ["info", "name"] => match session.tree.get("/machine", "name") {
            Ok(Value::Str(n)) if !n.is_empty() => format!("{n}\n"),
            _ => String::new(),
        },
        ["info"] | ["help" | "?"] | ["info", "help"] => {
            "info name -- show the current VM name\ninfo qtree -- show device tree\ninfo status -- show the current VM status \
             (running|paused)\ninfo version -- show the version of QEMU\nstop, cont, system_reset, system_powerdown, quit\n"
                .to_owned()
        }
        [cmd @ ("stop" | "cont" | "c" | "system_reset" | "system_powerdown" | "quit" | "q")] => {
            let action = match *cmd {
                "c" => "cont",
                "q" => "quit",
                "system_reset" => "system-reset",
                "system_powerdown" => "system-powerdown",
                c => c,
            };
            match session.tree.call("/machine", action, Default::default()) {
                Ok(_) => String::new(),
                Err(e) => format!("Error: {e}\n"),
            }
        }
        ["info", what, ..] => format!("unknown info command: '{what}'\n"),
        [] => String::new(),
        [cmd, ..] => format!("unknown command: '{cmd}'\n"),
    };
    text.replace('\n', "\r\n")
}

fn info_status(session: &Session) -> String {
    let status = session
        .tree
        .get("/machine", "status")
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "prelaunch".into());
    match status.as_str() {
        "running" => "VM status: running\n".into(),
        "paused" => "VM status: paused\n".into(),
        other => format!("VM status: paused ({other})\n"),
    }
}

/// The devices under `/machine` with their properties, in `info qtree`'s layout.
fn info_qtree(session: &Session) -> String {
    let mut out = String::from("bus: main-system-bus\n  type System\n");
    let Ok(machine) = session.tree.lookup("/machine") else {
        return out;
    };
    let mut devices = Vec::new();
    collect_devices(&machine, &mut devices);
    for dev in devices {
        let id = if dev
            .parent()
            .is_some_and(|p| p.path() == "/machine/peripheral")
        {
            dev.name()
        } else {
            ""
        };
        let _ = writeln!(out, "  dev: {}, id \"{id}\"", dev.type_name());
        for p in dev.list_properties() {
            if !matches!(p.role, PropertyRole::Value(_))
                || matches!(p.name.as_str(), "type" | "realized")
            {
                continue;
            }
            let Ok(v) = dev.get(&p.name) else { continue };
            let shown = match &v {
                Value::Int(i) => format!("{i} ({i:#x})"),
                Value::UInt(u) => format!("{u} ({u:#x})"),
                Value::Bool(b) => b.to_string(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "    {} = {shown}", p.name);
        }
    }
    out
}

fn collect_devices(obj: &ObjectRef, out: &mut Vec<ObjectRef>) {
    for child in obj.children() {
        if child.class().implements("device") {
            out.push(child.clone());
        }
        collect_devices(&child, out);
    }
}
