"""The LDS models of a store: their train subsets and their outputs on the LDS targets, the
ground truth of the linear datamodeling score and of the calibration of group predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trakwomp.errors import UserError
from trakwomp.store import Store, paths


@dataclass
class GroundTruth:
    """LDS models' subset masks (J x n) and actual outputs f on the targets (J x n_targets)."""

    masks: np.ndarray
    outputs: np.ndarray
    targets_sha: str

    @classmethod
    def from_store(cls, handle: Store, by_group: bool = False) -> "GroundTruth":
        """The LDS models of a store: those on random alpha-subsets of the examples, or with
        `by_group` those on random halves of the groups (`train --group-alpha`)."""
        role = "lds-groups" if by_group else "lds"
        names = handle.done_units("train", role)
        recorded = handle.manifest.lds_targets
        if not names or recorded is None:
            flag = " --group-alpha 0.5" if by_group else ""
            raise UserError(f"store {handle.location!r} has no {'group ' if by_group else ''}LDS models; run "
                            f"`trakwomp train --role lds{flag} --targets SPEC --num-models 100` first")
        masks = np.stack([handle.read_array(f"{paths.trained_model(role, name)}/mask") for name in names])
        outputs = np.stack([handle.read_array(paths.outputs(paths.trained_model(role, name))) for name in names])
        return cls(masks, outputs.astype(np.float64), recorded.sha256)

    def split(self, part: int) -> "GroundTruth":
        """Half `part` (0 or 1) of the LDS models: those at even or odd positions."""
        return GroundTruth(self.masks[part::2], self.outputs[part::2], self.targets_sha)
