#!/bin/sh
# The idle guard of a worker VM: powers the VM off once nothing has marked useful work for
# SPOTFAN_IDLE_TIMEOUT seconds. boot.sh starts it first, before the mount and the agent,
# and it needs neither (nor Python): only sh, coreutils and, for a self-delete, curl.
#
# Useful work is marked by touching $SPOTFAN_HOME/busy; the agent does it only while a
# key of this VM runs (waiting on keys that peers hold is idle). So a VM that never
# mounted the share, whose agent cannot start or died, or that only waits, stops itself.
# What "stop" is comes from boot.env: SPOTFAN_STOP_COMMAND (the lab: `kill -TERM 1`, its
# PID 1's poweroff; GCE: a guest shutdown), or first, with idle_action = "delete", a DELETE
# of this instance through the Compute API with the VM's own metadata-server token.
set -u
SPOTFAN_HOME=${SPOTFAN_HOME:-/var/lib/spotfan}
MARK="$SPOTFAN_HOME/busy"
STOP_NOW="$SPOTFAN_HOME/stop-now"  # the agent's "this VM cannot work" (e.g. no GPU driver): stop at once
TICK_S=1                  # between two looks at the mark (one stat and one date)
MAX_TICKS=2592000         # the loop's outer bound (30 days of ticks): then power off anyway
AGENT_GRACE_S=5           # the agent gets this long after SIGTERM to say so on the share
STOP_ATTEMPTS=5           # a stop command that did not stop the VM is tried again ...
STOP_RETRY_S=30           # ... this long after the last try
DELETE_WAIT_S=60          # after an accepted self-delete, how long to wait before stopping instead
CURL_TIMEOUT_S=20

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) watchdog: $*"; }

settings() {  # boot.env is read at every tick: a later `fab up` may change the timeout
    SPOTFAN_IDLE_TIMEOUT=600 SPOTFAN_STOP_COMMAND=poweroff SPOTFAN_SELF_DELETE_URL="" SPOTFAN_TOKEN_URL=""
    if [ -f "$SPOTFAN_HOME/boot.env" ]; then . "$SPOTFAN_HOME/boot.env"; fi
    idle=${SPOTFAN_IDLE_TIMEOUT%%.*}  # whole seconds (cluster.toml may say 2.5)
    case "$idle" in ''|*[!0-9]*) idle=600 ;; esac
    [ "$idle" -ge 1 ] || idle=1
}

agent_pid() {  # the recorded agent pid, if that process is still the agent
    [ -f "$SPOTFAN_HOME/agent.pid" ] || return 1
    pid=$(cat "$SPOTFAN_HOME/agent.pid")
    [ -r "/proc/$pid/cmdline" ] || return 1
    case "$(tr '\0' ' ' < "/proc/$pid/cmdline")" in
        *"-m cluster.vm.agent "*) echo "$pid" ;;
        *) return 1 ;;
    esac
}

self_delete() {  # DELETE this instance with the token of its own service account
    command -v curl >/dev/null 2>&1 || { log "no curl on this VM: cannot delete itself"; return 1; }
    token=$(curl -sf --max-time "$CURL_TIMEOUT_S" -H 'Metadata-Flavor: Google' "$SPOTFAN_TOKEN_URL" \
        | sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')
    [ -n "$token" ] || { log "the metadata server gave no access token (does the VM have a service account?)"; return 1; }
    code=$(curl -s -o "$SPOTFAN_HOME/self-delete.json" -w '%{http_code}' --max-time "$CURL_TIMEOUT_S" \
        -X DELETE -H "Authorization: Bearer $token" "$SPOTFAN_SELF_DELETE_URL")
    case "$code" in
        2??) log "the Compute API accepted the delete of this VM (HTTP $code)"; return 0 ;;
        *) log "the Compute API refused the delete (HTTP $code): $(head -c 300 "$SPOTFAN_HOME/self-delete.json")"; return 1 ;;
    esac
}

power_off() {
    log "${2:-no useful work for ${idle}s} ($1): powering off"
    echo "$1" > "$SPOTFAN_HOME/stopping"
    if pid=$(agent_pid); then
        kill -TERM "$pid" 2>/dev/null
        i=0
        while [ "$i" -lt "$AGENT_GRACE_S" ] && kill -0 "$pid" 2>/dev/null; do sleep 1; i=$((i + 1)); done
    fi
    if [ -n "$SPOTFAN_SELF_DELETE_URL" ] && self_delete; then
        sleep "$DELETE_WAIT_S"
        log "still running $DELETE_WAIT_S s after the delete was accepted: stopping instead"
    fi
    n=1
    while [ "$n" -le "$STOP_ATTEMPTS" ]; do
        log "running \`$SPOTFAN_STOP_COMMAND\` (attempt $n/$STOP_ATTEMPTS)"
        sh -c "$SPOTFAN_STOP_COMMAND" || log "\`$SPOTFAN_STOP_COMMAND\` exited $?"
        sleep "$STOP_RETRY_S"
        n=$((n + 1))
    done
    log "the VM is still running after $STOP_ATTEMPTS stop attempts: fix SPOTFAN_STOP_COMMAND's permissions"
    exit 1
}

settings
touch "$MARK"  # the idle clock starts now: a fresh boot gets a whole idle_timeout
log "started (pid $$): idle timeout ${idle}s, then \`$SPOTFAN_STOP_COMMAND\`${SPOTFAN_SELF_DELETE_URL:+ after a self-delete}"
ticks=0
while [ "$ticks" -lt "$MAX_TICKS" ]; do
    sleep "$TICK_S"
    ticks=$((ticks + 1))
    settings
    if [ -f "$STOP_NOW" ]; then power_off "$(head -c 64 "$STOP_NOW")" "the agent says this VM cannot work"; fi
    last=$(stat -c %Y "$MARK" 2>/dev/null) || { touch "$MARK"; continue; }
    if [ $(($(date +%s) - last)) -ge "$idle" ]; then power_off idle; fi
done
power_off "watchdog lifetime over"
