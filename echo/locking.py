# Copyright 2025 The ECHO-IHG Authors. Licensed under the Apache License, Version 2.0.
"""The lock of an output folder, for the tools that write many files into one (``echo-prep``, ``echo-render``).

Two runs of a tool into one folder at once would do every piece of work twice and interleave their records; one run
holds ``<out>/.<tool>.lock`` while it writes (``.<tool>.shard-K-of-N.lock`` for shard K of N of a job array):

- the lock is a JSON record naming the process that holds it (pid, host, start time, command line, shard), created
  atomically (written to a temporary file, then hard-linked under its name), and touched every ``HEARTBEAT_S`` by
  `start_heartbeat`;
- a run into a folder whose lock names a live process is refused with `OutputLocked`, naming that process; so is a
  shard beside a live run of another shard count (or a whole run beside a shard);
- a lock left by a killed run is taken over with a warning: on this host the named pid no longer runs (or is a
  zombie, or a reused pid with another start time); a lock of another host, once its heartbeat is ``LOCK_STALE_S``
  old;
- the checks run under a short mutex (``.<tool>.admit``, created exclusively), so runs starting together check one
  after the other.

`hold_lock` is the whole of it as a context manager (acquire, heartbeat, release); the tools name themselves in
``tool``, which names the lock files and appears in every message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: Seconds between touches of a running lock; a lock of another host untouched for ``LOCK_STALE_S`` is taken over.
HEARTBEAT_S = 30.0
LOCK_STALE_S = 300.0
#: Seconds after which the admission mutex of a killed run is removed (it is held for milliseconds).
ADMISSION_STALE_S = 60.0


class OutputLocked(RuntimeError):
    """The output folder is being written by another live run of the same tool (named in the message)."""


def process_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks since boot)`` of a Linux process from ``/proc``; `None` elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def lock_record(shard: tuple[int, int] | None = None) -> dict:
    """The record a lock holds: this process (pid, host, start time and start ticks), its command line, its shard."""
    stat = process_stat(os.getpid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "process_start_ticks": stat[1] if stat else None,
        "command": sys.argv,
        "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
    }


def lock_is_live(record: dict) -> bool:
    """Whether the process a lock record names still runs (on this host; a reused pid or a zombie does not count)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    stat = process_stat(pid)
    if stat is not None:
        state, ticks = stat
        recorded = record.get("process_start_ticks")
        if state == "Z" or (recorded is not None and recorded != ticks):
            return False
    return True


def describe(record: dict) -> str:
    """``[shard K/N, ]pid P on host 'H', started S``: the holder of a lock, for messages."""
    shard = f"shard {record['shard']}, " if record.get("shard") else ""
    return f"{shard}pid {record.get('pid')} on host {record.get('host')!r}, started {record.get('started')}"


def lock_name(tool: str, shard: tuple[int, int] | None = None) -> str:
    """``.<tool>.lock`` for a whole run, ``.<tool>.shard-K-of-N.lock`` for shard K of N."""
    return f".{tool}.lock" if shard is None else f".{tool}.shard-{shard[0]}-of-{shard[1]}.lock"


def heartbeat_age(path: Path) -> float | None:
    """Seconds since a lock's holder last touched it (its mtime; `None` when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def admission(out_dir: Path, tool: str) -> Iterator[None]:
    """A short mutex over ``out_dir`` (``.<tool>.admit``, created exclusively) around the lock checks (and what a
    tool records as it starts), so that runs starting together check one after the other. One left by a killed run
    is removed once ``ADMISSION_STALE_S`` old."""
    path = Path(out_dir) / f".{tool}.admit"
    deadline = time.monotonic() + 2 * ADMISSION_STALE_S
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            age = heartbeat_age(path)
            if age is not None and age > ADMISSION_STALE_S:
                logger.warning("removing %s, left by a killed %s run %.0f s ago", path, tool, age)
                path.unlink(missing_ok=True)
            elif time.monotonic() > deadline:
                raise OutputLocked(
                    f"could not enter {str(out_dir)!r}: {str(path)!r} stayed for {2 * ADMISSION_STALE_S:.0f} s. "
                    f"Delete it if no {tool} run is starting there."
                ) from None
            time.sleep(0.05)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def acquire_lock(out_dir: Path, tool: str, shard: tuple[int, int] | None = None) -> Path:
    """Create this run's lock in ``out_dir`` naming this process (`lock_name`); returns its path.

    A run and the N shards of a job array may not overlap: each lock is checked against the live locks of the folder
    (under `admission`): the same lock (the same run, or the same shard) held by a live process, or a live lock of
    another shard count (or a whole run beside a shard), refuses this run. Liveness: on this host, the named pid
    (and its start time); on another host, the lock's heartbeat (its mtime, refreshed every ``HEARTBEAT_S`` by
    `start_heartbeat`), stale after ``LOCK_STALE_S``.

    Raises:
        `OutputLocked`: the message names the live run and the way on.
    """
    out_dir = Path(out_dir)
    path = out_dir / lock_name(tool, shard)
    record = lock_record(shard)
    with admission(out_dir, tool):
        for other in sorted([out_dir / lock_name(tool), *out_dir.glob(f".{tool}.shard-*-of-*.lock")]):
            try:
                held = json.loads(other.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                held = {}  # unreadable: a torn lock of a crashed run
            if not isinstance(held, dict):
                held = {}
            age = heartbeat_age(other)
            foreign = held.get("host") not in (None, record["host"])
            live = (age is not None and age < LOCK_STALE_S) if foreign else lock_is_live(held)
            if other == path and live:
                if foreign:
                    raise OutputLocked(
                        f"{str(out_dir)!r} is being written by {tool} {describe(held)} (lock {str(other)!r}); this "
                        f"host cannot tell whether it still runs: its heartbeat is {age:.0f} s old (it is taken over "
                        f"after {LOCK_STALE_S:.0f} s). Wait for it, use another --out, or delete the lock if that run is "
                        "gone."
                    )
                raise OutputLocked(
                    f"{str(out_dir)!r} is being written by another {tool} run, {describe(held)} (lock "
                    f"{str(other)!r}). Wait for it to finish (or stop it), or use another --out."
                )
            same_array = shard is not None and other.name.endswith(f"-of-{shard[1]}.lock")
            if other != path and live and not same_array:
                mine = "a whole run" if shard is None else f"--shard {shard[0]}/{shard[1]}"
                raise OutputLocked(
                    f"{str(out_dir)!r} is being written by {tool} {describe(held)} (lock {str(other)!r}), whose work "
                    f"{mine} would overlap. Shards of one job array share a folder only with the same N; wait for "
                    "that run, or use its shard count or another --out."
                )
            if other == path:
                logger.warning(
                    "taking over the lock %s of a %s run that no longer runs (%s)",
                    other,
                    tool,
                    describe(held) if held else "unreadable",
                )
                other.unlink(missing_ok=True)
        tmp = out_dir / f"{path.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        try:
            os.link(tmp, path)  # atomic, and the lock appears complete
        except FileExistsError:
            raise OutputLocked(f"could not take the lock {str(path)!r}: another {tool} run took it.") from None
        finally:
            tmp.unlink(missing_ok=True)
    return path


def start_heartbeat(path: Path) -> threading.Event:
    """Touch the lock every ``HEARTBEAT_S`` seconds from a daemon thread (so runs on other hosts can tell it lives);
    set the returned event to stop."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:
                return

    threading.Thread(target=beat, name=f"{Path(path).name}-heartbeat", daemon=True).start()
    return stop


def release_lock(path: Path) -> None:
    """Remove the lock if it still names this process."""
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            Path(path).unlink()
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def hold_lock(out_dir: Path, tool: str, shard: tuple[int, int] | None = None) -> Iterator[Path]:
    """Hold ``out_dir``'s lock for ``tool`` (`acquire_lock`, `start_heartbeat`) for the block; released after it,
    also when it raises."""
    path = acquire_lock(out_dir, tool, shard)
    stop = start_heartbeat(path)
    try:
        yield path
    finally:
        stop.set()
        release_lock(path)
