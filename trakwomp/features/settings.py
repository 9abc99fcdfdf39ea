"""How features are made: the feature layout (a projector kind's method and, for factored
projections, the layers), the storage dtype and the parameters differentiated, as given or as a
store recorded them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trakwomp.errors import UserError
from trakwomp.features.base import FeatureLayout, FeatureMethod
from trakwomp.features.gradients import count_parameters, select_parameters
from trakwomp.features.methods import feature_method
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.store import Store

DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class FeatureSettings:
    """How features are made: the feature layout (projector and, per layer, the layers), the
    storage dtype and the parameters differentiated."""

    layout: FeatureLayout
    dtype: str
    parameter_names: list[str]
    num_params: int

    @property
    def projector(self) -> ProjectorSpec:
        return self.layout.projector

    @property
    def layers(self) -> tuple:
        return self.layout.layers

    @property
    def dims(self) -> int:
        return self.layout.dims

    @property
    def method(self) -> FeatureMethod:
        return feature_method(self.projector)

    @classmethod
    def of_store(cls, handle: Store, net: nn.Module) -> "FeatureSettings":
        """The settings the store's train features were made with (every recorded projector
        setting, tile size included), for featurizing targets alike."""
        recorded = handle.manifest.featurize
        if recorded is None:
            raise UserError(f"store {handle.location!r} has no features yet; run `trakwomp featurize` first")
        parameters = None if recorded.parameters is None else list(recorded.parameters)
        settings = cls.for_model(ProjectorSpec.of_store(recorded.projector), recorded.dtype, net,
                                 select_parameters(net, parameters))
        if settings.num_params != recorded.num_params:
            raise UserError(f"the model differentiates {settings.num_params} parameters, but the store's features were "
                            f"made from {recorded.num_params}")
        if [layer.as_dict() for layer in settings.layers] != [layer.json for layer in recorded.layers]:
            raise UserError("the model's layers differ from those the store's factored features were made from")
        return settings

    @classmethod
    def for_model(cls, projector: ProjectorSpec, dtype: str, net: nn.Module, names: list[str]) -> "FeatureSettings":
        """The settings for differentiating the parameters `names` of `net` with `projector`'s method."""
        layout = feature_method(projector).layout(projector, net, names)
        return cls(layout, dtype, names, count_parameters(net, names))

    def record(self, parameters: list[str] | None, chunk_rows: int) -> dict:
        """What a store records of them (`parameters`: the patterns given, None for all)."""
        recorded = {"projector": self.projector.as_dict(), "dtype": self.dtype, "parameters": parameters,
                    "num_params": self.num_params, "chunk_rows": chunk_rows}
        if self.layers:
            recorded["layers"] = [layer.as_dict() for layer in self.layers]
        return recorded

    def left_out(self) -> list[str]:
        """The chosen parameters the features leave out (factored: those of no supported layer)."""
        return self.method.left_out(self.layout, self.parameter_names)
