"""The catalogue of bad inputs. Each is refused with one line on stderr ("error: ...") and exit
code 2, without a traceback, and, refused before any work, leaves the store byte for byte as it
was (every path and every file's bytes hashed before and after) or, for a new path, creates
nothing. Faults in the middle of work (a full disk, a read-only file system) are in
tests/test_faults.py.
"""

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY,
    fortunes,
    plain,
    tree_digest,
    write_hf_folder,
    write_jsonl,
    write_scored_text_store,
    write_tiny_images,
)
from PIL import Image
from trakwomp.cli.main import app
from typer.testing import CliRunner

from trakwomp.analysis.groups import group_scores
from trakwomp.data.specs import load_dataset
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.train import train

RECIPE = Recipe(epochs=1, batch_size=16, lr=0.05)
STAGES = ("trained", "featurized", "finalized", "scored", "full")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Stores after each stage (trained, featurized, finalized, scored, full = with LDS models),
    and the bad (and good) input files the cases name."""
    root = tmp_path_factory.mktemp("bad-inputs")
    train_set = load_dataset(f"npz:{write_tiny_images(root / 'train.npz')}")
    targets = load_dataset(f"npz:{write_tiny_images(root / 'targets.npz', n=9, seed=1)}")
    write_tiny_images(root / "same-size-other-pixels.npz", seed=2)
    build = [
        lambda s: train(s, train_set, TINY, num_models=2, recipe=RECIPE),
        lambda s: featurize(s, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16, batch_size=16),
        lambda s: finalize(s),
        lambda s: score(s, targets),
        lambda s: train(s, train_set, TINY, role="lds", num_models=2, targets=targets, recipe=RECIPE),
    ]
    for i, (stage, step) in enumerate(zip(STAGES, build, strict=True)):
        if i:
            shutil.copytree(root / STAGES[i - 1], root / stage)
        step(root / stage)
    write_text_inputs(root)
    shutil.copytree(root / "full", root / "grouped")
    labels = np.array([f"g{i % 4}" for i in range(48)])
    np.save(root / "groups.npy", labels)
    group_scores(root / "grouped", root / "groups.npy")
    np.save(root / "groups-short.npy", labels[:40])
    np.save(root / "one-group.npy", np.array(["all"] * 48))
    excluding = root / "excluding"  # reference models that never saw group g0, scored
    train(excluding, train_set, TINY, recipe=replace(RECIPE, exclude_groups=("g0",)), groups=root / "groups.npy")
    featurize(excluding, projector=ProjectorSpec("sjlt", 0, 2, 8))
    finalize(excluding)
    score(excluding, targets)
    np.save(root / "groups-other.npy", np.roll(labels, 1))
    (root / "groups-missing.csv").write_text("index,group\n" + "".join(f"{i},g{i % 4}\n" for i in range(47)))
    shutil.copytree(root / "trained", root / "factored")
    featurize(root / "factored", projector=ProjectorSpec("factored", 0, block_dim=16), chunk_rows=16)

    np.savez(root / "empty.npz", x=np.zeros((0, 3, 16, 16), np.float32), y=np.zeros(0, np.int64))
    np.savez(root / "values.npz", x=np.zeros((8, 3, 16, 16), np.float32), y=np.linspace(0, 1, 8, dtype=np.float32))
    np.savez(root / "nan-values.npz", x=np.zeros((8, 3, 16, 16), np.float32), y=np.full(8, np.nan, np.float32))
    (root / "garbage.npz").write_bytes(b"not a zip archive")
    (root / "garbage.npy").write_bytes(b"not an array")
    for name, values in {"empty.npy": np.array([], np.int64), "beyond.npy": np.array([0, 9]),
                         "negative.npy": np.array([-1]), "floats.npy": np.array([0.5]),
                         "scores-3x5.npy": np.zeros((3, 5), np.float32)}.items():
        np.save(root / name, values)
    torch.save(ModelSpec.parse("resnet9", 0.125).build(4).state_dict(), root / "wider.pt")
    good = root / "good.pt"
    torch.save(TINY.build(4).state_dict(), good)
    (root / "truncated.pt").write_bytes(good.read_bytes()[:1000])
    featurize(root / "checkpointed", load_dataset(f"npz:{root / 'train.npz'}"), TINY, [str(good)],
              projector=ProjectorSpec("sjlt", 0, 2, 8))
    (root / "junk.pt").write_bytes(b"junk" * 100)
    torch.save({"layer": torch.nn.Linear(2, 2)}, root / "pickled.pt")
    (root / "images" / "cat").mkdir(parents=True)
    (root / "images" / "cat" / "0.png").write_bytes(b"not an image")
    write_bad_images(root)
    (root / "folder").mkdir()
    (root / "folder.npy").mkdir()
    (root / "folder" / "notes.txt").write_text("not a store")
    write_wide_store(root)
    return root


def write_wide_store(root: Path) -> None:
    """`wide`: a store of 1,200 train images of 8 x 8 pixels and a linear user model (finalized), 256
    targets for it, and 4 x 4 images, with the user models `with_user_models` makes importable."""
    (root / "usermods" / "catalognets").mkdir(parents=True)
    (root / "usermods" / "catalognets" / "__init__.py").touch()
    (root / "usermods" / "catalognets" / "nets.py").write_text(
        "import torch\n"
        "def four(num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, num_classes))\n"
        "def eight(num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, num_classes))\n")
    write_tiny_images(root / "four-pixels.npz", size=4)
    write_tiny_images(root / "wide-targets.npz", n=256, size=8, seed=1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        with_user_models(monkeypatch, root)
        model = ModelSpec.parse("catalognets.nets:eight")
        train(root / "wide", load_dataset(f"npz:{write_tiny_images(root / 'wide.npz', n=1200, size=8)}"), model,
              recipe=RECIPE)
        featurize(root / "wide", model=model, projector=ProjectorSpec("sjlt", 0, 2, 16), chunk_rows=256)
        finalize(root / "wide")


def write_bad_images(root: Path) -> None:
    """Image folders of one bad image each (PostScript named .png, a decompression bomb, an image
    beyond Pillow's pixel limit), of images of two sizes, and npz and groups files that broke
    readers before: a header of 10^12 elements, a superscript index, labels that are not UTF-8."""
    for name, write in (("postscript", lambda f: f.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
                                                                  b"newpath 0 0 moveto 8 8 lineto stroke showpage\n")),
                        ("bomb", lambda f: Image.new("1", (20000, 20000)).save(f)),
                        ("huge", lambda f: Image.new("1", (12000, 12000)).save(f))):
        (root / name / "cat").mkdir(parents=True)
        write(root / name / "cat" / "0.png")
    for label, size in (("cat", 8), ("dog", 9)):
        (root / "mixed" / label).mkdir(parents=True)
        Image.new("RGB", (size, size)).save(root / "mixed" / label / "0.png")
    header = {"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 10 ** 6)}
    with zipfile.ZipFile(root / "huge-header.npz", "w") as z:
        with z.open("x.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
        with z.open("y.npy", "w") as f:
            np.save(f, np.zeros(2, np.int64))
    (root / "groups-superscript.csv").write_text("index,group\n\u00b2,a\n")
    np.save(root / "groups-latin1.npy", np.array([b"caf\xe9"] * 48))
    (root / "surrogate.jsonl").write_text('{"text": "one"}\n{"text": "a \\ud800 b"}\n')
    (root / "surrogate-source.jsonl").write_text('{"text": "one", "source": "\\udfff"}\n')
    remote = shutil.copytree(root / "hf", root / "hf-remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "mine.Model"}}))


def write_text_inputs(root: Path) -> None:
    """A scored text store (`text`), good and bad jsonl files, and Hugging Face folders."""
    write_scored_text_store(root, "text", "texts.jsonl", "text-targets.jsonl")
    (root / "invalid.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n')
    (root / "no-text.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    (root / "empty-text.jsonl").write_text('{"text": ""}\n')
    (root / "latin1.jsonl").write_bytes('{"text": "one"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (root / "some-labels.jsonl").write_text('{"text": "one", "label": "a"}\n{"text": "two"}\n')
    write_jsonl(root / "long.jsonl", [{"text": "x" * 600}])
    write_jsonl(root / "no-completion.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "question?"}])
    write_jsonl(root / "empty-completion.jsonl", [{"prompt": "question?", "completion": ""}])
    write_jsonl(root / "text-and-prompts.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "plain"}])
    write_jsonl(root / "labelled-prompt.jsonl", [{"prompt": "a", "completion": "b", "label": "x"}])
    write_jsonl(root / "no-assistant.jsonl", [{"messages": [{"role": "user", "content": "hello?"}]}])
    write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    write_jsonl(root / "prompt-beyond-context.jsonl", [{"prompt": "p" * 600, "completion": "c"}])
    write_jsonl(root / "long-prompt.jsonl", [{"prompt": "p" * 30, "completion": "c"}, {"prompt": "q", "completion": "d"}])
    write_jsonl(root / "assistant-first.jsonl", [{"messages": [{"role": "assistant", "content": "hello"},
                                                               {"role": "user", "content": "hi"}]}])
    write_hf_folder(root / "hf", [r["text"] for r in fortunes("train", 100)])
    (root / "adapter-remote").mkdir()
    write_jsonl(root / "adapter-remote" / "adapter_config.json",
                [{"peft_type": "LORA", "base_model_name_or_path": "gpt2", "r": 4, "lora_alpha": 8}])
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf")),
                        peft.LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (root / "adapter-weightless").mkdir()
    (root / "adapter-weightless" / "adapter_config.json").write_text(json.dumps(config))
    shutil.copytree(root / "adapter", root / "adapter-saving-modules")
    (root / "adapter-saving-modules" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["ln_f"]}))
    failing = transformers.AutoTokenizer.from_pretrained(root / "hf")
    failing.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    failing.save_pretrained(root / "hf-failing-template")
    write_bad_jsonl(root)
    (root / "config-only").mkdir()
    (root / "config-only" / "config.json").write_text((root / "hf" / "config.json").read_text())


def write_bad_jsonl(root: Path) -> None:
    """JSON-lines files that were read wrong or crashed a reader: rows with the keys of two kinds,
    an unknown key, a number of 5,000 digits, nesting 100,000 deep, a non-string prompt."""
    write_jsonl(root / "text-and-prompt.jsonl", [{"text": "rendered", "prompt": "a", "completion": "b"}])
    write_jsonl(root / "text-and-messages.jsonl", [{"text": "rendered", "messages": [{"role": "user", "content": "a"}]}])
    write_jsonl(root / "messages-and-prompt.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                   {"role": "assistant", "content": "b"}], "prompt": 5}])
    write_jsonl(root / "text-prompt-then-text.jsonl", [{"text": "x", "prompt": "x", "completion": "y"}, {"text": "z"}])
    write_jsonl(root / "unknown-key.jsonl", [{"text": "one", "instruction": "say one"}])
    write_jsonl(root / "prompt-not-a-string.jsonl", [{"prompt": 5, "completion": "b"}])
    (root / "huge-number.jsonl").write_text('{"text": "x", "label": ' + "9" * 5000 + "}\n")
    (root / "deep.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n")
    (root / "fifo.npy").unlink(missing_ok=True)
    os.mkfifo(root / "fifo.npy")


def make_link(name: str, to: str):
    """A symbolic link beside the store (where the command runs) to `to` inside it."""
    def damage(store: Path) -> None:
        (store.parent / name).symlink_to(store / to)
    return damage


def link_inside(relative: str):
    """Move the store's folder `relative` out of the store and leave a link to it in its place."""
    def damage(store: Path) -> None:
        outside = store.parent / "outside"
        shutil.move(store / relative, outside)
        (store / relative).symlink_to(outside, target_is_directory=True)
    return damage


def replace_manifest(value):
    def damage(store: Path) -> None:
        document = json.loads((store / "zarr.json").read_text())
        document["attributes"]["trakwomp"] = value
        (store / "zarr.json").write_text(json.dumps(document))
    return damage


def nest_manifest(store: Path) -> None:
    text = (store / "zarr.json").read_text()
    (store / "zarr.json").write_text(text.replace('"trakwomp": {', '"deep": ' + "[" * 100000 + "]" * 100000
                                                  + ', "trakwomp": {', 1))


def edit_manifest(change):
    def damage(store: Path) -> None:
        document = json.loads((store / "zarr.json").read_text())
        change(document["attributes"]["trakwomp"])
        (store / "zarr.json").write_text(json.dumps(document))
    return damage


def overwrite(relative: str, data: bytes | None):
    """Replace a file of the store by `data`, or delete it (None)."""
    def damage(store: Path) -> None:
        path = store / relative
        path.unlink() if data is None else path.write_bytes(data)
    return damage


def escape_scores_key(manifest: dict) -> None:
    key, entry = manifest["scores"].popitem()
    manifest["scores"]["../../elsewhere"] = entry


@dataclass
class Case:
    """`args` of a command run on a copy of the store after `stage` (S in args, S/ a path inside
    it), or on a path that does not exist (stage None, S a new path); F/ in args is a file of the
    fixture's root."""

    id: str
    stage: str | None
    args: list[str]
    fragment: str
    damage: object = None
    mid_work: bool = False  # found in the middle of work: no unit published, no data rewritten
    prepare: object = None  # run with (monkeypatch, root) before the command: user modules, memory held


def with_user_models(monkeypatch, root: Path) -> None:
    """The fixture's models (`catalognets.nets`: `four` for 3 x 4 x 4 inputs, `eight` for 3 x 8 x 8) importable."""
    monkeypatch.syspath_prepend(str(root / "usermods"))


def with_user_models_and_nothing_held(monkeypatch, root: Path) -> None:
    """As `with_user_models`, and memory estimates without what the test process holds already."""
    with_user_models(monkeypatch, root)
    monkeypatch.setattr("trakwomp.features.memory.held_bytes", lambda device: 0)


CKPT = ["--data", "npz:F/train.npz", "--model", "resnet9", "--width", "0.0625", "--checkpoint"]
TRAIN = ["train", "S", "--data", "npz:F/train.npz", "--width", "0.0625", "--epochs", "1", "--batch-size", "16",
         "--lr", "0.05", "--num-models", "2"]
TARGETS = ["--targets", "npz:F/targets.npz"]
PHI_CHUNK = "features/000000/phi/c/0/0"
LM = ["train", "S", "--task", "causal-lm", "--width", "16", "--layers", "1", "--heads", "2", "--epochs", "1", "--data"]
HF = ["train", "S", "--task", "causal-lm", "--epochs", "1", "--data"]
TEXT_TARGETS = ["--targets", "jsonl:F/text-targets.jsonl"]

CASES = [
    # missing or unreadable paths
    Case("featurize-no-store", None, ["featurize", "S"], "no trakwomp store at"),
    Case("finalize-no-store", None, ["finalize", "S"], "no trakwomp store at"),
    Case("score-no-store", None, ["score", "S", *TARGETS], "no trakwomp store at"),
    Case("lds-no-store", None, ["lds", "S"], "no trakwomp store at"),
    Case("predict-no-store", None, ["predict", "S", "--subset", "F/beyond.npy"], "no trakwomp store at"),
    Case("status-no-store", None, ["status", "S"], "no trakwomp store at"),
    Case("store-is-a-file", None, ["finalize", "F/train.npz"], "is a file, not a store folder"),
    Case("store-is-another-folder", None, ["train", "F/folder", *TRAIN[2:]], "non-empty folder that is not a trakwomp store"),
    Case("data-file-missing", None, ["train", "S", "--data", "npz:F/missing.npz"], "no file"),
    Case("data-file-not-npz", "trained", ["score", "S", "--targets", "npz:F/garbage.npz"], "is not an .npz file"),
    Case("image-unreadable", "finalized", ["score", "S", "--targets", "imagefolder:F/images"], "cannot read image"),
    Case("image-postscript-named-png", "finalized", ["score", "S", "--targets", "imagefolder:F/postscript"],
         "trakwomp reads PNG, JPEG"),
    Case("image-decompression-bomb", "finalized", ["score", "S", "--targets", "imagefolder:F/bomb"],
         "could be decompression bomb"),
    Case("image-beyond-the-pixel-limit", "finalized", ["score", "S", "--targets", "imagefolder:F/huge"],
         "could be decompression bomb"),
    Case("images-of-two-sizes", None, ["train", "S", "--data", "imagefolder:F/mixed", "--width", "0.0625"],
         "holds examples of different shapes"),
    Case("npz-header-of-a-trillion-elements", None, ["train", "S", "--data", "npz:F/huge-header.npz"],
         "cannot read"),
    Case("groups-csv-superscript-index", "full", ["groups", "S", "--groups", "F/groups-superscript.csv"],
         "expected index,group"),
    Case("groups-labels-not-utf8", "full", ["groups", "S", "--groups", "F/groups-latin1.npy"], "is not UTF-8 text"),
    Case("jsonl-lone-surrogate", None, ["train", "S", "--task", "causal-lm", "--data", "jsonl:F/surrogate.jsonl"],
         'surrogate.jsonl:2: "text" holds a lone surrogate'),
    Case("jsonl-lone-surrogate-source", None, ["train", "S", "--task", "causal-lm", "--data",
                                               "jsonl:F/surrogate-source.jsonl"], '"source" holds a lone surrogate'),
    Case("model-folder-with-remote-code", None, ["train", "S", "--task", "causal-lm", "--data", "jsonl:F/texts.jsonl",
                                                 "--model", "hf:F/hf-remote", "--tokenizer", "hf:F/hf"],
         "names code of its own to run (auto_map)"),
    Case("data-folder-missing", None, ["train", "S", "--data", "imagefolder:F/missing"], "no folder"),
    Case("indices-file-missing", "finalized", ["score", "S", *TARGETS, "--target-indices", "F/missing.npy"],
         "cannot read indices file"),
    Case("indices-file-not-npy", "finalized", ["score", "S", *TARGETS, "--target-indices", "F/garbage.npy"],
         "is not an .npy file"),
    Case("checkpoint-missing", "featurized", ["featurize", "S", *CKPT, "F/missing.pt"], "no checkpoint file"),
    Case("checkpoint-glob-matches-nothing", "featurized", ["featurize", "S", *CKPT, "F/none*.pt"], "matches no file"),
    Case("run-without-checkpoints", "featurized", ["featurize", "S", "--run", "mine"], "--run names the training run"),
    Case("more-checkpoints-than-epochs", None, [*TRAIN, "--epochs", "2", "--save-checkpoints", "3"],
         "--save-checkpoints must lie between 1 and --epochs (2)"),
    Case("checkpoints-of-lds-models", None, [*TRAIN, "--role", "lds", "--targets", "npz:F/train.npz",
                                             "--epochs", "2", "--save-checkpoints", "2"], "--save-checkpoints is for reference models"),
    Case("out-folder-missing", "scored", ["score", "S", *TARGETS, "--out", "F/missing/scores.npy"], "there is no folder"),
    Case("top-k-out-folder-missing", "scored", ["score", "S", *TARGETS, "--top-k", "3", "--top-k-out", "F/missing/top.csv"],
         "there is no folder"),
    Case("show-out-folder-missing", "scored", ["show", "S", "--target", "0", "--out", "F/missing/show.png"],
         "there is no folder"),
    Case("scores-file-missing", "full", ["lds", "S", "--scores", "F/missing.npy"], "cannot read scores file"),
    # stores that this trakwomp must not use
    Case("newer-format-version", "finalized", ["finalize", "S"], "newer than this trakwomp reads (2); upgrade trakwomp",
         edit_manifest(lambda m: m.__setitem__("format_version", 3))),
    Case("zarr-group-not-a-trakwomp-store", "finalized", ["finalize", "S"], "is a Zarr group but not a trakwomp store",
         overwrite("zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')),
    Case("manifest-unreadable", "finalized", ["finalize", "S"], "cannot open store", overwrite("zarr.json", b"{")),
    # unknown specs, checkpoints that do not fit
    Case("unknown-dataset-spec", None, ["train", "S", "--data", "mnist:train"], "unknown dataset spec 'mnist:train'"),
    Case("unknown-model-spec", "featurized", ["featurize", "S", "--model", "resnet99"], "malformed model spec 'resnet99'"),
    Case("train-model-spec-malformed", None, [*TRAIN, "--model", "not a model"], "malformed model spec 'not a model'"),
    Case("model-module-missing", "featurized", ["featurize", "S", "--data", "npz:F/train.npz", "--model",
                                                "no_such_module:build", "--checkpoint", "F/good.pt"],
         "cannot import model module 'no_such_module'"),
    Case("checkpoint-of-another-architecture", "featurized", ["featurize", "S", *CKPT, "F/wider.pt"],
         "does not fit model resnet9 (width 0.0625)"),
    Case("checkpoint-truncated", "featurized", ["featurize", "S", *CKPT, "F/truncated.pt"], "truncated or not a torch file"),
    Case("checkpoint-corrupt", "featurized", ["featurize", "S", *CKPT, "F/junk.pt"], "truncated or not a torch file"),
    Case("checkpoint-with-pickled-objects", "featurized", ["featurize", "S", *CKPT, "F/pickled.pt"],
         "holds objects other than tensors"),
    Case("checkpoint-new-store-does-not-fit", None, ["featurize", "S", *CKPT, "F/wider.pt"], "does not fit model"),
    # empty or out-of-range data
    Case("empty-dataset", None, ["train", "S", "--data", "npz:F/empty.npz"], "has no examples"),
    Case("empty-selection", "finalized", ["score", "S", *TARGETS, "--target-indices", "F/empty.npy"], "select no examples"),
    Case("empty-train-selection", None, ["train", "S", "--data", "npz:F/train.npz", "--indices", "F/empty.npy"],
         "select no examples"),
    Case("target-index-beyond-the-end", "finalized", ["score", "S", *TARGETS, "--target-indices", "F/beyond.npy"],
         "must lie in [0, 9)"),
    Case("target-index-negative", "finalized", ["score", "S", *TARGETS, "--target-indices", "F/negative.npy"],
         "must lie in [0, 9)"),
    Case("target-indices-not-integers", "finalized", ["score", "S", *TARGETS, "--target-indices", "F/floats.npy"],
         "must hold a 1-d integer array"),
    Case("subset-out-of-range", "full", ["predict", "S", "--subset", "F/negative.npy"], "--subset indices must lie in [0, 48)"),
    # shards
    Case("shard-malformed", "featurized", ["featurize", "S", "--shard", "a/b"], "malformed --shard 'a/b'"),
    Case("shard-out-of-range", "featurized", ["finalize", "S", "--shard", "2/2"], "--shard '2/2' is out of range"),
    Case("shard-of-zero", "finalized", ["score", "S", *TARGETS, "--shard", "0/0"], "--shard '0/0' is out of range"),
    Case("shard-negative", None, [*TRAIN, "--shard", "-1/2"], "--shard"),
    # views
    Case("blocks-not-dividing-dims", "featurized", ["finalize", "S", "--blocks", "3"], "--blocks 3 must divide --dims 16"),
    Case("dims-not-whole-blocks", "featurized", ["finalize", "S", "--dims", "12"], "must be a multiple of the stored block dim 8"),
    Case("view-larger-than-featurized", "featurized", ["finalize", "S", "--dims", "32"], "the store holds 16 featurized dims"),
    Case("ridge-negative", "featurized", ["finalize", "S", "--ridge", "-1"], "--ridge must be auto or a number >= 0"),
    Case("ridge-not-a-number", "featurized", ["lds", "S", "--ridge", "automatic"], "--ridge must be auto or a number"),
    Case("model-id-not-featurized", "featurized", ["finalize", "S", "--models", "7"], "model 7 is not in store"),
    Case("model-ids-malformed", "featurized", ["finalize", "S", "--models", "first"], "malformed --models"),
    # stages out of order
    Case("featurize-before-train", None, ["featurize", "S", "--data", "npz:F/train.npz", "--model", "resnet9"],
         "no trained reference models"),
    Case("finalize-before-featurize", "trained", ["finalize", "S"], "has no features yet; run `trakwomp featurize` first"),
    Case("score-before-finalize", "featurized", ["score", "S", *TARGETS], "run `trakwomp finalize"),
    Case("score-at-a-view-not-finalized", "finalized", ["score", "S", *TARGETS, "--blocks", "1"], "run `trakwomp finalize"),
    Case("show-before-score", "finalized", ["show", "S", "--target", "0", "--out", "F/show.png"], "run `trakwomp score` first"),
    Case("show-target-out-of-range", "scored", ["show", "S", "--target", "9", "--out", "F/show.png"],
         "--target 9 is out of range: the scores hold targets 0 to 8"),
    Case("lds-without-lds-models", "scored", ["lds", "S"], "has no LDS models"),
    Case("lds-scores-of-another-shape", "full", ["lds", "S", "--scores", "F/scores-3x5.npy"], "are 3 x 5, but the LDS ground truth has 9 targets"),
    Case("lds-unknown-baseline", "full", ["lds", "S", "--baseline", "nothing"], "unknown --baseline 'nothing': expected one of gradcos"),
    Case("lds-bm25-baseline-of-images", "full", ["lds", "S", "--baseline", "bm25"], "the bm25 baseline needs text data"),
    # the store's bindings (compatibility checks)
    Case("other-dataset-size", "featurized", ["featurize", "S", "--data", "npz:F/targets.npz"],
         "dataset.num_examples is 48 in the store but 9 here"),
    Case("other-dataset-content", "featurized", ["featurize", "S", "--data", "npz:F/same-size-other-pixels.npz"],
         "dataset.sha256"),
    Case("other-model-spec", "featurized", ["featurize", "S", "--model", "resnet9", "--width", "0.125"],
         "model.width is 0.0625 in the store but 0.125 here"),
    Case("other-projector", "featurized", ["featurize", "S", "--blocks", "4", "--block-dim", "8"],
         "featurize.projector.blocks is 2 in the store but 4 here"),
    Case("other-chunk-rows", "featurized", ["featurize", "S", "--chunk-rows", "8"], "featurize.chunk_rows is 16"),
    Case("other-recipe", "trained", [*TRAIN, "--epochs", "2"], "train_reference.epochs is 1 in the store but 2 here"),
    Case("other-lds-targets", "full", [*TRAIN, "--role", "lds", "--targets", "npz:F/train.npz"], "lds_targets"),
    Case("weights-not-matching-their-hash", "finalized", ["score", "S", "--targets", "npz:F/train.npz"],
         "were made from other weights than model 0's", edit_manifest(lambda m: m["models"][0].__setitem__("sha256", "0" * 64))),
    # damaged stores
    Case("chunk-corrupt", "finalized", ["finalize", "S", "--dims", "8"],
         "is damaged: a chunk of 'features/000000/phi' fails its CRC-32C checksum",
         overwrite(PHI_CHUNK, b"garbage"), mid_work=True),
    Case("chunk-truncated", "finalized", ["finalize", "S", "--dims", "8"], "fails its CRC-32C checksum",
         lambda s: (s / PHI_CHUNK).write_bytes((s / PHI_CHUNK).read_bytes()[:40]), mid_work=True),
    Case("chunk-missing", "finalized", ["finalize", "S", "--dims", "8"], f"chunk '{PHI_CHUNK}' is missing",
         overwrite(PHI_CHUNK, None), mid_work=True),
    Case("array-metadata-corrupt", "finalized", ["finalize", "S", "--dims", "8"],
         "the metadata of 'features/000000/phi' does not read", overwrite("features/000000/phi/zarr.json", b"{"), mid_work=True),
    # names from the store that would leave it
    Case("weights-path-escaping-the-store", "finalized", ["score", "S", "--targets", "npz:F/train.npz"],
         "refusing the path", edit_manifest(lambda m: m["models"][0].__setitem__("weights", "../../trained/models/reference/000001/weights"))),
    Case("scores-key-escaping-the-store", "full", ["lds", "S"], "refusing the path", edit_manifest(escape_scores_key)),
    # bad flags
    Case("unknown-projector", "trained", ["featurize", "S", "--projector", "fastjl"], "unknown --projector 'fastjl'"),
    Case("unknown-dtype", "trained", ["featurize", "S", "--dtype", "int8"], "unknown --dtype 'int8'"),
    Case("zero-chunk-rows", "trained", ["featurize", "S", "--chunk-rows", "0"], "must be at least 1"),
    Case("zero-blocks", "trained", ["featurize", "S", "--blocks", "0"], "must be at least 1"),
    Case("lds-role-without-targets", None, [*TRAIN, "--role", "lds"], "--role lds needs --targets"),
    Case("alpha-above-one", None, [*TRAIN, "--alpha", "2"], "--alpha must lie in (0, 1]"),
    Case("zero-models", None, [*TRAIN[:-1], "0"], "--num-models must be at least 1"),
    Case("negative-top-k", "scored", ["score", "S", *TARGETS, "--top-k", "-1"], "--top-k must be >= 0"),
    Case("score-dense-chunk-beyond-max-memory", "wide", ["score", "S", "--model", "catalognets.nets:eight", "--targets",
                                                          "npz:F/wide-targets.npz", "--top-k", "5", "--max-memory", "1M"],
         "the scores of one target chunk (256 x 1200 train examples) need 1.2 MiB, and 0.0 MiB is held: more than the "
         "1.0 MiB allowed; lower --chunk-rows, or keep only the top k with --top-k and --top-k-only",
         prepare=with_user_models_and_nothing_held),
    Case("train-images-too-small-to-augment", None, ["train", "S", "--data", "npz:F/four-pixels.npz", "--model",
                                                      "catalognets.nets:four", "--epochs", "1"],
         "images of 4 x 4 pixels are too small for the recipe's augmentation", prepare=with_user_models),
    Case("top-k-only-without-top-k", "scored", ["score", "S", *TARGETS, "--top-k-only"],
         "--top-k-only keeps each target's --top-k examples: give --top-k"),
    Case("top-k-only-with-out", "scored", ["score", "S", *TARGETS, "--top-k", "3", "--top-k-only", "--out", "s.npy"],
         "--out writes the (targets x train) scores, which --top-k-only never makes"),
    Case("negative-threshold", "full", ["lds", "S", "--threshold", "-0.5"], "--threshold must be a finite number >= 0"),
    Case("threshold-nan-score", "scored", ["score", "S", *TARGETS, "--out", "F/scores-out.npy", "--threshold", "nan"],
         "--threshold must be a finite number >= 0, got nan"),
    Case("threshold-infinite-lds", "full", ["lds", "S", "--threshold", "inf"], "--threshold must be a finite number"),
    Case("threshold-nan-show", "scored", ["show", "S", "--target", "0", "--threshold", "nan"],
         "--threshold must be a finite number"),
    Case("threshold-nan-predict", "scored", ["predict", "S", "--subset", "F/beyond.npy", "--threshold", "nan"],
         "--threshold must be a finite number"),
    Case("ridge-nan", "featurized", ["finalize", "S", "--ridge", "nan"], "--ridge must be auto or a number >= 0"),
    Case("show-zero-k", "scored", ["show", "S", "--target", "0", "--k", "0", "--out", "F/show.png"], "--k must be at least 1"),
    Case("zero-bootstrap", "full", ["lds", "S", "--bootstrap", "0"], "--bootstrap must be at least 1"),
    Case("half-out-of-range", "full", ["lds", "S", "--half", "2"], "--half must be 0 or 1"),
    Case("unknown-device", "featurized", ["finalize", "S", "--device", "tpu"], "unknown --device 'tpu'"),
    Case("out-and-shard", "scored", ["score", "S", *TARGETS, "--out", "F/out.npy", "--shard", "0/2"], "need all shards"),
    Case("cuda-not-available", "featurized", ["finalize", "S", "--device", "cuda"], "CUDA is not available"),
    # text and language models
    Case("jsonl-invalid-json", None, [*LM, "jsonl:F/invalid.jsonl"], "invalid.jsonl:3: invalid JSON"),
    Case("jsonl-line-without-text", None, [*LM, "jsonl:F/no-text.jsonl"],
         'no-text.jsonl:2: each line must be a JSON object with a "text" field'),
    Case("jsonl-empty-text", None, [*LM, "jsonl:F/empty-text.jsonl"], 'empty-text.jsonl:1: "text" must be a non-empty string'),
    Case("jsonl-not-utf8", None, [*LM, "jsonl:F/latin1.jsonl"], "latin1.jsonl:2: not UTF-8 text"),
    Case("jsonl-labels-on-some-texts", None, [*LM, "jsonl:F/some-labels.jsonl"], '1 of 2 texts have no "label"'),
    Case("text-longer-than-the-context", None, [*LM, "jsonl:F/long.jsonl"],
         "has at least 601 tokens, more than the context of model gpt (width 16, 1 layers, 2 heads) (512); pass --max-length 512"),
    Case("prompt-without-completion", None, [*LM, "jsonl:F/no-completion.jsonl"],
         'no-completion.jsonl:2: a row with a "prompt" needs a "completion" too'),
    Case("empty-completion", None, [*LM, "jsonl:F/empty-completion.jsonl"],
         'empty-completion.jsonl:1: "completion" must be a non-empty string'),
    Case("text-rows-mixed-with-prompt-rows", None, [*LM, "jsonl:F/text-and-prompts.jsonl"],
         "text-and-prompts.jsonl:2: a text row, but line 1 is a prompt row"),
    Case("label-on-a-prompt-row", None, [*LM, "jsonl:F/labelled-prompt.jsonl"],
         "labelled-prompt.jsonl:1: a prompt row takes the keys prompt, completion, source, not 'label'"),
    Case("prompt-longer-than-the-context", None, [*LM, "jsonl:F/prompt-beyond-context.jsonl"],
         "prompt-beyond-context.jsonl has at least 602 tokens, more than the context"),
    Case("prompt-longer-than-max-length", None, [*LM, "jsonl:F/long-prompt.jsonl", "--max-length", "16"],
         "long-prompt.jsonl keeps none of its completion (or assistant turns) within --max-length 16 tokens"),
    Case("messages-without-an-assistant-turn", None, [*LM, "jsonl:F/no-assistant.jsonl"],
         "no-assistant.jsonl:1: the conversation has no assistant turn"),
    Case("messages-with-the-bytes-tokenizer", None, [*LM, "jsonl:F/chat.jsonl"],
         'rows of "messages" need --tokenizer hf:DIR, a tokenizer with a chat template'),
    Case("messages-with-a-tokenizer-without-a-chat-template", None, [*LM, "jsonl:F/chat.jsonl", "--tokenizer", "hf:F/hf"],
         'rows of "messages" need a tokenizer with a chat template; the one at hf:'),
    Case("messages-beginning-with-the-assistant", None, [*LM, "jsonl:F/assistant-first.jsonl"],
         "assistant-first.jsonl:1: the conversation begins with the assistant's turn"),
    Case("chat-template-that-fails", None, [*LM, "jsonl:F/chat.jsonl", "--tokenizer", "hf:F/hf-failing-template"],
         "fails on a conversation: Conversation roles must alternate user/assistant"),
    Case("explain-empty-completion", "text", ["explain", "S", "--prompt", "hello", "--completion", ""],
         "--completion must be non-empty text"),
    Case("lora-of-a-built-in-model", None, [*LM, "jsonl:F/texts.jsonl", "--lora", "4"],
         "--lora fine-tunes a Hugging Face model (--model hf:DIR), not 'gpt'"),
    Case("lora-alpha-without-lora", None, [*LM, "jsonl:F/texts.jsonl", "--lora-alpha", "8"],
         "--lora-alpha, --lora-targets and --lora-dropout go with --lora RANK"),
    Case("lora-of-no-such-module", None, [*HF, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/hf", "--model", "hf:F/hf",
                                          "--lora", "2", "--lora-targets", "no_such"],
         "cannot add LoRA layers to the modules no_such"),
    Case("adapter-of-a-base-that-is-not-local", None, [*HF, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/hf",
                                                       "--model", "hf:F/adapter-remote"],
         "its base model 'gpt2' is not a local folder with a config.json"),
    Case("lora-rank-zero", None, [*HF, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/hf", "--model", "hf:F/hf", "--lora", "0"],
         "--lora must be a rank of at least 1, got 0"),
    Case("lora-targets-naming-nothing", None, [*HF, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/hf", "--model", "hf:F/hf",
                                               "--lora", "2", "--lora-targets", ","], "--lora-targets names no module"),
    Case("lora-on-an-adapter", None, [*HF, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/hf", "--model", "hf:F/adapter",
                                      "--lora", "2"], "is an adapter already"),
    Case("adapter-without-weights", None, [*HF, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/hf",
                                           "--model", "hf:F/adapter-weightless"], "the folder holds no adapter weights"),
    Case("adapter-with-modules-to-save", None, [*HF, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/hf",
                                                "--model", "hf:F/adapter-saving-modules"],
         "adapters with modules_to_save are not supported"),
    Case("explain-by-a-model-not-registered", "text", ["explain", "S", "--prompt", "hello", "--model-id", "3"],
         "model 3 is not in store"),
    Case("train-on-prompt-of-plain-texts", None, [*LM, "jsonl:F/texts.jsonl", "--train-on-prompt"],
         "--train-on-prompt needs prompt/completion data"),
    Case("max-length-below-two", None, [*LM, "jsonl:F/texts.jsonl", "--max-length", "1"], "--max-length must lie between 2 and 2147483647 tokens"),
    Case("tokenizer-folder-missing", None, [*LM, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/missing"], "no folder"),
    Case("tokenizer-folder-incomplete", None, [*LM, "jsonl:F/texts.jsonl", "--tokenizer", "hf:F/folder"],
         "holds no tokenizer files"),
    Case("model-folder-missing", None, [*HF, "jsonl:F/texts.jsonl", "--model", "hf:F/missing"],
         "no Hugging Face model there (no config.json)"),
    Case("model-folder-without-weights", None, [*HF, "jsonl:F/texts.jsonl", "--model", "hf:F/config-only"],
         "holds no weights"),
    Case("tokenizer-other-than-the-store's", "text", ["score", "S", *TEXT_TARGETS, "--tokenizer", "hf:F/hf"],
         "differs from the one store"),
    Case("text-targets-for-an-image-store", "finalized", ["score", "S", *TEXT_TARGETS], "holds images or arrays, not text"),
    Case("image-targets-for-a-text-store", "text", ["score", "S", *TARGETS], "holds text read with the tokenizer 'bytes'"),
    Case("per-token-of-plain-texts", "text", ["score", "S", "--targets", "jsonl:F/text-targets.jsonl", "--per-token"],
         "--per-token needs prompt/completion targets"),
    Case("per-token-on-an-image-store", "finalized", ["score", "S", "--targets", "npz:F/targets.npz", "--per-token"],
         "--per-token needs prompt/completion targets"),
    Case("explain-on-an-image-store", "scored", ["explain", "S", "--prompt", "hello"],
         "explain attributes a language model's answers; store"),
    Case("explain-temperature-below-zero", "text", ["explain", "S", "--prompt", "hello", "--temperature", "-1"],
         "--temperature must be 0 (greedy) or a positive number, got -1.0"),
    Case("explain-empty-prompt", "text", ["explain", "S", "--prompt", "", "--completion", "x"],
         "--prompt must be non-empty text"),
    Case("explain-before-finalize", "text", ["explain", "S", "--prompt", "hello", "--completion", "x", "--blocks", "1"],
         "run `trakwomp finalize"),
    Case("show-text-as-png", "text", ["show", "S", "--target", "0", "--out", "F/show.png"], "give --out a .html name"),
    Case("causal-lm-on-images", None, [*LM, "npz:F/train.npz"], "causal-lm needs text data"),
    # JSON-lines rows: one kind each, decided by its keys; numbers and nesting JSON can hold
    Case("jsonl-text-and-prompt", None, [*LM, "jsonl:F/text-and-prompt.jsonl"],
         "text-and-prompt.jsonl:1: the row mixes the keys of text and prompt rows (completion, prompt, text)"),
    Case("jsonl-text-and-messages", None, [*LM, "jsonl:F/text-and-messages.jsonl"],
         "the row mixes the keys of text and messages rows"),
    Case("jsonl-messages-and-prompt", None, [*LM, "jsonl:F/messages-and-prompt.jsonl"],
         "the row mixes the keys of prompt and messages rows"),
    Case("jsonl-text-prompt-then-text", None, [*LM, "jsonl:F/text-prompt-then-text.jsonl"],
         "text-prompt-then-text.jsonl:1: the row mixes the keys"),
    Case("jsonl-unknown-key", None, [*LM, "jsonl:F/unknown-key.jsonl"],
         "unknown-key.jsonl:1: a text row takes the keys text, label, source, not 'instruction'"),
    Case("jsonl-prompt-not-a-string", None, [*LM, "jsonl:F/prompt-not-a-string.jsonl"],
         '"prompt" must be a non-empty string'),
    Case("jsonl-number-of-5000-digits", None, [*LM, "jsonl:F/huge-number.jsonl"], "huge-number.jsonl:1: a number too long"),
    Case("jsonl-nested-100000-deep", None, [*LM, "jsonl:F/deep.jsonl"], "deep.jsonl:1: JSON nested too deep to read"),
    # exports: never into the store, of the right kind, through a link only where it points
    Case("score-out-onto-the-manifest", "scored", ["score", "S", *TARGETS, "--out", "S/zarr.json"],
         "give --out a .npy name"),
    Case("score-out-into-the-store", "scored", ["score", "S", *TARGETS, "--out", "S/scores.npy"],
         "lies inside the store"),
    Case("score-top-k-out-onto-the-manifest", "scored", ["score", "S", *TARGETS, "--top-k", "2", "--top-k-out",
                                                         "S/zarr.json"], "--top-k-out"),
    Case("score-out-through-a-link-into-the-store", "scored", ["score", "S", *TARGETS, "--out", "into-store.npy"],
         "lies inside the store", make_link("into-store.npy", "scores.npy")),
    Case("show-table-onto-the-manifest", "scored", ["show", "S", "--target", "0", "--table", "S/zarr.json"],
         "lies inside the store"),
    Case("show-out-into-the-store", "scored", ["show", "S", "--target", "0", "--out", "S/show.png"],
         "lies inside the store"),
    Case("groups-table-through-a-link-onto-the-manifest", "grouped", ["groups", "S", "--table", "manifest.json"],
         "lies inside the store", make_link("manifest.json", "zarr.json")),
    Case("explain-out-into-the-store", "text", ["explain", "S", "--prompt", "hello", "--completion", "x",
                                                "--out", "S/page.html"], "lies inside the store"),
    Case("export-to-a-folder", "scored", ["score", "S", *TARGETS, "--out", "F/folder.npy"], "is a folder; give a file name"),
    # links inside a store: nothing is written or removed through them
    Case("store-folder-that-is-a-link", "scored", ["score", "S", "--targets", "npz:F/train.npz"],
         "holds a symbolic link at 'scores'",
         link_inside("scores"), mid_work=True),
    # hand-edited or damaged manifests, refused on open by every command
    Case("manifest-format-version-text", "scored", ["status", "S"], "format_version is '2', expected an integer",
         edit_manifest(lambda m: m.__setitem__("format_version", "2"))),
    Case("manifest-format-version-null", "scored", ["show", "S", "--target", "0"], "format_version is None",
         edit_manifest(lambda m: m.__setitem__("format_version", None))),
    Case("manifest-a-list", "scored", ["status", "S"], "the whole manifest) is list", replace_manifest([1, 2])),
    Case("manifest-a-string", "scored", ["finalize", "S"], "the whole manifest) is 'x'", replace_manifest("x")),
    Case("manifest-models-not-a-list", "scored", ["status", "S"], "field models is 'x', expected a list",
         edit_manifest(lambda m: m.__setitem__("models", "x"))),
    Case("manifest-num-examples-text", "scored", ["score", "S", *TARGETS], "field dataset.num_examples is '48'",
         edit_manifest(lambda m: m["dataset"].__setitem__("num_examples", "48"))),
    Case("manifest-chunk-rows-zero", "scored", ["finalize", "S"], "field featurize.chunk_rows is 0",
         edit_manifest(lambda m: m["featurize"].__setitem__("chunk_rows", 0))),
    Case("manifest-task-a-number", "text", ["status", "S"], "field task is 5, expected an object",
         edit_manifest(lambda m: m.__setitem__("task", 5))),
    Case("manifest-max-length-huge", "text", ["score", "S", *TEXT_TARGETS], "field dataset_source.max_length is 1e+20",
         edit_manifest(lambda m: m["dataset_source"].__setitem__("max_length", 1e20))),
    Case("manifest-width-text", "text", ["explain", "S", "--prompt", "hi"], "field model.width is 'wide'",
         edit_manifest(lambda m: m["model"].__setitem__("width", "wide"))),
    Case("manifest-heads-zero", "text", ["explain", "S", "--prompt", "hi"], "field model.heads is 0",
         edit_manifest(lambda m: m["model"].__setitem__("heads", 0))),
    Case("manifest-layers-100000", "text", ["explain", "S", "--prompt", "hi"], "field model.layers is 100000",
         edit_manifest(lambda m: m["model"].__setitem__("layers", 100000))),
    Case("manifest-scores-naming-missing-targets", "scored", ["status", "S"], "names targets",
         edit_manifest(lambda m: m.__setitem__("targets", {}))),
    Case("manifest-nested-100000-deep", "scored", ["status", "S"], "nested too deep to read", nest_manifest),
    Case("weights-array-missing", "text", ["explain", "S", "--prompt", "hi"], "do not match their recorded hash",
         lambda s: shutil.rmtree(s / "models/reference/000000/weights/head.weight")),
    Case("weights-array-extra", "text", ["explain", "S", "--prompt", "hi"], "do not match their recorded hash",
         lambda s: shutil.copytree(s / "models/reference/000000/weights/head.weight",
                                   s / "models/reference/000000/weights/extra")),
    Case("features-of-other-weights", "finalized", ["score", "S", *TARGETS], "were made from other weights than model 1's",
         lambda s: (s / "done/featurize/000001/000000/zarr.json").write_text(
             (s / "done/featurize/000001/000000/zarr.json").read_text().replace('"weights_sha256": "', '"weights_sha256": "f'))),
    Case("inverses-of-other-weights", "finalized", ["score", "S", *TARGETS], "were made from other weights than model 0's",
         lambda s: (s / "done/finalize/d16-b2-ridgeauto/000000/000001/zarr.json").write_text(
             (s / "done/finalize/d16-b2-ridgeauto/000000/000001/zarr.json").read_text().replace(
                 '"weights_sha256": "', '"weights_sha256": "f'))),
    # numbers beyond what the machine or the libraries take
    Case("train-seed-negative", None, [*LM, "jsonl:F/texts.jsonl", "--seed", "-5"], "--seed must lie between 0 and 2^63 - 1"),
    Case("train-max-length-1e20", None, [*LM, "jsonl:F/texts.jsonl", "--max-length", "100000000000000000000"],
         "--max-length must lie between 2 and 2147483647 tokens"),
    Case("train-width-1e9", None, [*LM[:4], "--width", "1e9", *LM[6:], "jsonl:F/texts.jsonl"], "gpt takes --width up to"),
    Case("train-layers-100000", None, ["train", "S", "--task", "causal-lm", "--layers", "100000", "--data",
                                       "jsonl:F/texts.jsonl"], "gpt takes --width up to 16384 and --layers up to 1024"),
    Case("train-threads-100000", None, [*LM, "jsonl:F/texts.jsonl", "--threads", "100000"],
         "--threads must lie between 1 and 1024"),
    Case("train-model-beyond-memory", None, ["train", "S", "--task", "causal-lm", "--layers", "1000", "--width", "8192",
                                             "--data", "jsonl:F/texts.jsonl"], "do not fit in this machine's"),
    Case("predict-subset-a-fifo", "grouped", ["predict", "S", "--subset", "F/fifo.npy"], "is not a regular file"),
    Case("explain-temperature-1e-300", "text", ["explain", "S", "--prompt", "hi", "--temperature", "1e-300"],
         "--temperature must be 0 (greedy) or at least 0.0001"),
    Case("explain-seed-2-to-the-64", "text", ["explain", "S", "--prompt", "hi", "--seed", "18446744073709551616"],
         "--seed must lie between 0 and 2^63 - 1"),
    Case("explain-device-tpu", "text", ["explain", "S", "--prompt", "hi", "--device", "tpu"], "unknown --device 'tpu'"),
    Case("explain-device-meta", "text", ["explain", "S", "--prompt", "hi", "--device", "meta"], "unsupported --device 'meta'"),
    Case("explain-device-cuda-9", "text", ["explain", "S", "--prompt", "hi", "--device", "cuda:9"], "--device cuda:9"),
    Case("explain-device-empty", "text", ["explain", "S", "--prompt", "hi", "--device", ""], "unknown --device ''"),
    Case("explain-max-answers-zero", "text", ["explain", "S", "--prompt", "hi", "--max-answers", "0"],
         "--max-answers must be at least 1"),
    Case("regression-on-class-labels", None, [*TRAIN, "--task", "regression"], "regression needs real-valued labels"),
    Case("classification-on-values", None, ["train", "S", "--data", "npz:F/values.npz"],
         "real-valued labels for --task regression"),
    Case("regression-on-nan-values", None, ["train", "S", "--data", "npz:F/nan-values.npz", "--task", "regression"],
         "y holds NaN or infinite values"),
    Case("unknown-task", None, [*TRAIN, "--task", "ranking"], "unknown --task 'ranking'"),
    Case("classification-on-unlabelled-text", None, ["train", "S", "--data", "jsonl:F/texts.jsonl", "--model", "gpt"],
         "classification needs labels of at least 2 classes"),
    Case("tokenizer-for-images", None, [*TRAIN, "--tokenizer", "bytes"], "--tokenizer and --max-length apply to text data"),
    Case("lm-output-for-classification", None, [*TRAIN, "--lm-output", "token"], "--lm-output applies to --task causal-lm only"),
    Case("unknown-lm-output", None, [*LM, "jsonl:F/texts.jsonl", "--lm-output", "word"], "unknown --lm-output 'word'"),
    Case("layers-for-resnet9", None, [*TRAIN, "--layers", "2"], "--layers and --heads apply to the built-in gpt only"),
    # factored projections and memory
    Case("blocks-with-factored", "trained", ["featurize", "S", "--projector", "factored", "--blocks", "4"],
         "does not go with --projector factored"),
    Case("factored-block-dim-not-square", "trained", ["featurize", "S", "--projector", "factored", "--block-dim", "20"],
         "the block dim must be a square"),
    Case("factored-dims-not-on-a-layer", "factored", ["finalize", "S", "--dims", "20"], "must end on a layer"),
    Case("malformed-max-memory", "trained", ["featurize", "S", "--max-memory", "lots"], "malformed --max-memory 'lots'"),
    Case("featurize-beyond-max-memory", "trained", ["featurize", "S", "--max-memory", "1M"],
         "more than the 1.0 MiB available"),
    Case("score-beyond-max-memory", "finalized", ["score", "S", *TARGETS, "--max-memory", "100K"],
         "more than the 0.1 MiB available"),
    # groups
    Case("drop-unknown-group", "grouped", ["predict", "S", "--drop-group", "g1,nosuch"], "unknown group 'nosuch'"),
    Case("exclude-unknown-group", None, [*TRAIN, "--groups", "F/groups.npy", "--exclude-groups", "nosuch"],
         "unknown group 'nosuch': the 4 groups are g0, g1, g2, g3"),
    Case("exclude-every-group", None, [*TRAIN, "--groups", "F/groups.npy", "--exclude-groups", "g0,g1,g2,g3"],
         "--exclude-groups names every group"),
    Case("groups-file-too-short", "scored", ["groups", "S", "--groups", "F/groups-short.npy"],
         "has 40 labels for the 48 train examples"),
    Case("groups-file-with-missing-entries", "scored", ["groups", "S", "--groups", "F/groups-missing.csv"],
         "no group for 1 of the 48 train examples (first: 47)"),
    Case("groups-other-than-the-store's", "grouped", ["groups", "S", "--groups", "F/groups-other.npy"],
         "differ from those store"),
    Case("groups-of-data-without-sources", "scored", ["groups", "S"], "has no sources; pass --groups FILE"),
    Case("group-alpha-for-reference-models", None, [*TRAIN, "--groups", "F/groups.npy", "--group-alpha", "0.5"],
         "--group-alpha is for --role lds"),
    Case("group-alpha-out-of-range", None, [*TRAIN, "--role", "lds", *TARGETS, "--group-alpha", "1.5"],
         "--group-alpha must lie in (0, 1)"),
    Case("group-lds-without-group-models", "full", ["lds", "S", "--by-group"], "has no group LDS models"),
    Case("group-chart-not-png", "grouped", ["show", "S", "--by-group", "--out", "F/chart.svg"], "give --out a .png name"),
    Case("predict-without-subset-or-groups", "grouped", ["predict", "S"], "give --subset, or groups to drop"),
    Case("target-set-beyond-the-targets", "grouped", ["groups", "S", "--target-set", "F/beyond.npy"],
         "target 9 is out of range"),
    # verify
    Case("verify-nothing-chosen", "scored", ["verify", "S"], "choose what to verify: --target, --target-set or --group"),
    Case("verify-target-not-scored", "scored", ["verify", "S", "--target", "9"], "target 9 is out of range"),
    Case("verify-k-beyond-the-train-set", "scored", ["verify", "S", "--target", "0", "--k", "48"],
         "--k (48) must be smaller than the 48 train examples the recipe trains on"),
    Case("verify-zero-seeds", "scored", ["verify", "S", "--target", "0", "--seeds", "0"],
         "--seeds and --k must be at least 1"),
    Case("verify-unknown-group", "grouped", ["verify", "S", "--group", "nosuch"], "unknown group 'nosuch'"),
    Case("verify-unknown-method", "scored", ["verify", "S", "--target", "0", "--method", "lucky"],
         "unknown --method 'lucky': expected trak or a baseline (gradcos, repsim, bm25)"),
    Case("verify-group-and-method", "grouped", ["verify", "S", "--group", "g0", "--method", "gradcos"],
         "give --group or --method"),
    Case("verify-without-a-recipe", "checkpointed", ["verify", "S", "--target", "0"],
         "records no training recipe"),
    Case("verify-recipe-with-an-unknown-field", "scored", ["verify", "S", "--target", "0"],
         "is damaged: its reference recipe (fields this trakwomp does not know)",
         edit_manifest(lambda m: m["train_reference"].__setitem__("lr_warp", 3))),
    Case("verify-group-of-data-without-sources", "scored", ["verify", "S", "--group", "g0"],
         "has no sources; pass --groups FILE"),
    Case("verify-group-as-large-as-the-train-set", "scored",
         ["verify", "S", "--groups", "F/one-group.npy", "--group", "all"],
         "group 'all' has 48 examples; it must be smaller than the 48 train examples the recipe trains on"),
    Case("verify-group-the-recipe-excludes", "excluding", ["verify", "S", "--group", "g0"],
         "--group 'g0' is one the recipe excludes: no model trains on it"),
    Case("verify-groups-other-than-the-store's", "excluding",
         ["verify", "S", "--groups", "F/groups-other.npy", "--group", "g1"], "differ from those store"),
    Case("verify-store-seen-through-a-transform", "scored", ["verify", "S", "--target", "0"],
         "sees its data through the transform 'mine:scale', which verify does not import",
         edit_manifest(lambda m: m["model"].__setitem__("transform", "mine:scale"))),
    Case("repsim-of-a-store-seen-through-a-transform", "full", ["lds", "S", "--baseline", "repsim"],
         "sees its data through the transform 'mine:scale', which the repsim baseline does not import",
         edit_manifest(lambda m: m["model"].__setitem__("transform", "mine:scale"))),
    Case("verify-drawing-not-png", "scored", ["verify", "S", "--target", "0", "--out", "F/verify.svg"],
         "give --out a .png name"),
]




def what_a_case_can_change(case: Case, root: Path, store: Path, skip: set[str]) -> dict:
    """Digests of what the command could change: every byte of the store it runs on, every byte
    of the input files it names, and every path (not the bytes) under the fixture's root, where
    a new or removed file would show."""
    named = sorted({root / a.split("F/", 1)[1] for a in case.args if "F/" in a})
    return {"store": tree_digest(store, skip) if store.exists() else None,
            "root paths": tree_digest(root, contents=False),
            **{str(p): p.read_bytes() for p in named if p.is_file()}}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_and_leaves_the_store_unchanged(root, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # for files a command would write, such as top-k.csv
    store = tmp_path / "store"
    if case.stage:
        shutil.copytree(root / case.stage, store)
        if case.damage:
            case.damage(store)
    skip = {"zarr.json"} if case.mid_work else set()  # the manifest may record the work asked for
    before = what_a_case_can_change(case, root, store, skip)
    if case.id == "cuda-not-available" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case.prepare:
        case.prepare(monkeypatch, root)
    args = [str(store) if a == "S" else f"{store}/{a[2:]}" if a.startswith("S/") else a.replace("F/", f"{root}/")
            for a in case.args]
    if args[0] not in ("lds", "predict", "show", "groups"):
        args.append("--quiet")
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = plain(result.stderr).strip()
    assert len(text.splitlines()) == 1 and text.startswith("error: "), text
    assert case.fragment in text, text
    assert what_a_case_can_change(case, root, store, skip) == before
    if not case.stage:
        assert not store.exists()


def test_the_catalogue_tries_every_command():
    """Every command the CLI has is given bad input at least once here."""
    commands = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert commands <= {case.args[0] for case in CASES}, commands - {case.args[0] for case in CASES}
