"""Where things live in a store and how units of work are named: the one place that knows the
paths (docs/store.md draws the same tree).

A unit of work is named by its parts joined with `/`, numbers as six digits (model 3, row chunk
1: `000003/000001`), so that names sort as numbers do. A unit is published by its done marker,
`done/<stage>/<unit>`.
"""

from __future__ import annotations

TRAIN_INDICES = "data/train_indices"  # the --indices a store's train set was selected with
GROUP_CODES = "groups/codes"  # each train example's group, by position in the names
GROUP_NAMES = "groups/names"  # the group names' UTF-8 bytes, one after another
GROUP_NAME_ENDS = "groups/name_ends"  # where each name's bytes end in GROUP_NAMES
FEATURES = "features"
MODELS = "models"
SCORES = "scores"
FINALIZE = "finalize"
ANSWERS = "answers"  # explain's answers: apart from scores, bounded (trakwomp/stages/answers.py)
ANSWER_ORDER = "answer_order"
VERIFY = "verify"  # verify's retraining runs, per scored target set


def unit(*parts: int | str) -> str:
    """`unit(3, 1)` -> "000003/000001"; string parts (a view key, a role) are kept as they are."""
    return "/".join(part if isinstance(part, str) else f"{part:06d}" for part in parts)


def done(stage: str, unit_name: str = "") -> str:
    """The done marker of a unit of `stage`, or (without a unit) the folder of the stage's markers."""
    return f"done/{stage}/{unit_name}" if unit_name else f"done/{stage}"


def short_id(sha256: str) -> str:
    """The id of a content hash in store paths and keys: its first 16 hex digits."""
    return sha256[:16]


def features(model_id: int, prefix: str = "") -> str:
    """The folder of a model's phi, q and outputs f (`outputs`); `prefix` is that of a
    target set (`targets_prefix`), empty for the train set."""
    return f"{prefix}{FEATURES}/{unit(model_id)}"


def targets_prefix(targets_id: str) -> str:
    """Where a target set's features live: `targets/<id>/features/...`."""
    return f"targets/{targets_id}/"


def target_features_stage(targets_id: str) -> str:
    """The stage whose units are a target set's (model, chunk) features."""
    return f"featurize_targets/{targets_id}"


def view_folder(view_key: str) -> str:
    return f"{FINALIZE}/{view_key}"


def inverse(view_key: str, model_id: int) -> str:
    """A model's block Gram inverses at a view, (blocks, width, width) float64."""
    return f"{view_folder(view_key)}/{unit(model_id)}/inverse"


def scores_folder(key: str) -> str:
    return f"{SCORES}/{key}"


def scores(key: str) -> str:
    """The raw scores `key`, (n_targets, n_train) float32."""
    return f"{scores_folder(key)}/tau"


def top_k(key: str, name: str) -> str:
    """An array of the top-k-only scores `key` (no `tau`): "values" (n_targets, 2k) float32 raw
    scores, each target's k largest then its k smallest, "index" (n_targets, 2k) int64 their
    train indices, and "sum_squares" (n_targets,) float64, the sum of each target's squared scores."""
    return f"{scores_folder(key)}/{name}"


def role_folder(role: str) -> str:
    return f"{MODELS}/{role}"


def answer(key: str) -> str:
    """The folder of an `explain` answer's scores `key`: its features (as `prefix`), `tau` (1,
    n_train) and, if asked, `token_tau` (answer tokens, n_train) with the tokens' features under
    `tokens/`."""
    return f"{ANSWERS}/{key}/"


def answer_order(seq: int) -> str:
    """The group whose attributes name the answer that was the `seq`-th begun (oldest first)."""
    return f"{ANSWER_ORDER}/{seq:012d}"


def trained_model(role: str, index: int | str) -> str:
    """The folder of model `index` (or its unit name) of `role`: its mask, and its weights or its target outputs."""
    return f"{role_folder(role)}/{unit(index)}"


def checkpoint(role: str, index: int | str, epoch: int) -> str:
    """The folder of a checkpoint kept along model `index`'s run, after epoch `epoch` (the last
    epoch's is the model itself, `trained_model`)."""
    return f"{trained_model(role, index)}/checkpoints/{unit(epoch)}"


def user_checkpoint(digest: str) -> str:
    """The folder of a checkpoint file registered by `featurize --checkpoint`, by its weights' hash."""
    return f"{MODELS}/checkpoints/{short_id(digest)}"


def outputs(folder: str) -> str:
    """The task's outputs f in `folder` (a model's features, or an LDS model's outputs on the
    targets); named `margins` on disk, as the classification task first called them."""
    return f"{folder}/margins"


def weights(folder: str) -> str:
    """The state_dict arrays of the model or checkpoint in `folder`."""
    return f"{folder}/weights"


def asked_train(role: str) -> str:
    """The manifest's "asked" entry of `train` for a role (the number of models asked for)."""
    return f"train/{role}"


def asked_finalize(view_key: str) -> str:
    """The manifest's "asked" entry of `finalize` for a view (the models asked for)."""
    return f"{FINALIZE}/{view_key}"


def verify_folder(targets_id: str) -> str:
    """verify's runs for a scored target set: `verify/<targets>/<removal>/<seed>`."""
    return f"{VERIFY}/{targets_id}"


def verify_run(targets_id: str, removal: str, seed: int) -> str:
    """The unit name of a verify run: what it removes (`none`, `random-k<K>`, `set-<hash>`) and its seed."""
    return unit(targets_id, removal, seed)


def verify_run_folder(run: str) -> str:
    """A verify run's folder (`run`: its unit name): the removed positions and the outputs f on the targets."""
    return f"{VERIFY}/{run}"


def verify_experiments(targets_id: str) -> str:
    """The records of the verifies of a scored target set, one per set of runs asked for."""
    return f"{verify_folder(targets_id)}/experiments"


def verify_experiment(targets_id: str, experiment: str) -> str:
    """The record of one verify's runs (their unit names), which `status` counts."""
    return f"{verify_experiments(targets_id)}/{experiment}"
