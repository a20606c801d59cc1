"""Method facts are stated once (spec classes, pipeline.methods) and every list of method names,
every select unit's upstream and every cross-section rule follows from them."""

import math
import re
import subprocess
import sys

import pytest

import pipeline.config as config
from pipeline.config import (DISTILL_METHODS, DISTILL_TYPES, SELECT_METHODS, SELECT_SPECS, SPEC_TYPES, check_dsa,
                             load_config)
from pipeline.errors import CurateError
from pipeline.methods import (DSA_DEFAULT, DSA_KINDS, NEEDS, ONLINE, ONLINE_METHODS, SCORE_METHODS, SCORES,
                              VALIDATED_SCORES, VALUE_SCORES, online_methods)
from pipeline.sampling import budget_count, budget_problem
from stages.registry import STAGES
from tests.helpers import fast_config

from tests.helpers import REPO

# the smallest valid spec of each method (beyond method and budget)
EXTRA = {"difficulty": {"score": "el2n"}, "ccs": {"score": "el2n"}, "clean": {"score": "el2n", "fraction": 0.1}}


def spec_of(method: str, **opts) -> dict:
    spec = {"method": method, "budget": 0.1, **EXTRA.get(method, {}), **opts}
    if method in ("dedup", "clean"):  # no budget: they keep what they do not drop
        spec.pop("budget")
    return spec


def config_with(tmp_path, *specs, **sections):
    sections.setdefault("score", {"methods": ["el2n"]})
    return load_config(fast_config(tmp_path, select=list(specs), **sections))


def readme_table(section: str) -> list[str]:
    """The backticked names in the first column of the README table under `## section`."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in body.splitlines() if line.startswith("| `")]
    return [name for cell in rows for name in re.findall(r"`([^`]+)`", cell)]


# ---------------------------------------------------------------- select


def test_select_methods_are_the_spec_classes_and_the_stage_dispatch():
    from stages.select import METHODS

    assert SELECT_METHODS == tuple(SELECT_SPECS) == tuple(METHODS)
    assert tuple(SELECT_SPECS.values()) == SPEC_TYPES
    for m, cls in SELECT_SPECS.items():
        assert cls.model_fields["method"].annotation.__args__ == (m,)


def test_every_method_in_the_readme_table_exists_and_every_method_is_there():
    named = readme_table("Selection methods")
    assert set(named) == set(SELECT_METHODS)
    assert set(readme_table("Scores")) <= set(SCORE_METHODS)


@pytest.mark.parametrize("method", SELECT_METHODS)
def test_needs_are_known_and_decide_the_upstream(tmp_path, method):
    cls = SELECT_SPECS[method]
    assert cls.needs <= set(NEEDS), f"{method} needs something no unit writes"
    cfg = config_with(tmp_path, spec_of(method))
    ups = STAGES["select"].upstream(cfg, cfg.select[0])
    assert ("embed" in ups) == any(NEEDS[n] == "embed" for n in cls.needs)
    assert ("score" in ups) == ("scores" in cls.needs)
    assert ups[0] == "index"


def test_upstream_examples(tmp_path):
    cfg = config_with(tmp_path, spec_of("craig", features="embeddings"), spec_of("difficulty"), spec_of("random"),
                      spec_of("craig", budget=0.05, pool="random-0.1", name="craig-in-random"))
    up = {s.sel_name: STAGES["select"].upstream(cfg, s) for s in cfg.select}
    assert up == {"craig-0.1": ["index", "embed"], "difficulty-0.1": ["index", "score"], "random-0.1": ["index"],
                  "craig-in-random": ["index", "embed", "select/random-0.1"]}


@pytest.mark.parametrize("method", SELECT_METHODS)
def test_weights_flag_decides_the_clip_recipe_rule(tmp_path, method):
    spec = spec_of(method, **({"threshold": 0.2, "budget": None} if method == "clipscore" else {}))
    sections = {"verify": {"recipe": "clip"}, "embed": {"method": "proxy_clip"}}
    if SELECT_SPECS[method].weights:
        with pytest.raises(CurateError, match=f"selection '{method}-0.1' has coreset weights"):
            config_with(tmp_path, spec, **sections)
    else:
        config_with(tmp_path, spec, **sections)


def test_captions_follow_from_needs(tmp_path):
    for method, cls in SELECT_SPECS.items():
        opts = {"threshold": 0.2, "budget": None} if method == "clipscore" else {}
        cfg = config_with(tmp_path, spec_of(method, **opts))
        assert cfg.uses_captions == ("captions" in cls.needs), method
    assert {m for m, c in SELECT_SPECS.items() if "captions" in c.needs} == config.CAPTION_METHODS
    assert "sas" not in config.CAPTION_METHODS  # image views, not captions
    for m in SCORE_METHODS:
        cfg = load_config(fast_config(tmp_path, select=[], score={"methods": [m]}))
        assert cfg.uses_captions == ("captions" in SCORES[m].needs), m
        assert cfg.needs_validation == (m in VALIDATED_SCORES)


# ---------------------------------------------------------------- scores, online, distill, DSA


def test_score_lists_come_from_the_registry():
    assert SCORE_METHODS == tuple(SCORES)
    assert VALUE_SCORES == {m for m, s in SCORES.items() if s.value} == {"knn_shapley", "influence", "clip"}
    assert VALIDATED_SCORES == {"knn_shapley", "influence"}
    for s in SCORES.values():
        assert s.needs <= set(NEEDS)
    assert config.ScoreConfig.model_fields["methods"].annotation.__args__[0].__args__ == SCORE_METHODS


def test_online_lists_come_from_the_registry():
    from stages.learn.online import PER_BATCH, make_selector
    from stages.learn.online.adaptive import METHODS as ADAPTIVE_KERNELS
    from stages.learn.online.per_batch import BASELINES

    assert config.OnlineSpec.model_fields["method"].annotation.__args__ == ONLINE_METHODS == tuple(ONLINE)
    assert PER_BATCH == online_methods("adaselection", "per_batch")
    assert BASELINES == online_methods("per_batch")
    assert tuple(ADAPTIVE_KERNELS) == online_methods("adaptive")
    for m, o in ONLINE.items():
        sel = make_selector(m, 0.25)
        assert sel.name == o.label_prefix + m
        spec = config.OnlineSpec(method=m, budget=0.25)
        assert spec.label == sel.name and spec.sel_name == f"{sel.name}-0.25"
        assert set(o.options) <= set(config.OnlineSpec.model_fields)
    with pytest.raises(ValueError, match="unknown"):
        make_selector("random", 0.25)


def test_distill_needs_decide_the_experts_unit(tmp_path):
    assert DISTILL_METHODS == tuple(c.model_fields["method"].annotation.__args__[0] for c in DISTILL_TYPES)
    cfg = load_config(fast_config(tmp_path, distill=[{"method": "mtt", "ipc": 1}, {"method": "dm", "ipc": 1}]))
    ups = {s.method: STAGES["distill"].upstream(cfg, s) for s in cfg.distill.specs}
    assert ups == {"mtt": ["index", "experts"], "dm": ["index"]}
    assert STAGES["experts"].units(cfg) == ["experts"]


def test_dsa_kinds_are_the_augment_kinds():
    from stages.learn import augment

    assert augment.KINDS == DSA_KINDS and set(augment.KEYS) == set(DSA_KINDS)
    assert augment.DEFAULT_KINDS == DSA_DEFAULT and augment.parse_kinds(DSA_DEFAULT) == list(DSA_KINDS)
    assert check_dsa(DSA_DEFAULT) == DSA_DEFAULT


# ---------------------------------------------------------------- one budget rule


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, math.nan, True])
def test_one_budget_rule_everywhere(tmp_path, bad):
    from stages.learn.online.adaptive import AdaptiveCoreset
    from stages.learn.online.crest import Crest
    from stages.learn.online.per_batch import PerBatch

    problem = budget_problem(bad)
    assert problem
    with pytest.raises(CurateError, match=re.escape(problem)):
        budget_count(bad, 100)
    if not isinstance(bad, bool):  # the config's strict types refuse a bool before the rule
        with pytest.raises(CurateError, match=re.escape(f"select.0.budget: {problem}")):
            config_with(tmp_path, spec_of("random", budget=bad))
    fraction = budget_problem(bad, counts=False, what="fraction")
    for make in (lambda: PerBatch("big_loss", bad), lambda: AdaptiveCoreset("craig", bad), lambda: Crest(bad)):
        with pytest.raises(ValueError, match=re.escape(fraction)):
            make()
    if not isinstance(bad, (bool, int)):
        online = budget_problem(bad, counts=False)
        with pytest.raises(CurateError, match=re.escape(f"verify.online.0.budget: {online}")):
            load_config(fast_config(tmp_path, verify={"online": [{"method": "crest", "budget": bad}]}))


def test_budget_rule_accepts_the_edges():
    for ok in (1, 7, 1.0, 1e-9, 0.5):
        assert budget_problem(ok) is None
    assert budget_problem(1, counts=False) is None and budget_problem(2, counts=False)
    assert budget_count(1.0, 10) == 10 and budget_count(3, 10) == 3


# ---------------------------------------------------------------- the package's public names


def test_every_name_the_repo_imports_from_pipeline_config_is_there():
    names = set()
    for folder in ("pipeline", "stages", "flows", "tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for m in re.finditer(r"from (?:pipeline)?\.config import (?:\(([^)]*)\)|([\w ,]+))", path.read_text()):
                names |= {n.strip() for n in (m.group(1) or m.group(2)).split(",") if n.strip()}
    assert {"load_config", "RunConfig", "SelectSpec", "IndexConfig"} <= names
    for name in names | set(config.__all__):
        assert hasattr(config, name), name


def test_training_code_reads_the_registries_without_pydantic():
    """The GPU machine has no pydantic, polars or prefect: the learning code's lists must not need them."""
    code = ("import sys\n"
            "for m in ('pydantic', 'polars', 'prefect', 'yaml'): sys.modules[m] = None\n"
            "import stages.learn.augment, stages.learn.online, stages.learn.online.per_batch\n"
            "from stages.learn.online import make_selector\n"
            "print(make_selector('big_loss', 0.5).name)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "big_loss"
