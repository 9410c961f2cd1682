#!/bin/sh
# Boot script of a worker VM (its GCE startup-script; a lab VM's PID 1 runs it too): mount
# the head's share, then start the worker agent. Safe to run again at any time, so a VM
# that restarts after a preemption resumes by itself.
set -eu
SPOTFAN_HOME=${SPOTFAN_HOME:-/var/lib/spotfan}
export SPOTFAN_HOME
if [ ! -f "$SPOTFAN_HOME/boot.env" ]; then
    echo "boot: not provisioned yet ($SPOTFAN_HOME/boot.env is missing); fab up provisions this VM"
    exit 0
fi
. "$SPOTFAN_HOME/boot.env"
BOOT_LOCK_WAIT_S=60

# One boot at a time: the VM's own boot and a `fab heal` may race right after a restart.
exec 9>"$SPOTFAN_HOME/boot.lock"
flock -w "$BOOT_LOCK_WAIT_S" 9 || { echo "boot: another boot holds $SPOTFAN_HOME/boot.lock" >&2; exit 1; }

# fd 9 is closed for children: a long-lived sshfs must not hold the boot lock.
sh "$SPOTFAN_HOME/mount.sh" mount 9>&-

agent_pid() {
    [ -f "$SPOTFAN_HOME/agent.pid" ] || return 1
    pid=$(cat "$SPOTFAN_HOME/agent.pid")
    [ -r "/proc/$pid/cmdline" ] || return 1
    case "$(tr '\0' ' ' < "/proc/$pid/cmdline")" in
        *"-m cluster.agent "*) echo "$pid" ;;
        *) return 1 ;;
    esac
}

if pid=$(agent_pid); then
    echo "agent: ok (already running, pid $pid)"
    exit 0
fi
PYTHONPATH="$SPOTFAN_PYTHONPATH" setsid "$SPOTFAN_PYTHON" -m cluster.agent \
    --name "$SPOTFAN_NAME" --root "$SPOTFAN_MOUNT" --home "$SPOTFAN_HOME" \
    --python "$SPOTFAN_PYTHON" --python-path "$SPOTFAN_PYTHONPATH" \
    --idle-timeout "$SPOTFAN_IDLE_TIMEOUT" --workers-per-vm "$SPOTFAN_WORKERS_PER_VM" \
    --stop-command "$SPOTFAN_STOP_COMMAND" \
    </dev/null >>"$SPOTFAN_HOME/agent.log" 2>&1 9>&- &
echo $! > "$SPOTFAN_HOME/agent.pid"
echo "agent: ok (started, pid $!)"
