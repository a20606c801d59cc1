"""What every section shares: the strict base model, budgets, spec lists and unit names."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt

from pipeline.sampling import budget_problem

DEVICE = str  # "auto" | "cpu" | "cuda" | "cuda:1" ...


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


Budget = StrictInt | StrictFloat


def check_budget(budget: Budget) -> Budget:
    """Range checks that need no dataset: 0 < fraction <= 1, count >= 1 (pipeline.sampling's rule)."""
    problem = budget_problem(budget)
    if problem:
        raise ValueError(problem)
    return budget


def check_fraction(budget: float) -> float:
    """A budget that is always a fraction of the data, in (0, 1]."""
    problem = budget_problem(budget, counts=False)
    if problem:
        raise ValueError(problem)
    return budget


def expand_budgets(v, key: str = "budget"):
    """One spec or a list; a spec whose `key` (budget, ipc) is a list becomes one spec per value."""
    specs = v if isinstance(v, list) else [v]
    out = []
    for spec in specs:
        if isinstance(spec, dict) and isinstance(spec.get(key), list):
            if spec.get("name"):
                raise ValueError(f"a spec with a list of {'budgets' if key == 'budget' else key} cannot set one 'name'")
            out += [{**spec, key: b} for b in spec[key]]
        else:
            out.append(spec)
    return out


def method_names(spec_types) -> tuple[str, ...]:
    """The `method` tag of each spec class (its `Literal["name"]`), in order."""
    return tuple(c.model_fields["method"].annotation.__args__[0] for c in spec_types)


SAFE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")


def check_names(kind: str, names: list[str]) -> None:
    """Unit names become one directory name each (`select/<name>`): unique, letters, digits and
    _ . + - only, and no leading dot, so `.` and `..` (the parent!) and hidden names cannot occur."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{kind} names repeat: {', '.join(dup)} (set 'name' to tell them apart)")
    bad = [n for n in names if not SAFE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"{kind} name {bad[0]!r} must be one path component: letters, digits and _ . + -, "
                         "not starting with a dot")
