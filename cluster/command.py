"""How a `fab` command runs: options parsed with messages that say what to type, one Cluster built from
cluster.toml, closed once, and the cluster's errors turned into exit codes (0 ok; 1 failed; 2 usage; 3 host key)."""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from invoke.exceptions import Exit, ParseError
from invoke.program import Program

from cluster import show
from cluster.config import config_path, load
from cluster.errors import ClusterError, ConfigError, GroupError, HostKeyError, RecordError, UsageError
from cluster.session import Cluster

EXIT_FAILED, EXIT_USAGE, EXIT_HOST_KEY = 1, 2, 3
GROUP_NAMES_SHOWN = 5  # a failed fan-out's error line names this many hosts, then counts the rest


def whole(value: Any, *, flag: str, example: str, minimum: int = 0) -> int:
    """An option that must be a whole number; a UsageError (exit 2) that says what to type."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise UsageError(f"{flag} {value!r} is not a whole number of at least {minimum}: type e.g. `{example}`")
    return n


def seconds(value: Any, *, flag: str, example: str, minimum: float = 0.0) -> float:
    """An option that must be a number of seconds; a UsageError (exit 2) that says what to type."""
    try:
        x = float(str(value).strip())
    except ValueError:
        x = None
    if x is None or not x >= minimum or x != x or x == float("inf"):
        raise UsageError(f"{flag} {value!r} is not a number of seconds (at least {minimum:g}): type e.g. `{example}`")
    return x


def _usage_errors_exit_2() -> None:
    """invoke ends a parse error with exit 1, and takes `--help` after a task with a positional
    argument for that argument; spotfan's usage errors exit 2 with one line saying what to
    type, and `fab TASK --help` shows that task's help. (The program imports this module
    before it parses the task's arguments, so wrapping its parse step here is enough.)"""
    if getattr(Program.parse_tasks, "spotfan", False):
        return
    parse_tasks = Program.parse_tasks

    def parse(self: Program) -> None:
        args = self.core.unparsed
        if args and args[0] in self.collection.task_names and "--help" in args[1:]:
            self.core[0].args.help.value = self.collection.task_names[args[0]] or args[0]
            self.core.unparsed = []
        try:
            parse_tasks(self)
        except ParseError as e:
            raise Exit(f"error: {e}: `fab --list` shows the commands, `fab TASK --help` a command's options",
                       code=EXIT_USAGE) from e

    parse.spotfan = True  # type: ignore[attr-defined]
    Program.parse_tasks = parse  # type: ignore[method-assign]


_usage_errors_exit_2()


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Load the config, build the Cluster, run the command, close the Cluster, map errors to exit codes."""

    @functools.wraps(fn)
    def wrapper(c: Any, *args: Any, config: str = "", **kwargs: Any) -> Any:
        show.json_mode(bool(kwargs.get("json")))
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        # paramiko logs each failed handshake with a traceback; our messages say it better.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        try:
            with Cluster(load(config_path(config or None))) as cluster:
                return fn(c, cluster, *args, **kwargs)
        except GroupError as e:
            show.group_error(e)
            raise Exit(group_line(e), code=group_exit_code(e)) from e
        except HostKeyError as e:
            raise Exit(f"error: {e}", code=EXIT_HOST_KEY) from e
        except (ConfigError, RecordError) as e:
            raise Exit(f"error: {e}", code=EXIT_USAGE) from e
        except ClusterError as e:
            raise Exit(f"error: {e}", code=EXIT_FAILED) from e

    # Invoke builds flags from the signature: show it without `cluster` and with `--config`.
    sig = inspect.signature(fn)
    params = [p for n, p in sig.parameters.items() if n != "cluster"]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=""))
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def group_line(e: GroupError) -> str:
    """The one error line of a failed fan-out: what failed, which hosts, where each one's error is."""
    head = str(e).splitlines()[0].rstrip(" :") if str(e) else "a fan-out failed"
    names = sorted(e.failed)
    shown = ", ".join(names[:GROUP_NAMES_SHOWN]) + (f" and {len(names) - GROUP_NAMES_SHOWN} more"
                                                   if len(names) > GROUP_NAMES_SHOWN else "")
    return f"error: {head} ({shown}); each one's error is printed above" if names else f"error: {head}"


def group_exit_code(e: GroupError) -> int:
    return EXIT_HOST_KEY if any(isinstance(r, HostKeyError) for r in e.failed.values()) else EXIT_FAILED
