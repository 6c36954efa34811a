"""Backend configuration: validation, and the job scripts rendered from it (the examples too)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from lmgate.backends.config import BackendConfig, LocalBackendConfig, SlurmBackendConfig
from lmgate.backends.jobs import Launch, build_job

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "slurm"
ADAPTER: TypeAdapter[Any] = TypeAdapter(BackendConfig)
LAUNCH = Launch("llama", "abc123", 23456, "s3cret", "http://gw:4000")


def test_the_type_picks_the_launcher_and_unknown_keys_are_refused() -> None:
    assert isinstance(
        ADAPTER.validate_python({"type": "local", "command": "x"}), LocalBackendConfig
    )
    assert isinstance(
        ADAPTER.validate_python({"type": "slurm", "command": "x"}), SlurmBackendConfig
    )
    with pytest.raises(ValidationError, match="gpu"):
        ADAPTER.validate_python({"type": "slurm", "command": "x", "gpu": 1})
    with pytest.raises(ValidationError, match="min_instances"):
        ADAPTER.validate_python({"type": "local", "command": "x", "min_instances": 3})
    with pytest.raises(ValidationError, match="walltime_margin"):
        ADAPTER.validate_python({"type": "slurm", "command": "x", "walltime": "10"})
    with pytest.raises(ValidationError, match="walltime must be"):
        ADAPTER.validate_python({"type": "slurm", "command": "x", "walltime": "soon"})
    with pytest.raises(ValidationError, match="needs `command`"):
        ADAPTER.validate_python({"type": "local"})


def test_the_default_script_exports_the_registration_variables() -> None:
    config = SlurmBackendConfig(command="serve {{ model_path }} --port {{ port }}", qos="high",
                                gpus=2, walltime="1:00:00", walltime_margin=60)  # fmt: skip
    spec = build_job(config, LAUNCH, Path.cwd())
    assert spec.script.startswith("#!/bin/bash")
    assert "export LMGATE_REGISTER_SECRET=s3cret" in spec.script
    assert "export LMGATE_REGISTER_URL=http://gw:4000/internal/backends/register" in spec.script
    assert "serve llama --port 23456" in spec.script
    assert "--qos=high" in spec.options and "--gres=gpu:2" in spec.options
    assert spec.name == "lmgate-llama"
    with pytest.raises(ValueError, match="job template"):
        build_job(SlurmBackendConfig(command="{{ nope }}"), LAUNCH, Path.cwd())


def test_the_vllm_example_renders_to_valid_bash() -> None:
    models = yaml.safe_load((EXAMPLES / "lmgate-slurm.yaml").read_text())["models"]
    for model in models:
        config = ADAPTER.validate_python(model["backend"])
        spec = build_job(config, LAUNCH, EXAMPLES)
        subprocess.run(["bash", "-n"], input=spec.script, text=True, check=True)
    vllm = build_job(ADAPTER.validate_python(models[0]["backend"]), LAUNCH, EXAMPLES)
    assert "vllm serve /shared/models/Meta-Llama-3.1-70B-Instruct" in vllm.script
    assert "--tensor-parallel-size 4" in vllm.script and "--port 23456" in vllm.script
