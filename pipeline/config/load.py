"""Loading a run config: YAML or a dict or the embedded demo, `--set a.b=v` overrides (v parsed
as YAML), and validation errors told in one line (`config: select.0.budget: ...`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import CurateError

from .distill import DISTILL_METHODS
from .embed import resolve_paths
from .run import RunConfig
from .select import SELECT_METHODS

# The demo (`make demo`, `curate run` without a config): digits with 10% of the training labels
# flipped (pipeline.ingest.DEMO_DATASET), the proxy's embeddings and dynamics, two scores that find
# the flips, and craig beside a cleaned pool at 10% and 30%, all trained for the same optimiser
# steps. Its printed summary is computed from the report (pipeline.summary), and
# tests/acceptance/test_demo.py fails if its claims stop holding.
DEMO_CONFIG: dict[str, Any] = {
    "run": "runs/demo",
    "dataset": "digits-noisy",
    "seed": 0,
    "embed": {"method": "proxy", "epochs": 5},
    "score": {"methods": ["knn_shapley", "forgetting"]},
    "select": [
        {"method": "craig", "budget": [0.1, 0.3]},
        {"method": "clean", "score": "knn_shapley", "fraction": 0.1},
        {"method": "craig", "budget": 0.1, "pool": "clean-knn_shapley-0.1", "name": "clean-craig-0.1"},
        {"method": "craig", "budget": 0.3, "pool": "clean-knn_shapley-0.1", "name": "clean-craig-0.3"},
    ],
    "materialize": {"register_entry": False},  # `make demo` leaves the repository's catalog as it is
    "verify": {"recipe": "small_cnn", "steps": 500, "seeds": 2, "batch_size": 64, "lr": 0.05},
}


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (list items by index: `select.0.budget=0.2`) in place."""
    if "=" not in assignment:
        raise CurateError(f"--set {assignment!r}: expected key=value")
    path, _, text = assignment.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise CurateError(f"--set {assignment!r}: value is not valid YAML") from None
    keys = path.strip().split(".")
    node: Any = raw
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise CurateError(f"--set {path}: '{k}' is not an index of a {len(node)}-item list")
            k = int(k)
            if last:
                node[k] = value
            else:
                node = node[k]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {})
        else:
            raise CurateError(f"--set {path}: '{keys[i - 1]}' is not a section")


def one_line(exc: ValidationError) -> str:
    """The first validation error as `config: <where>: <why>`, where the spec unions' method
    tags are left out of the path (select.0.craig.eps reads select.0.eps)."""
    err = exc.errors()[0]
    parts = list(err["loc"])
    if len(parts) > 2 and parts[0] == "select" and parts[2] in SELECT_METHODS:
        del parts[2]
    if len(parts) > 3 and parts[:2] == ["distill", "specs"] and parts[3] in DISTILL_METHODS:
        del parts[3]  # distill.specs.0.mtt.ipc reads distill.specs.0.ipc
    loc = "".join(f"{p}: " if i == len(parts) - 1 else f"{p}." for i, p in enumerate(parts))
    msg = err["msg"].removeprefix("Value error, ")
    return f"config: {loc}{msg}"


def load_config(source: str | Path | dict | None = None, overrides: list[str] = ()) -> RunConfig:
    """Config from a YAML path, a dict, or the embedded demo; then `--set` overrides.

    A relative `run:` (and embed.path, keys, text_path) in a config file is relative to that file's
    folder (a scheduled run's working directory is the worker's, not yours); in a dict or the demo,
    to the current one."""
    if source is None:
        raw = yaml.safe_load(yaml.safe_dump(DEMO_CONFIG))
    elif isinstance(source, dict):
        raw = yaml.safe_load(yaml.safe_dump(source))
    else:
        p = Path(source)
        if not p.exists():
            raise CurateError(f"config {p}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CurateError(f"config {p}: not valid YAML: {str(exc).splitlines()[0]}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    if isinstance(source, (str, Path)) and isinstance(raw, dict) and isinstance(raw.get("run"), str):
        raw["run"] = os.path.normpath(Path(source).absolute().parent / raw["run"])
    if isinstance(source, (str, Path)) and isinstance(raw, dict):
        resolve_paths(raw, Path(source).absolute().parent)  # embed.path, keys, text_path likewise
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise CurateError(one_line(exc)) from None
