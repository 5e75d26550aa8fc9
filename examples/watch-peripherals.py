#!/usr/bin/env python3
"""examples/watch-peripherals.py: follow everything under /machine/peripheral (every
device plugged or unplugged, and every event of those devices, whatever their type) with
one subscription, over QMP with QEMU's own client library (pip install qemu.qmp), and
lose nothing across a restart of this script.

    examples/watch-peripherals.py /tmp/vm.qmp --state /tmp/watch.state --linger 300

The first run subscribes to every notifier (`*`) of the subtree `/machine/peripheral`
with `linger`, and writes the subscription's path and adoption token to --state. When
the script stops (Ctrl-C, a crash, --count reached), qomu keeps the subscription and
queues its events for --linger seconds. The next run finds --state, adopts the
subscription with `__org.qomu_adopt`, and first receives everything that happened in
between, in order. Each line shows the event's sequence number in its subscription; a
gap (events dropped because the queue was full) is reported, never silent.

    seq 3 /machine/peripheral child-removed {"child": "/machine/peripheral/disk1", ...}

--count N ends after N events (0: run until interrupted); --forget unsubscribes and
removes --state at the end instead of leaving the subscription to be adopted. See
docs/scripting.md and docs/qmp.md (__org.qomu_subscribe, __org.qomu_adopt).
"""

import argparse
import asyncio
import json
import os
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient

SUBTREE = "/machine/peripheral"


def load_state(path):
    try:
        with open(path) as f:
            state = json.load(f)
        return state["subscription"], state["token"]
    except FileNotFoundError:
        return None


def save_state(path, subscription, token):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"subscription": subscription, "token": token}, f)
    os.replace(tmp, path)


async def subscribe(qmp, args):
    """Adopts the subscription --state names, or makes a new one; returns its path and
    the sequence number its next event must have (None: not known yet)."""
    saved = load_state(args.state) if args.state else None
    if saved:
        sub, token = saved
        try:
            await qmp.execute("__org.qomu_adopt", {"subscription": sub, "token": token})
            print(f"adopted {sub}: what it queued follows", flush=True)
            return sub, None
        except ExecuteError as e:
            # Its linger ran out (or another client took it): start again, and say so.
            print(f"cannot adopt {sub} ({e.error.desc}); subscribing anew", flush=True)
    made = await qmp.execute(
        "__org.qomu_subscribe",
        {"path": SUBTREE, "subtree": True, "notifier": "*", "linger": args.linger},
    )
    sub = made["subscription"]
    if args.state:
        save_state(args.state, sub, made["token"])
    print(f"watching everything under {SUBTREE} ({sub})", flush=True)
    return sub, 1


async def run(args):
    qmp = QMPClient("watch-peripherals")
    await qmp.connect(args.socket)
    events = EventListener(("__org.qomu_NOTIFY",))
    qmp.register_listener(events)
    sub, expected = await subscribe(qmp, args)
    seen = 0
    try:
        while args.count == 0 or seen < args.count:
            event = await asyncio.wait_for(events.get(), args.timeout or None)
            data = event["data"]
            if data["subscription"] != sub:
                continue
            seq = data["sequence"]
            if expected is not None and seq != expected:
                lost = seq - expected
                print(f"gap: {lost} event(s) before seq {seq} were dropped "
                      f"(the subscription's `dropped` counter says how many in all)", flush=True)
            expected = seq + 1
            payload = json.dumps(data["data"], sort_keys=True)
            print(f"seq {seq} {data['path']} {data['notifier']} {payload}", flush=True)
            seen += 1
    except asyncio.TimeoutError:
        print(f"no event for {args.timeout} s", file=sys.stderr)
        return 1
    finally:
        if args.forget:
            await qmp.execute("__org.qomu_unsubscribe", {"subscription": sub})
            if args.state and os.path.exists(args.state):
                os.remove(args.state)
        await qmp.disconnect()
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("socket", help="qomu's QMP socket (--qmp unix:PATH)")
    p.add_argument("--state", help="file keeping the subscription's path and token")
    p.add_argument("--linger", type=int, default=300,
                   help="seconds qomu keeps the subscription after this script goes (1-86400)")
    p.add_argument("--count", type=int, default=0, help="end after this many events (0: never)")
    p.add_argument("--timeout", type=float, default=0,
                   help="fail after this many seconds without an event (0: wait forever)")
    p.add_argument("--forget", action="store_true",
                   help="unsubscribe at the end instead of leaving it to be adopted")
    args = p.parse_args()
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
