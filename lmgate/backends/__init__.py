"""Managed backends: models served by workers the gateway launches, balances and stops.

`manager.BackendManager` is the one entry point the gateway uses; `launchers/` holds one
launcher per scheduler (SLURM, local processes); `config.py` the configuration.
"""
