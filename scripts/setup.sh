# Sourced by test.sh and demo.sh: system packages and the project venv, idempotently.
# Installs: openssh-server and sshfs (the lab cluster), fuse3, GNU parallel (benchmarks),
# strace (syscall counts in benchmarks); a venv at .venv with spotfan (editable, the real
# Compute client among its dependencies: the tests drive it against a local emulator) and its
# test extra (pytest, pytest-xdist, the object-store servers).
VENV="${SPOTFAN_VENV:-$PWD/.venv}"
PACKAGES=(openssh-server openssh-client sshfs fuse3 parallel strace psmisc procps iproute2 util-linux faketime)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: missing system packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
        exit 2
    fi
    echo "==> installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "==> creating the virtualenv $VENV"
    python3 -m venv "$VENV"
fi
stamp="$VENV/.spotfan-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    echo "==> installing spotfan and its dependencies into $VENV"
    # pip's own chatter goes to a log; on failure its end is shown with where the rest is.
    log="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
           "$VENV/bin/python" -m pip install -q -e ".[test,aws]"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "error: installing spotfan into $VENV failed (full log: $log); fix the cause and run again" >&2
        exit 1
    fi
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
