"""`explain`: which train examples made a language model answer a prompt as it did.

The store's reference model completes the prompt, greedily or sampled at a temperature with a
seed (`generate`), or the answer is given. The (prompt, answer) pair is then a target like any
prompt/completion target: f is the log-odds of the answer's tokens given the prompt (the
store's causal-lm output, over the answer's tokens only), scored with `score` at the view, so a
query asked again reads its stored scores; the answer's k most supporting and opposing train
examples are its rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trakwomp.analysis.show import write_page
from trakwomp.data.base import Dataset, capable
from trakwomp.data.text import TextDataset, answer_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.threshold import DEFAULT_THRESHOLD, check_threshold, relative_soft_threshold
from trakwomp.estimator.view import ViewSpec
from trakwomp.models.registry import load_registered_model
from trakwomp.models.spec import ModelSpec
from trakwomp.outputs import check_output
from trakwomp.runtime import Progress, resolve_device
from trakwomp.settings import check_seed, option
from trakwomp.stages.bindings import stored_dataset, stored_task
from trakwomp.stages.answers import DEFAULT_MAX_ANSWERS, score_answer
from trakwomp.stages.export import strongest_rows
from trakwomp.stages.selection import featurized_models
from trakwomp.store import Store
from trakwomp.tasks.base import logits_of


MIN_TEMPERATURE = 1e-4  # below it, logits / temperature overflow float32: use 0 for greedy


@dataclass(frozen=True)
class Generation:
    """How the reference model completes a prompt: greedy at temperature 0, else sampled from
    softmax(logits / temperature) with a seeded generator; it stops at the tokenizer's end token,
    once the answer ends with `stop` (kept in the answer), after `max_new_tokens`, or at the
    model's context."""

    max_new_tokens: int = option(32, "Tokens the model may add to the prompt.")
    temperature: float = option(0.0, "0: the most likely token each time (greedy); above 0: sampled at this temperature.")
    seed: int = option(0, "Seed of the sampling (with --temperature above 0).")
    stop: str | None = option(None, "End the answer once it ends with this text (kept in the answer), e.g. a newline "
                                    "for a model whose tokenizer has no end token (bytes).")

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"`max_new_tokens` must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise UserError(f"`temperature` must be 0 (greedy) or a positive number, got {self.temperature}")
        check_seed("`seed`", self.seed)
        if self.temperature != 0 and self.temperature < MIN_TEMPERATURE:
            raise UserError(f"`temperature` must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature:g}")
        if self.stop == "":
            raise UserError("`stop` must be a non-empty text")


@dataclass
class Explanation:
    prompt: str
    answer: str  # the answer's text as its ids decode (special tokens left out)
    answer_ids: list[int]  # the ids scored: the generated ones themselves, or --completion's tokens
    generated: bool  # the model's own answer (False: given with --completion)
    ended: str  # why the answer ends: "end token", "stop text", "max-new-tokens", "context", "max-length", "given"
    model_id: int
    key: str  # the answer's stored scores (answers/<key>)
    seconds: float  # from the model's answer to the rows, start-up excluded
    rows: list[dict] = field(default_factory=list)
    tokens: list[dict] = field(default_factory=list)  # with per_token: each answer token's strongest support
    token_seconds: float = 0.0  # what the per-token scores took beyond the answer's
    cached: bool = False  # the answer's scores were read from the store (asked before)


def token_rows(token_tau: np.ndarray, tokens: Dataset, train: TextDataset, k: int) -> list[dict]:
    """Per answer token (a row of the soft-thresholded `token_tau`): its id and how it shows, its
    position in the answer, the train example that most supports it (index, source, text, score;
    None where no train example's score is positive), and how concentrated its support is: the
    share of its positive scores' sum held by its k largest (1: k train examples or fewer carry
    all of it; 0: no train example supports it)."""
    rows = []
    for r, scores in enumerate(token_tau):
        top = int(np.argmax(scores))
        positive = np.sort(scores[scores > 0])[::-1]
        concentration = float(positive[:k].sum() / positive.sum()) if len(positive) else 0.0
        described = tokens.describe(r)
        support = {"train_index": top, "train_source": train.source(top), "train_text": train.text(top),
                   "score": float(scores[top])} if len(positive) else \
            {"train_index": None, "train_source": None, "train_text": None, "score": 0.0}
        rows.append({"token": described["token"], "token_id": described["token_id"],
                     "position": described["token_position"], **support, "concentration": concentration})
    return rows


@dataclass(frozen=True)
class Answer:
    """Generated ids, and why generation ended."""

    ids: list[int]
    ended: str


@torch.no_grad()
def generate(net: nn.Module, data: TextDataset, prompt: str, generation: Generation, device: torch.device) -> Answer:
    """The model's completion of `prompt`, as ids after the prompt's ids as the train set `data`
    begins a prompt/completion text. It ends at the tokenizer's end token (kept: the model said
    it, as it learnt to after every completion), once the answer ends with `generation.stop`,
    after `max_new_tokens`, or where the text would outgrow the model's context or the store's
    --max-length (so that all of it is scored)."""
    tokenizer = data.tokenizer
    ids = data.answer_prompt_ids(prompt)
    start = len(ids)
    limits = {"context": getattr(net, "context", None), "max-length": data.max_length}
    limit, limited_by = min((v, k) for k, v in limits.items() if v is not None) if any(limits.values()) else (None, "")
    if limit is not None and start >= limit:
        raise UserError(f"the prompt takes {start} tokens, the {limited_by} ({limit}): no room for an answer")
    sampler = torch.Generator().manual_seed(generation.seed)
    net.to(device).eval()
    for _ in range(generation.max_new_tokens):
        if limit is not None and len(ids) >= limit:
            return Answer(ids[start:], limited_by)
        x = torch.tensor([ids], device=device)
        logits = logits_of(net(x, torch.ones_like(x, dtype=torch.bool)))[0, -1, :data.vocab_size].float().cpu()
        if generation.temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits / generation.temperature, -1), 1, generator=sampler))
        if token == tokenizer.stop:
            return Answer(ids[start:] + ([token] if token == tokenizer.end else []), "end token")
        ids.append(token)
        if generation.stop is not None and tokenizer.decode(ids[start:]).endswith(generation.stop):
            return Answer(ids[start:], "stop text")
    return Answer(ids[start:], "max-new-tokens")


def answer_target(handle: Store, train: TextDataset, prompt: str, completion: str | None, model_id: int,
                  generation: Generation, device: torch.device) -> tuple[TextDataset, str]:
    """The answer as a prompt/completion target, and why it ends: `completion` tokenized as train
    completions are ("given"), else registered model `model_id`'s generated ids themselves."""
    featurized_models(handle, [model_id])
    if completion is not None:
        return answer_dataset(prompt, train, completion=completion), "given"
    spec = ModelSpec.of_store(handle.manifest.model_record(), handle.location)
    generated = generate(load_registered_model(handle, model_id, spec, train.vocab_size), train, prompt, generation,
                         device)
    if not generated.ids:
        raise UserError(f"model {model_id} answers {prompt!r} with nothing (it ends at once: {generated.ended}); "
                        "give the answer to attribute with `completion`")
    return answer_dataset(prompt, train, completion_ids=generated.ids), generated.ended


def checked_store(store: str | Path, k: int, out: str | Path | None, max_answers: int, threshold: float) -> Store:
    """The store, refused (before the model answers) unless it holds a language model, and the
    options that do not depend on the answer."""
    handle = Store.open(store)
    task = stored_task(handle)
    if not task.generates_text:
        raise UserError(f"explain attributes a language model's answers; store {str(store)!r} holds a {task.name} "
                        "model (train with `task` causal-lm)")
    if k < 1:
        raise UserError("`k` must be at least 1")
    if max_answers < 1:
        raise UserError(f"`max_answers` must be at least 1, got {max_answers}")
    check_threshold(threshold)
    check_output("`out`", out, (".html",), store, "explain writes an HTML page")
    return handle


def thresholded(tau: np.ndarray, threshold: float) -> np.ndarray:
    return relative_soft_threshold(torch.from_numpy(tau), threshold).numpy()


def explain(
    store: str | Path,
    prompt: str,
    completion: str | None = None,
    *,
    generation: Generation = Generation(),
    model_id: int = 0,
    k: int = 5,
    view: ViewSpec = ViewSpec(),
    threshold: float = DEFAULT_THRESHOLD,
    out: str | Path | None = None,
    per_token: bool = False,
    max_answers: int = DEFAULT_MAX_ANSWERS,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Explanation:
    """Registered model `model_id`'s answer (a model `featurize` attributes: a reference model of
    `train`, a checkpoint kept along its run, or a checkpoint or adapter registered by `featurize`;
    `trakwomp status` lists them) to `prompt` (or `completion`, if given), and the
    k train examples that most support and most oppose it at the view; with `per_token`, each
    answer token's own scores (f_t: the log-odds of that token given what precedes it) and its
    strongest support; an HTML page to `out`. Answers are kept in the store (the oldest removed
    beyond `max_answers`), so a query asked again reads its scores (stages/answers.py)."""
    handle = checked_store(store, k, out, max_answers, threshold)
    train = capable(stored_dataset(handle), TextDataset, "explain")
    target, ended = answer_target(handle, train, prompt, completion, model_id, generation, resolve_device(device))
    began = time.perf_counter()
    scored = score_answer(store, target, view, False, max_answers, device, progress)
    answer_ids = target.completion_ids(0)
    explained = Explanation(prompt, train.tokenizer.decode(answer_ids), answer_ids, ended != "given", ended, model_id,
                            scored.key, 0.0, strongest_rows(target, 0, train, thresholded(scored.tau, threshold)[0], k),
                            cached=scored.cached)
    explained.seconds = time.perf_counter() - began
    if per_token:
        tokens = score_answer(store, target, view, True, max_answers, device, progress)
        explained.tokens = token_rows(thresholded(tokens.token_scores(), threshold), target.per_token(), train, k)
        explained.token_seconds = time.perf_counter() - began - explained.seconds
    if out is not None:
        write_page(explained.rows, target, train, k, out, explained.tokens)
    return explained
