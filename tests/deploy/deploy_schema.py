"""Offline validation of Kubernetes manifests: KubeRay custom resources against their CRDs' openAPIV3Schema, made
strict; core objects with kubernetes-validate; Ray Serve configs against Serve's pydantic schema, made strict.

The API server prunes (or, with kubectl's default field validation, rejects) fields a structural schema does not
declare; a plain JSON Schema validator would accept them, because CRD schemas leave `additionalProperties` unset.
``strict_schema`` closes every object schema that lists its properties, unless it keeps unknown fields
(`x-kubernetes-preserve-unknown-fields`), and turns the Kubernetes extensions a validator can check into JSON Schema:
`x-kubernetes-int-or-string`, `nullable`, `x-kubernetes-embedded-resource`, and list types `map` / `set` (entries
unique by their keys). Not checked offline: CEL rules (`x-kubernetes-validations`) and defaulting.
"""

from __future__ import annotations

import functools
import json
import typing
from pathlib import Path

import jsonschema
import yaml
from jsonschema import FormatChecker, ValidationError, validators

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


# -- CRD schemas -----------------------------------------------------------------------------------------------
def strict_schema(schema: dict) -> dict:
    """A copy of a CRD's structural schema in which undeclared fields are errors (see the module docstring)."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {name: strict_schema(sub) for name, sub in s["properties"].items()}
    for key in ("items", "not", "additionalProperties"):
        if isinstance(s.get(key), dict):
            s[key] = strict_schema(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict_schema(sub) for sub in s[key]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s and "type" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-embedded-resource"):
        s["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                           "metadata": {"type": "object"}, **s.get("properties", {})}
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    return s


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: `set` entries are unique; `map` entries are unique by `x-kubernetes-list-map-keys`
    (a missing key counts as its schema default, as the API server defaults it first, e.g. protocol: TCP)."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = set()
        for item in instance:
            key = json.dumps(item, sort_keys=True)
            if key in seen:
                yield ValidationError(f"duplicate entry {item!r} in a list of type set")
            seen.add(key)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        key_schemas = schema.get("items", {}).get("properties", {})
        first: dict[tuple, int] = {}
        for i, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k, key_schemas.get(k, {}).get("default"))) for k in keys)
            if key in first:
                named = {k: item.get(k, key_schemas.get(k, {}).get("default")) for k in keys}
                yield ValidationError(f"entries {first[key]} and {i} have the same keys {named}")
            first.setdefault(key, i)


_format_checker = FormatChecker()


@_format_checker.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_format_checker.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubeValidator = validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


class CustomResourceSchemas:
    """apiVersion + kind -> a strict validator, from a folder of CRD YAMLs (served versions only)."""

    def __init__(self, crd_dir: Path) -> None:
        self._schemas: dict[tuple[str, str], dict] = {}
        for path in sorted(crd_dir.glob("*.yaml")):
            for crd in load_documents(path):
                if crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    if version.get("served", True):
                        self._schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]

    def kinds(self) -> set[tuple[str, str]]:
        return set(self._schemas)

    @functools.cache
    def validator(self, api_version: str, kind: str) -> jsonschema.protocols.Validator:
        try:
            schema = self._schemas[(api_version, kind)]
        except KeyError:
            raise LookupError(f"no CRD here serves {kind} {api_version}; known: {sorted(self._schemas)}") from None
        return KubeValidator(strict_schema(schema), format_checker=_format_checker)

    def errors(self, doc: dict) -> list[str]:
        """Every violation in ``doc``, each as 'path: message' ('' when the document is valid)."""
        found = self.validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)
        return [f"{_path(e)}: {e.message}" for e in sorted(found, key=lambda e: list(map(str, e.absolute_path)))]


def _path(error: ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "."


# -- Ray Serve config ---------------------------------------------------------------------------------------------
def unknown_keys(model, data, path: str = "") -> list[str]:
    """Keys of ``data`` that the pydantic (v2) ``model`` does not declare, recursively through nested models.

    Serve's config schemas accept unknown keys on purpose (forward compatibility), so a misspelt option in
    serveConfigV2 would otherwise be dropped without a word."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    by_name = {**{f.alias: f for f in fields.values() if f.alias}, **fields}
    found = []
    for key, value in data.items():
        field = by_name.get(key)
        if field is None:
            found.append(f"{path}{key}")
            continue
        models = _models_in(field.annotation)
        if len(models) != 1:  # free-form (dict, Any) or ambiguous unions: nothing to check
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                found += unknown_keys(models[0], item, f"{path}{key}[{i}].")
        else:
            found += unknown_keys(models[0], value, f"{path}{key}.")
    return found


def _models_in(annotation) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
