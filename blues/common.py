"""Small facts every layer of Blues needs, each written once.

Imports nothing else of Blues (the lowest layer): atomic file writes with fsync, a free TCP port,
byte sizes, log-once, the one-line CLI error and the exit codes every console script uses.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import Any, Callable, Optional, Union

# Exit codes, the same in every console script: 2 is argparse's own code for a usage mistake, so a
# bad flag and a bad value (a config field, a file, a checkpoint) exit alike.
EXIT_OK = 0
EXIT_FAILURE = 1  # something broke that is not the user's input (a crashed rank, a bug)
EXIT_USAGE = 2  # the user's input is wrong; the one line on stderr says what would be right


# ----------------------------------------------------------------------------- files

def atomic_write(path: str, data: Union[str, bytes]) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part.

    The bytes reach the disk (fsync) before the rename, and the rename reaches it after (fsync of
    the folder): a crash right after return cannot leave an empty file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write_json(path: str, obj: Any, **dump_kw: Any) -> None:
    """atomic_write of `obj` as JSON (indent=1 unless given), ending in a newline."""
    dump_kw.setdefault("indent", 1)
    atomic_write(path, json.dumps(obj, **dump_kw) + "\n")


def fsync_dir(folder: str) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- validation

def require(cond: bool, name: str, value: Any, expected: str) -> None:
    """ValueError "name=value is invalid: expected" unless `cond`: the one shape of a config error."""
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: {expected}")


def positive_int(name: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
            "expected a positive integer")


def non_negative(name: str, value: Any) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, name, value,
            "expected a number >= 0")


def probability(name: str, value: Any) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1, name, value,
            "expected a probability in [0, 1)")


# ----------------------------------------------------------------------------- network

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- byte sizes

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'3GB' -> 3_000_000_000, '1.5GiB' -> 1610612736, '512' -> 512; ValueError naming the text."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size: expected a number with an optional unit, e.g. 3GB, 1.5GiB, "
                         "512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """1610612736 -> '1.50 GiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- logging

_LOGGED: set = set()


def log_once(logger: logging.Logger, key: Any, msg: str, *args: Any, level: int = logging.INFO) -> bool:
    """Log `msg` the first time `key` is seen in this process; True if it was logged now."""
    if key in _LOGGED:
        return False
    _LOGGED.add(key)
    logger.log(level, msg, *args)
    return True


# ----------------------------------------------------------------------------- CLI

class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (and --help for the rest), exit EXIT_USAGE."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_cli(prog: str, body: Callable[[], Optional[int]],
            user_errors: tuple[type[BaseException], ...] = (ValueError,)) -> int:
    """Run a console script's body: a user error becomes one line on stderr and EXIT_USAGE, Ctrl-C
    exits 130, and nothing prints a traceback for what the user can fix."""
    try:
        rc = body()
        return EXIT_OK if rc is None else rc
    except user_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130



def add_alias(parser: argparse.ArgumentParser, old: str, dest: str, **kwargs: Any) -> None:
    """Accept the old spelling `old` of a renamed flag; it stores into `dest` (converted by the same
    `type=` as the new flag, passed in kwargs) and --help shows only the new name."""
    parser.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
