"""Launchers: one per scheduler, behind the `Launcher` interface of `base.py`."""

from __future__ import annotations

from lmgate.backends.config import LocalBackendConfig, SlurmBackendConfig
from lmgate.backends.launchers.base import Launcher
from lmgate.backends.launchers.local import LocalLauncher
from lmgate.backends.launchers.runners import CommandRunner, LocalRunner, SshRunner
from lmgate.backends.launchers.slurm import SlurmLauncher


def make_launcher(config: SlurmBackendConfig | LocalBackendConfig) -> Launcher:
    """The launcher a backend configuration asks for."""
    if isinstance(config, LocalBackendConfig):
        return LocalLauncher(config.log_dir)
    runner: CommandRunner = SshRunner(config.ssh) if config.ssh else LocalRunner()
    return SlurmLauncher(runner)
