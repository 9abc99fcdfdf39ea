"""Causal language modelling: next-token prediction, attributed through the log-odds of the
probability of a text (or of its average token)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trakwomp.data.base import Batch, Dataset, TokenBatch, TokenizedTexts, capable
from trakwomp.errors import UserError
from trakwomp.tasks.base import Task, log_odds_from_loss, logits_of

LM_OUTPUTS = ("sequence", "token")


@dataclass(frozen=True)
class CausalLM(Task):
    """Next-token prediction on a right-padded sequence z of T + 1 real tokens: token t + 1 is
    predicted from tokens 0..t, and L(z) is the sum of the T token cross-entropies. For
    prompt/completion text only the completion's tokens are predicted (`Batch.predicted`): L(z)
    and T are then over those (the instruction-tuning convention), in the loss and in f alike.

    output "token" (default): p = exp(-L / T), the geometric-mean probability of one token;
    output "sequence":        p = exp(-L), the probability of the whole sequence.
    f = log(p / (1 - p)) in both; trained with the mean cross-entropy over the batch's real
    predicted tokens. The model returns (batch, length, vocabulary) logits."""

    output: str = "token"
    name = "causal-lm"
    help = "next-token prediction on text"
    default_model = "gpt"
    summary_name = "target_token_loss"
    generates_text = True
    options = {"lm_output": "output"}  # the output function (default: token, the better of the two on
    # docs/results.md's benchmark)
    recipe_defaults = {"optimizer": "adamw", "epochs": 8, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.1,
                       "augment": False}

    def __post_init__(self):
        if self.output not in LM_OUTPUTS:
            raise UserError(f"unknown `lm_output` {self.output!r}: expected one of {', '.join(LM_OUTPUTS)}")

    def token_losses(self, output, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, T) cross-entropies of the predicted tokens (0 at padding) and the float mask."""
        _, mask = batch.inputs
        losses = self.next_token_losses(output, batch)
        predicted = (mask if batch.predicted is None else mask & batch.predicted)[:, 1:]
        # where, not a product: a loss elsewhere that is not finite must not reach L (0 x inf is NaN)
        return torch.where(predicted, losses, torch.zeros((), dtype=losses.dtype)), predicted.to(losses.dtype)

    @staticmethod
    def next_token_losses(output, batch: Batch) -> torch.Tensor:
        """(batch, T) -log p(token t | tokens before it), t = 1..T (column t - 1), padding included."""
        ids, _ = batch.inputs
        logits = logits_of(output)[:, :-1]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return losses.view(ids.shape[0], -1)

    def token_outputs(self, output, batch: Batch, texts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """f_t = log(p_t / (1 - p_t)) of token `positions[r]` of text `texts[r]` given the tokens
        before it, p_t the model's probability of it: one token's f under either output. The
        log-odds are taken of those tokens' losses only: a token elsewhere that the model is sure
        of (a loss of exactly 0, f = inf) leaves them, and their gradients, finite."""
        return log_odds_from_loss(self.next_token_losses(output, batch)[texts, positions - 1])

    def representation(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The mean over a text's real tokens of the hidden states (batch, T, width) that enter
        the output layer."""
        real = batch.inputs[1].to(hidden.dtype).unsqueeze(-1)
        return (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)

    def outputs(self, output, batch: Batch) -> torch.Tensor:
        if isinstance(batch, TokenBatch):  # token rows: each its token's f, from its text's one forward pass
            return self.token_outputs(output, batch, batch.tokens[:, 0], batch.tokens[:, 1])
        losses, predicted = self.token_losses(output, batch)
        total = losses.sum(dim=1)
        if self.output == "token":
            total = total / predicted.sum(dim=1)
        return log_odds_from_loss(total)

    def loss(self, output, batch: Batch) -> torch.Tensor:
        losses, predicted = self.token_losses(output, batch)
        return losses.sum() / predicted.sum()

    def summary_terms(self, output, batch: Batch) -> tuple[float, float]:
        """(summed cross-entropy, predicted tokens): summed over batches, their ratio is the mean
        cross-entropy per predicted token, in nats."""
        losses, predicted = self.token_losses(output, batch)
        return float(losses.sum()), float(predicted.sum())

    def describe_summary(self, value: float) -> str:
        return f"target loss {value:.3f} nats/token"

    def output_size(self, dataset: Dataset) -> int:
        """The vocabulary of `dataset`'s tokenizer (checked to be text; its lengths are checked
        by `check_data`, once the model's context is known not to be exceeded)."""
        return capable(dataset, TokenizedTexts, "causal-lm").tokenizer.vocab_size

    def check_data(self, dataset: Dataset) -> None:
        texts = capable(dataset, TokenizedTexts, "causal-lm")
        lengths = texts.lengths
        if lengths.min() < 2:
            i = int(lengths.argmin())
            raise UserError(f"text {i} of {dataset.spec} has {lengths[i]} token(s): a causal LM needs at least 2, "
                            "one to predict from and one to predict")
        counted = texts.completion_tokens
        if counted is not None and (counted == 0).any():
            i = int(np.flatnonzero(counted == 0)[0])
            raise UserError(f"text {i} of {dataset.spec} keeps none of its completion (or assistant turns) within "
                            f"`max_length` {texts.max_length} tokens; raise `max_length` or shorten the prompt")

    def output_mismatch(self, shape: tuple[int, ...], batch: Batch, output_size: int) -> str | None:
        ids = tuple(batch.inputs[0].shape)
        if len(shape) == 3 and shape[:2] == ids and shape[2] >= output_size:
            return None
        return f"expected (batch, length, vocabulary) = ({ids[0]}, {ids[1]}, at least {output_size}) logits"

    def as_dict(self) -> dict:
        """What a store records of the task (its name and output function)."""
        return {"name": self.name, "output": self.output}

    def __str__(self) -> str:
        return f"{self.name} ({self.output})"
