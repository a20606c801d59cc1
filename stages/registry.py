"""The stages a run is made of, by name, in pipeline order."""

from .distill.stage import DistillStage, ExpertsStage
from .embed import EmbedPartStage, EmbedStage
from .index import IndexStage
from .materialize import MaterializeStage
from .score import ScoreStage
from .select import SelectStage
from .verify import VerifyStage

STAGES = {s.name: s for s in (IndexStage(), EmbedPartStage(), EmbedStage(), ScoreStage(), SelectStage(),
                              MaterializeStage(), ExpertsStage(), DistillStage(), VerifyStage())}
