"""explain's answers in the store: apart from scores (the manifest does not grow), bounded
first-in first-out, read back equal to a fresh computation, refused when the weights they came
from changed, and an answer a kill interrupted is neither served nor waited for by `status`."""

import json
import shutil

import pytest
from conftest import TINY_GPT, fortunes, plain, write_jsonl
from trakwomp.cli.main import app
from trakwomp.store import Store
from typer.testing import CliRunner

from trakwomp.analysis.explain import explain
from trakwomp.analysis.status import status
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.stages import answers
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.train import train
from trakwomp.tasks.causal_lm import CausalLM

VIEW = ViewSpec(ridge=0.01)
PROMPT = "Q: Say something.\nA: "


@pytest.fixture(scope="module")
def finalized(tmp_path_factory):
    """The tiny gpt, two reference models trained on 24 prompt/completion fortunes, featurized and
    finalized, and scored on 3 targets of its own."""
    root = tmp_path_factory.mktemp("answers")
    rows = [{"prompt": PROMPT, "completion": r["text"][:40], "source": r["source"]} for r in fortunes("train", 24)]
    data = load_dataset(f"jsonl:{write_jsonl(root / 'pc.jsonl', rows)}")
    targets = load_dataset(f"jsonl:{write_jsonl(root / 'targets.jsonl', rows[:3])}")
    train(root / "store", data, TINY_GPT, task=CausalLM(), num_models=2, recipe=Recipe.for_task(CausalLM(), epochs=1))
    featurize(root / "store", projector=ProjectorSpec("sjlt", 0, 2, 8))
    finalize(root / "store", VIEW)
    score(root / "store", targets, VIEW)
    return root / "store"


@pytest.fixture
def store(finalized, tmp_path):
    return shutil.copytree(finalized, tmp_path / "store")


def manifest_bytes(store) -> int:
    return len(json.dumps(json.loads((store / "zarr.json").read_text())["attributes"]["trakwomp"]))


def test_answers_stay_apart_bounded_first_in_first_out_and_read_back_equal(store):
    """Five answers kept at most three: the manifest's size stays that of one answer; the two
    oldest are removed (asked again, computed afresh), the newest read back; a read-back answer's
    rows equal those computed; scores, show and status are as without answers."""
    before = Store.open(store).manifest.json
    first = explain(store, PROMPT, "one", k=2, view=VIEW, max_answers=3)
    size = manifest_bytes(store)
    for completion in ("two", "three", "four", "five"):
        assert not explain(store, PROMPT, completion, k=2, view=VIEW, max_answers=3).cached
    handle = Store.open(store)
    assert manifest_bytes(store) == size and handle.manifest.json["answers"] == {"first": 2, "next": 5}
    assert {k: v for k, v in handle.manifest.json.items() if k != "answers"} == before
    kept = handle.children("answers")
    assert len(kept) == 3 and first.key not in kept and len(handle.children("answer_order")) == 3
    again = explain(store, PROMPT, "five", k=2, view=VIEW, max_answers=3)
    assert again.cached and again.rows == explain(store, PROMPT, "five", k=2, view=VIEW, max_answers=3).rows
    recomputed = explain(store, PROMPT, "one", k=2, view=VIEW, max_answers=3)
    assert not recomputed.cached and recomputed.rows == first.rows  # the same numbers as before its removal
    report = status(store)
    assert report.complete and report.answers == 3 and report.unfinished_answers == 0


def test_a_killed_answer_is_not_served_not_waited_for_and_finished_by_the_same_query(store, monkeypatch, cli):
    real = answers.answer_features_scores

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(answers, "answer_features_scores", killed)
    with pytest.raises(KeyboardInterrupt):
        explain(store, PROMPT, "Be kind.", k=2, view=VIEW)
    result = cli("status", str(store))
    assert result.exit_code == 0 and "1 unfinished" in plain(result.output), plain(result.output)
    monkeypatch.setattr(answers, "answer_features_scores", real)
    finished = explain(store, PROMPT, "Be kind.", k=2, view=VIEW)
    assert not finished.cached and explain(store, PROMPT, "Be kind.", k=2, view=VIEW).cached
    assert status(store).unfinished_answers == 0


def test_an_answer_from_weights_that_changed_is_refused(store):
    """Model 0's weights replaced by model 1's (a copied-in model folder): the stored answer,
    asked with a given completion (no model loaded to generate), is refused, never served."""
    explain(store, PROMPT, "Be kind.", k=2, view=VIEW)
    weights = store / "models" / "reference" / "000000" / "weights"
    shutil.rmtree(weights)
    shutil.copytree(store / "models" / "reference" / "000001" / "weights", weights)
    with pytest.raises(UserError, match="the weights of model 0 do not match their recorded hash"):
        explain(store, PROMPT, "Be kind.", k=2, view=VIEW)


def test_after_explain_the_reading_commands_find_the_scores_without_targets(store, cli):
    explain(store, PROMPT, "Be kind.", k=2, view=VIEW)
    for args in (["show", str(store), "--target", "0", "--out", str(store.parent / "page.html"), "--ridge", "0.01"],
                 ["groups", str(store), "--ridge", "0.01", "--json"],
                 ["predict", str(store), "--drop-group", fortunes("train", 1)[0]["source"], "--ridge", "0.01"]):
        result = cli(*args)
        assert result.exit_code == 0, plain(result.output)


def test_a_store_whose_only_scores_are_answers_says_so(finalized, tmp_path, cli):
    store = shutil.copytree(finalized, tmp_path / "store")
    document = json.loads((store / "zarr.json").read_text())
    for section in ("scores", "targets"):
        del document["attributes"]["trakwomp"][section]
    (store / "zarr.json").write_text(json.dumps(document))
    shutil.rmtree(store / "scores")
    explain(store, PROMPT, "Be kind.", k=2, view=VIEW)
    result = cli("show", str(store), "--target", "0", "--ridge", "0.01")
    assert result.exit_code == 2 and "explain's answers are kept apart from scores" in plain(result.stderr)


def test_max_answers_below_one_is_refused(store):
    with pytest.raises(UserError, match="`max_answers` must be at least 1"):
        explain(store, PROMPT, "x", view=VIEW, max_answers=0)


def test_the_device_of_every_command_is_checked_alike_from_the_environment_too(store):
    result = CliRunner().invoke(app, ["explain", str(store), "--prompt", "hi"], env={"TRAKWOMP_DEVICE": "tpu"})
    assert result.exit_code == 2 and plain(result.stderr).strip() == \
        "error: unknown --device 'tpu': expected cpu, cuda or cuda:N"


def test_a_done_marker_nested_too_deep_is_unfinished_and_redone(store, cli):
    marker = store / "done" / "finalize" / "d16-b2-ridge0.01" / "000000" / "000000" / "zarr.json"
    text = marker.read_text()
    marker.write_text(text.replace('"attributes": {', '"deep": ' + "[" * 100000 + "]" * 100000 + ', "attributes": {', 1))
    assert cli("status", store, "--quiet").exit_code == 3
    assert cli("finalize", store, "--ridge", "0.01", "--quiet").exit_code == 0
    assert cli("status", store, "--quiet").exit_code == 0
