"""`explain`: the reference model's answer to a prompt (greedy against a step-by-step argmax
loop; sampled reproducibly by seed), and the answer's scores against eq. 3 computed densely from
the stored features, with f over the answer's tokens only (its closed form, by autograd)."""

import json

import numpy as np
import pytest
import torch
from conftest import (
    TINY_GPT,
    block_diagonal_scores,
    causal_lm_autograd_loop,
    fortunes,
    plain,
    soft_thresholded,
    write_jsonl,
)
from trakwomp.store import Store

from trakwomp.analysis.explain import Generation, explain
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.gradients import select_parameters
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.train import load_reference_model, train
from trakwomp.tasks.causal_lm import CausalLM

VIEW = ViewSpec(ridge=0.01)
PROMPT = "Q: What did the wise man say?\nA: "


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """The tiny gpt trained 3 epochs on 32 fortunes as prompt/completion pairs (two reference
    models), featurized at 2 x 8 (sjlt) and finalized at ridge 0.01."""
    root = tmp_path_factory.mktemp("explain")
    rows = [{"prompt": PROMPT, "completion": r["text"][:60], "source": r["source"]} for r in fortunes("train", 32)]
    data = load_dataset(f"jsonl:{write_jsonl(root / 'pc.jsonl', rows)}")
    train(root / "store", data, TINY_GPT, task=CausalLM(), num_models=2, recipe=Recipe.for_task(CausalLM(), epochs=3))
    featurize(root / "store", projector=ProjectorSpec("sjlt", 0, 2, 8))
    finalize(root / "store", VIEW)
    return root / "store", data


def greedy_by_hand(net, prompt: str, steps: int) -> str:
    ids = [256, *prompt.encode("utf-8")]
    for _ in range(steps):
        logits = net(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0, -1, :257]
        token = int(logits.argmax())
        if token == 256:
            break
        ids.append(token)
    return bytes(ids[1 + len(prompt.encode("utf-8")):]).decode("utf-8", errors="replace")


def test_the_answer_is_the_greedy_continuation_and_a_sample_is_fixed_by_its_seed(answers):
    store, data = answers
    explained = explain(store, PROMPT, generation=Generation(max_new_tokens=12), k=2, view=VIEW)
    net = load_reference_model(store, 0, data.vocab_size)
    assert explained.generated and explained.answer == greedy_by_hand(net, PROMPT, 12) != ""
    cold = explain(store, PROMPT, generation=Generation(12, temperature=1e-4, seed=3), k=2, view=VIEW)
    assert cold.answer == explained.answer  # sampling at a temperature near 0 is greedy
    hot = [explain(store, PROMPT, generation=Generation(12, temperature=3.0, seed=s), k=2, view=VIEW).answer
           for s in (1, 1, 2)]
    assert hot[0] == hot[1] != hot[2]
    stop = explained.answer[3]  # ends the answer at its first occurrence, which the answer keeps
    stopped = explain(store, PROMPT, generation=Generation(max_new_tokens=12, stop=stop), k=2, view=VIEW)
    assert stopped.answer == explained.answer[:explained.answer.index(stop) + 1]
    other = explain(store, PROMPT, generation=Generation(max_new_tokens=12), model_id=1, k=2, view=VIEW)
    assert other.answer == greedy_by_hand(load_reference_model(store, 1, data.vocab_size), PROMPT, 12)


def test_the_answers_scores_are_eq3_of_its_completion_only_gradients(answers, tmp_path):
    store, data = answers
    answer = "Never trust a fortune."
    explained = explain(store, PROMPT, answer, k=3, view=VIEW, out=tmp_path / "page.html")
    assert not explained.generated and explained.answer == answer
    handle = Store.open(store)
    prefix = f"answers/{explained.key}/"  # the answer's own area, apart from score's scores
    assert not handle.manifest.scores and not handle.manifest.targets
    dense = block_diagonal_scores(handle, [8, 8], prefix, 0.01)
    np.testing.assert_allclose(handle.read_array(f"{prefix}tau"), dense, rtol=1e-3,
                               atol=1e-6 * np.abs(dense).max())
    first = 1 + len(PROMPT.encode("utf-8"))  # f counts the answer's tokens only
    ids = torch.tensor([256, *(PROMPT + answer).encode("utf-8")])
    for m in (0, 1):
        net = load_reference_model(store, m, data.vocab_size)
        _, f = causal_lm_autograd_loop(net, [(ids, 0, first)], CausalLM(), select_parameters(net, None))
        np.testing.assert_allclose(handle.read_array(f"{prefix}features/{m:06d}/margins"), f.numpy(), rtol=1e-5, atol=1e-5)
    # the ranking from the stored float32 scores (checked against dense eq. 3 above) thresholded in
    # float64: dense itself agrees only to 1e-3, which could swap near-equal scores on another CPU
    tau = soft_thresholded(handle.read_array(f"{prefix}tau"))[0]
    supports = [r["train_index"] for r in explained.rows if r["direction"] == "supports"]
    assert supports == list(np.argsort(-tau, kind="stable")[:3])
    assert explained.rows[0]["target_completion"] == answer and explained.rows[0]["train_prompt"] == PROMPT
    page = (tmp_path / "page.html").read_text()
    assert "Never trust a fortune." in page and "<script" not in page


def test_the_command_prints_the_answer_and_its_examples_and_refuses_what_it_cannot_do(answers, cli, tmp_path):
    store, _ = answers
    result = cli("explain", str(store), "--prompt", PROMPT, "--completion", "Be kind.", "--ridge", "0.01", "--json")
    assert result.exit_code == 0, plain(result.output)
    report = json.loads(result.stdout)
    assert report["answer"] == "Be kind." and len(report["rows"]) == 10 and report["seconds"] > 0
    for args, message in ((["--temperature", "-0.5"], "--temperature must be 0 (greedy) or a positive number"),
                          (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                          (["--stop", ""], "--stop must be a non-empty text"),
                          (["--out", str(tmp_path / "page.png")], "give --out a .html name")):
        result = cli("explain", str(store), "--prompt", PROMPT, *args)
        assert result.exit_code == 2 and message in plain(result.stderr), plain(result.output)
    with pytest.raises(UserError, match="`prompt` must be non-empty text"):
        explain(store, "", "x", view=VIEW)


def test_each_answer_token_gets_the_log_odds_of_its_own_probability_and_eq3_scores(answers, tmp_path):
    """Per token t of the answer: f_t = log(p_t / (1 - p_t)), p_t read from one forward pass of the
    whole text here; its scores are dense eq. 3 of its gradient; the page shades every token."""
    store, data = answers
    answer = "Be <b>kind</b>."
    explained = explain(store, PROMPT, answer, k=3, view=VIEW, per_token=True, out=tmp_path / "page.html")
    assert [t["token"] for t in explained.tokens] == list(answer) and explained.token_seconds > 0
    handle = Store.open(store)
    prefix = f"answers/{explained.key}/tokens/"
    ids = [256, *(PROMPT + answer).encode("utf-8")]
    first = 1 + len(PROMPT.encode("utf-8"))
    for m in (0, 1):
        net = load_reference_model(store, m, data.vocab_size)
        with torch.no_grad():
            log_p = torch.log_softmax(net(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0].double(), -1)
        p = torch.exp(torch.stack([log_p[t - 1, ids[t]] for t in range(first, len(ids))]))
        np.testing.assert_allclose(handle.read_array(f"{prefix}features/{m:06d}/margins"),
                                   torch.log(p / (1 - p)).numpy(), rtol=1e-4, atol=1e-4)
    dense = block_diagonal_scores(handle, [8, 8], prefix, 0.01)
    token_tau = handle.read_array(f"answers/{explained.key}/token_tau")
    np.testing.assert_allclose(token_tau, dense, rtol=1e-3, atol=1e-6 * np.abs(dense).max())
    tau = soft_thresholded(token_tau)  # stored, thresholded in float64, as above
    assert [t["train_index"] for t in explained.tokens] == [int(np.argmax(row)) for row in tau]
    positive = [np.sort(row[row > 0])[::-1] for row in tau]
    np.testing.assert_allclose([t["concentration"] for t in explained.tokens],
                               [r[:3].sum() / r.sum() if len(r) else 0.0 for r in positive], rtol=1e-4)
    page = (tmp_path / "page.html").read_text()
    assert page.count("<span style=\"background:rgba(230,120,0,") == len(answer) and "<b>kind" not in page


def sampled_by_hand(net, prompt: str, steps: int, temperature: float, seed: int) -> list[int]:
    """The ids a step-by-step sampling loop draws after the prompt's (recorded as drawn)."""
    ids, sampler = [256, *prompt.encode("utf-8")], torch.Generator().manual_seed(seed)
    start = len(ids)
    for _ in range(steps):
        with torch.no_grad():
            logits = net(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0, -1, :257]
        token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=sampler))
        if token == 256:
            break
        ids.append(token)
    return ids[start:]


def test_the_generated_ids_themselves_are_scored_not_their_decoded_text(answers):
    """Sampled hot, a byte model writes bytes that are not UTF-8 on their own; decoding and
    encoding again would score U+FFFD's bytes (EF BF BD) the model never wrote. The scored ids,
    the per-token rows' ids and the target's features all follow the ids recorded as drawn."""
    store, data = answers
    net = load_reference_model(store, 0, data.vocab_size)
    drawn = {seed: sampled_by_hand(net, PROMPT, 8, 3.0, seed) for seed in (1, 2, 3)}
    assert any(not _is_utf8(ids) for ids in drawn.values())  # the case the old decode got wrong
    for seed, ids in drawn.items():
        explained = explain(store, PROMPT, generation=Generation(8, temperature=3.0, seed=seed), k=2, view=VIEW,
                            per_token=True)
        assert explained.answer_ids == ids and [t["token_id"] for t in explained.tokens] == ids
        assert [t["position"] for t in explained.tokens] == list(range(len(ids)))
    handle = Store.open(store)
    features = handle.read_array(f"answers/{explained.key}/features/000000/margins")
    _, f = causal_lm_autograd_loop(net, [(torch.tensor([256, *PROMPT.encode("utf-8"), *ids]), 0,
                                          1 + len(PROMPT.encode("utf-8")))], CausalLM(), select_parameters(net, None))
    np.testing.assert_allclose(features, f.numpy(), rtol=1e-5, atol=1e-5)


def _is_utf8(ids: list[int]) -> bool:
    try:
        bytes(ids).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_generation_stops_where_max_length_would_cut_and_a_longer_answer_is_refused(answers, tmp_path):
    """With a store's --max-length, the answer ends where the text reaches it (all of it is
    scored); an answer given that would be cut is refused, never scored in part."""
    store, data = answers
    from trakwomp.analysis.explain import generate
    from trakwomp.data.text import answer_dataset

    prompt_tokens = 1 + len(PROMPT.encode("utf-8"))
    short = data.select(np.arange(len(data)))
    short.max_length = prompt_tokens + 3
    net = load_reference_model(store, 0, data.vocab_size)
    generated = generate(net, short, PROMPT, Generation(max_new_tokens=12, stop=None), torch.device("cpu"))
    assert len(generated.ids) == 3 and generated.ended == "max-length"
    assert generated.ids == greedy_ids_by_hand(net, PROMPT, 3)
    with pytest.raises(UserError, match=f"take {prompt_tokens + 5} tokens, more than the store's `max_length`"):
        answer_dataset(PROMPT, short, completion="abcde")
    with pytest.raises(UserError, match="no room for an answer"):
        short.max_length = prompt_tokens
        generate(net, short, PROMPT, Generation(), torch.device("cpu"))


def greedy_ids_by_hand(net, prompt: str, steps: int) -> list[int]:
    ids = [256, *prompt.encode("utf-8")]
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(net(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0, -1, :257].argmax()))
    return ids[1 + len(prompt.encode("utf-8")):]


def test_escape_sequences_in_prompts_answers_and_texts_never_reach_the_terminal_raw(answers, cli, tmp_path):
    """Colour, OSC 8 links, OSC 52 clipboard writes and a bidi override in the prompt and the
    answer are printed as their escapes; the JSON report keeps them exact."""
    store, _ = answers
    prompt, answer = "\x1b]8;;http://evil\x07click\x1b]8;;\x07 ", "\x1b[31mred\x1b]52;c;aGk=\x07\u202e"
    result = cli("explain", str(store), "--prompt", prompt, "--completion", answer, "--ridge", "0.01")
    assert result.exit_code == 0, plain(result.output)
    assert "\x1b" not in result.output and "\x07" not in result.output and "\u202e" not in result.output
    assert "\\x1b]8;;http://evil\\x07click" in result.output.replace("\n", "") and "\\u202e" in result.output
    report = json.loads(cli("explain", str(store), "--prompt", prompt, "--completion", answer, "--ridge", "0.01",
                            "--json").stdout)
    assert report["prompt"] == prompt and report["answer"] == answer
