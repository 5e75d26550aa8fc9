#!/usr/bin/env bash
# examples/dump-on-line.sh: when the guest's console prints a line matching a pattern, stop
# the VM and save its vCPU registers and a range of its RAM, over D-Bus with busctl and
# gdbus (the shell twin of dump-on-line.py; docs/scripting.md).
#
#   examples/dump-on-line.sh PATTERN ADDR SIZE [OUT [stay|resume|quit]]
#   examples/dump-on-line.sh 'panic|oops' 0x100000 65536 /tmp/dump resume
#
# PATTERN is an extended regular expression (grep -E) a console line must match. Writes
# OUT.regs (QueryCpus: every vCPU's registers, JSON), OUT.cpus (QueryCpusFast, JSON) and
# OUT.ram (Pmemsave: SIZE bytes of guest physical memory from ADDR); then leaves the VM
# stopped (stay, the default), resumes it or ends qomu. Prints how long it took from seeing
# the line to the stop's answer: a shell that polls the monitor's output and starts a
# process per call is slower than the Python twin, by some milliseconds.
#
# The VM's bus is the session bus of DBUS_SESSION_BUS_ADDRESS, its name QOMU_DBUS_NAME
# (default org.qomu.VM1), the console QOMU_SERIAL (default /machine/unattached/serial0);
# QOMU_TIMEOUT (default 3600) seconds are allowed for the line. Needs busctl (systemd) and
# gdbus (libglib2.0-bin). As in hotplug.sh, `gdbus monitor` receives the events and the
# subscription is made for it (`owner`), so it ends with the script.
set -euo pipefail

[ $# -ge 3 ] || { sed -n '6,7p' "$0" >&2; exit 2; }
pattern=$1 addr=$(($2)) size=$(($3)) out=${4:-dump} then=${5:-stay}
case $then in stay | resume | quit) ;; *) echo "then: stay, resume or quit" >&2; exit 2 ;; esac
name=${QOMU_DBUS_NAME:-org.qomu.VM1}
serial=${QOMU_SERIAL:-/machine/unattached/serial0}
timeout=${QOMU_TIMEOUT:-3600}
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
machine=$root/machine
call() { busctl --user call "$name" "$@"; }
now_ms() { date +%s%3N; }

log=$(mktemp)
gdbus monitor --session --dest "$name" >"$log" 2>&1 &
monitor=$!
trap 'kill $monitor 2>/dev/null; rm -f "$log"' EXIT
listener=
for _ in $(seq 100); do
    listener=$(busctl --user list --unique --no-legend | awk -v pid=$monitor '$2 == pid { print $1 }')
    [ -n "$listener" ] && grep -q "is owned by" "$log" && break
    sleep 0.05
done
[ -n "$listener" ] || { echo "gdbus monitor did not come up on the bus" >&2; exit 1; }

sub=$(call "$root$(escape "$serial")" org.qomu.Object1 SubscribeWithOptions 'sa{sv}' \
    line 1 owner s "$listener")
echo "watching $serial's lines for /$pattern/ (${sub#o })"

# gdbus prints each Line signal as: PATH: org.qomu.Type.IsaSerial.Line (objectpath '...', 'TEXT')
deadline=$(($(date +%s) + timeout))
seen=
until seen=$(sed -n "s/^.*IsaSerial\.Line (objectpath '[^']*', '\(.*\)')\$/\1/p" "$log" |
    grep -E -m1 -- "$pattern"); do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "no matching line within ${timeout}s" >&2; exit 1; }
    sleep 0.005
done
t0=$(now_ms)
call "$machine" org.qomu.Type.QomuX86Machine Stop
echo "line: $seen"
echo "stopped $(($(now_ms) - t0)) ms after seeing the line"

busctl --user --json=pretty call "$name" "$machine" org.qomu.Type.QomuX86Machine QueryCpus >"$out.regs"
busctl --user --json=pretty call "$name" "$machine" org.qomu.Type.QomuX86Machine QueryCpusFast >"$out.cpus"
call "$machine" org.qomu.Type.QomuX86Machine Pmemsave tts "$addr" "$size" "$(realpath -m "$out.ram")"
echo "saved $out.regs, $out.cpus and $out.ram ($size bytes from $(printf '%#x' "$addr"))"
case $then in
resume) call "$machine" org.qomu.Type.QomuX86Machine Cont && echo resumed ;;
quit) call "$machine" org.qomu.Type.QomuX86Machine Quit && echo quit ;;
*) echo "the VM stays stopped" ;;
esac
