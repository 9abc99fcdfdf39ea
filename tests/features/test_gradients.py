import torch
from torch import nn

from trakwomp.data.base import Batch
from trakwomp.features.gradients import PerExampleGradients, select_parameters
from trakwomp.tasks.classification import Classification


def margins(logits, labels):
    """logit_y - log sum_{k != y} exp(logit_k), written out (the test's own reference)."""
    rows = torch.arange(len(labels))
    others = torch.ones_like(logits, dtype=torch.bool)
    others[rows, labels] = False
    return logits[rows, labels] - torch.log(torch.where(others, logits.exp(), 0).sum(dim=1))


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5),
    )
    net.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial BatchNorm running statistics
            net(torch.randn(8, 3, 6, 6) * 2 + 1)
    return net.eval()


def autograd_loop(net, x, y, names):
    rows = []
    params = dict(net.named_parameters())
    for i in range(len(x)):
        net.zero_grad()
        margins(net(x[i:i + 1]), y[i:i + 1]).sum().backward()
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    return torch.stack(rows)


def test_per_example_gradients_match_an_autograd_loop():
    net = small_bn_net()
    x, y = torch.randn(7, 3, 6, 6), torch.randint(0, 5, (7,))
    names = select_parameters(net, None)
    out = PerExampleGradients(net, names, torch.device("cpu"), Classification())(Batch((x,), y))
    expected = autograd_loop(net, x, y, names)
    assert out.rows.shape == (7, sum(p.numel() for p in net.parameters()))
    torch.testing.assert_close(out.rows, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = net(x)
    torch.testing.assert_close(out.outputs, margins(logits, y))
    torch.testing.assert_close(out.q, 1 - torch.softmax(logits, 1).gather(1, y.view(-1, 1)).squeeze(1))
    assert not net.training


def test_gradients_for_a_parameter_subset():
    net = small_bn_net()
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 5, (5,))
    names = select_parameters(net, ["5.*", "1.weight"])
    assert names == ["1.weight", "5.weight", "5.bias"]
    engine = PerExampleGradients(net, names, torch.device("cpu"), Classification())
    assert engine.num_params == 4 + 80 + 5
    torch.testing.assert_close(engine(Batch((x,), y)).rows, autograd_loop(net, x, y, names), rtol=1e-5, atol=1e-6)
