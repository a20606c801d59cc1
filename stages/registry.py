"""The stages a run is made of, by name, in pipeline order."""

from stages.distill import DistillStage, ExpertsStage
from stages.embed import EmbedPartStage, EmbedStage
from stages.index import IndexStage
from stages.materialize import MaterializeStage
from stages.report import ReportStage
from stages.score import ScoreStage
from stages.select import SelectPartStage, SelectStage
from stages.verify import VerifyStage

STAGES = {s.name: s for s in (IndexStage(), EmbedPartStage(), EmbedStage(), ScoreStage(), SelectPartStage(), SelectStage(),
                              MaterializeStage(), ExpertsStage(), DistillStage(), VerifyStage(),
                              ReportStage())}
