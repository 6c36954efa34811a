"""prometheus-client's multiprocess mode, for `lmgate serve --workers N`.

Every worker writes its metrics to memory-mapped files in `PROMETHEUS_MULTIPROC_DIR`, and
the worker that answers a scrape sums the files of all of them. prometheus-client chooses the
mode when it is first imported, so the variable must be set before the workers start: the CLI
calls `prepare_multiprocess_dir()` before uvicorn starts them and `cleanup_multiprocess_dir()`
when it exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import values
from prometheus_client.multiprocess import mark_process_dead

ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGES = "gauge_live*_*.db"


def prepare_multiprocess_dir() -> Path | None:
    """Create a fresh, private directory and point `PROMETHEUS_MULTIPROC_DIR` at it.

    Returns None, and changes nothing, when the variable is already set: that directory is
    the operator's, who must empty it between runs (prometheus-client's rule).
    """
    if os.environ.get(ENV):
        return None
    path = Path(tempfile.mkdtemp(prefix="lmgate-metrics-"))
    os.environ[ENV] = str(path)
    return path


def cleanup_multiprocess_dir(path: Path | None) -> None:
    """Remove a directory made by `prepare_multiprocess_dir` (None: nothing to do)."""
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(ENV) == str(path):
        del os.environ[ENV]


def multiprocess_dir() -> Path | None:
    """The directory this process writes its metrics to, or None in single-process mode.

    Decided by how prometheus-client was imported, not by the variable alone: a variable set
    after the import does not switch the process to files.
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    path = os.environ.get(ENV)
    return Path(path) if path else None


def process_exited(path: Path, pid: int) -> None:
    """Drop a worker's live gauges (in flight, health): it no longer has any."""
    mark_process_dead(pid, str(path))


def reap_dead_workers(path: Path) -> None:
    """Drop the live gauges of workers that died without `process_exited` (killed, crashed)."""
    for f in path.glob(_LIVE_GAUGES):
        try:
            pid = int(f.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if not _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                process_exited(path, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
