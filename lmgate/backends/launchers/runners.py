"""Where scheduler commands run: on this machine, or on a login host over SSH.

The SLURM launcher builds the same argument vectors for both; only the transport differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmgate.backends.config import SshConfig

COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class CommandResult:
    """A finished command."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.returncode == 0


class CommandError(Exception):
    """A command could not be run at all (missing binary, SSH down, timeout)."""


class CommandRunner(Protocol):
    """Runs a command and returns its exit status and output."""

    async def run(
        self, argv: list[str], stdin: str | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> CommandResult:
        """Run `argv` with `stdin` as its input."""
        ...

    def describe(self) -> str:
        """Where the commands run."""
        ...

    async def close(self) -> None:
        """Release the transport."""
        ...


class LocalRunner:
    """Runs commands as subprocesses of the gateway."""

    async def run(
        self, argv: list[str], stdin: str | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> CommandResult:
        """Run `argv` locally."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise CommandError(f"cannot run {argv[0]}: {e}") from e
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), timeout
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise CommandError(f"{argv[0]} did not finish within {timeout:g} s") from None
        return CommandResult(proc.returncode or 0, out.decode(), err.decode())

    def describe(self) -> str:
        """`local`."""
        return "local"

    async def close(self) -> None:
        """Nothing to release."""


class SshRunner:
    """Runs commands on a login host over one kept-alive SSH connection (asyncssh).

    Key authentication only; the host key is checked against `known_hosts`.
    """

    def __init__(self, config: SshConfig) -> None:
        self.config = config
        self.user = config.user or getpass.getuser()
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> Any:
        import asyncssh

        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            c = self.config
            options: dict[str, Any] = {
                "username": self.user,
                "port": c.port,
                "password": None,
                "kbdint_auth": False,
                "connect_timeout": c.connect_timeout,
                "keepalive_interval": 30,
            }
            if c.key_file:
                options["client_keys"] = [str(Path(c.key_file).expanduser())]
            if c.known_hosts:
                options["known_hosts"] = str(Path(c.known_hosts).expanduser())
            try:
                self._conn = await asyncssh.connect(c.host, **options)
            except (OSError, asyncssh.Error) as e:
                raise CommandError(f"ssh {self.describe()}: {e}") from e
            return self._conn

    async def run(
        self, argv: list[str], stdin: str | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> CommandResult:
        """Run `argv` on the login host (reconnecting once if the connection dropped)."""
        import asyncssh

        command = shlex.join(argv)
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                result = await conn.run(command, input=stdin, check=False, timeout=timeout)
            except asyncssh.TimeoutError:
                raise CommandError(f"{argv[0]} did not finish within {timeout:g} s") from None
            except (OSError, asyncssh.Error) as e:
                self._conn = None
                if attempt == 2:
                    raise CommandError(f"ssh {self.describe()}: {e}") from e
                continue
            status = result.exit_status if result.exit_status is not None else 255
            return CommandResult(status, _text(result.stdout), _text(result.stderr))
        raise AssertionError("unreachable")

    def describe(self) -> str:
        """`ssh user@host:port`."""
        return f"ssh {self.user}@{self.config.host}:{self.config.port}"

    async def close(self) -> None:
        """Close the SSH connection."""
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await self._conn.wait_closed()
            self._conn = None


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
