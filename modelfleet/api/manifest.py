"""Reading ModelDeployment manifests: YAML in, a validated object or every problem at once out."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from modelfleet.api.rules import NAME_RULE_MESSAGE, RULES, objects_at
from modelfleet.api.spec import (
    API_VERSION,
    KIND,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    ModelDeploymentSpec,
)
from modelfleet.api.status import ModelDeploymentStatus


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: the field path and what would be valid."""

    path: str
    message: str

    def __str__(self) -> str:
        if not self.path or self.message.startswith(self.path):
            return self.message
        return f"{self.path}: {self.message}"


class ManifestError(ValueError):
    """A manifest that is not a valid ModelDeployment; `problems` lists every reason."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(f"{prefix}{p}" for p in problems))


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta modelfleet reads; other metadata passes through untouched."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


class ModelDeployment(BaseModel):
    """A whole ModelDeployment object: apiVersion, kind, metadata, spec and status."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["modelfleet.dev/v1alpha1"]
    kind: Literal["ModelDeployment"]
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None

    @property
    def served_name(self) -> str:
        """The model name in /v1/models and in requests."""
        return self.spec.model.served_name or self.metadata.name

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @classmethod
    def parse(cls, doc: Any, source: str | None = None) -> ModelDeployment:
        """Validate a document; raise ManifestError listing every problem."""
        return parse_manifest(doc, source)

    def to_manifest(self) -> dict[str, Any]:
        """The object as a camelCase manifest, without defaults the user did not write."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-"):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """The camelCase keys allowed at the object holding `loc[-1]`."""
    from modelfleet.api.reference import model_of

    model: type[BaseModel] | None = ModelDeployment
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        model = model_of(fields[part].annotation) if part in fields else None
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _describe(error: dict[str, Any]) -> Problem:
    loc = tuple(error["loc"])
    path = _path(loc)
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        valid = _valid_keys(loc)
        key = str(loc[-1])
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return Problem(path, f"unknown field; {hint}valid fields here: {', '.join(valid)}")
    if kind == "missing":
        return Problem(path, "required field is missing")
    if path == "apiVersion":
        return Problem(path, f"{given!r} is not supported; use apiVersion: {API_VERSION}")
    if path == "kind":
        return Problem(path, f"{given!r} is not supported; use kind: {KIND}")
    if path == "metadata.name" and kind in ("string_pattern_mismatch", "string_too_long"):
        return Problem(path, NAME_RULE_MESSAGE)
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return Problem(path, f"{given!r} is not allowed; use one of {expected}")
    if kind == "string_pattern_mismatch":
        return Problem(path, f"{given!r} is not valid; {_pattern_hint(path)}")
    if kind == "value_error":
        return Problem(path, error["msg"].removeprefix("Value error, "))
    message = error["msg"].replace("Input should be", "must be")
    return Problem(path, f"{message} (got {given!r})")


def _pattern_hint(path: str) -> str:
    hints = {
        "spec.model.uri": "use builtin://tiny-llama, hf://org/name[@revision], file:///path, "
        "pvc://claim/path or an absolute path",
        "spec.model.servedName": "use letters, digits and . _ : / -, starting with a letter or digit",
        "spec.resources.gpu.resourceName": "use an extended resource name such as nvidia.com/gpu",
        "spec.resources.gpu.product": "use a label value such as NVIDIA-H100-80GB-HBM3",
        "spec.autoscaling.prometheusUrl": "use an http:// or https:// URL",
        "spec.image": "an image reference has no spaces",
    }
    for prefix, hint in hints.items():
        if path.startswith(prefix):
            return hint
    if path.endswith(("Secret", "Ref.name", "priorityClassName")):
        return "use a DNS subdomain: lowercase letters, digits, '-' and '.'"
    return "see `modelfleet crd` for the allowed form"


def validation_problems(doc: Any) -> tuple[ModelDeployment | None, list[Problem]]:
    """Validate a document; return the object (when valid) and every problem found."""
    if not isinstance(doc, dict):
        kind = type(doc).__name__ if doc is not None else "nothing"
        return None, [Problem("", f"expected a ModelDeployment mapping, found {kind}")]
    problems: list[Problem] = []
    obj: ModelDeployment | None = None
    try:
        obj = ModelDeployment.model_validate(doc)
    except ValidationError as err:
        problems.extend(_describe(e) for e in err.errors())
    for rule in RULES:
        for path, raw in objects_at(doc, rule.scope):
            try:
                value = rule.model.model_validate(raw) if rule.model else raw
            except ValidationError:
                continue  # its field errors are already listed
            message = rule.check(value)
            if message:
                problems.append(Problem(f"{path}.{rule.field}", message))
    if problems:
        return None, problems
    return obj, []


def parse_manifest(doc: Any, source: str | None = None) -> ModelDeployment:
    """A validated ModelDeployment, or ManifestError with every problem."""
    obj, problems = validation_problems(doc)
    if problems or obj is None:
        raise ManifestError(problems, source)
    return obj


def read_document(path: str | Path) -> Any:
    """The single YAML document in a file; ManifestError with one clear line otherwise."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([Problem("", "no such file")], source) from None
    except IsADirectoryError:
        raise ManifestError([Problem("", "is a directory, not a manifest file")], source) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError([Problem("", f"cannot read: {err}")], source) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ManifestError([Problem("", f"not valid YAML{where}: {what}")], source) from None
    if not docs:
        raise ManifestError([Problem("", "empty file: expected one ModelDeployment document")], source)
    if len(docs) > 1:
        raise ManifestError(
            [
                Problem(
                    "",
                    f"holds {len(docs)} YAML documents; put one ModelDeployment in each file",
                )
            ],
            source,
        )
    return docs[0]


def load_manifest(path: str | Path) -> ModelDeployment:
    """Read and validate a ModelDeployment manifest file."""
    return parse_manifest(read_document(path), str(path))
