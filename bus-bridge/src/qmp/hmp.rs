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
        ["info", "registers", rest @ ..] => info_registers(session, rest),
        ["info", "name"] => match session.tree.get("/machine", "name") {
            Ok(Value::Str(n)) if !n.is_empty() => format!("{n}\n"),
            _ => String::new(),
        },
        ["info"] | ["help" | "?"] | ["info", "help"] => {
            "info name -- show the current VM name\ninfo qtree -- show device tree\ninfo registers [-a|vcpu] -- show the cpu \
             registers (-a: all vCPUs)\ninfo status -- show the current VM status \
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

/// `info registers [-a|N]`: vCPU 0's registers (all with `-a`, vCPU N with a number), in
/// QEMU's 64-bit layout for the registers `/machine`'s `query-cpus` reads (general purpose,
/// RIP and RFLAGS with its flag letters, CR0-CR4, EFER). The guest pauses for the moment of
/// reading, as `query-cpus` does.
fn info_registers(session: &Session, args: &[&str]) -> String {
    let which = match args {
        [] => Some(0),
        ["-a"] => None,
        [n] => match n.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return format!("Error: invalid vcpu '{n}'\n"),
        },
        _ => return "Error: info registers takes -a or a vcpu index\n".into(),
    };
    let cpus = match session
        .tree
        .call("/machine", "query-cpus", Default::default())
    {
        Ok(Some(Value::List(cpus))) => cpus,
        Ok(_) => return String::new(),
        Err(e) => return format!("Error: {e}\n"),
    };
    if cpus.is_empty() {
        return "Error: no vCPU exists until the guest first runs\n".into();
    }
    let mut out = String::new();
    for cpu in &cpus {
        let index = cpu.field("cpu-index").and_then(Value::as_u64).unwrap_or(0);
        if which.is_some_and(|w| w != index) {
            continue;
        }
        let reg = |name: &str| {
            cpu.field("registers")
                .and_then(|r| r.field(name))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let _ = writeln!(out, "\nCPU#{index}");
        for row in [
            ["rax", "rbx", "rcx", "rdx"],
            ["rsi", "rdi", "rbp", "rsp"],
            ["r8", "r9", "r10", "r11"],
            ["r12", "r13", "r14", "r15"],
        ] {
            let cells: Vec<String> = row
                .iter()
                .map(|r| format!("{:<3}={:016x}", r.to_uppercase(), reg(r)))
                .collect();
            let _ = writeln!(out, "{}", cells.join(" "));
        }
        let rflags = reg("rflags");
        // QEMU's letters: D O S Z A P C, '-' where the flag is clear.
        let flags: String = [
            (10, 'D'),
            (11, 'O'),
            (7, 'S'),
            (6, 'Z'),
            (4, 'A'),
            (2, 'P'),
            (0, 'C'),
        ]
        .iter()
        .map(|&(bit, c)| if rflags >> bit & 1 == 1 { c } else { '-' })
        .collect();
        let _ = writeln!(out, "RIP={:016x} RFL={rflags:08x} [{flags}]", reg("rip"));
        let _ = writeln!(
            out,
            "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}",
            reg("cr0"),
            reg("cr2"),
            reg("cr3"),
            reg("cr4")
        );
        let _ = writeln!(out, "EFER={:016x}", reg("efer"));
    }
    match which {
        Some(n) if out.is_empty() => format!("Error: invalid vcpu '{n}'\n"),
        _ => out,
    }
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
