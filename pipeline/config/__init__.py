"""Run configuration: one YAML per run, validated; `--set a.b=v` overrides (v parsed as YAML).

Unknown keys are errors. `select` is one spec or a list; a list of budgets expands into
one spec per budget, each named `<method>-<budget>` unless it sets `name`.

One module per section (index, embed, clip, score, select, materialize, distill, verify, flow),
`base` (what they share), `run` (RunConfig and the rules that span sections) and `load`
(YAML, `--set`, one-line errors). Method facts are stated once: on the select and distill
spec classes (`needs`, `weights`), and for scores, online methods and DSA kinds in
pipeline.methods (no pydantic: the training code reads it too); every list of method
names is derived from those.
"""

from pipeline.methods import (DSA_DEFAULT, DSA_KINDS, ONLINE_METHODS, SCORE_METHODS, VALIDATED_SCORES,
                              VALUE_SCORES)

from .base import DEVICE, SAFE_NAME, Budget, Section, check_budget, check_names, expand_budgets
from .clip import ClipConfig
from .distill import (DISTILL_METHODS, DISTILL_TYPES, AnyDistill, DistillConfig, DistillSpec, DmSpec,
                      ExpertsConfig, MttSpec, check_dsa)
from .embed import EmbedConfig
from .flow import FlowConfig
from .index import IndexConfig
from .load import DEMO_CONFIG, apply_override, load_config
from .materialize import MaterializeConfig
from .run import RunConfig, VerifySet
from .score import ScoreConfig
from .select import (CAPTION_METHODS, FEATURES, GROUPS, SELECT_METHODS, SELECT_SPECS, SPEC_TYPES, AnySpec,
                     CcsSpec, ClipCovSpec, ClipScoreSpec, CraigSpec, DedupSpec, DifficultySpec, GradMatchSpec,
                     RandomSpec, SasSpec, SelectSpec, StratifiedSpec)
from .verify import OnlineSpec, VerifyConfig

__all__ = [
    "AnyDistill", "AnySpec", "Budget", "CAPTION_METHODS", "CcsSpec", "ClipConfig", "ClipCovSpec", "ClipScoreSpec",
    "CraigSpec", "DEMO_CONFIG", "DEVICE", "DISTILL_METHODS", "DISTILL_TYPES", "DSA_DEFAULT", "DSA_KINDS",
    "DedupSpec", "DifficultySpec", "DistillConfig", "DistillSpec", "DmSpec", "EmbedConfig", "ExpertsConfig",
    "FEATURES", "FlowConfig", "GROUPS", "GradMatchSpec", "IndexConfig", "MaterializeConfig", "MttSpec",
    "ONLINE_METHODS", "OnlineSpec", "RandomSpec", "RunConfig", "SAFE_NAME", "SCORE_METHODS", "SELECT_METHODS",
    "SELECT_SPECS", "SPEC_TYPES", "SasSpec", "ScoreConfig", "Section", "SelectSpec", "StratifiedSpec",
    "VALIDATED_SCORES", "VALUE_SCORES", "VerifyConfig", "VerifySet", "apply_override", "check_budget", "check_dsa",
    "check_names", "expand_budgets", "load_config",
]
