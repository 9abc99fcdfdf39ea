"""Text and language models: the fortunes-mini asset, jsonl data and tokenizers, the causal-lm
output against its closed form, per-example gradients of sequence models (built-in gpt and a
Hugging Face GPT-2) against an autograd loop over single unpadded examples, and the whole
pipeline on text from the command line."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY_GPT,
    causal_lm_autograd_loop,
    block_diagonal_scores,
    fortunes,
    independent_lds,
    plain,
    soft_thresholded,
    write_hf_folder,
    write_jsonl,
)
from trakwomp.store import Store

from trakwomp.data.base import Batch, load_batch
from trakwomp.data.specs import load_dataset
from trakwomp.data.tokenizers import ByteTokenizer, HuggingFaceTokenizer
from trakwomp.errors import UserError
from trakwomp.features.gradients import PerExampleGradients, select_parameters
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.train import load_reference_model, train
from trakwomp.tasks.causal_lm import CausalLM
from trakwomp.tasks.classification import Classification

ASSET = REPO / "trakwomp" / "assets" / "fortunes_mini.jsonl.gz"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("hf"), [r["text"] for r in fortunes("train", 300)])


def test_fortunes_mini_is_small_has_its_provenance_and_keeps_train_and_test_apart():
    rows = [json.loads(line) for line in gzip.decompress(ASSET.read_bytes()).decode().splitlines()]
    assert ASSET.stat().st_size < 2 * 2 ** 20
    train, test = load_dataset("fortunes-mini:train"), load_dataset("fortunes-mini:test")
    assert (len(train), len(test)) == (2000, 200) == (sum(r["split"] == "train" for r in rows), sum(r["split"] == "test" for r in rows))
    assert not {train.text(i) for i in range(len(train))} & {test.text(i) for i in range(len(test))}
    assert len({train.source(i) for i in range(len(train))}) > 30
    provenance = (ASSET.parent / "fortunes_mini.md").read_text()
    assert "fortunes.tar.gz" in provenance and "BSD" in provenance and "build_fortunes_mini.py" in provenance
    # bytes: a start token, then the text's UTF-8 bytes
    ids, label, predicted = train[0]
    assert ids[0] == 256 and bytes(ids[1:].tolist()).decode("utf-8") == train.text(0) and label == 0 and predicted is None


def test_jsonl_labels_sources_truncation_and_a_fingerprint_over_the_tokens(tmp_path):
    rows = [{"text": "héllo wörld", "label": "b", "source": "s1"}, {"text": "x" * 40, "label": "a"},
            {"text": "short", "label": "b", "source": "s2"}]
    data = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'd.jsonl', rows)}")
    assert data.classes == ("a", "b") and data.labels.tolist() == [1, 0, 1]
    assert [data.source(i) for i in range(3)] == ["s1", "", "s2"]
    assert data.lengths.tolist() == [1 + len("héllo wörld".encode()), 41, 6] and data.truncated == 0
    cut = load_dataset(f"jsonl:{tmp_path / 'd.jsonl'}", max_length=10)
    assert cut.truncated == 2 and cut.lengths.tolist() == [10, 10, 6] and len(cut[1][0]) == 10
    assert cut.fingerprint().sha256 != data.fingerprint().sha256
    rows[2]["text"] = "shorT"
    assert load_dataset(f"jsonl:{write_jsonl(tmp_path / 'e.jsonl', rows)}").fingerprint().sha256 != data.fingerprint().sha256
    batch = load_batch(data, [0, 2])
    ids, mask = batch.inputs
    assert ids.shape == (2, 14) and mask.sum(1).tolist() == [14, 6] and (ids[1, 6:] == 0).all()


def test_a_byte_order_mark_at_the_start_of_a_jsonl_file_is_read_as_one(tmp_path):
    """Files saved by Windows editors start with EF BB BF: read, not refused, and the texts are
    those of the same file without it (byte for byte: same fingerprint)."""
    rows = [{"text": "first", "source": "s"}, {"text": "second", "source": "s"}]
    plain_file = write_jsonl(tmp_path / "plain.jsonl", rows)
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain_file.read_bytes())
    with_mark = load_dataset(f"jsonl:{marked}")
    assert with_mark.text(0) == "first" and with_mark.fingerprint() == load_dataset(f"jsonl:{plain_file}").fingerprint()


def test_a_text_longer_than_the_context_is_refused_by_its_bytes_before_it_is_tokenized(tmp_path, monkeypatch):
    """A 2 MB line against a 512-token context: its byte length proves it too long, so the
    tokenizer never runs (on a 100 MB line it would hold about 1 GB before the refusal)."""
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "short one"}, {"text": "y" * 2_000_000}])
    data = load_dataset(f"jsonl:{path}")

    def no_tokenizing(*args):
        raise AssertionError("the texts were tokenized")

    monkeypatch.setattr(ByteTokenizer, "encode", no_tokenizing)
    with pytest.raises(UserError, match=r"text 1 of .* has at least 2000001 tokens, more than the context .*\(512\)"):
        train(tmp_path / "store", data, TINY_GPT, task=CausalLM())
    assert not (tmp_path / "store").exists()


def test_the_token_bound_from_bytes_holds_and_a_cut_keeps_the_first_ids(hf_folder):
    """Against the tokenizers run directly: the bound never exceeds the real count (and is not
    trivially 0), and `encode` with a limit returns the full encoding's first ids and full count."""
    texts = [r["text"] for r in fortunes("test", 40)] + ["\u00e9\u00e8" * 30, "\u65e5\u672c\u8a9e", " " * 20, "x"]
    hf = HuggingFaceTokenizer(str(hf_folder))
    full = {"bytes": [[256, *t.encode("utf-8")] for t in texts], "hf": hf.tokenizer(texts)["input_ids"]}
    for name, tokenizer in (("bytes", ByteTokenizer()), ("hf", hf)):
        counts = np.array([len(ids) for ids in full[name]])
        fewest = tokenizer.fewest_tokens(texts)
        assert (fewest <= counts).all() and (fewest > 0).all(), name
        ids, lengths = tokenizer.encode(texts, 7)
        assert lengths.tolist() == counts.tolist() and [i.tolist() for i in ids] == [f[:7] for f in full[name]]
    assert (ByteTokenizer().fewest_tokens(texts) == [len(f) for f in full["bytes"]]).all()


def test_the_causal_lm_output_is_the_log_odds_of_the_sequence_or_token_probability():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    batch = Batch((ids, mask), torch.zeros(2, dtype=torch.long))
    for output in ("sequence", "token"):
        f = CausalLM(output).outputs(logits, batch)
        for row, real in enumerate((5, 3)):
            log_probs = torch.log_softmax(logits[row], dim=-1)
            loss = -sum(float(log_probs[t, ids[row, t + 1]]) for t in range(real - 1))
            p = math.exp(-loss / (real - 1) if output == "token" else -loss)
            assert float(f[row]) == pytest.approx(math.log(p / (1 - p)), rel=1e-12)
            assert float(torch.sigmoid(-f[row])) == pytest.approx(1 - p, rel=1e-12)  # q = 1 - p
    # a long sequence: p underflows, f stays finite (about -L)
    long_loss = CausalLM("sequence").outputs(torch.zeros(1, 400, 257), Batch((torch.zeros(1, 400, dtype=torch.long),
                                                                    torch.ones(1, 400, dtype=torch.bool)), torch.zeros(1)))
    # 399 float32 losses of log(257) summed: at most 399 roundings of float32's epsilon, in any order
    assert float(long_loss) == pytest.approx(-399 * math.log(257), rel=400 * float(torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("output", ["sequence", "token"])
def test_gpt_per_example_gradients_with_padding_match_single_examples(output):
    data = load_dataset("fortunes-mini:train")
    torch.manual_seed(0)
    net = TINY_GPT.build(data.vocab_size)
    positions = [0, 5, 7, 11]  # texts of different lengths: all but the longest are padded
    assert len(set(data.lengths[positions])) == len(positions)
    names = select_parameters(net, None)
    task = CausalLM(output)
    out = PerExampleGradients(net, names, torch.device("cpu"), task)(load_batch(data, positions))
    expected, f = causal_lm_autograd_loop(net, [data[i] for i in positions], task, names)
    torch.testing.assert_close(out.rows, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs, f.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.q, torch.sigmoid(-f.float()))


def test_hugging_face_gpt2_per_example_gradients_with_padding_match_single_examples(hf_folder):
    data = load_dataset("fortunes-mini:test", tokenizer=f"hf:{hf_folder}")
    net = ModelSpec.parse(f"hf:{hf_folder}").build(data.vocab_size)
    positions = [0, 1, 2]
    assert len(set(data.lengths[positions])) == 3
    names = select_parameters(net, None)
    out = PerExampleGradients(net, names, torch.device("cpu"), CausalLM())(load_batch(data, positions))
    expected, f = causal_lm_autograd_loop(net, [data[i] for i in positions], CausalLM(), names)
    torch.testing.assert_close(out.rows, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs, f.float(), rtol=1e-5, atol=1e-5)


def test_a_text_classifier_by_factory_gets_margin_gradients(tmp_path, user_module):
    user_module("textnets.bag", "import torch\n"
                "class Bag(torch.nn.Module):\n"
                "    def __init__(self, classes):\n"
                "        super().__init__()\n"
                "        self.embed = torch.nn.Embedding(257, 8)\n"
                "        self.out = torch.nn.Linear(8, classes)\n"
                "    def forward(self, ids, mask):\n"
                "        m = mask.unsqueeze(-1).float()\n"
                "        return self.out((self.embed(ids) * m).sum(1) / m.sum(1))\n"
                "def build(classes):\n"
                "    return Bag(classes)\n")
    rows = [{"text": r["text"], "label": r["source"]} for r in fortunes("train", 400) if r["source"] in ("people", "zippy")]
    data = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'labelled.jsonl', rows)}")
    spec = ModelSpec.parse("textnets.bag:build")
    torch.manual_seed(0)
    net = spec.build(data.num_classes)
    names = select_parameters(net, None)
    positions = list(range(6))
    out = PerExampleGradients(net, names, torch.device("cpu"), Classification())(load_batch(data, positions))
    params = dict(net.named_parameters())
    expected = []
    for ids, label, _ in (data[i] for i in positions):  # the margin of each example alone, by autograd
        logits = net(ids[None], torch.ones(1, len(ids), dtype=torch.bool))[0]
        others = torch.cat([logits[:label], logits[label + 1:]])
        expected.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            logits[label] - torch.logsumexp(others, 0), [params[n] for n in names])]))
    torch.testing.assert_close(out.rows, torch.stack(expected), rtol=1e-4, atol=1e-6)
    report = train(tmp_path / "store", data, spec, num_models=1, recipe=None)
    assert report.trained == [0]


def test_featurized_text_equals_autograd_gradients_of_the_trained_model(tmp_path):
    """End to end through train and featurize with the identity projector (no projection): the
    stored features are the per-example gradients, in row order, whatever the length batching."""
    rows = fortunes("train", 24)
    data = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'train.jsonl', rows)}")
    task = CausalLM("token")
    train(tmp_path / "store", data, TINY_GPT, task=task, recipe=None, num_models=1)
    net = load_reference_model(tmp_path / "store", 0, data.vocab_size)
    names = select_parameters(net, None)
    p = sum(param.numel() for param in net.parameters())
    featurize(tmp_path / "store", projector=ProjectorSpec("identity", 0, 1, p), chunk_rows=10, batch_size=4)
    store = Store.open(tmp_path / "store")
    expected, f = causal_lm_autograd_loop(net, [data[i] for i in range(len(data))], task, names)
    torch.testing.assert_close(torch.from_numpy(store.array("features/000000/phi")[...]), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(store.array("features/000000/margins")[...]), f.float(), rtol=1e-5, atol=1e-5)
    assert store.manifest.task.json == {"name": "causal-lm", "output": "token"}


def test_every_command_on_text_and_an_escaped_html_page(tmp_path, cli):
    rows = fortunes("train", 47) + [{"text": "<script>alert('x')</script> & more", "source": "<b>mallory</b>"}]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    targets_file = write_jsonl(tmp_path / "targets.jsonl", fortunes("test", 6))
    store = str(tmp_path / "store")
    common = ["--task", "causal-lm", "--data", f"jsonl:{train_file}", "--width", "16", "--layers", "1", "--heads", "2",
              "--epochs", "1", "-q"]
    assert cli("train", store, *common).exit_code == 0
    assert cli("train", store, *common, "--role", "lds", "--num-models", "4", "--targets", f"jsonl:{targets_file}").exit_code == 0
    assert cli("featurize", store, "--blocks", "4", "--block-dim", "8", "--chunk-rows", "20", "-q").exit_code == 0
    for blocks in ("1", "4"):
        assert cli("finalize", store, "--blocks", blocks, "-q").exit_code == 0
        assert cli("score", store, "--targets", f"jsonl:{targets_file}", "--blocks", blocks, "-q").exit_code == 0
    result = cli("lds", store, "--blocks", "1", "--blocks", "4", "--json")
    report = json.loads(result.stdout)
    handle = Store.open(store)
    keys = {blocks: next(k for k in handle.manifest.scores if f"-b{blocks}-" in k) for blocks in (1, 4)}
    assert [r["targets"] for r in report["results"]] == [6, 6] and report["results"][0]["models"] == 4
    for result_row, blocks in zip(report["results"], (1, 4), strict=True):
        assert result_row["lds"] == pytest.approx(independent_lds(handle, keys[blocks]), abs=1e-9)
    np.save(tmp_path / "subset.npy", np.arange(0, 48, 2))
    predicted = json.loads(cli("predict", store, "--subset", str(tmp_path / "subset.npy"), "--json").stdout)
    tau = soft_thresholded(handle.read_array(f"scores/{keys[4]}/tau"))
    np.testing.assert_allclose(predicted["predicted_margin"], tau[:, ::2].sum(axis=1), rtol=1e-5, atol=1e-6)
    page = tmp_path / "show.html"
    result = cli("show", store, "--target", "0", "--k", "48", "--threshold", "0", "--out", str(page), "--json")
    shown = json.loads(result.stdout)
    assert {r["train_index"] for r in shown} == set(range(48))  # k = all, raw scores: every train text on the page
    html = page.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in html
    assert "&lt;b&gt;mallory&lt;/b&gt;" in html and "<b>" not in html
    assert shown[0]["target_text"] == fortunes("test", 1)[0]["text"] and "train_source" in shown[0]
    status = cli("status", store, "--json")
    assert status.exit_code == 0, plain(status.output)
    stages = {(p["stage"], p["what"]): (p["done"], p["total"]) for p in json.loads(status.stdout)["stages"]}
    assert stages[("train", "reference models")] == (1, 1) and stages[("train", "lds models")] == (4, 4)
    assert stages[("featurize", "model 0 (train:reference/000000) row chunks")] == (3, 3)  # 48 texts, 20 a chunk
    assert sorted(v for k, v in stages.items() if k[0] == "finalize") == [(1, 1), (4, 4)]


def test_a_hugging_face_model_and_tokenizer_from_a_folder_through_the_pipeline(tmp_path, hf_folder, cli):
    train_file = write_jsonl(tmp_path / "train.jsonl", fortunes("train", 24))
    targets_file = write_jsonl(tmp_path / "targets.jsonl", fortunes("test", 4))
    store = str(tmp_path / "store")
    hf = f"hf:{hf_folder}"
    result = cli("train", store, "--task", "causal-lm", "--model", hf, "--tokenizer", hf, "--data", f"jsonl:{train_file}",
                 "--epochs", "1", "--max-length", "24", "-q")
    assert result.exit_code == 0, plain(result.output)
    assert "cut" in plain(result.stderr) and "to --max-length 24 tokens" in plain(result.stderr)
    for args in (["featurize", store, "--blocks", "2", "--block-dim", "8"], ["finalize", store, "--ridge", "0.01"],
                 ["score", store, "--targets", f"jsonl:{targets_file}", "--ridge", "0.01"]):  # the store's tokenizer
        result = cli(*args, "-q")
        assert result.exit_code == 0, plain(result.output)
    handle = Store.open(store)
    (key, entry), = handle.manifest.json["scores"].items()
    np.testing.assert_allclose(handle.read_array(f"scores/{key}/tau"),
                               block_diagonal_scores(handle, [8, 8], f"targets/{entry['targets']}/", 0.01),
                               rtol=1e-3, atol=1e-6)
    manifest = Store.open(store).manifest
    assert manifest.tokenizer.spec == "hf" and manifest.dataset_source.max_length == 24
    assert manifest.model.name == hf
