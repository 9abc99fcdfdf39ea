"""trakwomp: data attribution with TRAK and TRAK-WOMP (block-wise inverse TRAK)."""

from trakwomp.data import Dataset, Fingerprint, load_dataset
from trakwomp.errors import UserError
from trakwomp.models import GPT, ModelSpec, load_checkpoint, resnet9
from trakwomp.runtime import Shard
from trakwomp.featurize import featurize
from trakwomp.finalize import finalize
from trakwomp.groups import Groups, group_scores, predict_groups, read_groups_file
from trakwomp.lds import lds
from trakwomp.estimator import ViewSpec
from trakwomp.projectors import ProjectorSpec
from trakwomp.predict import predict
from trakwomp.scoring import score
from trakwomp.show import show, show_groups
from trakwomp.status import status
from trakwomp.tasks import CausalLM, Classification, make_task, margins
from trakwomp.text import TextDataset
from trakwomp.training import Recipe, TrainReport, evaluate, load_reference_model, train

__version__ = "0.1.0"

__all__ = [
    "CausalLM", "Classification", "Dataset", "Fingerprint", "GPT", "Groups", "ModelSpec", "ProjectorSpec", "Recipe", "Shard",
    "TrainReport", "UserError", "ViewSpec",
    "evaluate", "featurize", "finalize", "group_scores", "lds", "load_checkpoint", "load_dataset",
    "load_reference_model", "make_task", "margins", "predict", "predict_groups", "read_groups_file", "resnet9",
    "score", "show", "show_groups", "status", "TextDataset", "train",
]
