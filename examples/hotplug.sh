#!/usr/bin/env bash
# examples/hotplug.sh: plug a virtio device into a running qomu and take it out again, over
# D-Bus with busctl, knowing each step by its event rather than by polling (docs/hotplug.md).
#
#   examples/hotplug.sh [DRIVER [ID [PROPERTY=VALUE...]]]
#   examples/hotplug.sh virtio-rng-pci rng1
#   examples/hotplug.sh virtio-blk-pci disk1 file=/var/tmp/disk.img serial=EX1
#
# The VM's bus is the session bus of DBUS_SESSION_BUS_ADDRESS (export the line qomu prints),
# its name QOMU_DBUS_NAME (default org.qomu.VM1); QOMU_TIMEOUT (default 60) seconds are
# allowed per step. Needs busctl (systemd) and gdbus (libglib2.0-bin).
#
# A subscription lives as long as the connection that owns it, and every busctl call is a
# connection of its own. So `gdbus monitor` stays connected to receive the events, and the
# subscriptions are made for it (the `owner` option of SubscribeTypeWithOptions); they end
# with it when the script exits.
set -euo pipefail

driver=${1:-virtio-rng-pci}
id=${2:-hotplug0}
shift $(($# < 2 ? $# : 2))
name=${QOMU_DBUS_NAME:-org.qomu.VM1}
timeout=${QOMU_TIMEOUT:-60}
root=/org/qomu/VM1

# The D-Bus path of a qom path: bytes outside [A-Za-z0-9] become _ and two hex digits.
escape() {
    local s=$1 out= c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        if [[ $c == [A-Za-z0-9/] ]]; then out+=$c; else out+=$(printf '_%02x' "'$c"); fi
    done
    printf '%s' "$out"
}
device=$root$(escape "/machine/peripheral/$id")

call() { busctl --user call "$name" "$@"; }
now_ms() { date +%s%3N; }

log=$(mktemp)
gdbus monitor --session --dest "$name" >"$log" 2>&1 &
monitor=$!
trap 'kill $monitor 2>/dev/null; rm -f "$log"' EXIT

# The monitor's unique name, from the bus's list of connections and their processes.
listener=
for _ in $(seq 100); do
    listener=$(busctl --user list --unique --no-legend | awk -v pid=$monitor '$2 == pid { print $1 }')
    [ -n "$listener" ] && grep -q "is owned by" "$log" && break
    sleep 0.05
done
[ -n "$listener" ] || { echo "gdbus monitor did not come up on the bus" >&2; exit 1; }

# Subscribe first: to every object of the driver's type, including the one about to exist.
for notifier in plugged driver-ok unplugged; do
    sub=$(call "$root" org.qomu.Root1 SubscribeTypeWithOptions 'ssa{sv}' \
        "$driver" "$notifier" 1 owner s "$listener")
    echo "subscribed to $notifier of every $driver: ${sub#o }"
done

# Waits until the monitor has printed SIGNAL from a subscription, for our device.
wait_for() {
    local signal=$1 deadline=$(($(date +%s) + timeout))
    until grep -q "^$root/subscriptions/[0-9]*: $signal (objectpath '$device'" "$log"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "no $signal of $device within ${timeout}s" >&2
            exit 1
        fi
        sleep 0.01
    done
    grep -m1 "^$root/subscriptions/[0-9]*: $signal (objectpath '$device'" "$log" |
        sed "s|^.*objectpath '$device',* *||; s|)$||"
}

props=()
for p in "$@"; do props+=("${p%%=*}" s "${p#*=}"); done
t0=$(now_ms)
call "$root/machine" org.qomu.Type.QomuX86Machine DeviceAdd 'sa{sv}' "$driver" 2 \
    id s "$id" properties 'a{sv}' $(($# )) "${props[@]}"
echo "plugged ($(wait_for org.qomu.Type.PciDevice.Plugged)) after $(($(now_ms) - t0)) ms"
echo "driver-ok (features $(wait_for org.qomu.Type.VirtioDevice.DriverOk)) after $(($(now_ms) - t0)) ms"

t0=$(now_ms)
call "$root/machine" org.qomu.Type.QomuX86Machine DeviceDel s "$id"
echo "unplug requested; waiting for the guest to eject it"
wait_for org.qomu.Type.PciDevice.Unplugged >/dev/null
echo "unplugged after $(($(now_ms) - t0)) ms"
