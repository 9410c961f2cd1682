#!/bin/sh
# The spot interruption watch of an EC2 worker: asks IMDS (v2, with a session token) for
# spot/instance-action every few seconds and records the two-minute notice, once, in
# $SPOTFAN_HOME/preempted (as the GCE shutdown-script does) and in the system log.
# Started by the user-data at every boot; needs only sh, curl and date. SPOTFAN_IMDS_URL
# is the metadata service's root (tests point it at 127.0.0.1).
set -u
SPOTFAN_HOME=${SPOTFAN_HOME:-/var/lib/spotfan}
IMDS=${SPOTFAN_IMDS_URL:-http://169.254.169.254}
TICK_S=5                  # between two looks (EC2 gives two minutes of notice)
MAX_TICKS=1036800         # the loop's outer bound (60 days of ticks)
TOKEN_TTL_S=21600         # the IMDSv2 session token's lifetime; renewed when refused
CURL_TIMEOUT_S=2

token=""
i=0
while [ "$i" -lt "$MAX_TICKS" ]; do
    i=$((i + 1))
    [ -n "$token" ] || token=$(curl -sf -m "$CURL_TIMEOUT_S" -X PUT \
        -H "X-aws-ec2-metadata-token-ttl-seconds: $TOKEN_TTL_S" "$IMDS/latest/api/token" || true)
    # 404 until EC2 decides to interrupt; then {"action": "stop"|"terminate", "time": "..."}
    code=$(curl -s -m "$CURL_TIMEOUT_S" -o "$SPOTFAN_HOME/.instance-action" -w '%{http_code}' \
        -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/spot/instance-action" || true)
    case "$code" in
        200)
            now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
            notice=$(tr -d '\n' < "$SPOTFAN_HOME/.instance-action" | head -c 200)
            echo "$now $notice" >> "$SPOTFAN_HOME/preempted"
            logger -t spotfan "spot interruption notice at $now: $notice" 2>/dev/null || true
            echo "$now spot notice: $notice"
            exit 0
            ;;
        401) token="" ;;  # the token expired: ask for a new one
    esac
    sleep "$TICK_S"
done
