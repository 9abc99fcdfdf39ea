"""Seeded, block-structured random projections of per-example gradients (Johnson-Lindenstrauss).

The projection P (p x d) has d = B * d_block columns in B blocks. Block b of model m is a
function of (projector seed, m, b) alone: its rows are generated in tiles of `tile_rows`
parameters (TILE_ROWS unless a store recorded another), tile t from a torch CPU generator
seeded by SeedSequence([seed, m, b, t]). So

- any block of any model can be regenerated on any machine, process or shard;
- the first b blocks of a B-block projection are exactly a b-block projection (prefix property);
- each block is scaled by 1/sqrt(d_block), so one block alone preserves inner products in
  expectation: E[<P_b^T u, P_b^T v>] = <u, v>.

Kinds: `gaussian` (entries N(0, 1/d_block)), `rademacher` (entries +-1/sqrt(d_block)),
`sjlt` (a sparse Johnson-Lindenstrauss transform, Kane and Nelson: in each block every gradient
coordinate goes to one output coordinate, drawn uniformly, with a random sign; unscaled, since
E <P_b^T u, P_b^T v> = <u, v> already; it costs O(p) per example and block instead of O(p d)), and
`identity` (no projection: block b is coordinates [b * d_block, (b + 1) * d_block) of the
gradient, so B * d_block must equal the number of parameters; exact TRAK for small models).
The fifth kind, `factored`, projects each layer on its own without building per-example
gradients; see trakwomp/features/factored.py (there `blocks` is the number of layers).

Kinds are `ProjectorKind`s in the registry PROJECTOR_KINDS (trakwomp's own in
trakwomp.features.kinds; other packages' through the entry point group `trakwomp.projectors`).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from trakwomp.errors import UserError
from trakwomp.registry import Registry
from trakwomp.settings import check_seed
from trakwomp.runtime import torch_seed
from trakwomp.store.records import ProjectorRecord

if TYPE_CHECKING:
    from trakwomp.features.base import FeatureMethod

TILE_ROWS = 4096
TILE_CACHE_BYTES = 2 << 30  # a dense projector keeps its tiles up to this size, else regenerates them per call
GRADIENT_BUFFER_BYTES = 1 << 30  # gradient rows gathered per call of a projector that regenerates


DEFAULT_BLOCKS = 16


def side_dim(block_dim: int) -> int:
    """k for factored per-layer blocks of block_dim = k x k dims."""
    k = math.isqrt(block_dim)
    if k * k != block_dim:
        raise UserError(f"`block_dim` {block_dim}: factored projections make k x k blocks per layer, so the block "
                        f"dim must be a square (e.g. {k * k} or {(k + 1) ** 2})")
    return k


@dataclass(frozen=True)
class ProjectorSpec:
    """A projection as asked for: its kind, seed, blocks and block dim. `blocks` None: the
    method's default (DEFAULT_BLOCKS; for `factored`, one per layer), resolved by the feature
    method's layout."""

    kind: str = "sjlt"
    seed: int = 0
    blocks: int | None = None
    block_dim: int = 1024
    tile_rows: int = TILE_ROWS

    def __post_init__(self):
        PROJECTOR_KINDS.get(self.kind)  # an unknown kind is refused naming the kinds
        if (self.blocks is not None and self.blocks < 1) or self.block_dim < 1 or self.tile_rows < 1:
            raise UserError("`blocks` and `block_dim` must be at least 1")
        check_seed("`projector_seed`", self.seed)
        if self.kind == "factored":
            side_dim(self.block_dim)

    @property
    def num_blocks(self) -> int:
        """B, which every spec that projects has (`blocks` is None only until featurize derives it)."""
        if self.blocks is None:
            raise ValueError("the projection's number of blocks is not resolved yet")
        return self.blocks

    @property
    def dim(self) -> int:
        return self.num_blocks * self.block_dim

    def as_dict(self) -> dict:
        """What a store records of the projection (`of_store` reads it back)."""
        return asdict(self)

    @classmethod
    def of_store(cls, recorded: ProjectorRecord) -> "ProjectorSpec":
        """The projector a store's features were made with."""
        tile_rows = recorded.tile_rows if recorded.tile_rows is not None else TILE_ROWS
        return cls(recorded.kind, recorded.seed, recorded.blocks, recorded.block_dim, tile_rows)


def tile_generator(seed: int, model_id: int, block: int, tile: int) -> torch.Generator:
    return torch.Generator().manual_seed(torch_seed(seed, model_id, block, tile))


def sjlt_tile(spec: ProjectorSpec, model_id: int, block: int, tile: int, num_params: int):
    """For the parameters of tile `tile`: their output coordinate in the block, and their sign."""
    rows = min(spec.tile_rows, num_params - tile * spec.tile_rows)
    generator = tile_generator(spec.seed, model_id, block, tile)
    positions = torch.randint(0, spec.block_dim, (rows,), generator=generator)
    signs = torch.randint(0, 2, (rows,), generator=generator, dtype=torch.int8).float().mul_(2).sub_(1)
    return positions, signs


def sjlt_rows(spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int, num_params: int) -> torch.Tensor:
    positions, signs = sjlt_tile(spec, model_id, block, tile, num_params)
    out = torch.zeros(rows, spec.block_dim)
    out[torch.arange(rows), positions] = signs
    return out


def identity_rows(spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int, num_params: int) -> torch.Tensor:
    columns = torch.arange(rows) + tile * spec.tile_rows - block * spec.block_dim
    inside = (columns >= 0) & (columns < spec.block_dim)
    out = torch.zeros(rows, spec.block_dim)
    out[torch.arange(rows)[inside], columns[inside]] = 1.0
    return out


def gaussian_rows(spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int, num_params: int) -> torch.Tensor:
    generator = tile_generator(spec.seed, model_id, block, tile)
    return torch.randn(rows, spec.block_dim, generator=generator).mul_(1.0 / math.sqrt(spec.block_dim))


def rademacher_rows(spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int, num_params: int) -> torch.Tensor:
    generator = tile_generator(spec.seed, model_id, block, tile)
    scale = 1.0 / math.sqrt(spec.block_dim)
    signs = torch.randint(0, 2, (rows, spec.block_dim), generator=generator, dtype=torch.int8)
    return signs.float().mul_(2 * scale).sub_(scale)


class ProjectorKind(ABC):
    """A kind of projection (`--projector`): its feature method and, for a projection of
    per-example gradients, its rows tile by tile, its projector and that projector's memory."""

    name: ClassVar[str]
    help: ClassVar[str] = ""  # what it is, in a few words, for --help
    method: ClassVar[FeatureMethod]  # the gradient engine that makes its features
    keeps_every_coordinate: ClassVar[bool] = False  # no projection: B x d_block must be the parameter count

    def rows(self, spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int,
             num_params: int) -> torch.Tensor:
        """Rows [tile * spec.tile_rows, + rows) of block `block` of model `model_id`'s projection."""
        raise UserError(f"the {self.name} projector does not project per-example gradients")

    def projector(self, spec: ProjectorSpec, model_id: int, num_params: int, device: torch.device):
        """What projects gradient rows (default: the dense tiles of `rows`)."""
        return DenseProjector(spec, model_id, num_params, device)

    def memory(self, spec: ProjectorSpec, num_params: int) -> tuple[str, int, str]:
        """(what, bytes, the setting that lowers it) of its projector."""
        return DenseProjector.memory(spec, num_params)


PROJECTOR_KINDS: Registry[ProjectorKind] = Registry("trakwomp.projectors", "`projector`", lambda cls: cls(),
                                                    builtins=("trakwomp.features.kinds",))


def projector_help() -> str:
    """Every projector kind, with its few words, as --help shows them."""
    named = [f"{name} ({kind.help})" if kind.help else name for name, kind in PROJECTOR_KINDS.items()]
    return ", ".join(named[:-1]) + f" or {named[-1]}" if len(named) > 1 else named[0]


def projection_tile(spec: ProjectorSpec, model_id: int, block: int, tile: int, num_params: int) -> torch.Tensor:
    """Rows [tile * spec.tile_rows, ...) of block `block` of model `model_id`'s projection, float32 on CPU."""
    rows = min(spec.tile_rows, num_params - tile * spec.tile_rows)
    return PROJECTOR_KINDS.get(spec.kind).rows(spec, model_id, block, tile, rows, num_params)


def projection_block(spec: ProjectorSpec, model_id: int, block: int, num_params: int) -> torch.Tensor:
    """The whole (num_params, d_block) block; for tests and small models."""
    tiles = math.ceil(num_params / spec.tile_rows)
    return torch.cat([projection_tile(spec, model_id, block, t, num_params) for t in range(tiles)])


class DenseProjector:
    """Projects gradient rows G (n x p) to G P (n x B*d_block), generating P tile by tile.

    Tiles are kept for reuse across calls while they fit in `cache_bytes`; beyond that they are
    regenerated per call (`regenerates`), which costs about as much as the matmul divided by the
    rows per call."""

    @staticmethod
    def memory(spec: ProjectorSpec, num_params: int) -> tuple[str, int, str]:
        """(what, bytes, the setting that lowers it): the tile cache, and a gradient buffer if it regenerates."""
        matrix = 4 * num_params * spec.dim
        buffer = GRADIENT_BUFFER_BYTES if matrix > TILE_CACHE_BYTES else 0  # regenerating: gradients gathered
        return "projection matrix cache", min(matrix, TILE_CACHE_BYTES) + buffer, "pass `projector` factored"

    def __init__(self, spec: ProjectorSpec, model_id: int, num_params: int, device: torch.device,
                 cache_bytes: int = TILE_CACHE_BYTES):
        self.spec, self.model_id, self.num_params, self.device = spec, model_id, num_params, device
        self.num_tiles = math.ceil(num_params / spec.tile_rows)
        self._cache: dict[int, torch.Tensor] = {}
        self.regenerates = num_params * spec.dim * 4 > cache_bytes

    def _tile(self, tile: int) -> torch.Tensor:
        """Rows of tile `tile` for all B blocks side by side: (rows, B * d_block) on the device."""
        if tile in self._cache:
            return self._cache[tile]
        blocks = [projection_tile(self.spec, self.model_id, b, tile, self.num_params) for b in range(self.spec.num_blocks)]
        value = torch.cat(blocks, dim=1).to(self.device)
        if not self.regenerates:
            self._cache[tile] = value
        return value

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[1] != self.num_params:
            raise ValueError(f"expected {self.num_params} gradient columns, got {grads.shape[1]}")
        out = torch.zeros(grads.shape[0], self.spec.dim, device=grads.device, dtype=torch.float32)
        for t in range(self.num_tiles):
            rows = self.spec.tile_rows
            out.addmm_(grads[:, t * rows:(t + 1) * rows], self._tile(t))
        return out


class SparseProjector:
    """Projects G (n x p) to G P for the `sjlt` kind: P^T (D x p) is kept as one CSR matrix per tile
    of `tile_rows` parameters, so each sparse product reads a slice of G^T that stays in cache.
    About 2 * p * B flops per example, whatever d_block is."""

    regenerates = False

    @staticmethod
    def memory(spec: ProjectorSpec, num_params: int) -> tuple[str, int, str]:
        """(what, bytes, the setting that lowers it): the index tables, 12 bytes per parameter and
        block plus 8 per projected dim and tile."""
        tiles = math.ceil(num_params / spec.tile_rows)
        tables = 12 * spec.num_blocks * num_params + 8 * tiles * (spec.dim + 1)
        return f"sjlt tables ({spec.blocks} blocks)", tables, "pass `projector` factored, or fewer `blocks`"

    def __init__(self, spec: ProjectorSpec, model_id: int, num_params: int, device: torch.device):
        self.spec, self.num_params = spec, num_params
        self.tiles = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            for tile in range(math.ceil(num_params / spec.tile_rows)):
                drawn = [sjlt_tile(spec, model_id, block, tile, num_params) for block in range(spec.num_blocks)]
                rows = torch.cat([positions + block * spec.block_dim for block, (positions, _) in enumerate(drawn)])
                signs = torch.cat([s for _, s in drawn])
                width = len(drawn[0][0])
                columns = torch.arange(width).repeat(spec.num_blocks)
                order = torch.argsort(rows, stable=True)
                row_starts = torch.zeros(spec.dim + 1, dtype=torch.int64)
                row_starts[1:] = torch.bincount(rows, minlength=spec.dim).cumsum(0)
                matrix = torch.sparse_csr_tensor(row_starts, columns[order], signs[order], (spec.dim, width),
                                                  check_invariants=False)
                self.tiles.append(matrix.to(device))

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[1] != self.num_params:
            raise ValueError(f"expected {self.num_params} gradient columns, got {grads.shape[1]}")
        grads_t = grads.T.contiguous()
        out = torch.zeros(self.spec.dim, grads.shape[0], device=grads.device, dtype=torch.float32)
        for t, matrix in enumerate(self.tiles):
            out.addmm_(matrix, grads_t[t * self.spec.tile_rows:(t + 1) * self.spec.tile_rows])
        return out.T


def make_projector(spec: ProjectorSpec, model_id: int, num_params: int, device: torch.device):
    """The projector of `spec` for one model (its kind's)."""
    return PROJECTOR_KINDS.get(spec.kind).projector(spec, model_id, num_params, device)
