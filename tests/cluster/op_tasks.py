"""Tasks the operator tests ship to a lab's share: a steady one, one that fails for some
keys until its cause is fixed, and a CPU-bound one."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tasks import filetask

STEADY_KEYS = [f"k{i:03d}" for i in range(40)]
FLAKY_KEYS = [f"f{i:02d}" for i in range(10)]
BAD_KEYS = ("f03", "f07")  # fail until FIXED exists in the run root
FIXED = "flaky.fixed"
SPIN_KEYS = [f"s{i}" for i in range(8)]


def _burn(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


@filetask(keys=STEADY_KEYS, out="steady/{key}.json")
def steady(key: str, out: Path) -> None:
    """Half a second a key: a little CPU, a little waiting."""
    _burn(0.25)
    time.sleep(0.25)
    i = int(key[1:])
    out.write_text(json.dumps({"n": i, "square": i * i, "host": socket.gethostname()}))


@filetask(keys=FLAKY_KEYS, out="flaky/{key}.json")
def flaky(key: str, out: Path) -> None:
    if key in BAD_KEYS and not Path(FIXED).exists():  # tasks run in the run root
        raise ValueError(f"bad input in shard/{key}.csv: column 'price' is empty")
    out.write_text(json.dumps({"key_n": int(key[1:])}))


@filetask(keys=SPIN_KEYS, out="spun/{key}.json")
def spin(key: str, out: Path) -> None:
    """CPU-bound: a minute of pure Python per key."""
    out.write_text(json.dumps({"loops": _burn(60.0)}))


HELD_KEYS = ["h0", "h1", "h2", "h3"]
HELD_BAD = "h0"  # fails at once until FIXED exists
RELEASE = "held.release"  # the other keys wait for this file (at most HOLD_MAX_S)
HOLD_MAX_S = 60.0


@filetask(keys=HELD_KEYS, out="held/{key}.json")
def held(key: str, out: Path) -> None:
    """One key fails at once while the others hold the run open until released."""
    if key == HELD_BAD:
        if not Path(FIXED).exists():
            raise ValueError(f"bad input in shard/{key}.csv: column 'price' is empty")
    else:
        deadline = time.monotonic() + HOLD_MAX_S
        while not Path(RELEASE).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    out.write_text(json.dumps({"key_n": int(key[1:])}))
