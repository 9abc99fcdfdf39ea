"""trakwomp: data attribution with TRAK and TRAK-WOMP (block-wise inverse TRAK)."""

from trakwomp.analysis.explain import Generation, explain
from trakwomp.analysis.groups import group_scores, predict_groups
from trakwomp.analysis.lds import lds
from trakwomp.analysis.predict import predict
from trakwomp.analysis.show import show, show_groups
from trakwomp.analysis.status import status
from trakwomp.data.base import Dataset, Fingerprint
from trakwomp.data.groups import Groups, read_groups_file
from trakwomp.data.specs import load_dataset
from trakwomp.data.text import TextDataset
from trakwomp.errors import UserError
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.checkpoints import load_checkpoint
from trakwomp.models.networks import GPT, resnet9
from trakwomp.models.spec import ModelSpec
from trakwomp.runtime import Shard
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.fit import model_outputs
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.selection import Selection
from trakwomp.stages.train import TrainReport, load_reference_model, train
from trakwomp.tasks.base import Task
from trakwomp.tasks.causal_lm import CausalLM
from trakwomp.tasks.classification import Classification, margins
from trakwomp.tasks.registry import make_task
from trakwomp.tasks.regression import Regression

__version__ = "0.1.0"

__all__ = [
    "CausalLM", "Classification", "Regression", "Task", "Dataset", "Fingerprint", "GPT", "Generation", "Groups", "ModelSpec", "ProjectorSpec", "Recipe", "Selection", "Shard",
    "TrainReport", "UserError", "ViewSpec",
    "model_outputs", "explain", "featurize", "finalize", "group_scores", "lds", "load_checkpoint", "load_dataset",
    "load_reference_model", "make_task", "margins", "predict", "predict_groups", "read_groups_file", "resnet9",
    "score", "show", "show_groups", "status", "TextDataset", "train",
]
