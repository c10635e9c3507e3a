"""A convolutional DEQ cell of MDEQ-Tiny's shape, for the backward-pass benchmark.

Self-contained stand-in for ``pipeline.models.mdeq`` (which ``backward.py`` uses
when it is importable): the same state and the same kind of F, so the cost of a
solver step, a VJP and an unrolled step is the cost they have in MDEQ-Tiny.

Shape (locuslab/mdeq ``cls_mdeq_TINY.yaml``): two branches of 24 channels at
32x32 and 16x16 (n = 24*32*32 + 24*16*16 = 30,720 unknowns per sample), group
norm with 8 groups, expansion 5, weight-normed convs. F is MDEQ's
(``lib/models/mdeq_core.py``):

    per branch i:  x_i = GN3(ReLU(GN2(conv2(ReLU(GN1(conv1(h_i)))) + u_i) + h_i))
    fusion:        y_0 = x_0 + Up(x_1)   (conv1x1, GN, nearest x2)
                   y_1 = x_1 + Down(x_0) (stride-2 conv3x3, GN)
    post-fusion:   F_i = GN(conv1x1(ReLU(y_i)))   (GN with 4 groups)

The input injection u goes to branch 0 only (the stem's output); dropout is left
out (it is a fixed mask per forward and costs nothing measurable).

>>> import torch
>>> cell = ConvDEQCell()
>>> func, h0 = cell.deq_problem(torch.randn(2, 3, 32, 32))
>>> func(h0).shape
torch.Size([2, 30720])

Run from the repository root, e.g. ``python -c "import benchmarks.conv_cell"``;
``benchmarks/backward.py`` imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class ConvCellConfig:
    """MDEQ-Tiny's defaults: ``channels`` per branch, branch 0 at ``image_size``."""

    in_channels: int = 3
    image_size: int = 32
    channels: tuple[int, int] = (24, 24)
    expansion: int = 5
    num_groups: int = 8

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        s = self.image_size
        return [(self.channels[0], s, s), (self.channels[1], s // 2, s // 2)]

    @property
    def state_size(self) -> int:
        return sum(c * h * w for c, h, w in self.shapes)


class WNConv2d(nn.Conv2d):
    """Conv2d with weight normalisation w = g v / ||v|| per output channel
    (Salimans & Kingma, 2016), recomputed on every call as autograd needs it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        v = self.weight.detach().clone()
        del self.weight
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        v = self.weight_v
        w = self.weight_g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self._conv_forward(x, w, self.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> WNConv2d:
    return WNConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class Block(nn.Module):
    """MDEQ's BasicBlock with expansion (conv3x3 up, conv3x3 down, three group norms)."""

    def __init__(self, c: int, expansion: int, groups: int):
        super().__init__()
        self.conv1 = _conv3x3(c, expansion * c)
        self.gn1 = nn.GroupNorm(groups, expansion * c)
        self.conv2 = _conv3x3(expansion * c, c)
        self.gn2 = nn.GroupNorm(groups, c)
        self.gn3 = nn.GroupNorm(groups, c)

    def forward(self, h: Tensor, injection: Tensor | None) -> Tensor:
        out = F.relu(self.gn1(self.conv1(h)))
        out = self.conv2(out)
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + h
        return self.gn3(F.relu(out))


class ConvDEQCell(nn.Module):
    """Stem plus the two-branch multiscale F; ``deq_problem(x)`` gives (func, h0)."""

    def __init__(self, config: ConvCellConfig = ConvCellConfig()):
        super().__init__()
        self.config = config
        c0, c1 = config.channels
        g = config.num_groups
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0),
            nn.ReLU(), nn.Conv2d(c0, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        self.blocks = nn.ModuleList([Block(c0, config.expansion, g),
                                     Block(c1, config.expansion, g)])
        self.down = nn.Sequential(nn.Conv2d(c0, c1, 3, stride=2, padding=1, bias=False),
                                  nn.GroupNorm(g, c1))
        self.up = nn.Sequential(nn.Conv2d(c1, c0, 1, bias=False), nn.GroupNorm(g, c0))
        self.post = nn.ModuleList([
            nn.ModuleDict({"conv": WNConv2d(c, c, 1, bias=False), "gn": nn.GroupNorm(g // 2, c)})
            for c in (c0, c1)])

    def cell(self, h0: Tensor, h1: Tensor, injection: Tensor) -> tuple[Tensor, Tensor]:
        x0 = self.blocks[0](h0, injection)
        x1 = self.blocks[1](h1, None)
        y0 = x0 + F.interpolate(self.up(x1), scale_factor=2, mode="nearest")
        y1 = x1 + self.down(x0)
        return tuple(p["gn"](p["conv"](F.relu(y))) for p, y in zip(self.post, (y0, y1)))

    def deq_problem(self, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """(func, h0) for ``implicit_layer``: func maps the packed state (B, n) to (B, n)."""
        u = self.stem(x)
        (c0, s0, _), (c1, s1, _) = self.config.shapes
        split = c0 * s0 * s0
        bsz = x.shape[0]

        def func(h: Tensor) -> Tensor:
            h0 = h[:, :split].reshape(bsz, c0, s0, s0)
            h1 = h[:, split:].reshape(bsz, c1, s1, s1)
            f0, f1 = self.cell(h0, h1, u)
            return torch.cat([f0.flatten(1), f1.flatten(1)], dim=1)

        return func, u.new_zeros(bsz, self.config.state_size)
