#!/usr/bin/env python3
"""A helper process whose state travels with the VM (qomu's and QEMU's dbus-vmstate).

It owns some state (here: a counter and a note), exports it on a D-Bus bus as
org.qemu.VMState1 (property Id, methods Save() -> ay and Load(ay)) and queues for the
well-known name org.qemu.VMState1, as every helper of one VM does. qomu's dbus-vmstate
object calls Save while it snapshots the VM and Load while it restores it.

    examples/vmstate-helper.py --address unix:path=/run/vm/bus --id counter \
        [--count 5] [--note hello] [--state-file FILE]

--count/--note set the starting state; --pad N adds N bytes of padding to it and
--save-delay S makes Save take S seconds (to see qomu refuse oversized or slow helpers). The helper prints its state as one JSON line
whenever it changes (`state {...}`), bumps the counter on SIGUSR1, and, with
--state-file, writes the state there too (what a test reads). Needs `dbus-next` (PyPI).
See docs/snapshot.md.
"""

import argparse
import asyncio
import json
import signal
import sys

from dbus_next.aio import MessageBus
from dbus_next.constants import NameFlag, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method

NAME = "org.qemu.VMState1"
PATH = "/org/qemu/VMState1"


class Helper(ServiceInterface):
    def __init__(self, ident, state, state_file, save_delay=0.0):
        super().__init__(NAME)
        self.save_delay = save_delay
        self._id = ident
        self.state = state
        self.state_file = state_file
        self.report()

    def report(self):
        line = json.dumps(self.state, sort_keys=True)
        print("state", line, flush=True)
        if self.state_file:
            with open(self.state_file, "w") as f:
                f.write(line)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":  # noqa: F821 (D-Bus signature)
        return self._id

    @method()
    async def Save(self) -> "ay":  # noqa: F821
        await asyncio.sleep(self.save_delay)
        print("save", flush=True)
        return json.dumps(self.state, sort_keys=True).encode()

    @method()
    def Load(self, data: "ay"):  # noqa: F821
        try:
            state = json.loads(bytes(data).decode())
        except ValueError as e:
            raise DBusError("org.qemu.VMState1.Error.BadState", f"not my state: {e}")
        self.state = state
        print("load", flush=True)
        self.report()


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the bus's D-Bus address")
    p.add_argument("--id", required=True, help="this helper's Id, unique among the VM's helpers")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--note", default="")
    p.add_argument("--state-file")
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--save-delay", type=float, default=0.0)
    args = p.parse_args()

    bus = await MessageBus(bus_address=args.address).connect()
    state = {"count": args.count, "note": args.note}
    if args.pad:
        state["pad"] = "x" * args.pad
    helper = Helper(args.id, state, args.state_file, args.save_delay)
    bus.export(PATH, helper)
    # Queue for the name: every helper of the VM owns it in turn; qomu lists the queue.
    reply = await bus.request_name(NAME, NameFlag.NONE)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.IN_QUEUE):
        sys.exit(f"cannot queue for {NAME}: {reply}")
    print("ready", bus.unique_name, flush=True)

    def bump():
        helper.state["count"] += 1
        helper.report()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, bump)
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    await asyncio.wait([disconnected, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)


if __name__ == "__main__":
    asyncio.run(main())
