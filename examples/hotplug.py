#!/usr/bin/env python3
"""examples/hotplug.py: plug a virtio device into a running qomu and take it out again,
over QMP with QEMU's own client library (pip install qemu.qmp), knowing each step by its
event rather than by polling (docs/hotplug.md).

    examples/hotplug.py /tmp/vm1.qmp
    examples/hotplug.py /tmp/vm1.qmp --driver virtio-blk-pci --id disk1 \\
        --prop file=/var/tmp/disk.img --prop serial=EX1

The VM must be running with a guest that serves PCI hotplug (a Linux guest with acpiphp,
or the `virtio` test guest with hotplug=N).
"""

import argparse
import asyncio
import sys
import time

from qemu.qmp import EventListener, ExecuteError, QMPClient


async def run(args: argparse.Namespace) -> None:
    qmp = QMPClient("hotplug-example")
    await qmp.connect(args.socket)
    path = f"/machine/peripheral/{args.id}"
    # Listen before subscribing, subscribe before adding: no event can be missed.
    events = EventListener(("__org.qomu_NOTIFY", "DEVICE_DELETED"))
    qmp.register_listener(events)
    for notifier in ("plugged", "driver-ok", "unplugged"):
        r = await qmp.execute(
            "__org.qomu_subscribe", {"type": args.driver, "notifier": notifier}
        )
        print(f"subscribed to {notifier} of every {args.driver}: {r['subscription']}")

    async def wait_for(what: str, match) -> dict:
        async def first():
            while True:
                event = await events.get()
                if match(event):
                    return event

        try:
            return await asyncio.wait_for(first(), args.timeout)
        except asyncio.TimeoutError:
            sys.exit(f"no {what} within {args.timeout} s")

    def notify(notifier: str):
        return lambda e: (
            e["event"] == "__org.qomu_NOTIFY"
            and e["data"]["notifier"] == notifier
            and e["data"]["path"] == path
        )

    props = dict(p.split("=", 1) for p in args.prop)
    t0 = time.monotonic()
    ms = lambda: f"{(time.monotonic() - t0) * 1000:.1f} ms"  # noqa: E731
    await qmp.execute("device_add", {"driver": args.driver, "id": args.id, **props})
    e = await wait_for("plugged", notify("plugged"))
    data = e["data"]["data"]
    print(f"plugged (bus {data['bus']}, slot {data['slot']}) after {ms()}")
    e = await wait_for("driver-ok", notify("driver-ok"))
    print(f"driver-ok (features {e['data']['data']['features']:#x}) after {ms()}")

    t0 = time.monotonic()
    await qmp.execute("device_del", {"id": args.id})
    print("unplug requested; waiting for the guest to eject it")
    await wait_for("unplugged", notify("unplugged"))
    print(f"unplugged after {ms()}")
    await wait_for(
        "DEVICE_DELETED",
        lambda e: e["event"] == "DEVICE_DELETED" and e["data"].get("device") == args.id,
    )
    print(f"DEVICE_DELETED after {ms()}")
    # The subscriptions end with the connection.
    await qmp.disconnect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("socket", help="qomu's QMP socket (--qmp unix:PATH)")
    p.add_argument("--driver", default="virtio-rng-pci", help="a virtio PCI device type")
    p.add_argument("--id", default="hotplug0")
    p.add_argument("--prop", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--timeout", type=float, default=60, help="seconds per step")
    args = p.parse_args()
    try:
        asyncio.run(run(args))
    except ExecuteError as e:
        sys.exit(f"refused: {e.error.desc}")


if __name__ == "__main__":
    main()
