import subprocess
import sys

import numpy as np
import pytest
import torch

from trakwomp.features.projectors import (
    TILE_ROWS,
    ProjectorSpec,
    make_projector,
    projection_block,
)


def test_blocks_regenerate_identically_in_another_process(tmp_path):
    spec = ProjectorSpec("gaussian", seed=11, blocks=4, block_dim=8)
    code = ("import numpy as np; from trakwomp.features.projectors import ProjectorSpec, projection_block; "
            f"np.save({str(tmp_path / 'b.npy')!r}, projection_block(ProjectorSpec('gaussian', 11, 4, 8), 3, 2, 5000).numpy())")
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), projection_block(spec, 3, 2, 5000).numpy())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_prefix_property_and_block_independence(kind):
    p = TILE_ROWS + 100  # two tiles
    grads = torch.randn(6, p)
    cpu = torch.device("cpu")
    four = make_projector(ProjectorSpec(kind, 5, 4, 16), 2, p, cpu)
    two = make_projector(ProjectorSpec(kind, 5, 2, 16), 2, p, cpu)
    wide, narrow = four.project(grads), two.project(grads)
    assert torch.equal(wide[:, :32], narrow)
    other_model = make_projector(ProjectorSpec(kind, 5, 2, 16), 3, p, cpu)
    assert not torch.allclose(other_model.project(grads), narrow)
    dense = torch.cat([projection_block(ProjectorSpec(kind, 5, 4, 16), 2, b, p) for b in range(4)], dim=1)
    torch.testing.assert_close(wide, grads @ dense, rtol=1e-4, atol=1e-4)
    if kind == "sjlt":  # one nonzero of +-1 per parameter and block
        assert set(dense.unique().tolist()) == {-1.0, 0.0, 1.0}
        for b in range(4):
            assert torch.equal((dense[:, b * 16:(b + 1) * 16] != 0).sum(1), torch.ones(p, dtype=torch.long))


def projected_inner_products(kind: str, u: torch.Tensor, v: torch.Tensor, samples: int, scale: float = 1.0):
    """<P_b^T u, P_b^T v> for `samples` independent blocks (other seeds, models and block indices)."""
    block_dim, blocks = 32, 50
    values = []
    for seed in range(samples // blocks):
        P = torch.cat([projection_block(ProjectorSpec(kind, seed, blocks, block_dim), 0, b, len(u))
                       for b in range(blocks)], dim=1).double() * scale
        pu, pv = (u @ P).view(blocks, block_dim), (v @ P).view(blocks, block_dim)
        values.append((pu * pv).sum(1))
    return torch.cat(values).numpy(), block_dim


def theoretical_variance(kind: str, u, v, k: int) -> float:
    """Var <P^T u, P^T v> for P with k columns of i.i.d. entries of variance 1/k."""
    uv, uu, vv = float(u @ v), float(u @ u), float(v @ v)
    var = (uv ** 2 + uu * vv) / k
    if kind in ("rademacher", "sjlt"):  # no fourth-moment excess (sjlt: hashing, the same variance)
        var -= 2 * float((u ** 2) @ (v ** 2)) / k
    return var


def check_unbiased_with_theoretical_variance(kind, scale=1.0) -> bool:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(200, generator=g, dtype=torch.float64)
    v = 0.6 * u + 0.8 * torch.randn(200, generator=g, dtype=torch.float64)
    v[:5] *= 8  # heavy coordinates make the two kinds' variances differ
    values, k = projected_inner_products(kind, u, v, samples=4000, scale=scale)
    mean, var = values.mean(), values.var(ddof=1)
    expected_var = theoretical_variance(kind, u, v, k)
    # Standard errors from the sample itself: of the mean, and of the variance (via 4th moments).
    se_mean = np.sqrt(var / len(values))
    se_var = np.sqrt((np.mean((values - mean) ** 4) - var ** 2) / len(values))
    return abs(mean - float(u @ v)) < 4 * se_mean and abs(var - expected_var) < 4 * se_var


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_inner_products_unbiased_with_the_theoretical_variance(kind):
    assert check_unbiased_with_theoretical_variance(kind)
    # The same check catches a projection scaled wrongly by 10%.
    assert not check_unbiased_with_theoretical_variance(kind, scale=1.1)
    assert not check_unbiased_with_theoretical_variance(kind, scale=0.9)
