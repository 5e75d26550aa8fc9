#!/usr/bin/env python3
"""qomu's QMP, driven by QEMU's own client library (qemu.qmp from PyPI).

Usage: qmp_scenarios.py QOMU_BINARY GUEST_DIR SCENARIO

Each scenario starts its own qomu with a test guest and a QMP socket, drives it through
qemu.qmp.QMPClient exactly as a QEMU user would, and raises on any difference from what
it expects. tests/tests/qmp_client.rs runs every scenario.
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient

TIMEOUT = 60


class Qomu:
    """A qomu process with a QMP socket."""

    def __init__(self, binary, guests, guest=None, append="", extra=(), paused=False, debug_exit=True):
        self.dir = tempfile.TemporaryDirectory(prefix="qomu-py-")
        self.sock = os.path.join(self.dir.name, "qmp.sock")
        args = [binary, "--serial", "none", "--dbus", "none", "--qmp", "unix:" + self.sock]
        if guest:
            args += ["--kernel", os.path.join(guests, guest + ".elf")]
            if debug_exit:
                args += ["--device", "isa-debug-exit"]
        if append:
            args += ["--append", append]
        if paused:
            args.append("-S")
        args += list(extra)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("qomu did not create its QMP socket")
            time.sleep(0.01)

    async def client(self, name="test"):
        qmp = QMPClient(name)
        await qmp.connect(self.sock)
        return qmp

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.dir.cleanup()


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def expect_error(qmp, cmd, args, klass, desc):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as e:
        got = (e.error_class, e.error.error.desc)
        check(got == (klass, desc), f"{cmd}: expected {(klass, desc)}, got {got}")
        return
    raise AssertionError(f"{cmd} {args} should have failed")


async def next_event(qmp, name, timeout=TIMEOUT):
    async def wait():
        async for event in qmp.events:
            if event["event"] == name:
                return event
    return await asyncio.wait_for(wait(), timeout)


async def serial_lines(qmp, want, timeout=TIMEOUT):
    """Collect __org.qomu_NOTIFY serial lines until one contains `want`."""
    lines = []

    async def wait():
        async for event in qmp.events:
            if event["event"] == "__org.qomu_NOTIFY" and event["data"]["notifier"] == "line":
                lines.append((event["data"]["path"], event["data"]["data"]["line"]))
                if want in lines[-1][1]:
                    return lines
    return await asyncio.wait_for(wait(), timeout)


# ---- scenarios ----

async def handshake(b, g):
    vm = Qomu(b, g, paused=True)
    try:
        qmp = await vm.client()
        greeting = qmp.greeting._asdict()["QMP"]
        check(greeting["version"]["qemu"] == {"major": 10, "minor": 1, "micro": 0}, greeting)
        check(greeting["version"]["package"].startswith("qomu "), greeting)
        check(greeting["capabilities"] == [], greeting)
        version = await qmp.execute("query-version")
        check(version["qemu"]["major"] == 10, version)
        names = {c["name"] for c in await qmp.execute("query-commands")}
        for c in ["qom-get", "qom-set", "stop", "cont", "quit", "device_add", "__org.qomu_subscribe"]:
            check(c in names, f"query-commands lacks {c}")
        schema = await qmp.execute("query-qmp-schema")
        check(any(e["name"] == "SHUTDOWN" and e["meta-type"] == "event" for e in schema), "schema lacks SHUTDOWN")
        status = await qmp.execute("query-status")
        check(status == {"running": False, "status": "prelaunch"}, status)
        await qmp.disconnect()
    finally:
        vm.stop()


async def qom_basics(b, g):
    vm = Qomu(b, g, guest="spin", append="iters=1000000000", paused=True)
    try:
        qmp = await vm.client()
        props = {p["name"]: p["type"] for p in await qmp.execute("qom-list", {"path": "/machine"})}
        check(props["memory-size"] == "size" and props["unattached"] == "child<container>", props)
        check(props["STOP"] == "notifier<Stop>", props)
        check(await qmp.execute("qom-get", {"path": "/machine/unattached/serial0", "property": "iobase"}) == 0x3F8, "iobase")
        # Partial paths.
        check(await qmp.execute("qom-get", {"path": "serial0", "property": "irq"}) == 4, "partial path")
        # qom-set, and the change is visible.
        await qmp.execute("qom-set", {"path": "/machine", "property": "name", "value": "demo-vm"})
        check(await qmp.execute("query-name") == {"name": "demo-vm"}, "query-name")
        await qmp.execute("qom-set", {"path": "/machine", "property": "memory-size", "value": 128 << 20})
        await qmp.execute("cont")
        await expect_error(qmp, "qom-set", {"path": "/machine", "property": "memory-size", "value": 64 << 20}, "GenericError",
                           "property 'memory-size' of '/machine' can only be set while the machine is in prelaunch; "
                           "the machine is running")
        await expect_error(qmp, "qom-get", {"path": "/machine/nowhere", "property": "type"}, "DeviceNotFound",
                           "Device '/machine/nowhere' not found")
        # qom-list-get: several objects in one call.
        got = await qmp.execute("qom-list-get", {"paths": ["/machine", "serial0"]})
        machine = {p["name"]: p.get("value") for p in got[0]["properties"]}
        check(machine["status"] == "running" and machine["memory-size"] == 128 << 20, machine)
        check({p["name"]: p.get("value") for p in got[1]["properties"]}["iobase"] == 0x3F8, got[1])
        await qmp.disconnect()
    finally:
        vm.stop()


async def qom_types(b, g):
    vm = Qomu(b, g, paused=True)
    try:
        qmp = await vm.client()
        concrete = {t["name"]: t for t in await qmp.execute("qom-list-types", {"implements": "device"})}
        check("isa-serial" in concrete and "i8042" in concrete, concrete.keys())
        check("device" not in concrete, "abstract types are left out by default")
        check(concrete["isa-serial"] == {"name": "isa-serial", "parent": "device"}, concrete["isa-serial"])
        everything = {t["name"]: t for t in await qmp.execute("qom-list-types", {"implements": "device", "abstract": True})}
        check(everything["device"].get("abstract") is True, everything["device"])
        creatable = {t["name"] for t in await qmp.execute("qom-list-types", {"implements": "user-creatable"})}
        check({"rng-random", "rng-builtin"} <= creatable, creatable)
        props = {p["name"]: p for p in await qmp.execute("qom-list-properties", {"typename": "isa-serial"})}
        check(props["iobase"]["default-value"] == 0x3F8 and props["line"]["type"] == "notifier<SerialLine>", props)
        devprops = {p["name"] for p in await qmp.execute("device-list-properties", {"typename": "isa-serial"})}
        check("iobase" in devprops and "realized" not in devprops and "line" not in devprops, devprops)
        await expect_error(qmp, "qom-list-properties", {"typename": "nope"}, "DeviceNotFound", "Class 'nope' not found")
        await expect_error(qmp, "device-list-properties", {"typename": "rng-random"}, "GenericError",
                           "Parameter 'typename' expects device")
        await qmp.disconnect()
    finally:
        vm.stop()


async def object_add_del(b, g):
    vm = Qomu(b, g, paused=True)
    try:
        qmp = await vm.client()
        await qmp.execute("object-add", {"qom-type": "rng-random", "id": "rng0", "filename": "/dev/urandom"})
        check(await qmp.execute("qom-get", {"path": "/objects/rng0", "property": "filename"}) == "/dev/urandom", "filename")
        await expect_error(qmp, "object-add", {"qom-type": "rng-random", "id": "rng1", "filename": "/nonexistent"},
                           "GenericError", "Could not open '/nonexistent': No such file or directory (os error 2)")
        await expect_error(qmp, "object-add", {"qom-type": "rng-random", "id": "rng0"}, "GenericError",
                           "attempt to add duplicate property 'rng0' to object (type 'container')")
        await expect_error(qmp, "object-add", {"qom-type": "isa-serial", "id": "x"}, "GenericError",
                           "object type 'isa-serial' isn't supported by object-add")
        await qmp.execute("object-del", {"id": "rng0"})
        await expect_error(qmp, "qom-get", {"path": "/objects/rng0", "property": "type"}, "DeviceNotFound",
                           "Device '/objects/rng0' not found")
        await expect_error(qmp, "object-del", {"id": "rng0"}, "GenericError", "object 'rng0' not found")
        await qmp.disconnect()
    finally:
        vm.stop()


async def stop_cont_reset_quit(b, g):
    vm = Qomu(b, g, guest="spin", append="iters=1000000000 step=100000")
    try:
        qmp = await vm.client()
        check((await qmp.execute("query-status"))["status"] == "running", "running")
        await qmp.execute("stop")
        await next_event(qmp, "STOP")
        check(await qmp.execute("query-status") == {"running": False, "status": "paused"}, "paused")
        await qmp.execute("cont")
        await next_event(qmp, "RESUME")
        await qmp.execute("system_reset")
        reset = await next_event(qmp, "RESET")
        check(reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, reset)
        cpus = await qmp.execute("query-cpus-fast")
        check(cpus[0]["cpu-index"] == 0 and cpus[0]["thread-id"] > 0 and cpus[0]["qom-path"] == "/machine/unattached/cpu[0]", cpus)
        hmp = await qmp.execute("human-monitor-command", {"command-line": "info status"})
        check(hmp == "VM status: running\r\n", hmp)
        qtree = await qmp.execute("human-monitor-command", {"command-line": "info qtree"})
        check("dev: isa-serial" in qtree and "iobase = 1016 (0x3f8)" in qtree, qtree)
        await qmp.execute("quit")
        shutdown = await next_event(qmp, "SHUTDOWN")
        check(shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}, shutdown)
        check(vm.proc.wait(timeout=10) == 0, "exit status 0 after quit")
        try:
            await qmp.disconnect()
        except EOFError:
            pass  # the server hung up after quit, as QEMU does; QEMU's machine.py expects this too
    finally:
        vm.stop()


async def serial_subscription(b, g):
    vm = Qomu(b, g, guest="hello", append="exit=0 from-python", paused=True)
    try:
        qmp = await vm.client()
        sub = await qmp.execute("__org.qomu_subscribe", {"path": "serial0", "notifier": "line"})
        check(sub["subscription"].startswith("/subscriptions/"), sub)
        info = {p["name"]: p.get("value") for p in
                (await qmp.execute("qom-list-get", {"paths": [sub["subscription"]]}))[0]["properties"]}
        check(info["target"] == "/machine/unattached/serial0" and info["notifier"] == "line" and info["scope"] == "object", info)
        check(info["owner"].startswith("qmp:"), info)
        await qmp.execute("cont")
        lines = await serial_lines(qmp, "exiting with code")
        texts = [t for _, t in lines]
        check("hello from the qomu test guest" in texts and "cmdline: exit=0 from-python" in texts, texts)
        check(all(p == "/machine/unattached/serial0" for p, _ in lines), lines)
        await next_event(qmp, "SHUTDOWN")
        check(vm.proc.wait(timeout=10) == 1, "debug exit 0 is status 1")
    finally:
        vm.stop()


async def type_subscription_before_the_object(b, g):
    # A second UART is added after the subscription: its lines still arrive. Without a
    # debug-exit device the guest's exit write goes nowhere and it halts, so the VM is still
    # there to be asked about the subscription's counters afterwards.
    vm = Qomu(b, g, guest="hello", append="exit=0 port=0x2f8", paused=True, debug_exit=False)
    try:
        qmp = await vm.client()
        sub = await qmp.execute("__org.qomu_subscribe", {"type": "isa-serial", "notifier": "line"})
        await qmp.execute("device_add", {"driver": "isa-serial", "id": "com2", "iobase": 0x2F8, "irq": 3})
        check(await qmp.execute("qom-get", {"path": "com2", "property": "iobase"}) == 0x2F8, "com2")
        await qmp.execute("cont")
        lines = await serial_lines(qmp, "exiting with code")
        check(all(p == "/machine/peripheral/com2" for p, _ in lines), lines)
        counters = {p["name"]: p.get("value") for p in
                    (await qmp.execute("qom-list-get", {"paths": [sub["subscription"]]}))[0]["properties"]}
        check(counters["matched"] == counters["delivered"] + counters["dropped"] + counters["pending"], counters)
    finally:
        vm.stop()


async def unsubscribe_and_disconnect(b, g):
    vm = Qomu(b, g, paused=True)
    try:
        first = await vm.client("first")
        watcher = await vm.client("watcher")
        a = (await first.execute("__org.qomu_subscribe", {"path": "serial0", "notifier": "line"}))["subscription"]
        by_read = await first.execute("qom-get", {"path": "/machine", "property": "STOP"})
        check(by_read.startswith("/subscriptions/"), by_read)
        mine = {p["name"] for p in await first.execute("qom-list", {"path": "/subscriptions"}) if p["type"] == "child<subscription>"}
        check(a.rsplit("/", 1)[1] in mine and by_read.rsplit("/", 1)[1] in mine, mine)
        # Another client cannot remove it; its owner can.
        await expect_error(watcher, "__org.qomu_unsubscribe", {"subscription": a}, "GenericError",
                           f"subscription '{a}' belongs to '" + await first.execute("qom-get", {"path": a, "property": "owner"}) + "'")
        await first.execute("__org.qomu_unsubscribe", {"subscription": a})
        await expect_error(first, "qom-get", {"path": a, "property": "owner"}, "DeviceNotFound", f"Device '{a}' not found")
        owner = await first.execute("qom-get", {"path": by_read, "property": "owner"})
        await first.disconnect()
        # Everything the first client owned is gone once it has disconnected.
        deadline = time.monotonic() + 10
        while True:
            subs = [p["name"] for p in await watcher.execute("qom-list", {"path": "/subscriptions"}) if p["type"] == "child<subscription>"]
            owners = []
            for sub in subs:
                try:
                    owners.append(await watcher.execute("qom-get", {"path": "/subscriptions/" + sub, "property": "owner"}))
                except ExecuteError:
                    pass  # removed between the listing and the read: what we are waiting for
            if owner not in owners:
                break
            check(time.monotonic() < deadline, f"{owner}'s subscriptions outlived it: {owners}")
            await asyncio.sleep(0.05)
        await watcher.disconnect()
    finally:
        vm.stop()


async def errors_through_the_library(b, g):
    vm = Qomu(b, g, paused=True)
    try:
        qmp = await vm.client()
        await expect_error(qmp, "frobnicate", None, "CommandNotFound", "The command frobnicate has not been found")
        await expect_error(qmp, "qom-get", {"path": "/machine"}, "GenericError", "Parameter 'property' is missing")
        await expect_error(qmp, "qom-get", {"path": 7, "property": "type"}, "GenericError",
                           "Invalid parameter type for 'path', expected: string")
        await expect_error(qmp, "device_add", {"driver": "isa-serial", "id": "c2", "iobase": 0x3F8}, "GenericError",
                           "pio range 0x3f8-0x3ff overlaps 0x3f8-0x3ff of '/machine/unattached/serial0'")
        await expect_error(qmp, "device_add", {"driver": "nope"}, "GenericError", "'nope' is not a valid device model name")
        await expect_error(qmp, "device_del", {"id": "ghost"}, "DeviceNotFound", "Device 'ghost' not found")
        await qmp.execute("device_add", {"driver": "isa-debug-exit", "id": "dbg", "iobase": "0xf4"})
        await expect_error(qmp, "device_add", {"driver": "isa-debug-exit", "id": "dbg", "iobase": "0xf8"}, "GenericError",
                           "Duplicate device ID 'dbg'")
        await qmp.execute("device_del", {"id": "dbg"})
        deleted = await next_event(qmp, "DEVICE_DELETED")
        check(deleted["data"] == {"device": "dbg", "path": "/machine/peripheral/dbg"}, deleted)
        await qmp.disconnect()
    finally:
        vm.stop()


SCENARIOS = {f.__name__: f for f in [
    handshake, qom_basics, qom_types, object_add_del, stop_cont_reset_quit, serial_subscription,
    type_subscription_before_the_object, unsubscribe_and_disconnect, errors_through_the_library,
]}

if __name__ == "__main__":
    binary, guests, name = sys.argv[1:4]
    asyncio.run(SCENARIOS[name](binary, guests))
    print(f"{name}: ok")
