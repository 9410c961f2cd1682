#!/bin/sh
# A worker VM's SSHFS mount of the head's share: `mount.sh mount|check|remount|unmount`.
# Settings come from $SPOTFAN_HOME/boot.env, written by `fab up`. Every step is idempotent.
# The worker key logs in as the head's jailed, SFTP-only user, to whom the share is
# $SPOTFAN_SHARE (normally /share inside its chroot; see cluster/jail.py).
set -eu
SPOTFAN_HOME=${SPOTFAN_HOME:-/var/lib/spotfan}
. "$SPOTFAN_HOME/boot.env"

MOUNT_WAIT_TRIES=100  # x 0.1 s: how long a fresh sshfs may take to answer
MOUNT_ATTEMPTS=4      # a refused or dropped connection (a head busy with a fleet's connects) is retried
RETRY_BASE_MS=1000    # before retry n: RETRY_BASE_MS * 2^(n-1), plus up to as much again of jitter
STAT_TIMEOUT_S=5      # a stat slower than this means the mount is dead
PIDFILE="$SPOTFAN_HOME/sshfs.pid"
LOG="$SPOTFAN_HOME/sshfs.log"

# Chosen for many writers (docs/cluster-toml.md, "The SSHFS mount options"): reconnect plus keep-alives so a dropped link heals;
# no name, attribute or negative caching so a claim or output made by one worker is seen
# by every other at once. Never workaround=rename: publishing relies on the server's
# atomic posix-rename.
FUSE_OPTS="reconnect,ServerAliveInterval=15,ServerAliveCountMax=3,dir_cache=no,attr_timeout=0,entry_timeout=0,negative_timeout=0"
# The head's host key must match the one fab up wrote; never trust on first use.
SSH_OPTS="port=$SPOTFAN_HEAD_PORT,IdentityFile=$SPOTFAN_HOME/worker_key,IdentitiesOnly=yes,BatchMode=yes,StrictHostKeyChecking=yes,UserKnownHostsFile=$SPOTFAN_HOME/known_hosts,GlobalKnownHostsFile=$SPOTFAN_HOME/known_hosts,ConnectTimeout=10"
# Opt-in only (cluster.toml ssh.kex_algorithms): OpenSSH's default post-quantum kex costs
# ~60 ms of CPU per mount on each end, which matters only when many VMs share few cores.
if [ -n "${SPOTFAN_KEX:-}" ]; then SSH_OPTS="$SSH_OPTS,KexAlgorithms=$SPOTFAN_KEX"; fi
# The runner's own SFTP session (sftp.cmd, tasks/direct.py) rides on the mount's SSH connection
# as a second channel (OpenSSH's connection multiplexing, through a socket only this user can
# use): no second handshake at each run's start (~0.2 s, and ~0.1 s of CPU at each end with the
# default post-quantum kex). Only where the socket's path is short enough for a Unix socket and
# has no character that ssh or sshfs would read as syntax; else the session connects by itself.
MUX="$SPOTFAN_HOME/mux.sock"
case "$MUX" in *[%,\\\ ]*) MUX="" ;; esac
if [ "${#MUX}" -gt 100 ]; then MUX=""; fi

is_mounted() {  # an sshfs mount sits on the mount point (alive or dead)
    awk -v m="$SPOTFAN_MOUNT" '$5 == m { for (i = 7; i < NF; i++) if ($i == "-") { if ($(i + 1) == "fuse.sshfs") found = 1; break } }
        END { exit !found }' /proc/self/mountinfo
}

is_alive() {  # a statfs through the mount, in a child with a timeout: a dead mount fails or hangs
    # It must be answered by FUSE (sshfs asks the head's statvfs), not by the disk under the
    # mount point: an sshfs that cannot connect can mount for an instant and unmount again, so
    # a plain stat may land on the empty folder once the mount is gone.
    fs=$(timeout "$STAT_TIMEOUT_S" stat -f -c %T "$SPOTFAN_MOUNT/." 2>/dev/null) || return 1
    case "$fs" in fuse*) return 0 ;; *) return 1 ;; esac
}

sshfs_pid() {  # the pid we recorded, if that process is still our sshfs
    [ -f "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE")
    [ -r "/proc/$pid/cmdline" ] || return 1
    case "$(tr '\0' ' ' < "/proc/$pid/cmdline")" in
        sshfs*" $SPOTFAN_MOUNT ") echo "$pid" ;;
        *) return 1 ;;
    esac
}

do_unmount() {
    if pid=$(sshfs_pid); then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$PIDFILE"
    if is_mounted; then fusermount3 -u -z "$SPOTFAN_MOUNT"; fi
}

why_failed() {  # what ssh said in this attempt's part of the log ($1: the log's size before it)
    said=$(tail -c "+$(($1 + 1))" "$LOG")
    if printf '%s' "$said" | grep -q -e 'REMOTE HOST IDENTIFICATION HAS CHANGED' -e 'Host key verification failed'; then
        presented=$(printf '%s\n' "$said" | grep -o 'SHA256:[A-Za-z0-9+/=]*' | head -n 1)
        echo "the head's host key changed: $SPOTFAN_HEAD_ADDRESS:$SPOTFAN_HEAD_PORT presented ${presented:-another key}, not the one in $SPOTFAN_HOME/known_hosts (written by fab up). If the head's key was really changed, update head.host_keys (the lab does it itself) and run \`fab heal\`; otherwise someone may be intercepting the connection: do not proceed"
    elif printf '%s' "$said" | grep -q 'Permission denied'; then
        echo "the head refused the worker key for $SPOTFAN_HEAD_USER: set up its jailed SFTP user (\`fab head-setup\` prints how)"
    else
        printf '%s' "$said" | tail -n 3 | tr '\n' ' '
    fi
}

attempt_mount() {  # one sshfs start; 0 once the mount answers
    log_size=0
    if [ -f "$LOG" ]; then log_size=$(wc -c < "$LOG"); fi
    if ! mkdir -p "$SPOTFAN_MOUNT" 2>/dev/null || [ ! -d "$SPOTFAN_MOUNT" ]; then
        echo "the mount point $SPOTFAN_MOUNT is not a folder that can be made on this VM: set cluster.mount_point to one" >> "$LOG"
        return 1
    fi
    mux=""
    if [ -n "$MUX" ]; then
        # A socket left by a killed ssh would turn multiplexing off (ssh will not replace it).
        rm -f "$MUX"
        mux=",ControlMaster=yes,ControlPath=$MUX"
    fi
    # -f keeps sshfs in the foreground of its own session so that $! is its pid.
    setsid sshfs -f -o "$FUSE_OPTS" -o "$SSH_OPTS$mux" -o "ssh_command=ssh -F none" \
        "$SPOTFAN_HEAD_USER@$SPOTFAN_HEAD_ADDRESS:$SPOTFAN_SHARE" "$SPOTFAN_MOUNT" \
        </dev/null >>"$LOG" 2>&1 &
    pid=$!
    echo "$pid" > "$PIDFILE"
    i=0
    while [ "$i" -lt "$MOUNT_WAIT_TRIES" ]; do
        # Mounted, answering through FUSE, and still our live sshfs (not one on its way out).
        if is_mounted && is_alive && kill -0 "$pid" 2>/dev/null && is_mounted; then return 0; fi
        # (not sshfs_pid: until the child has exec'd, its cmdline is still this shell's)
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.1
        i=$((i + 1))
    done
    do_unmount
    return 1
}

jitter_sleep() {  # $1 ms, plus a random part of up to as much again (so a fleet does not retry in step)
    r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
    ms=$(($1 + r % ($1 + 1)))
    sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
}

quote() {  # $1 as one shell word
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

write_sftp_command() {  # how `tasks run` opens its own SFTP session to the head (tasks/direct.py)
    cmd="ssh -F none" opt=""
    old_ifs=$IFS; IFS=,; set -f
    for part in $SSH_OPTS; do  # a part without "=" continues a list value (KexAlgorithms=a,b)
        case "$part" in
            *=*) if [ -n "$opt" ]; then cmd="$cmd -o $(quote "$opt")"; fi; opt=$part ;;
            *) opt="$opt,$part" ;;
        esac
    done
    IFS=$old_ifs; set +f
    cmd="$cmd -o $(quote "$opt")"
    # Through the mount's connection while it lives; a connection of its own otherwise.
    if [ -n "$MUX" ]; then cmd="$cmd -o ControlMaster=no -o $(quote "ControlPath=$MUX")"; fi
    printf '%s -s %s sftp\n' "$cmd" "$(quote "$SPOTFAN_HEAD_USER@$SPOTFAN_HEAD_ADDRESS")" > "$SPOTFAN_HOME/sftp.cmd.tmp"
    mv "$SPOTFAN_HOME/sftp.cmd.tmp" "$SPOTFAN_HOME/sftp.cmd"
}

do_mount() {
    write_sftp_command
    n=1
    delay=$RETRY_BASE_MS
    while :; do
        if attempt_mount; then
            if [ "$n" -gt 1 ]; then retried=" after $n attempts"; fi
            return 0
        fi
        why=$(why_failed "$log_size")
        case "$why" in  # a refused key, a changed host key or a bad mount point will not heal by retrying
            "the head's host key changed"*|"the head refused"*|"the mount point"*) break ;;
        esac
        if [ "$n" -ge "$MOUNT_ATTEMPTS" ]; then break; fi
        jitter_sleep "$delay"
        delay=$((delay * 2))
        n=$((n + 1))
    done
    echo "mount: FAILED to mount $SPOTFAN_HEAD_USER@$SPOTFAN_HEAD_ADDRESS:$SPOTFAN_SHARE on $SPOTFAN_MOUNT ($n attempt(s)): $why"
    return 1
}

case "${1:-}" in
    check)
        if is_mounted && is_alive; then echo "mount: ok"
        elif is_mounted; then echo "mount: dead"; exit 1
        else echo "mount: absent"; exit 1
        fi ;;
    mount)
        if is_mounted && is_alive; then echo "mount: ok (already mounted)"; exit 0; fi
        if is_mounted; then state="remounted a dead mount"; else state="mounted"; fi
        do_unmount
        retried=""
        do_mount || exit 1
        echo "mount: ok ($state$retried)" ;;
    remount)
        do_unmount
        retried=""
        do_mount || exit 1
        echo "mount: ok (remounted$retried)" ;;
    unmount)
        do_unmount
        echo "mount: unmounted" ;;
    *)
        echo "usage: mount.sh mount|check|remount|unmount" >&2; exit 2 ;;
esac
