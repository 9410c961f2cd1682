#!/bin/sh
# Boot script of a worker VM (its GCE startup-script; a lab VM's PID 1 runs it too): start
# the idle guard first, then mount the head's share (retried with jitter), check that the
# interpreter can import spotfan, and start the worker agent. Safe to run again at any
# time, so a VM that restarts after a preemption resumes by itself. On a headless cluster
# (SPOTFAN_ROOT_URL: the share is a bucket) nothing is mounted: step 2 checks instead that
# this VM can list, write and delete under the bucket's prefix (cluster.vm.storecheck), as
# its instance role or service account (the lab: with store.env's local endpoint).
#
# One line per step on stdout; exit 0 only when the share is usable and the agent runs.
# It never says "ok" for the agent: `fab up` does, once the agent's first heartbeat is on
# the share. Whatever fails here, the guard is already running and stops an idle VM.
set -u
SPOTFAN_HOME=${SPOTFAN_HOME:-/var/lib/spotfan}
export SPOTFAN_HOME
if [ ! -f "$SPOTFAN_HOME/boot.env" ]; then
    echo "boot: not provisioned yet ($SPOTFAN_HOME/boot.env is missing); fab up provisions this VM"
    # A cloud VM's startup-script may say how long to wait for that (SPOTFAN_UNPROVISIONED_S):
    # a VM that `fab up` created but never provisioned (the laptop went away) stops itself.
    if [ -n "${SPOTFAN_UNPROVISIONED_S:-}" ]; then
        mkdir -p "$SPOTFAN_HOME"
        setsid sh -c 'sleep "$1"; [ -f "$2/boot.env" ] && exit 0
            echo "boot: not provisioned within $1 s: stopping this VM with \`$3\`"; sh -c "$3"' \
            unprovisioned "$SPOTFAN_UNPROVISIONED_S" "$SPOTFAN_HOME" "$SPOTFAN_UNPROVISIONED_STOP" \
            </dev/null >>"$SPOTFAN_HOME/unprovisioned.log" 2>&1 &
        echo "boot: it stops itself unless provisioned within ${SPOTFAN_UNPROVISIONED_S}s"
    fi
    exit 0
fi
. "$SPOTFAN_HOME/boot.env"
if [ -f "$SPOTFAN_HOME/store.env" ]; then . "$SPOTFAN_HOME/store.env"; fi  # headless lab: its store's endpoint
cd "$SPOTFAN_HOME" || exit 1  # never a cwd on the share, which may be dead
BOOT_LOCK_WAIT_S=60

running() {  # $1: pid file, $2: what its command line must contain; prints the pid if alive
    [ -f "$1" ] || return 1
    pid=$(cat "$1")
    [ -r "/proc/$pid/cmdline" ] || return 1
    case "$(tr '\0' ' ' < "/proc/$pid/cmdline")" in
        *"$2"*) echo "$pid" ;;
        *) return 1 ;;
    esac
}

# 1. The idle guard, before anything that can fail or hang. fd 9 (the boot lock, below)
#    is not open yet; nothing long-lived may hold it.
rm -f "$SPOTFAN_HOME/stop-now"  # an earlier boot's "cannot work": this boot's agent checks again
if pid=$(running "$SPOTFAN_HOME/watchdog.pid" "watchdog.sh"); then
    guard="idle guard: running (pid $pid)"
else
    setsid sh "$SPOTFAN_HOME/watchdog.sh" </dev/null >>"$SPOTFAN_HOME/watchdog.log" 2>&1 &
    echo $! > "$SPOTFAN_HOME/watchdog.pid"
    guard="idle guard: started (pid $!, idle_timeout ${SPOTFAN_IDLE_TIMEOUT}s)"
fi

# One boot at a time: the VM's own boot and a `fab heal` may race right after a restart.
exec 9>"$SPOTFAN_HOME/boot.lock"
if ! flock -w "$BOOT_LOCK_WAIT_S" 9; then
    echo "boot: FAILED: another boot holds $SPOTFAN_HOME/boot.lock; $guard"
    exit 1
fi

# 2. The share. mount.sh retries a refused or dropped connection with jittered backoff;
#    if it still fails, the agent goes on retrying (and the guard stops an idle VM).
mounted=0
if [ -n "${SPOTFAN_ROOT_URL:-}" ]; then
    ROOT="$SPOTFAN_ROOT_URL"
    if said=$(PYTHONPATH="$SPOTFAN_PYTHONPATH" "$SPOTFAN_PYTHON" -m cluster.vm.storecheck --name "$SPOTFAN_NAME" \
            "$ROOT" 2>&1 9>&-); then mounted=1; fi
    case "$said" in
        *"store: "*) printf '%s\n' "$said" | grep '^store: ' ;;
        *) echo "store: FAILED: $SPOTFAN_PYTHON could not check $ROOT ($(printf '%s' "$said" | tail -n 1))" ;;
    esac
else
    ROOT="$SPOTFAN_MOUNT"
    if sh "$SPOTFAN_HOME/mount.sh" mount 9>&-; then mounted=1; fi
fi

# 3. The agent, after checking that the interpreter exists and can import spotfan.
if pid=$(running "$SPOTFAN_HOME/agent.pid" "-m cluster.vm.agent "); then
    echo "agent: running (pid $pid, id $(cat "$SPOTFAN_HOME/agent.id" 2>/dev/null))"
else
    if ! command -v "$SPOTFAN_PYTHON" >/dev/null 2>&1; then
        echo "agent: FAILED: cluster.python = $SPOTFAN_PYTHON does not exist on this VM: set cluster.python in cluster.toml to an interpreter on the VMs that has spotfan installed (a relative path is resolved against the folder of cluster.toml)"
        echo "$guard"
        exit 1
    fi
    if ! said=$(PYTHONPATH="$SPOTFAN_PYTHONPATH" "$SPOTFAN_PYTHON" -c 'import cluster.vm.agent, tasks' 2>&1 9>&-); then
        echo "agent: FAILED: cluster.python = $SPOTFAN_PYTHON cannot import spotfan ($(printf '%s' "$said" | tail -n 1)): install spotfan for that interpreter on the image, or point cluster.python_path at a checkout"
        echo "$guard"
        exit 1
    fi
    id=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
    echo "$id" > "$SPOTFAN_HOME/agent.id"
    PYTHONPATH="$SPOTFAN_PYTHONPATH" setsid "$SPOTFAN_PYTHON" -m cluster.vm.agent \
        --name "$SPOTFAN_NAME" --root "$ROOT" --home "$SPOTFAN_HOME" --agent-id "$id" \
        --python "$SPOTFAN_PYTHON" --python-path "$SPOTFAN_PYTHONPATH" \
        --idle-timeout "$SPOTFAN_IDLE_TIMEOUT" --workers-per-vm "$SPOTFAN_WORKERS_PER_VM" \
        --gpus "${SPOTFAN_GPUS:-0}" --gpus-per-worker "${SPOTFAN_GPUS_PER_WORKER:-1}" \
        --nvidia-smi "${SPOTFAN_NVIDIA_SMI:-nvidia-smi}" \
        </dev/null >>"$SPOTFAN_HOME/agent.log" 2>&1 9>&- &
    echo $! > "$SPOTFAN_HOME/agent.pid"
    echo "agent: starting (pid $!, id $id)"
fi
echo "$guard"
[ "$mounted" = 1 ]
