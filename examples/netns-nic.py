#!/usr/bin/env python3
"""examples/netns-nic.py: give a running qomu guest a network card on a private network,
use it, and take it away again, over QMP with QEMU's client library (pip install
qemu.qmp). Needs root (a network namespace and a tap) and `ip` (iproute2); see
docs/network.md.

    examples/netns-nic.py /tmp/vm1.qmp
    examples/netns-nic.py /tmp/vm1.qmp --id nic1 --host-addr 10.0.2.2/24 --port 5555

Steps, each known by its event or its answer rather than by polling the guest:
  1. a network namespace of the script's own, holding nothing but what it adds;
  2. `netdev_add` of a tap; the tap moves into the namespace and gets the host address;
  3. a UDP responder inside the namespace at that address (it answers every datagram
     with "reply: " and the datagram);
  4. `device_add virtio-net-pci` on the netdev, and the guest driver's `driver-ok`;
  5. traffic: it waits for the guest's first datagram and answers it, then prints the
     NIC's and the netdev's counters;
  6. `device_del` (the guest ejects the card: DEVICE_DELETED), `netdev_del`, and the
     namespace is deleted.
Traffic stays inside the namespace: nothing outside it is reachable from there.

The guest must serve PCI hotplug and talk on the card: a Linux guest with acpiphp and
virtio_net configured for the address (10.0.2.15/24 by default), or the `virtio` test
guest with hotplug=N.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time

from qemu.qmp import EventListener, QMPClient

RESPONDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("bound", flush=True)
s.settimeout(float(sys.argv[3]))
data, peer = s.recvfrom(2048)
s.sendto(b"reply: " + data, peer)
print(peer[0], data.decode(errors="replace"), flush=True)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


async def run(args: argparse.Namespace) -> None:
    ns = args.netns or f"qomu-example-{os.getpid()}"
    tap = args.tap or f"qe{os.getpid() % 1000000}"
    netdev = f"{args.id}-net"
    path = f"/machine/peripheral/{args.id}"
    qmp = QMPClient("netns-nic-example")
    await qmp.connect(args.socket)
    events = EventListener(("__org.qomu_NOTIFY", "DEVICE_DELETED"))
    qmp.register_listener(events)

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

    t0 = time.monotonic()
    ms = lambda: f"{(time.monotonic() - t0) * 1000:.1f} ms"  # noqa: E731
    ip("netns", "add", ns)
    responder = None
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        await qmp.execute(
            "netdev_add",
            {"type": "tap", "id": netdev, "ifname": tap, "script": "no", "downscript": "no"},
        )
        ip("link", "set", tap, "netns", ns)
        ip("-n", ns, "addr", "add", args.host_addr, "dev", tap)
        ip("-n", ns, "link", "set", tap, "up")
        host = args.host_addr.split("/")[0]
        print(f"netdev {netdev}: tap {tap} in namespace {ns} at {args.host_addr}")
        responder = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", RESPONDER,
             host, str(args.port), str(args.timeout)],
            stdout=subprocess.PIPE, text=True,
        )
        if responder.stdout.readline().strip() != "bound":
            sys.exit("the responder did not start")

        await qmp.execute(
            "__org.qomu_subscribe", {"type": "virtio-net-pci", "notifier": "driver-ok"}
        )
        await qmp.execute(
            "device_add", {"driver": "virtio-net-pci", "id": args.id, "netdev": netdev}
        )
        await wait_for(
            "driver-ok",
            lambda e: e["event"] == "__org.qomu_NOTIFY" and e["data"]["path"] == path,
        )
        mac = await qmp.execute("qom-get", {"path": path, "property": "mac"})
        print(f"{args.id} ({mac}): the guest's driver took it after {ms()}")

        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(
                loop.run_in_executor(None, responder.stdout.readline), args.timeout
            )
        except asyncio.TimeoutError:
            line = ""
        if not line:
            sys.exit(f"no datagram from the guest within {args.timeout} s")
        peer, _, text = line.strip().partition(" ")
        print(f"datagram from {peer}: {text!r}, answered, after {ms()}")
        for obj in (path, f"/netdev/{netdev}"):
            counts = {
                name: await qmp.execute("qom-get", {"path": obj, "property": name})
                for name in ("tx-packets", "rx-packets", "tx-bytes", "rx-bytes")
            }
            print(f"{obj}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

        await qmp.execute("device_del", {"id": args.id})
        await wait_for(
            "DEVICE_DELETED",
            lambda e: e["event"] == "DEVICE_DELETED" and e["data"].get("device") == args.id,
        )
        await qmp.execute("netdev_del", {"id": netdev})
        print(f"{args.id} and {netdev} gone after {ms()}")
    finally:
        if responder is not None and responder.poll() is None:
            responder.kill()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        await qmp.disconnect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("socket", help="qomu's QMP socket")
    p.add_argument("--id", default="nic1", help="the NIC's device id")
    p.add_argument("--netns", help="the namespace's name (default: qomu-example-PID)")
    p.add_argument("--tap", help="the tap's name (default: qePID)")
    p.add_argument("--host-addr", default="10.0.2.2/24", help="the namespace's address")
    p.add_argument("--port", type=int, default=5555, help="the UDP responder's port")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for each wait")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
