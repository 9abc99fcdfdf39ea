"""Tasks: the one place that knows what a model's output means.

A task fixes the output function f that TRAK differentiates, the weight q = 1 - p, the training
loss, and the model output it expects. Batches come from `Dataset.collate` as `Batch(inputs,
labels)`: the model is called as `model(*inputs)` (images: `(x,)`; text: `(token ids, mask)`,
right-padded, mask True on real tokens).

In both built-in tasks f is the log-odds log(p / (1 - p)) of a probability p of being right, so
that q = 1 - p = sigmoid(-f) and the training loss of one example is -log p = -log sigmoid(f).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trakwomp.errors import UserError

TASKS = ("classification", "causal-lm")
LM_OUTPUTS = ("sequence", "token")


@dataclass(frozen=True)
class Batch:
    """What the model is called with (`model(*inputs)`) and, for classification, the labels."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Batch":
        return Batch(tuple(t.to(device) for t in self.inputs), self.labels.to(device))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Inputs then labels: what a per-example function is mapped over."""
        return (*self.inputs, self.labels)

    @classmethod
    def of_tensors(cls, tensors: tuple[torch.Tensor, ...]) -> "Batch":
        return cls(tuple(tensors[:-1]), tensors[-1])


def logits_of(output) -> torch.Tensor:
    """A model's logits: the output itself, or its `.logits` (Hugging Face models)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The classification output f = logit_y - logsumexp_{k != y} logit_k, one per row."""
    labels = labels.view(-1, 1)
    correct = logits.gather(1, labels).squeeze(1)
    return correct - torch.logsumexp(logits.scatter(1, labels, float("-inf")), dim=1)


def log_odds_from_loss(loss: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(-loss): -loss - log(1 - exp(-loss)), computed stably."""
    return -loss - torch.log(-torch.expm1(-loss))


@dataclass(frozen=True)
class Classification:
    """f = logit_y - logsumexp_{k != y} logit_k (the correct-class margin); p = softmax_y =
    sigmoid(f); trained with cross-entropy. The model returns (batch, classes) logits."""

    name = "classification"
    default_model = "resnet9"

    def outputs(self, output, batch: Batch) -> torch.Tensor:
        return margins(logits_of(output), batch.labels)

    def loss(self, output, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits_of(output), batch.labels)

    summary_name = "target_accuracy"

    def summary_terms(self, output, batch: Batch) -> tuple[float, float]:
        """(examples whose top logit is the label, examples): summed over batches, their ratio
        is the accuracy (a positive margin means p_y > 1/2, a stricter test)."""
        return float((logits_of(output).argmax(dim=1) == batch.labels).sum()), float(len(batch))

    def output_size(self, dataset) -> int:
        """How many outputs a model needs for `dataset` (checked to suit the task): its classes."""
        self.check_data(dataset)
        return dataset.num_classes

    def check_data(self, dataset) -> None:
        if dataset.num_classes < 2:
            raise UserError(f"classification needs labels of at least 2 classes; {dataset.spec} has "
                            f"{dataset.num_classes} (texts without \"label\" are for --task causal-lm)")

    def output_mismatch(self, shape: tuple[int, ...], batch: Batch, output_size: int) -> str | None:
        expected = (len(batch), output_size)
        return None if shape == expected else f"expected {expected} logits"

    def as_dict(self) -> dict:
        return {"name": self.name}

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction on a right-padded sequence z of T + 1 real tokens: token t + 1 is
    predicted from tokens 0..t, and L(z) is the sum of the T token cross-entropies.

    output "token" (default): p = exp(-L / T), the geometric-mean probability of one token;
    output "sequence":        p = exp(-L), the probability of the whole sequence.
    f = log(p / (1 - p)) in both; trained with the mean cross-entropy over the batch's real
    predicted tokens. The model returns (batch, length, vocabulary) logits."""

    output: str = "token"
    name = "causal-lm"
    default_model = "gpt"

    def __post_init__(self):
        if self.output not in LM_OUTPUTS:
            raise UserError(f"unknown --lm-output {self.output!r}: expected one of {', '.join(LM_OUTPUTS)}")

    def token_losses(self, output, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, T) cross-entropies of the predicted tokens (0 at padding) and the float mask."""
        ids, mask = batch.inputs
        logits = logits_of(output)[:, :-1]
        predicted = mask[:, 1:].to(logits.dtype)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return losses.view(predicted.shape) * predicted, predicted

    def outputs(self, output, batch: Batch) -> torch.Tensor:
        losses, predicted = self.token_losses(output, batch)
        total = losses.sum(dim=1)
        if self.output == "token":
            total = total / predicted.sum(dim=1)
        return log_odds_from_loss(total)

    def loss(self, output, batch: Batch) -> torch.Tensor:
        losses, predicted = self.token_losses(output, batch)
        return losses.sum() / predicted.sum()

    summary_name = "target_token_loss"

    def summary_terms(self, output, batch: Batch) -> tuple[float, float]:
        """(summed cross-entropy, predicted tokens): summed over batches, their ratio is the mean
        cross-entropy per predicted token, in nats."""
        losses, predicted = self.token_losses(output, batch)
        return float(losses.sum()), float(predicted.sum())

    def output_size(self, dataset) -> int:
        """How many outputs a model needs for `dataset` (checked to be text): its vocabulary."""
        self.check_data(dataset)
        return dataset.vocab_size

    def check_data(self, dataset) -> None:
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise UserError(f"causal-lm needs text data (fortunes-mini:..., jsonl:PATH), not {dataset.spec}")
        if lengths.min() < 2:
            i = int(lengths.argmin())
            raise UserError(f"text {i} of {dataset.spec} has {lengths[i]} token(s): a causal LM needs at least 2, "
                            "one to predict from and one to predict")

    def output_mismatch(self, shape: tuple[int, ...], batch: Batch, output_size: int) -> str | None:
        ids = tuple(batch.inputs[0].shape)
        if len(shape) == 3 and shape[:2] == ids and shape[2] >= output_size:
            return None
        return f"expected (batch, length, vocabulary) = ({ids[0]}, {ids[1]}, at least {output_size}) logits"

    def as_dict(self) -> dict:
        return {"name": self.name, "output": self.output}

    def __str__(self) -> str:
        return f"{self.name} ({self.output})"


Task = Classification | CausalLM


def make_task(name: str, lm_output: str | None = None) -> Task:
    """The task `name`; `lm_output` picks the causal-lm output function (default: token, the
    better of the two on docs/results.md's benchmark)."""
    if name == "classification":
        if lm_output is not None:
            raise UserError("--lm-output applies to --task causal-lm only")
        return Classification()
    if name == "causal-lm":
        return CausalLM(lm_output or "token")
    raise UserError(f"unknown --task {name!r}: expected one of {', '.join(TASKS)}")


def task_of_store(recorded: dict | None) -> Task:
    """The task a store records; stores made before tasks were recorded are classification."""
    if recorded is None:
        return Classification()
    return make_task(recorded["name"], recorded.get("output"))



