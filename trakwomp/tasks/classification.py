"""Classification: f is the correct-class margin, trained with cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trakwomp.data.base import Batch, Dataset
from trakwomp.errors import UserError
from trakwomp.tasks.base import Task, logits_of


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The classification output f = logit_y - logsumexp_{k != y} logit_k, one per row."""
    labels = labels.view(-1, 1)
    correct = logits.gather(1, labels).squeeze(1)
    return correct - torch.logsumexp(logits.scatter(1, labels, float("-inf")), dim=1)


@dataclass(frozen=True)
class Classification(Task):
    """f = logit_y - logsumexp_{k != y} logit_k (the correct-class margin); p = softmax_y =
    sigmoid(f), so q = 1 - p; trained with cross-entropy. The model returns (batch, classes) logits."""

    name = "classification"
    help = "the margin of the label"
    default_model = "resnet9"
    summary_name = "target_accuracy"

    def outputs(self, output, batch: Batch) -> torch.Tensor:
        return margins(logits_of(output), batch.labels)

    def loss(self, output, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits_of(output), batch.labels)

    def summary_terms(self, output, batch: Batch) -> tuple[float, float]:
        """(examples whose top logit is the label, examples): summed over batches, their ratio
        is the accuracy (a positive margin means p_y > 1/2, a stricter test)."""
        return float((logits_of(output).argmax(dim=1) == batch.labels).sum()), float(len(batch))

    def describe_summary(self, value: float) -> str:
        return f"target accuracy {value:.1%}"

    def output_size(self, dataset: Dataset) -> int:
        """The classes of `dataset`."""
        self.check_data(dataset)
        return dataset.num_classes

    def check_data(self, dataset: Dataset) -> None:
        if dataset.num_classes < 2:
            raise UserError(f"classification needs labels of at least 2 classes; {dataset.spec} has "
                            f"{dataset.num_classes} (texts without \"label\" are for `task` causal-lm, real-valued "
                            "labels for `task` regression)")

    def output_mismatch(self, shape: tuple[int, ...], batch: Batch, output_size: int) -> str | None:
        expected = (len(batch), output_size)
        return None if shape == expected else f"expected {expected} logits"

    def check_targets(self, targets: Dataset, train_classes: tuple[str, ...]) -> None:
        if targets.classes != train_classes:
            raise UserError("the targets' classes differ from the train set's; targets must share its labels")
