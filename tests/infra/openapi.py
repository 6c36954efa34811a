"""Validate JSON bodies against OpenAI's official OpenAPI description.

The description lives beside the repository (``<repo>/../shared/openai/openapi.json``); the
``LMGATE_OPENAPI_SPEC`` environment variable names another file.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft4Validator, Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match, by_relevance
from jsonschema.protocols import Validator
from referencing import Registry
from referencing.jsonschema import DRAFT4, DRAFT202012

DEFAULT_SPEC = Path(__file__).resolve().parents[3] / "shared/openai/openapi.json"
_SPEC_URI = "urn:lmgate:openai-openapi"
_MAX_ERRORS = 5


def spec_path() -> Path:
    """The OpenAPI description in use."""
    return Path(os.environ.get("LMGATE_OPENAPI_SPEC", DEFAULT_SPEC))


def _allow_null(node: Any) -> Any:
    """Rewrite OpenAPI 3.0's ``nullable: true`` as JSON Schema, recursively.

    The schema is wrapped in ``anyOf [null, schema]`` rather than given a ``"null"`` type, so
    that a nullable ``enum`` or ``$ref`` accepts null too.
    """
    if isinstance(node, list):
        return [_allow_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    rewritten = {key: _allow_null(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [{"type": "null"}, rewritten]}
    return rewritten


@cache
def _prepared() -> tuple[type[Validator], Registry[Any]]:
    """Load the description once; pick the dialect its OpenAPI version implies."""
    path = spec_path()
    if not path.is_file():
        raise FileNotFoundError(f"OpenAPI description not found: {path} (set LMGATE_OPENAPI_SPEC)")
    document = json.loads(path.read_bytes())
    version = str(document.get("openapi", ""))
    if version.startswith("3.1"):
        validator_class, specification = Draft202012Validator, DRAFT202012
    elif version.startswith("3.0"):
        validator_class, specification = Draft4Validator, DRAFT4
    else:
        raise ValueError(f"{path}: unsupported OpenAPI version {version!r}")
    resource = specification.create_resource(_allow_null(document))
    return validator_class, Registry().with_resource(_SPEC_URI, resource)


@cache
def _validator(schema_name: str) -> Validator:
    validator_class, registry = _prepared()
    schemas = registry.contents(_SPEC_URI)["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"no schema {schema_name!r} in components.schemas of {spec_path()}")
    schema = {"$ref": f"{_SPEC_URI}#/components/schemas/{schema_name}"}
    return validator_class(schema, registry=registry)


def validate(schema_name: str, instance: object) -> None:
    """Assert that ``instance`` matches ``components.schemas[schema_name]``.

    Raises AssertionError listing the most relevant errors, each with its JSON path.
    """
    errors = sorted(_validator(schema_name).iter_errors(instance), key=by_relevance(), reverse=True)
    if not errors:
        return
    # best_match descends into anyOf/oneOf to the failure of the branch that fits best.
    lines = [f"  {e.json_path}: {_shorten(e.message)}" for e in map(_deepest, errors[:_MAX_ERRORS])]
    if len(errors) > _MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - _MAX_ERRORS} more")
    raise AssertionError(f"does not match {schema_name}:\n" + "\n".join(lines))


def _deepest(error: ValidationError) -> ValidationError:
    return best_match([error]) or error


def _shorten(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
