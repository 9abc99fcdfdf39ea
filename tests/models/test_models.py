
import numpy as np
import pytest
import torch

from trakwomp.errors import UserError
from trakwomp.models.checkpoints import load_checkpoint, load_weights, state_hash
from trakwomp.models.networks import resnet9
from trakwomp.models.spec import ModelSpec
from trakwomp.tasks.classification import margins


def test_resnet9_parameter_count_matches_the_architecture():
    # Width 0.25: channels 16, 32, 64. Convs (no bias) 3->16 k3, 16->32 k5, 2x 32->32 k3, 32->64 k3,
    # 2x 64->64 k3, 64->32 k3; BatchNorm weight+bias per conv; linear 32->10 without bias.
    convs = 3 * 16 * 9 + 16 * 32 * 25 + 2 * 32 * 32 * 9 + 32 * 64 * 9 + 2 * 64 * 64 * 9 + 64 * 32 * 9
    bns = 2 * (16 + 32 + 32 + 32 + 64 + 64 + 64 + 32)
    expected = convs + bns + 32 * 10
    assert expected == 143_248
    assert sum(p.numel() for p in resnet9(10, 0.25).parameters()) == expected
    out = resnet9(7, 0.25).eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_margins_match_definition():
    logits = torch.randn(20, 6, dtype=torch.float64)
    labels = torch.randint(0, 6, (20,))
    got = margins(logits, labels).numpy()
    for i in range(20):
        row = logits[i].numpy()
        others = np.delete(row, labels[i].item())
        expected = row[labels[i]] - np.log(np.exp(others).sum())
        assert got[i] == pytest.approx(expected, rel=1e-12)


def test_user_model_by_module_factory(user_module):
    user_module("usermodels_a.nets", "import torch\n"
                "def build(num_classes):\n"
                "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, num_classes))\n"
                "NOT_CALLABLE = 3\n")
    model = ModelSpec.parse("usermodels_a.nets:build").build(4)
    assert model(torch.rand(2, 3, 2, 2)).shape == (2, 4)
    with pytest.raises(UserError, match="no attribute"):
        ModelSpec.parse("usermodels_a.nets:missing").build(4)
    with pytest.raises(UserError, match="not .*callable"):
        ModelSpec.parse("usermodels_a.nets:NOT_CALLABLE").build(4)
    with pytest.raises(UserError, match="cannot import"):
        ModelSpec.parse("usermodels_zzz.nets:build").build(4)


@pytest.mark.parametrize("spec", ["resnet", "my-module:build", "a.b:", ":build", "a b:c"])
def test_malformed_model_specs(spec):
    with pytest.raises(UserError, match="model spec"):
        ModelSpec.parse(spec)


def test_width_only_for_builtin():
    with pytest.raises(UserError, match="built-in"):
        ModelSpec.parse("pkg.mod:build", width=0.5)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(resnet9(10, 0.5).state_dict(), tmp_path / "wide.pt")
    spec = ModelSpec.parse("resnet9", 0.25)
    with pytest.raises(UserError, match="does not fit model resnet9 \\(width 0.25\\).*wrong shape"):
        load_weights(spec.build(10), load_checkpoint(tmp_path / "wide.pt"), "wide.pt", spec)
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(UserError, match="missing.*unexpected"):
        load_weights(spec.build(10), load_checkpoint(tmp_path / "linear.pt"), "linear.pt", spec)


def test_checkpoint_roundtrip_and_corrupt_files(tmp_path):
    net = resnet9(10, 0.25)
    torch.save(net.state_dict(), tmp_path / "ok.pt")
    spec = ModelSpec.parse("resnet9", 0.25)
    loaded = load_weights(spec.build(10), load_checkpoint(tmp_path / "ok.pt"), "ok.pt", spec)
    assert state_hash(loaded.state_dict()) == state_hash(net.state_dict())
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    with pytest.raises(UserError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"epoch": 3}, tmp_path / "notweights.pt")
    with pytest.raises(UserError, match="not a state_dict"):
        load_checkpoint(tmp_path / "notweights.pt")


def test_state_hash_sees_one_bit():
    state = resnet9(10, 0.25).state_dict()
    before = state_hash(state)
    w = state["1.0.weight"]
    w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(10.0))
    assert state_hash(state) != before
