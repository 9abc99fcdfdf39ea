"""The built-in networks: the CIFAR ResNet-9 and a small GPT.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GPT_DEFAULTS = {"width": 64, "layers": 2, "heads": 4}


GPT_CONTEXT = 512


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)


CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, kept inside the model so that data stays in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def resnet9(num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """The CIFAR ResNet-9 of the TRAK paper's CIFAR experiments (channels 64-128-256 at width 1),
    with CIFAR-10 normalization as its first layer. Width 0.25 has 143,248 parameters."""
    c1, c2, c3 = (max(1, round(c * width)) for c in (64, 128, 256))
    return nn.Sequential(
        Normalize(CIFAR10_MEAN, CIFAR10_STD),
        _conv_bn(3, c1),
        _conv_bn(c1, c2, kernel_size=5, stride=2, padding=2),
        Residual(nn.Sequential(_conv_bn(c2, c2), _conv_bn(c2, c2))),
        _conv_bn(c2, c3),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(_conv_bn(c3, c3), _conv_bn(c3, c3))),
        _conv_bn(c3, c2, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(c2, num_classes, bias=False),
        Scale(0.2),
    )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions 0..t only."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attention = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.out((attention @ v).transpose(1, 2).reshape(b, t, c))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A small pre-norm GPT: token and position embeddings, `layers` causal transformer blocks,
    a final layer norm and an untied output layer; (batch, T) token ids -> (batch, T, vocabulary)
    logits. The padding mask is accepted and not needed: padding sits right of the real tokens,
    which causal attention keeps from seeing it."""

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4, context: int = GPT_CONTEXT):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, mask=None):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.norm(self.blocks(x)))
