"""LoRA fine-tunes (peft): a peft adapter folder featurized as `--model hf:ADAPTER`, its features
by both engines against autograd on peft's own model (PeftModel.from_pretrained); `train --lora`
keeping each model's adapter weights only, on a base that never changes; a changed base
refused; the memory estimate counting the frozen base once."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import (
    causal_lm_autograd_loop,
    fortunes,
    kronecker_features,
    plain,
    split_gradient,
    write_hf_folder,
    write_jsonl,
)
from trakwomp.store import Store

from trakwomp.analysis.explain import Generation, explain
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.factored import factored_layers
from trakwomp.features.gradients import select_parameters
from trakwomp.features.memory import featurize_need
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.features.settings import FeatureSettings
from trakwomp.models.checkpoints import state_hash
from trakwomp.models.lora import LoraSpec
from trakwomp.models.registry import read_checkpoints
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.train import load_reference_model, train
from trakwomp.tasks.causal_lm import CausalLM

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
ADAPTER_PARAMS = 4 * 16 + 48 * 4  # c_attn of the 1-layer GPT-2 (16 -> 48), rank 4: A then B


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """A tiny GPT-2 base with its BPE tokenizer, 12 prompt/completion pairs read with it, and a
    peft adapter of the base (rank 4 on c_attn, B drawn at random so that it matters)."""
    root = tmp_path_factory.mktemp("lora")
    base = write_hf_folder(root / "base", [r["text"] for r in fortunes("train", 200)])
    rows = [{"prompt": r["text"][:24], "completion": r["text"][24:48] or ".", "source": r["source"]}
            for r in fortunes("train", 12)]
    data = load_dataset(f"jsonl:{write_jsonl(root / 'pc.jsonl', rows)}", tokenizer=f"hf:{base}")
    torch.manual_seed(1)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(root / "adapter")
    return root, base, data


class PeftCalled(torch.nn.Module):
    """peft's model called as the autograd loop calls models: (ids, mask) -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask=None):
        return self.model(input_ids=ids).logits


def peft_reference(base, adapter, data, positions):
    """Each example alone through peft's own model, autograd over the adapter's weights (A, B in
    peft's parameter order), f from its closed form."""
    model = PeftCalled(peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                                                      str(adapter), is_trainable=True).eval())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n.split("c_attn.")[1] for n in names] == ["lora_A.default.weight", "lora_B.default.weight"]
    return causal_lm_autograd_loop(model, [data[i] for i in positions], CausalLM(), names)


def test_an_adapter_folder_is_featurized_over_its_weights_by_both_engines(lora_files, tmp_path):
    root, base, data = lora_files
    spec = ModelSpec.parse(f"hf:{root / 'adapter'}")
    assert spec.name == f"hf:{base}" and spec.lora == LoraSpec(4, 8.0, ("c_attn",))
    featurize(tmp_path / "identity", data, spec, task=CausalLM(), projector=ProjectorSpec("identity", 0, 4, 64))
    handle = Store.open(tmp_path / "identity")
    assert handle.manifest.featurize.num_params == ADAPTER_PARAMS
    expected, f = peft_reference(base, root / "adapter", data, range(len(data)))
    phi = handle.read_array("features/000000/phi")
    np.testing.assert_allclose(phi, expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    np.testing.assert_allclose(handle.read_array("features/000000/margins"), f.numpy(), rtol=1e-5, atol=1e-5)
    finalize(tmp_path / "identity", ViewSpec(ridge=0.1))  # explain answers with the adapter: peft's greedy answer
    explained = explain(tmp_path / "identity", "Quoth the raven ", generation=Generation(max_new_tokens=6),
                        view=ViewSpec(ridge=0.1), k=2)
    model = PeftCalled(peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                                                      str(root / "adapter")).eval())
    ids = data.tokenizer.tokenizer("Quoth the raven ")["input_ids"]
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert explained.answer_ids == ids[-6:]
    featurize(tmp_path / "factored", data, spec, task=CausalLM(), projector=ProjectorSpec("factored", block_dim=16))
    net = ModelSpec.parse(f"hf:{root / 'adapter'}").build(data.vocab_size)
    net.load_state_dict(read_checkpoints(spec, data.vocab_size, [str(root / "adapter")])[0][1], strict=False)
    names = select_parameters(net, None)
    layers = factored_layers(net, names, 16)
    assert [layer.name.split("c_attn.")[1] for layer in layers] == ["lora_A.default.weight", "lora_B.default.weight"]
    projected = torch.stack([kronecker_features(net, layers, split_gradient(net, names, g)) for g in expected])
    phi = Store.open(tmp_path / "factored").read_array("features/000000/phi")
    np.testing.assert_allclose(phi, projected.numpy(), rtol=1e-4, atol=1e-5 * float(projected.abs().max()))


@pytest.fixture(scope="module")
def lora_store(lora_files):
    """`train --lora 4` of the base: one reference model, 1 epoch, featurized at 2 x 16."""
    root, base, data = lora_files
    store = root / "trained"
    train(store, data, ModelSpec.parse(f"hf:{base}", lora=LoraSpec(4)), task=CausalLM(),
          recipe=Recipe.for_task(CausalLM(), epochs=2, batch_size=4))
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 16))
    finalize(store)
    return store


def test_train_lora_keeps_each_models_adapter_weights_only_on_the_unchanged_base(lora_files, lora_store):
    root, base, data = lora_files
    handle = Store.open(lora_store)
    entry = handle.manifest.models[0]
    stored = {k: torch.from_numpy(v) for k, v in handle.read_arrays(entry.weights).items()}
    assert sorted(k.split("c_attn.")[1] for k in stored) == ["lora_A.default.weight", "lora_B.default.weight"]
    assert state_hash(stored) == entry.sha256 and handle.manifest.featurize.num_params == ADAPTER_PARAMS
    assert handle.manifest.model.lora.json == {"r": 4, "alpha": 8.0, "targets": ["c_attn"], "dropout": 0.0}
    net = load_reference_model(lora_store, 0, data.vocab_size)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    weights = {k.removeprefix("model."): v for k, v in net.state_dict().items()}
    for name, value in original.items():  # the base as it was; the adapter moved B away from zero
        key = name.replace("c_attn.weight", "c_attn.base_layer.weight").replace("c_attn.bias", "c_attn.base_layer.bias")
        assert torch.equal(weights[key], value), name
    assert float(stored[next(k for k in stored if "lora_B" in k)].abs().max()) > 0


def test_a_changed_base_is_refused_in_one_line(lora_files, lora_store, tmp_path, cli):
    root, base, data = lora_files
    moved = shutil.copytree(lora_store, tmp_path / "store")
    changed = shutil.copytree(base, tmp_path / "base")
    document = json.loads((moved / "zarr.json").read_text())
    document["attributes"]["trakwomp"]["model"]["name"] = f"hf:{changed}"
    (moved / "zarr.json").write_text(json.dumps(document))
    targets = ["--targets", f"jsonl:{root / 'pc.jsonl'}", "--quiet"]
    assert cli("score", str(moved), *targets).exit_code == 0  # a copy of the base is the same base
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-3}))
    result = cli("score", str(moved), *targets)
    assert result.exit_code == 2 and "has changed since the store's LoRA models were made on it" in plain(result.stderr)
    assert len(plain(result.stderr).strip().splitlines()) == 1


def test_the_memory_estimate_counts_the_frozen_base_once(lora_files):
    root, base, data = lora_files
    spec = ModelSpec.parse(f"hf:{root / 'adapter'}")
    net = spec.build(data.vocab_size)
    settings = FeatureSettings.for_model(ProjectorSpec("sjlt", 0, 2, 16), "float32", net, select_parameters(net, None))
    need = featurize_need(net, settings.method, settings.layout, settings.num_params, 16, 0, torch.device("cpu"))
    original = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    base_bytes = sum(4 * p.numel() for p in original.parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    assert need.fixed["frozen base (1 more copy)"][0] == base_bytes
    assert need.fixed["model (4 more copies)"][0] == 4 * (4 * ADAPTER_PARAMS + buffers)


def test_lora_options_that_cannot_work_are_refused(lora_files, tmp_path):
    root, base, data = lora_files
    for make, message in ((lambda: ModelSpec.parse("gpt", lora=LoraSpec(4)), "`lora` fine-tunes a Hugging Face model"),
                          (lambda: ModelSpec.parse(f"hf:{root / 'adapter'}", lora=LoraSpec(4)), "is an adapter already"),
                          (lambda: LoraSpec(0), "`lora` must be a rank of at least 1"),
                          (lambda: ModelSpec.parse(f"hf:{base}", lora=LoraSpec(2, targets=("no_such",))).build(300),
                           "cannot add LoRA layers to the modules no_such")):
        with pytest.raises(UserError, match=message):
            make()
    elsewhere = shutil.copytree(root / "adapter", tmp_path / "adapter")
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gpt2"}))
    with pytest.raises(UserError, match="its base model 'gpt2' is not a local folder"):
        ModelSpec.parse(f"hf:{elsewhere}")
    for extra, message in (({"modules_to_save": ["ln_f"]}, "adapters with modules_to_save are not supported"),
                           ({"bias": "lora_only"}, "an adapter that trains biases")):
        (elsewhere / "adapter_config.json").write_text(json.dumps({**config, **extra}))
        with pytest.raises(UserError, match=message):  # its other trained weights would be silently left out
            ModelSpec.parse(f"hf:{elsewhere}")


def test_the_commands_train_lora_and_featurize_an_adapter(lora_files, tmp_path, cli):
    """As a user types them: `train --model hf:BASE --lora 4` (reference and LDS models on the one
    base) and `featurize --model hf:ADAPTER` (the adapter's weights are the model featurized)."""
    root, base, _ = lora_files
    data = ["--data", f"jsonl:{root / 'pc.jsonl'}", "--tokenizer", f"hf:{base}"]
    lora = ["--task", "causal-lm", "--model", f"hf:{base}", "--lora", "4", "--lora-alpha", "4", "--epochs", "1",
            "--batch-size", "6", "--quiet"]
    assert cli("train", str(tmp_path / "s"), *data, *lora).exit_code == 0
    result = cli("train", str(tmp_path / "s"), *data, *lora, "--role", "lds", "--num-models", "2",
                 "--targets", f"jsonl:{root / 'pc.jsonl'}")
    assert result.exit_code == 0, plain(result.output)
    assert Store.open(tmp_path / "s").manifest.model.lora.alpha == 4.0
    result = cli("featurize", str(tmp_path / "a"), *data, "--model", f"hf:{root / 'adapter'}", "--task", "causal-lm",
                 "--blocks", "2", "--block-dim", "16", "--quiet")
    assert result.exit_code == 0, plain(result.output)
    models = Store.open(tmp_path / "a").manifest.json["models"]
    assert [m["source"] for m in models] == [str(root / "adapter")]
