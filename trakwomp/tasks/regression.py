"""Regression: f is the model's one output, trained with the squared error.

For the loss l_i(f) = (f - y_i)^2 / 2 of a real-valued label y_i, TRAK's weight is
q_i = -l_i'(f_i) = y_i - f_i, the residual: removing example i from a least-squares fit moves the
parameters by -(Phi^T Phi)^-1 phi_i q_i / (1 - h_i) (h_i its leverage), so for a linear model
at its optimum tau_i(z) = phi(z) (Phi^T Phi)^-1 phi_i q_i is the exact effect of removing i on f(z)
times (1 - h_i) (docs/method.md derives it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trakwomp.data.base import Batch, Dataset
from trakwomp.errors import UserError
from trakwomp.tasks.base import Task


@dataclass(frozen=True)
class Regression(Task):
    """f = the model's output (a (batch, 1) tensor, or (batch,)); loss: the mean squared error over
    the batch, halved; q = y - f. Labels are real values (an npz dataset with float `y`)."""

    name = "regression"
    help = "the output, trained with the squared error on real-valued labels"
    default_model = "resnet9"
    summary_name = "target_squared_error"

    def outputs(self, output, batch: Batch) -> torch.Tensor:
        return output.reshape(len(batch))

    def q(self, f: torch.Tensor, batch: Batch) -> torch.Tensor:
        """q_i = y_i - f_i, the residual (-l_i'(f_i) for l_i = (f - y_i)^2 / 2)."""
        return batch.labels.to(f.dtype) - f

    def loss(self, output, batch: Batch) -> torch.Tensor:
        return 0.5 * (self.outputs(output, batch) - batch.labels).pow(2).mean()

    def summary_terms(self, output, batch: Batch) -> tuple[float, float]:
        """(summed squared error, examples): their ratio is the mean squared error."""
        return float((self.outputs(output, batch) - batch.labels).pow(2).sum()), float(len(batch))

    def describe_summary(self, value: float) -> str:
        return f"target mean squared error {value:.4g}"

    def output_size(self, dataset: Dataset) -> int:
        self.check_data(dataset)
        return 1

    def check_data(self, dataset: Dataset) -> None:
        if not dataset.real_valued:
            raise UserError(f"regression needs real-valued labels (an npz dataset with float y); {dataset.spec} has "
                            "class labels or none")

    def output_mismatch(self, shape: tuple[int, ...], batch: Batch, output_size: int) -> str | None:
        return None if shape in ((len(batch), 1), (len(batch),)) else f"expected ({len(batch)}, 1) outputs"
