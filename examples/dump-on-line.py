#!/usr/bin/env python3
"""examples/dump-on-line.py: when the guest's console prints a line matching a pattern,
stop the VM at once and save its vCPU registers and a range of its RAM, over QMP with
QEMU's own client library (pip install qemu.qmp).

The 2004 control-API sketch qomu grew from: "start the emulation, monitor the processor,
and pull an image of some portion of RAM ... when some condition occurs".

    examples/dump-on-line.py /tmp/vm.qmp 'panic|oops' --addr 0x100000 --size 65536 \\
        --out /tmp/dump --then resume

It subscribes to the console's `line` notifier (no polling), and on the first matching
line sends `stop`, then writes:
    OUT.regs   every vCPU's registers (HMP `info registers -a`),
    OUT.cpus   query-cpus-fast (index, QOM path, host thread), as JSON,
    OUT.ram    SIZE bytes of guest physical memory from ADDR (`pmemsave`),
and resumes the guest (`--then resume`), leaves it stopped (`stay`, the default) or ends
qomu (`quit`). It prints how long it took from the line to the stop, as qomu's own time
stamps of the `line` notification and the STOP event say. --serial is the qom path of
the console (default: the first serial port). See docs/scripting.md.
"""

import argparse
import asyncio
import json
import re
import sys

from qemu.qmp import EventListener, QMPClient


def stamp(event):
    t = event["timestamp"]
    return t["seconds"] + t["microseconds"] / 1e6


async def run(args):
    pattern = re.compile(args.pattern)
    qmp = QMPClient("dump-on-line")
    await qmp.connect(args.socket)
    events = EventListener(("__org.qomu_NOTIFY", "STOP"))
    qmp.register_listener(events)
    sub = await qmp.execute("__org.qomu_subscribe", {"path": args.serial, "notifier": "line"})
    print(f"watching {args.serial}'s lines for /{args.pattern}/ ({sub['subscription']})", flush=True)

    async def first(match):
        while True:
            event = await events.get()
            if match(event):
                return event

    def matching_line(event):
        return (
            event["event"] == "__org.qomu_NOTIFY"
            and event["data"]["subscription"] == sub["subscription"]
            and pattern.search(event["data"]["data"]["line"])
        )

    try:
        line = await asyncio.wait_for(first(matching_line), args.timeout)
    except asyncio.TimeoutError:
        print(f"no matching line within {args.timeout} s", file=sys.stderr)
        return 1
    await qmp.execute("stop")
    stopped = await asyncio.wait_for(first(lambda e: e["event"] == "STOP"), 10)
    print(f"line: {line['data']['data']['line']}")
    print(f"stopped {(stamp(stopped) - stamp(line)) * 1000:.2f} ms after the line")

    regs = await qmp.execute("human-monitor-command", {"command-line": "info registers -a"})
    with open(f"{args.out}.regs", "w") as f:
        f.write(regs.replace("\r\n", "\n"))
    cpus = await qmp.execute("query-cpus-fast")
    with open(f"{args.out}.cpus", "w") as f:
        json.dump(cpus, f, indent=1)
    await qmp.execute("pmemsave", {"val": args.addr, "size": args.size, "filename": f"{args.out}.ram"})
    print(f"saved {args.out}.regs, {args.out}.cpus and {args.out}.ram ({args.size} bytes from {args.addr:#x})")

    await qmp.execute("__org.qomu_unsubscribe", {"subscription": sub["subscription"]})
    if args.then == "resume":
        await qmp.execute("cont")
        print("resumed")
    elif args.then == "quit":
        await qmp.execute("quit")
        print("quit")
    else:
        print("the VM stays stopped")
    await qmp.disconnect()
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("socket", help="qomu's QMP socket")
    ap.add_argument("pattern", help="a Python regular expression a console line must match")
    ap.add_argument("--addr", type=lambda s: int(s, 0), required=True, help="guest physical address to dump from")
    ap.add_argument("--size", type=lambda s: int(s, 0), required=True, help="bytes to dump")
    ap.add_argument("--out", default="dump", help="file name prefix (default: dump)")
    ap.add_argument("--then", choices=("stay", "resume", "quit"), default="stay")
    ap.add_argument("--serial", default="/machine/unattached/serial0", help="the console's qom path")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the line")
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
