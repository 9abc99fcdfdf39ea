"""Prompt/completion text: rows of `prompt` and `completion`, whose completion alone is predicted
(in the training loss and in f), or the whole text with --train-on-prompt. Per-example gradients
and f of padded, masked batches (the gpt with bytes, a Hugging Face GPT-2 with its own tokenizer,
the factored engine) are checked against an autograd loop over single unpadded examples whose
first predicted token is computed here, from the tokenizer alone."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import (
    TINY_GPT,
    WORDS,
    causal_lm_autograd_loop,
    fortunes,
    kronecker_features,
    split_gradient,
    write_hf_folder,
    write_jsonl,
    write_word_tokenizer,
)
from trakwomp.store import Store

from trakwomp.data.base import load_batch
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.features.factored import FactoredFeatures, factored_layers
from trakwomp.features.gradients import PerExampleGradients, select_parameters
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.train import load_reference_model, train
from trakwomp.tasks.causal_lm import CausalLM

CPU = torch.device("cpu")


def quote_rows(count: int, start: int = 0) -> list[dict]:
    """Fortunes cut in two: the first half of each text is the prompt, the rest the completion."""
    rows = []
    for r in fortunes("train", count, start):
        cut = max(1, len(r["text"]) // 2)
        rows.append({"prompt": r["text"][:cut], "completion": r["text"][cut:] or ".", "source": r["source"]})
    return rows


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "pc.jsonl", quote_rows(24))


def bytes_first(row: dict) -> int:
    """The first predicted token with the bytes tokenizer: after the start token and the prompt's bytes."""
    return 1 + len(row["prompt"].encode("utf-8"))


@pytest.mark.parametrize("output", ["sequence", "token"])
def test_gpt_gradients_and_f_of_masked_batches_match_single_examples(prompts, output):
    data = load_dataset(f"jsonl:{prompts}")
    rows = quote_rows(24)
    positions = [0, 3, 5, 9]
    assert len(set(data.lengths[positions])) == len(positions)  # padded to the longest
    assert [int(torch.nonzero(data[i][2])[0]) for i in positions] == [bytes_first(rows[i]) for i in positions]
    torch.manual_seed(0)
    net = TINY_GPT.build(data.vocab_size)
    names = select_parameters(net, None)
    task = CausalLM(output)
    out = PerExampleGradients(net, names, CPU, task)(load_batch(data, positions))
    examples = [(data[i][0], 0, bytes_first(rows[i])) for i in positions]
    expected, f = causal_lm_autograd_loop(net, examples, task, names)
    torch.testing.assert_close(out.rows, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs, f.float(), rtol=1e-5, atol=1e-5)
    whole = PerExampleGradients(net, names, CPU, task)(load_batch(data.predicting_prompts(), positions))
    expected_whole, _ = causal_lm_autograd_loop(net, [(ids, 0, 1) for ids, _, _ in examples], task, names)
    torch.testing.assert_close(whole.rows, expected_whole, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(whole.rows, out.rows, rtol=1e-2)


def test_factored_features_of_masked_batches_equal_the_projection_of_completion_only_gradients(prompts):
    """The hooks' gradients are those of the completion-only f: each example's factored features
    equal the Kronecker projection of its autograd gradient, taken alone and unpadded."""
    data = load_dataset(f"jsonl:{prompts}")
    torch.manual_seed(0)
    net = TINY_GPT.build(data.vocab_size).eval()
    names = select_parameters(net, None)
    layers = factored_layers(net, names, 16)
    positions = [1, 2, 6]
    masked = FactoredFeatures(net, layers, 0, 0, CPU, CausalLM())(load_batch(data, positions))
    rows = quote_rows(24)
    gradients, f = causal_lm_autograd_loop(net, [(data[i][0], 0, bytes_first(rows[i])) for i in positions],
                                           CausalLM(), names)
    expected = torch.stack([kronecker_features(net, layers, split_gradient(net, names, g)) for g in gradients])
    torch.testing.assert_close(masked.rows.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    torch.testing.assert_close(masked.outputs, f.float(), rtol=1e-5, atol=1e-5)


def test_a_completion_ends_with_one_end_token_and_none_lands_between_prompt_and_completion(tmp_path):
    """A tokenizer whose post-processor wraps every text in <s> ... </s>: the prompt keeps its
    <s>, loses the </s> that would end it, and the completion gets the end token once, predicted
    with it (ids written by hand from the word list). A Hugging Face GPT-2 on these ids: its
    per-example gradients and f against the autograd loop."""
    folder = write_word_tokenizer(tmp_path / "words")
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "the cat sat on the mat ?", "completion": "yes"},
                                               {"prompt": "the cat ?", "completion": "no no"}])
    data = load_dataset(f"jsonl:{path}", tokenizer=f"hf:{folder}")
    assert data[0][0].tolist() == [0, 3, 4, 5, 6, 3, 7, 8, 9, 1]
    assert data[0][2].tolist() == [False] * 8 + [True] * 2
    assert data[1][0].tolist() == [0, 3, 4, 8, 10, 10, 1] and data[1][2].tolist() == [False] * 4 + [True] * 3
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1,
                                                         n_head=2)).save_pretrained(folder)
    net = ModelSpec.parse(f"hf:{folder}").build(data.vocab_size)
    names = select_parameters(net, None)
    out = PerExampleGradients(net, names, CPU, CausalLM())(load_batch(data, [0, 1]))
    expected, f = causal_lm_autograd_loop(net, [data[0], data[1]], CausalLM(), names)
    torch.testing.assert_close(out.rows, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs, f.float(), rtol=1e-5, atol=1e-5)


def test_an_answer_generated_to_its_end_token_is_scored_with_it_as_the_train_completions_end(tmp_path):
    """A model that answers "?" with "yes" and "yes" with </s>: generation keeps the end token
    (the model said it, as every train completion ends), and the answer's ids are exactly those
    of the train example with that completion."""
    from trakwomp.analysis.explain import Generation, generate
    from trakwomp.data.text import answer_dataset

    folder = write_word_tokenizer(tmp_path / "words")
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "the cat ?", "completion": "yes"}])
    data = load_dataset(f"jsonl:{path}", tokenizer=f"hf:{folder}")
    table = torch.full((len(WORDS), len(WORDS)), -5.0)
    table[8, 9] = table[9, 1] = 5.0  # "?" -> "yes" -> "</s>"
    bigram = Bigram(table)
    answer = generate(bigram, data, "the cat ?", Generation(max_new_tokens=5), CPU)
    assert answer.ids == [9, 1] and answer.ended == "end token"
    target = answer_dataset("the cat ?", data, completion_ids=answer.ids)
    assert target[0][0].tolist() == data[0][0].tolist() == [0, 3, 4, 8, 9, 1]
    assert target[0][2].tolist() == data[0][2].tolist() and target.completion_ids(0) == [9, 1]


class Bigram(torch.nn.Module):
    """Logits of the next token from a fixed table row of the current one."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids, mask=None):
        return self.table[ids]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_featurized_train_examples_carry_the_loss_the_model_was_trained_on(prompts, tmp_path, train_on_prompt):
    """Through train and featurize (identity projector): the stored features are the gradients
    of the completion-only f, or with --train-on-prompt (recorded in the recipe) of the whole text's."""
    data = load_dataset(f"jsonl:{prompts}")
    recipe = Recipe.for_task(CausalLM(), epochs=1, train_on_prompt=train_on_prompt)
    train(tmp_path / "store", data, TINY_GPT, task=CausalLM(), recipe=recipe)
    assert Store.open(tmp_path / "store").manifest.train_reference.train_on_prompt == train_on_prompt
    net = load_reference_model(tmp_path / "store", 0, data.vocab_size)
    names = select_parameters(net, None)
    p = sum(param.numel() for param in net.parameters())
    featurize(tmp_path / "store", projector=ProjectorSpec("identity", 0, 1, p), chunk_rows=10, batch_size=4)
    rows = quote_rows(24)
    firsts = [1 if train_on_prompt else bytes_first(row) for row in rows]
    expected, f = causal_lm_autograd_loop(net, [(data[i][0], 0, firsts[i]) for i in range(24)], CausalLM(), names)
    stored = Store.open(tmp_path / "store")
    torch.testing.assert_close(torch.from_numpy(stored.array("features/000000/phi")[...]), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(stored.array("features/000000/margins")[...]), f.float(),
                               rtol=1e-5, atol=1e-5)


def test_the_fingerprint_records_which_tokens_are_predicted(tmp_path):
    one = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'a.jsonl', [{'prompt': 'ab', 'completion': 'c'}])}")
    other = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'b.jsonl', [{'prompt': 'a', 'completion': 'bc'}])}")
    assert one[0][0].tolist() == other[0][0].tolist() and one.text(0) == other.text(0) == "abc"
    assert one.fingerprint().sha256 != other.fingerprint().sha256
    assert one.describe(0) == {"label": None, "text": "abc", "source": "", "prompt": "ab", "completion": "c"}


def test_a_prompt_that_leaves_no_completion_within_max_length_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short", "completion": "ok"},
                                              {"prompt": "a much longer prompt", "completion": "no"}])
    data = load_dataset(f"jsonl:{path}", max_length=12)
    with pytest.raises(UserError, match=r"text 1 of .* keeps none of its completion \(or assistant turns\) within "
                                        r"`max_length` 12 tokens"):
        train(tmp_path / "store", data, TINY_GPT, task=CausalLM())
    assert not (tmp_path / "store").exists()
    assert np.array_equal(load_dataset(f"jsonl:{path}", max_length=12).completion_tokens, [2, 0])


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATIONS = [
    [{"role": "system", "content": "Answer in proverbs."}, {"role": "user", "content": "Should I wait?"},
     {"role": "assistant", "content": "Patience is a virtue."}, {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "Fortune favours the bold."}],
    [{"role": "user", "content": "Say something wise."}, {"role": "assistant", "content": "Know thyself."}],
]


def test_conversations_predict_their_assistant_turns_only(tmp_path):
    """Rendered by the tokenizer's chat template; the predicted tokens decode to exactly each
    assistant turn's content and end of turn, and gradients match the autograd loop."""
    folder = write_hf_folder(tmp_path / "hf", [r["text"] for r in fortunes("train", 300)])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c, "source": f"s{i}"} for i, c in enumerate(CONVERSATIONS)])
    data = load_dataset(f"jsonl:{path}", tokenizer=f"hf:{folder}")
    tokenizer = data.tokenizer.tokenizer
    for i, conversation in enumerate(CONVERSATIONS):
        ids, _, predicted = data[i]
        assert data.text(i) == "".join(f"<|{m['role']}|>{m['content']}\n" for m in conversation)
        runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(predicted.numpy().astype(int))) + 1)
        turns = [tokenizer.decode(ids[run].tolist()) for run in runs if predicted[run[0]]]
        assert turns == [m["content"] + "\n" for m in conversation if m["role"] == "assistant"]
    net = ModelSpec.parse(f"hf:{folder}").build(data.vocab_size)
    names = select_parameters(net, None)
    out = PerExampleGradients(net, names, CPU, CausalLM())(load_batch(data, [0, 1]))
    expected, f = causal_lm_autograd_loop(net, [data[0], data[1]], CausalLM(), names)
    torch.testing.assert_close(out.rows, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs, f.float(), rtol=1e-5, atol=1e-5)
    assert data.describe(1)["messages"] == CONVERSATIONS[1] and len(data.per_token()) == int(data[0][2].sum() + data[1][2].sum())


def test_explain_on_a_conversation_store_renders_the_prompt_with_the_chat_template(tmp_path):
    """A store trained on conversations: explain's prompt is a user turn in the chat template,
    then its generation prompt, as the tokenizer itself renders it; a given answer is the
    assistant turn's tokens (its end of turn included), exactly those predicted."""
    from trakwomp.data.text import answer_dataset

    folder = write_hf_folder(tmp_path / "hf", [r["text"] for r in fortunes("train", 300)])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    data = load_dataset(f"jsonl:{path}", tokenizer=f"hf:{folder}")
    tokenizer = data.tokenizer.tokenizer
    user = [{"role": "user", "content": "Should I wait?"}]
    rendered = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert data.answer_prompt_ids("Should I wait?") == list(rendered)
    target = answer_dataset("Should I wait?", data, completion="Yes.")
    ids, _, predicted = target[0]
    whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "Yes."}], tokenize=True,
                                          return_dict=False)
    assert ids.tolist() == list(whole) and tokenizer.decode(ids[predicted].tolist()) == "Yes.\n"


def test_every_command_on_a_prompt_completion_store_and_shards_equal_one_process(prompts, tmp_path, cli):
    """train (reference and LDS), featurize in two shards (equal to one process, bitwise) and with
    the factored engine, finalize, score, lds, predict, groups and show on answers."""
    targets = write_jsonl(tmp_path / "targets.jsonl", quote_rows(4, start=100))
    store, whole = str(tmp_path / "store"), str(tmp_path / "whole")
    common = ["--task", "causal-lm", "--width", "16", "--layers", "1", "--heads", "2", "--epochs", "1", "-q"]
    for args in (["train", store, "--data", f"jsonl:{prompts}", *common],
                 ["train", store, "--data", f"jsonl:{prompts}", *common, "--role", "lds", "--num-models", "4",
                  "--targets", f"jsonl:{targets}"]):
        assert cli(*args).exit_code == 0
    factored = str(tmp_path / "factored")
    shutil.copytree(store, whole)
    shutil.copytree(store, factored)
    featurize_args = ["--blocks", "2", "--block-dim", "8", "--chunk-rows", "8", "-q"]
    for shard in ("0/2", "1/2"):
        assert cli("featurize", store, *featurize_args, "--shard", shard).exit_code == 0
    assert cli("featurize", whole, *featurize_args).exit_code == 0
    for name in ("phi", "q", "margins"):
        np.testing.assert_array_equal(Store.open(store).read_array(f"features/000000/{name}"),
                                      Store.open(whole).read_array(f"features/000000/{name}"))
    for args in (["finalize", store, "-q"], ["score", store, "--targets", f"jsonl:{targets}", "-q"]):
        assert cli(*args).exit_code == 0
    lds = json.loads(cli("lds", store, "--json").stdout)
    np.save(tmp_path / "half.npy", np.arange(0, 24, 2))
    assert len(json.loads(cli("predict", store, "--subset", str(tmp_path / "half.npy"), "--json").stdout)["predicted_margin"]) == 4
    groups = json.loads(cli("groups", store, "--json").stdout)
    shown = json.loads(cli("show", store, "--target", "1", "--out", str(tmp_path / "show.html"), "--json").stdout)
    assert lds["results"][0]["targets"] == 4 and {g["group"] for g in groups["groups"]} <= {r["source"] for r in quote_rows(24)}
    assert shown[0]["target_completion"] == quote_rows(4, start=100)[1]["completion"]
    assert cli("featurize", factored, "--projector", "factored", "--block-dim", "16", "-q").exit_code == 0


@pytest.mark.parametrize("engine", ["per-example", "factored"])
def test_a_texts_tokens_share_one_forward_pass_and_each_gets_its_own_gradient(prompts, engine):
    """Per-token rows of three texts in one batch: the model runs once per text (per-example
    engine) or once for the batch (factored), and each row's gradient and f are those of its
    token alone, by the autograd loop over the single unpadded text."""
    tokens = load_dataset(f"jsonl:{prompts}").per_token()
    rows = [r for r in range(len(tokens)) if tokens.rows[r, 0] in (2, 5, 7)][::3]
    batch = load_batch(tokens, rows)
    assert len(batch) == len(rows) and len(batch.inputs[0]) == 3  # each text once
    torch.manual_seed(0)
    net = TINY_GPT.build(tokens.vocab_size).eval()
    names = select_parameters(net, None)
    forward = net.forward
    calls = []
    net.forward = lambda *args: calls.append(args[0].shape) or forward(*args)
    if engine == "per-example":
        out = PerExampleGradients(net, names, CPU, CausalLM())(batch)
        assert len(calls) == 3
    else:
        layers = factored_layers(net, names, 16)
        out = FactoredFeatures(net, layers, 0, 0, CPU, CausalLM())(batch)
        assert calls[0][0] == 3 and len(calls) == 1 + 2  # the batch once, then the check of 2 rows alone
    net.forward = forward
    singles = [(tokens.texts[int(i)][0], 0, torch.arange(len(tokens.texts[int(i)][0])) == int(t))
               for i, t in tokens.rows[rows]]
    expected, f = causal_lm_autograd_loop(net, singles, CausalLM(), names)
    torch.testing.assert_close(out.outputs, f.float(), rtol=1e-5, atol=1e-5)
    if engine == "per-example":
        torch.testing.assert_close(out.rows, expected, rtol=1e-4, atol=1e-6)
    else:  # the Kronecker projection of each token's autograd gradient
        projected = [kronecker_features(net, layers, split_gradient(net, names, g)) for g in expected]
        torch.testing.assert_close(out.rows.double(), torch.stack(projected), rtol=1e-4, atol=1e-6)


def test_sampled_bpe_answers_are_scored_as_the_ids_drawn_not_as_their_text_tokenized_again(tmp_path):
    """A BPE model sampled hot writes token sequences that decoding and tokenizing again would
    change (canonical merges); the answer's ids are those a step-by-step sampling loop draws."""
    from trakwomp.analysis.explain import Generation, generate
    from trakwomp.data.text import answer_dataset

    folder = write_hf_folder(tmp_path / "hf", [r["text"] for r in fortunes("train", 300)])
    data = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'pc.jsonl', quote_rows(2))}", tokenizer=f"hf:{folder}")
    net = ModelSpec.parse(f"hf:{folder}").build(data.vocab_size).eval()
    prompt = quote_rows(1)[0]["prompt"]
    tokenizer = data.tokenizer.tokenizer
    changed = 0
    for seed in range(6):
        ids, sampler = tokenizer(prompt)["input_ids"], torch.Generator().manual_seed(seed)
        start = len(ids)
        for _ in range(8):
            with torch.no_grad():
                logits = net(torch.tensor([ids]), None)[0, -1, :data.vocab_size]
            ids.append(int(torch.multinomial(torch.softmax(logits / 2.0, -1), 1, generator=sampler)))
        drawn = ids[start:]
        answer = generate(net, data, prompt, Generation(8, temperature=2.0, seed=seed), CPU)
        target = answer_dataset(prompt, data, completion_ids=answer.ids)
        assert answer.ids == drawn and target.completion_ids(0) == drawn
        assert target[0][0].tolist() == tokenizer(prompt)["input_ids"] + drawn
        changed += tokenizer(tokenizer.decode(drawn), add_special_tokens=False)["input_ids"] != drawn
    assert changed  # the answers that the old decode and tokenize would have scored as other ids
