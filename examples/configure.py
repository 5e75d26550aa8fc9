#!/usr/bin/env python3
"""examples/configure.py: configure a VM from an INI file over D-Bus, then start it.

The 2007 D-Bus proposal qomu grew from: start the VMM with no configuration, and have "a
nice python script that reads VM's configuration from INI file" set everything over
D-Bus before saying "ConfigDone" (here: `Cont`).

    examples/configure.py vm.ini                       # attach to a qomu -S on the bus
    examples/configure.py vm.ini --start qomu          # start `qomu -S --dbus ...` first
    examples/configure.py vm.ini --no-start            # configure, check, leave it paused

The file (examples/vm.ini is one):

    [machine]                 # /machine's properties, by their qom names
    memory-size = 128M        # integers take K/M/G/T suffixes (powers of 1024)
    cpus = 2
    kernel = /path/to/guest.elf
    append = console=ttyS0
    name = example

    [netdev net0]             # one section per host network backend: its id, then
    type = stream             # its type (stream or tap), and its properties by qom name:
    path = /run/passt.socket  # a stream's socket (server = true to listen there instead),
                              # a tap's ifname

    [device rng0]             # one section per device: its id, then
    driver = virtio-rng-pci   # its type, optionally
    bus = pci.0               # its bus, and
    file = ...                # any of its properties, as text (qomu converts it)

    [device nic0]             # a NIC names the netdev of a [netdev] section before it
    driver = virtio-net-pci
    netdev = net0
    mac = 52:54:00:12:34:56

Each value is set in order and read back. The first one the VMM refuses (an unknown
property, a value of the wrong type or out of range, a device it will not add) is reported
as FILE:LINE with the VMM's own D-Bus error, everything already set is undone (old values
back, devices and netdevs removed) and the VM is not started: the script exits with 1.

The bus: --bus ADDRESS, else DBUS_SESSION_BUS_ADDRESS. With --start and neither, qomu
starts a private bus (`--dbus auto`) and the script reads its address from what qomu
prints. --name is the VM's bus name (default org.qomu.VM1). Needs dbus-next (PyPI).
See docs/scripting.md.
"""

import argparse
import asyncio
import os
import re
import shlex
import subprocess
import sys
import threading

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

ROOT = "/org/qomu/VM1"
OBJECT = "org.qomu.Object1"
MACHINE_IFACE = "org.qomu.Type.QomuX86Machine"


class ConfigError(Exception):
    """A line of the file that cannot be applied: where, and the VMM's words."""

    def __init__(self, line, text):
        super().__init__(text)
        self.line = line


def parse_ini(path):
    """The file's sections in order: (name, line, [(key, value, line)])."""
    sections = []
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].split(";", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"\[\s*(.+?)\s*\]", line)
            if m:
                sections.append((m.group(1), number, []))
                continue
            if "=" not in line or not sections:
                raise ConfigError(number, f"expected [section] or key = value, got {raw.strip()!r}")
            key, value = (s.strip() for s in line.split("=", 1))
            sections[-1][2].append((key, value, number))
    return sections


def dbus_path(qom_path):
    """The D-Bus path of a qom path: bytes outside [A-Za-z0-9] become _ and two hex digits."""
    out = ROOT
    for part in qom_path.strip("/").split("/"):
        out += "/" + "".join(c if c.isalnum() and c.isascii() else f"_{ord(c):02x}" for c in part)
    return out


SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
INT_RANGES = {
    "y": (0, 2**8 - 1), "q": (0, 2**16 - 1), "u": (0, 2**32 - 1), "t": (0, 2**64 - 1),
    "n": (-(2**15), 2**15 - 1), "i": (-(2**31), 2**31 - 1), "x": (-(2**63), 2**63 - 1),
}


BOOLS = {"true": True, "yes": True, "false": False, "no": False}


def to_variant(text, signature):
    """The INI text as a value of the property's D-Bus type, where it can be one. Where it
    cannot, it goes as text (or as a wider integer), and the VMM says what is wrong."""
    if signature == "b" and text.lower() in BOOLS:
        return Variant("b", BOOLS[text.lower()])
    if signature in INT_RANGES:
        m = re.fullmatch(r"(0x[0-9a-fA-F]+|-?\d+)([kKmMgGtT]?)", text)
        if m:
            value = int(m.group(1), 0) * SUFFIX.get(m.group(2).lower(), 1)
            low, high = INT_RANGES[signature]
            if low <= value <= high:
                return Variant(signature, value)
            return Variant("x" if value < 0 else "t", value) if -(2**63) <= value < 2**64 else Variant("s", text)
        return Variant("s", text)
    if signature == "b":
        words = {"on": True, "true": True, "yes": True, "1": True,
                 "off": False, "false": False, "no": False, "0": False}
        if text.lower() in words:
            return Variant("b", words[text.lower()])
        return Variant("s", text)
    return Variant("s", text)


class Vm:
    def __init__(self, bus, name):
        self.bus = bus
        self.name = name

    async def call(self, path, interface, member, signature="", body=()):
        reply = await self.bus.call(Message(
            destination=self.name, path=path, interface=interface, member=member,
            signature=signature, body=list(body)))
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise RuntimeError(f"{reply.error_name}: {detail}")
        return reply.body

    async def get(self, path, prop):
        (value,) = await self.call(path, OBJECT, "GetProperty", "s", [prop])
        return value.value

    async def set(self, path, prop, variant):
        await self.call(path, OBJECT, "SetProperty", "sv", [prop, variant])

    async def signatures(self, path):
        """qom property name -> D-Bus signature, from the object's ListProperties and its
        typed interfaces' introspection."""
        node = await self.bus.introspect(self.name, path)
        by_dbus = {}
        for iface in node.interfaces:
            for p in iface.properties:
                by_dbus[p.name] = p.signature
        (props,) = await self.call(path, OBJECT, "ListProperties")
        camel = lambda n: "".join(w[:1].upper() + w[1:] for w in re.split(r"[-_]", n))
        return {p[0]: by_dbus.get(camel(p[0]), "s") for p in props}


def same(read, text, signature):
    """Whether what the VMM holds now is what the file said."""
    wanted = to_variant(text, signature)
    if wanted.signature == signature:
        return read == wanted.value
    return str(read) == text


async def read_back(vm, path, entries, skip, what):
    """Checks that the object at `path` holds each value its section set (but the keys in
    `skip`, which say how to make it); the first that differs is the file's error."""
    types = await vm.signatures(path)
    for key, text, number in entries:
        if key in skip:
            continue
        read = await vm.get(path, key)
        if not same(read, text, types.get(key, "s")):
            raise ConfigError(number, f"{key} = {text}: the {what} holds {read!r}")


class Kind:
    """What a [device ID] or [netdev ID] section makes: the key naming its type (with a
    hint for the error when it is missing), keys passed as options beside `properties`,
    the machine's method that adds one and the one that removes it, and where it lands."""

    def __init__(self, what, type_key, hint, option_keys, add, remove, root):
        self.what, self.type_key, self.hint = what, type_key, hint
        self.option_keys, self.add, self.remove, self.root = option_keys, add, remove, root

    def __str__(self):
        return self.what


DEVICE = Kind("device", "driver", "TYPE", ("bus",), "DeviceAdd", "DeviceDel", "/machine/peripheral")
NETDEV = Kind("netdev", "type", "stream|tap", (), "NetdevAdd", "NetdevDel", "/netdev")


async def add_object(vm, name, line, entries, undo, kind):
    """Adds the object of section [name] with the machine's `kind.add`, notes how to take
    it away in `undo`, and checks it holds what the section set."""
    machine = dbus_path("/machine")
    ident = name.split(None, 1)[1]
    props = dict((k, v) for k, v, _ in entries)
    typename = props.pop(kind.type_key, None)
    if not typename:
        raise ConfigError(line, f"[{name}] has no {kind.type_key} = {kind.hint}")
    options = {"id": Variant("s", ident)}
    for key in kind.option_keys:
        if key in props:
            options[key] = Variant("s", props.pop(key))
    options["properties"] = Variant("a{sv}", {k: Variant("s", v) for k, v in props.items()})
    try:
        await vm.call(machine, MACHINE_IFACE, kind.add, "sa{sv}", [typename, options])
    except RuntimeError as e:
        raise ConfigError(line, f"[{name}] {kind.type_key} = {typename}: {e}") from None
    undo.append((kind, ident, None))
    path = dbus_path(f"{kind.root}/{ident}")
    await read_back(vm, path, entries, (kind.type_key,) + kind.option_keys, kind.what)
    print(f"{kind.what} {ident}: {typename} at {path}")


async def configure(vm, sections):
    """Applies the file; on the first refusal, undoes what it did and raises."""
    undo = []
    try:
        machine = dbus_path("/machine")
        for name, line, entries in sections:
            if name == "machine":
                types = await vm.signatures(machine)
                for key, text, number in entries:
                    signature = types.get(key, "s")
                    try:
                        old = await vm.get(machine, key) if key in types else None
                        await vm.set(machine, key, to_variant(text, signature))
                        if key in types:
                            undo.append(("set", key, Variant(signature, old)))
                        read = await vm.get(machine, key)
                    except RuntimeError as e:
                        raise ConfigError(number, f"{key} = {text}: {e}") from None
                    if not same(read, text, signature):
                        raise ConfigError(number, f"{key} = {text}: the VMM holds {read!r}")
                    print(f"machine {key} = {read!r}")
            elif name.startswith("device "):
                await add_object(vm, name, line, entries, undo, DEVICE)
            elif name.startswith("netdev "):
                await add_object(vm, name, line, entries, undo, NETDEV)
            else:
                raise ConfigError(line, f"unknown section [{name}] (machine, netdev ID or device ID)")
    except ConfigError:
        for kind, what, old in reversed(undo):
            try:
                if kind == "set":
                    await vm.set(machine, what, old)
                else:
                    await vm.call(machine, MACHINE_IFACE, kind.remove, "s", [what])
            except RuntimeError as e:
                print(f"configure.py: could not undo {kind} {what}: {e}", file=sys.stderr)
        raise


def files_named(sections):
    """The files the INI names (a kernel, an initrd, a disk image): a sandboxed qomu opens
    them after it locked down, so it must be told of them when it starts."""
    return sorted({os.path.abspath(value) for _, _, entries in sections
                   for _, value, _ in entries if os.path.exists(value)})


def start_qomu(command, bus, paths=()):
    """Starts `COMMAND -S --dbus BUS|auto`, allowed the files `paths` (docs/security.md);
    the bus address it serves on."""
    argv = shlex.split(command) + ["-S", "--dbus", bus or "auto"]
    for path in paths:
        argv += ["--sandbox-path", path]
    if bus:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL), bus
    # With --dbus auto and no session bus qomu starts a private bus and prints its address;
    # what it prints after that is passed on, so that its pipe never fills.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        sys.stderr.write(line)
        m = re.search(r"export DBUS_SESSION_BUS_ADDRESS='([^']+)'", line)
        if m:
            threading.Thread(target=lambda: [sys.stderr.write(l) for l in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    raise SystemExit("configure.py: qomu ended without saying where its bus is")


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--bus", help="D-Bus address (default: DBUS_SESSION_BUS_ADDRESS)")
    ap.add_argument("--name", default="org.qomu.VM1", help="the VM's bus name")
    ap.add_argument("--start", metavar="COMMAND", help="start this qomu command with -S first")
    ap.add_argument("--no-start", action="store_true", help="configure and check, but do not run the guest")
    ap.add_argument("--timeout", type=float, default=20, help="seconds to wait for the VM on the bus")
    args = ap.parse_args()

    try:
        sections = parse_ini(args.file)
    except ConfigError as e:
        print(f"{args.file}:{e.line}: {e}", file=sys.stderr)
        return 1
    address = args.bus or os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if args.start:
        _, address = start_qomu(args.start, address, files_named(sections))
    if not address:
        print("configure.py: no bus: pass --bus or set DBUS_SESSION_BUS_ADDRESS", file=sys.stderr)
        return 2
    bus = await MessageBus(bus_address=address).connect()
    vm = Vm(bus, args.name)
    deadline = asyncio.get_running_loop().time() + args.timeout
    while True:
        try:
            status = await vm.get(dbus_path("/machine"), "status")
            break
        except RuntimeError:
            if asyncio.get_running_loop().time() > deadline:
                print(f"configure.py: {args.name} is not on the bus", file=sys.stderr)
                return 2
            await asyncio.sleep(0.05)
    if status != "prelaunch":
        print(f"configure.py: the VM is {status}; it must be in prelaunch (qomu -S)", file=sys.stderr)
        return 2
    try:
        await configure(vm, sections)
    except ConfigError as e:
        print(f"{args.file}:{e.line}: {e}", file=sys.stderr)
        print("configure.py: nothing changed; the VM stays in prelaunch", file=sys.stderr)
        return 1
    if args.no_start:
        print("configured; the VM stays in prelaunch")
        return 0
    await vm.call(dbus_path("/machine"), MACHINE_IFACE, "Cont")
    try:
        status = await vm.get(dbus_path("/machine"), "status")
    except RuntimeError:
        # Cont succeeded, and a guest quick to end (isa-debug-exit) took qomu with it.
        status = "ran, and qomu has ended since"
    print(f"started: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
