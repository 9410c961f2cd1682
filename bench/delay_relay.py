"""A TCP relay on loopback that adds a fixed delay each way: a laptop-to-cloud link's round trip, for benches.

Every connection to LISTEN is forwarded to TO; every chunk read from one side is written to
the other RTT/2 ms after it was read, in order. What it models: propagation delay (a round trip
of RTT ms on top of loopback's), and with `--rate` a bottleneck link of that many MB/s each way
(a chunk leaves once the ones before it have been "serialized" at that rate, then is delayed).
What it does not model: loss, jitter, reordering, or TCP's own congestion window over a long
path (each side's TCP talks to the relay on loopback, so it acknowledges at once; only the
window of the protocol on top, e.g. an SSH channel's, holds data back per round trip). Memory is
bounded: a direction holds at most QUEUE_CHUNKS chunks, then stops reading (back-pressure).
Only 127.0.0.0/8 addresses are accepted.
With `--count`, each connection's end prints one line to stderr: its seconds, bytes each way and
turns (a chunk one way after one the other way: a protocol that waits for each answer turns
twice per round trip, a pipelined one far less), to see where a client's round trips go.
Usage: python bench/delay_relay.py --listen 127.100.0.2:35090 --to 127.100.0.1:35090 --rtt-ms 20 [--rate 100] [--count]
Prints `listening HOST:PORT` once it accepts; runs until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import signal
import sys
import time
from dataclasses import dataclass, field

CHUNK_BYTES = 256 * 1024  # read at a time
QUEUE_CHUNKS = 256  # chunks held per direction before reading pauses (at most 64 MB)
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Link:
    """What each direction of every relayed connection goes through."""

    delay_s: float  # one way: half the round trip
    rate: float  # bytes per second each way; 0: no cap
    count: bool = False  # print each connection's turns and bytes at its end


@dataclass
class Tally:
    """One connection's traffic, for --count."""

    up: int = 0  # bytes client -> server
    down: int = 0
    turns: int = 0  # chunks read in the other direction than the chunk before
    last: str = ""  # "up" or "down"
    started: float = field(default_factory=time.monotonic)

    def add(self, way: str, n: int) -> None:
        if n:
            setattr(self, way, getattr(self, way) + n)
            self.turns += self.last not in ("", way)
            self.last = way


_ids = itertools.count(1)


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        if not ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).version != 4:
            raise ValueError
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT with HOST in 127.0.0.0/8") from None


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, tally: Tally,
                way: str) -> None:
    """Copy one direction: each chunk written `delay_s` after it was read (and after the ones before it)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
    free_at = 0.0  # when the modelled link has sent what is queued (with --rate)

    async def take() -> None:
        nonlocal free_at
        while True:
            try:
                chunk = await reader.read(CHUNK_BYTES)
            except (ConnectionError, OSError):
                chunk = b""  # reset (a peer closed with data unread): an end, as for a real link's peer
            tally.add(way, len(chunk))
            now = loop.time()
            if link.rate:
                free_at = max(now, free_at) + len(chunk) / link.rate
                now = free_at
            await queue.put((now + link.delay_s, chunk))
            if not chunk:
                return

    taker = asyncio.ensure_future(take())
    try:
        while True:
            due, chunk = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()  # a half-close travels too
                return
            writer.write(chunk)
            await writer.drain()
    finally:
        taker.cancel()


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to: tuple[str, int],
                     link: Link) -> None:
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*to), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as e:
        print(f"relay: cannot reach {to[0]}:{to[1]}: {e}", file=sys.stderr)
        writer.close()
        return
    tally = Tally()
    try:
        await asyncio.gather(_pump(reader, up_w, link, tally, "up"), _pump(up_r, writer, link, tally, "down"))
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass  # one side went away, or the relay stops: end both
    finally:
        for w in (writer, up_w):
            w.close()
        if link.count:
            print(f"relay: connection {next(_ids)}: {time.monotonic() - tally.started:.2f} s, {tally.up} bytes up, "
                  f"{tally.down} down, {tally.turns} turns", file=sys.stderr, flush=True)


async def serve(listen: tuple[str, int], to: tuple[str, int], link: Link) -> None:
    server = await asyncio.start_server(lambda r, w: _serve_one(r, w, to=to, link=link), *listen,
                                        reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {listen[0]}:{listen[1]}", flush=True)
    async with server:
        await stop.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=endpoint, required=True, help="HOST:PORT to accept on (127.x.y.z)")
    p.add_argument("--to", type=endpoint, required=True, help="HOST:PORT to forward to (127.x.y.z)")
    p.add_argument("--rtt-ms", type=float, required=True, help="round trip added: half of it each way")
    p.add_argument("--rate", type=float, default=0.0, help="MB/s each way at most (default: no cap)")
    p.add_argument("--count", action="store_true", help="print each connection's seconds, bytes and turns at its end")
    a = p.parse_args()
    if a.rtt_ms < 0 or a.rate < 0:
        p.error("--rtt-ms and --rate must be 0 or more")
    asyncio.run(serve(a.listen, a.to, Link(delay_s=a.rtt_ms / 2000, rate=a.rate * 1e6, count=a.count)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
