"""An upstream HTTP server that the test process can reach only through real proxies.

The upstream, a private sshd and tinyproxy listen on 127.0.0.1 inside a fresh network
namespace. socat bridges sshd and tinyproxy (never the upstream) to the host's loopback, and
``ssh -D`` against the bridged sshd makes a real SOCKS5 proxy::

    test --SOCKS5--> ssh -D ==socat==> sshd -------+
    test --HTTP----------------socat==> tinyproxy --+--> upstream   (inside the namespace)

The name ``upstream.lmgate.test`` resolves to 127.0.0.1 inside the namespace only (through
``/etc/netns/<name>/hosts``, which ``ip netns exec`` mounts over /etc/hosts): a request naming it
succeeds only if the proxy resolves the name, as with ``socks5h``.

Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN) and ip, socat, ssh, ssh-keygen, sshd, tinyproxy.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

TOOLS = ("ip", "socat", "ssh", "ssh-keygen", "sshd", "tinyproxy")
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# The namespace is empty, so fixed ports inside it cannot collide.
_SSHD_PORT = 2222
_PROXY_PORT = 8888
_LOG_TAIL_LINES = 40
UPSTREAM_HOSTNAME = "upstream.lmgate.test"


class IsolationError(RuntimeError):
    """Setting up the isolated upstream failed; the message carries the daemons' logs."""


@dataclass(frozen=True)
class IsolatedUpstream:
    """Addresses of an isolated upstream and of the proxies that reach it."""

    upstream_host_port: str
    """``127.0.0.1:PORT`` as seen inside the namespace (and by the proxies)."""
    upstream_named_host_port: str
    """``upstream.lmgate.test:PORT``: the same server, by a name only the proxies resolve."""
    socks5_url: str
    http_proxy_url: str
    proxy_log_path: Path
    """tinyproxy's log: one ``Request (file descriptor N): GET http://...`` line per request."""

    @property
    def upstream_url(self) -> str:
        return f"http://{self.upstream_host_port}"


@cache
def _tool(name: str) -> str:
    """The absolute path of ``name``, looking in /usr/sbin and /sbin too."""
    path = shutil.which(name, path=_SBIN_PATH)
    if path is None:
        raise IsolationError(f"{name} not found")
    return path


@cache
def _netns_problem() -> str | None:
    """Why network namespaces cannot be used here, or None if they can."""
    missing = [name for name in TOOLS if shutil.which(name, path=_SBIN_PATH) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    probe = f"lmgate-probe-{secrets.token_hex(4)}"
    added = subprocess.run([_tool("ip"), "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"cannot create a network namespace: {added.stderr.strip()}"
    subprocess.run([_tool("ip"), "netns", "del", probe], capture_output=True)
    return None


def netns_available() -> bool:
    """Whether this process can create network namespaces and has every tool needed."""
    return _netns_problem() is None


def require_netns() -> None:
    """Skip the calling test if namespaces are unavailable; fail it instead when CI=true."""
    problem = _netns_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"isolated upstream unavailable in CI: {problem}")
    pytest.skip(f"isolated upstream unavailable: {problem}")


@contextlib.contextmanager
def isolated_upstream(
    upstream_argv_factory: Callable[[int], Sequence[str]],
    *,
    cwd: Path | None = None,
    timeout: float = 15.0,
) -> Iterator[IsolatedUpstream]:
    """Run ``upstream_argv_factory(port)`` in a new namespace, reachable only through the proxies.

    The command must listen on 127.0.0.1:port. Everything is ready on entry (within
    ``timeout`` seconds, else IsolationError) and is torn down on exit, even on failure.
    """
    with contextlib.ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="lmgate-isolated-"))
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        namespace = f"lmgate-{secrets.token_hex(4)}"
        _run(_tool("ip"), "netns", "add", namespace)
        cleanup.callback(_delete_namespace, namespace)
        _write_namespace_hosts(namespace)
        _run(_tool("ip"), "-n", namespace, "link", "set", "lo", "up")
        daemons = _Daemons(workdir, timeout)
        cleanup.callback(daemons.stop)

        upstream_port, sshd_bridge, proxy_bridge, socks_port = _free_ports(4)
        sshd_config = _write_sshd_files(workdir)
        proxy_config, proxy_log = _write_tinyproxy_config(workdir)

        in_ns = [_tool("ip"), "netns", "exec", namespace]
        daemons.start("upstream", [*in_ns, *upstream_argv_factory(upstream_port)], cwd=cwd)
        daemons.start("sshd", [*in_ns, _tool("sshd"), "-D", "-e", "-f", str(sshd_config)])
        daemons.start("tinyproxy", [*in_ns, _tool("tinyproxy"), "-d", "-c", str(proxy_config)])
        daemons.start("sshd-bridge", _bridge(namespace, sshd_bridge, _SSHD_PORT))
        daemons.start("tinyproxy-bridge", _bridge(namespace, proxy_bridge, _PROXY_PORT))

        daemons.wait_until("sshd", lambda: _accepts_in(namespace, _SSHD_PORT))
        daemons.wait_until("the sshd bridge", lambda: _accepts(sshd_bridge))
        daemons.start("ssh-socks", _ssh_socks(workdir / "clientkey", socks_port, sshd_bridge))
        daemons.wait_until("tinyproxy", lambda: _accepts_in(namespace, _PROXY_PORT))
        daemons.wait_until("the tinyproxy bridge", lambda: _accepts(proxy_bridge))
        daemons.wait_until("the upstream", lambda: _accepts_in(namespace, upstream_port))
        daemons.wait_until("ssh -D (SOCKS5)", lambda: _accepts(socks_port))
        _assert_refused_on_host(upstream_port)

        yield IsolatedUpstream(
            upstream_host_port=f"127.0.0.1:{upstream_port}",
            upstream_named_host_port=f"{UPSTREAM_HOSTNAME}:{upstream_port}",
            socks5_url=f"socks5://127.0.0.1:{socks_port}",
            http_proxy_url=f"http://127.0.0.1:{proxy_bridge}",
            proxy_log_path=proxy_log,
        )


class _Daemons:
    """The processes behind one isolated upstream: start, readiness, logs, teardown."""

    def __init__(self, workdir: Path, timeout: float) -> None:
        self._workdir = workdir
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> None:
        """Start ``argv`` in its own process group, its output in ``<name>.log``."""
        with (self._workdir / f"{name}.log").open("ab") as output:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        self._started.append((name, process))

    def wait_until(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll ``ready`` until true; raise with the logs if a daemon dies or time runs out."""
        while not ready():
            for name, process in self._started:
                if process.poll() is not None:
                    raise IsolationError(
                        f"{name} exited with status {process.returncode} "
                        f"while waiting for {what}\n{self.logs(first=name)}"
                    )
            if time.monotonic() > self._deadline:
                raise IsolationError(f"{what} not ready within {self._timeout} s\n{self.logs()}")
            time.sleep(0.01)

    def logs(self, first: str | None = None) -> str:
        """The tail of every log in the work directory, ``<first>.log`` first."""
        paths = sorted(self._workdir.glob("*.log"), key=lambda p: (p.stem != first, p.name))
        sections = []
        for path in paths:
            lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
            sections.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(sections)

    def stop(self) -> None:
        """Terminate every process group started, newest first; kill those that linger."""
        for _, process in reversed(self._started):
            _signal_group(process, signal.SIGTERM)
        for _, process in reversed(self._started):
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise IsolationError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def _namespace_etc(namespace: str) -> Path:
    return Path("/etc/netns") / namespace


def _write_namespace_hosts(namespace: str) -> None:
    """An /etc/hosts for the namespace's processes, naming the upstream."""
    etc = _namespace_etc(namespace)
    etc.mkdir(parents=True)
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {UPSTREAM_HOSTNAME}\n")


def _delete_namespace(namespace: str) -> None:
    """Kill what still runs in the namespace (such as sshd's session children), then delete it."""
    pids = subprocess.run([_tool("ip"), "netns", "pids", namespace], capture_output=True, text=True)
    for pid in pids.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    shutil.rmtree(_namespace_etc(namespace), ignore_errors=True)
    _run(_tool("ip"), "netns", "del", namespace)


def _free_ports(count: int) -> list[int]:
    """Distinct ports that nothing listens on in the host namespace right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _write_sshd_files(workdir: Path) -> Path:
    """Host and client keys, authorized_keys and an sshd_config that touch nothing in /etc."""
    keygens = [
        subprocess.Popen(
            [_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / key)],
            stdin=subprocess.DEVNULL,
        )
        for key in ("hostkey", "clientkey")
    ]
    if any(keygen.wait() != 0 for keygen in keygens):
        raise IsolationError("ssh-keygen failed")
    shutil.copy(workdir / "clientkey.pub", workdir / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    config = workdir / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {_SSHD_PORT}\n"
        f"HostKey {workdir / 'hostkey'}\nPidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nAllowTcpForwarding yes\nStrictModes no\n"
    )
    return config


def _write_tinyproxy_config(workdir: Path) -> tuple[Path, Path]:
    """A tinyproxy config and its log path. With no ConnectPort line, CONNECT reaches any port.

    Without User/Group tinyproxy keeps running as the current user (root here) and only warns;
    dropping to nobody would leave it unable to write its log in our private work directory.
    """
    config, log = workdir / "tinyproxy.conf", workdir / "proxy.log"
    config.write_text(
        f"Port {_PROXY_PORT}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 600\nMaxClients 200\n"
        f'LogLevel Info\nLogFile "{log}"\nPidFile "{workdir / "tinyproxy.pid"}"\n'
    )
    return config, log


def _bridge(namespace: str, host_port: int, namespace_port: int) -> list[str]:
    """socat forwarding host 127.0.0.1:host_port to 127.0.0.1:namespace_port in the namespace."""
    socat = _tool("socat")
    inner = f"{_tool('ip')} netns exec {namespace} {socat} STDIO TCP:127.0.0.1:{namespace_port}"
    return [
        socat,
        f"TCP-LISTEN:{host_port},bind=127.0.0.1,reuseaddr,fork",
        f'EXEC:"{inner}"',  # quoted: socat would split the inner address at its colons
    ]


def _ssh_socks(client_key: Path, socks_port: int, sshd_port: int) -> list[str]:
    options = {
        "StrictHostKeyChecking": "no",
        "UserKnownHostsFile": "/dev/null",
        "ExitOnForwardFailure": "yes",
        "BatchMode": "yes",
        "IdentitiesOnly": "yes",
        "LogLevel": "ERROR",
    }
    return [
        _tool("ssh"),
        *("-F", "/dev/null", "-N", "-D", f"127.0.0.1:{socks_port}"),
        *("-p", str(sshd_port), "-i", str(client_key)),
        *(arg for key, value in options.items() for arg in ("-o", f"{key}={value}")),
        "root@127.0.0.1",
    ]


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port in the host namespace."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _accepts_in(namespace: str, port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port inside ``namespace``."""
    probe = [_tool("ip"), "netns", "exec", namespace, _tool("socat"), "-u", "OPEN:/dev/null"]
    result = subprocess.run(
        [*probe, f"TCP:127.0.0.1:{port}"], capture_output=True, timeout=5, check=False
    )
    return result.returncode == 0


def _assert_refused_on_host(port: int) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return
    raise IsolationError(f"127.0.0.1:{port} accepts connections in the host namespace")
