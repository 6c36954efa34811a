"""Spawn pinned services, wait for them, and sample a process tree's CPU time and RSS."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class TreeSample:
    """CPU seconds (user + system, including reaped children) and RSS of a process tree."""

    cpu_seconds: float
    rss_bytes: int
    pids: tuple[int, ...]


@dataclass
class Service:
    """A process this harness started, in its own session so it can be stopped as a group."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    cmd: list[str]

    @property
    def pid(self) -> int:
        """The process id (taskset execs, so this is the service itself)."""
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the service's combined stdout/stderr."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """The root pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def sample_tree(root: int) -> TreeSample:
    """Sum utime+stime+cutime+cstime (stat fields 14-17) and RSS (field 24) over the tree."""
    ticks = 0
    pages = 0
    pids = []
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
        pages += int(fields[21])
        pids.append(pid)
    return TreeSample(ticks / CLK_TCK, pages * PAGE_SIZE, tuple(pids))


def machine_busy_seconds() -> float:
    """User + nice + system CPU seconds of the whole machine (first line of /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(x) for x in fields[1:4]) / CLK_TCK


def own_and_children_seconds() -> float:
    """CPU seconds of this process and its reaped children (wrk, ttft.py)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(
    name: str,
    cmd: list[str],
    cpus: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Service:
    """Start `cmd` pinned to `cpus` with taskset, output to <log_dir>/<name>.log."""
    full = ["taskset", "-c", cpus, *cmd]
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    return Service(name, proc, log, full)


def stop(service: Service, timeout: float = 15.0) -> None:
    """SIGTERM the service's process group, then SIGKILL it if it lingers."""
    if service.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGTERM)
        try:
            service.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGKILL)
            service.proc.wait(5)
    # Workers of a stopped parent may outlive it in the same group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.pid, signal.SIGKILL)


def _check_alive(service: Service) -> None:
    if service.proc.poll() is not None:
        raise RuntimeError(
            f"{service.name} exited with {service.proc.returncode} during start-up:\n"
            f"{service.log_tail()}"
        )


def wait_http(service: Service, url: str, timeout: float) -> None:
    """Poll `url` until it answers 200; raise if the service dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(service)
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(
        f"{service.name} not ready at {url} after {timeout:.0f}s:\n{service.log_tail()}"
    )


def wait_port(service: Service, port: int, timeout: float) -> None:
    """Wait until 127.0.0.1:<port> accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(service)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(
        f"{service.name} not listening on {port} after {timeout:.0f}s:\n{service.log_tail()}"
    )
