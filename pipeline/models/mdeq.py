"""MDEQ-Tiny: the multiscale deep equilibrium model of the paper's ablations (appendix §4.2).

The paper trains "the original MDEQ-Tiny model on CIFAR-10 without any architecture
modification" (Bai et al., 2020, https://github.com/locuslab/mdeq,
``experiments/cifar/cls_mdeq_TINY.yaml``). This module rebuilds that network with
the defaults of :class:`MDEQConfig` equal to the TINY settings; counted like the
official code, it has 158,986 trainable parameters.

Structure (what one forward does)::

    x ──stem──► u  (conv3x3-BN-ReLU x2, full resolution, no downsampling for TINY)
    h* = F(h*; u)          the equilibrium, solved by pipeline.deq.implicit_layer
    F: per branch i  a residual block (conv3x3 -> expansion x channels -> conv3x3,
                     group norm, variational dropout, u injected into branch 0 only),
       then multiscale fusion (stride-2 conv3x3 down, conv1x1 + nearest up) and
       a post-fusion ReLU-conv1x1-GroupNorm per branch.
    head: per-branch bottleneck ("incre") -> stride-2 merges to the coarsest branch
          -> conv1x1 to final_channels -> global average pool -> linear.

The multiscale state [h_0 (B, C_0, H, W), h_1 (B, C_1, H/2, W/2), ...] is packed into
one flat tensor (B, n) so the solvers and gradient estimators of ``pipeline.deq`` see
a single tensor; ``func`` unpacks it, applies F and packs the result.

Training modes (chosen by the caller through :class:`~pipeline.deq.EstimatorConfig`):

* MDEQ's shallow pretraining stage ("unrolled" weight-tied network, NUM_LAYERS = 10 in
  the TINY config) is ``EstimatorConfig("unrolled", k=config.num_layers)``: k
  applications of F from h0 = 0 under autograd, as the official ``_forward`` does for
  ``train_step < PRETRAIN_STEPS``.
* Implicit differentiation (paper Eq. 4): ``EstimatorConfig("implicit", b_max_iter=24)``.
* Phantom gradients: ``EstimatorConfig("upg", k=5, lam=0.5)`` (the paper's A_{5,0.5},
  appendix Alg. 1) or ``"npg"`` (Alg. 2/3).

>>> import torch
>>> from pipeline.deq import SolverConfig, EstimatorConfig
>>> model = MDEQ(MDEQConfig(in_channels=1, image_size=8))     # scikit-learn digits, 8x8
>>> logits, stats = model(torch.randn(4, 1, 8, 8), SolverConfig("broyden", 22),
...                       EstimatorConfig("upg", k=5, lam=0.5))
>>> tuple(logits.shape)
(4, 10)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from pipeline.deq import EstimatorConfig, SolverConfig, SolverStats, implicit_layer
from pipeline.models.presets import from_preset

Tensor = torch.Tensor
Shape = tuple[int, int, int]


@dataclass(frozen=True)
class MDEQConfig:
    """MDEQ hyperparameters; the defaults are the official TINY CIFAR-10 config.

    Args:
        in_channels: image channels (3 for CIFAR-10, 1 for scikit-learn digits).
        num_classes: classifier outputs.
        image_size: input height = width. Branch i works at image_size / 2^(d + i)
            with d = ``downsample_times``: 32x32 and 16x16 for CIFAR, 8x8 and 4x4
            for digits. Must be divisible by 2^(d + branches - 1).
        channels: channels of each resolution branch (NUM_CHANNELS [24, 24]).
        head_channels: bottleneck widths of the classification head per branch
            (HEAD_CHANNELS [8, 16]); the head works with head_expansion times these.
        final_channels: width of the last 1x1 conv before pooling (FINAL_CHANSIZE 200).
        blocks_per_branch: residual blocks per branch (NUM_BLOCKS [1, 1]).
        num_groups: GroupNorm groups inside F (NUM_GROUPS 8); the post-fusion
            norms use num_groups // 2, as in the official code.
        expansion: width factor of a residual block's hidden conv (EXPANSION_FACTOR 5).
        dropout: variational dropout rate inside F (DROPOUT 0.25); one mask per
            sample and channel, fixed for a whole forward; 0 disables it.
        weight_norm: weight normalisation (Salimans & Kingma, 2016) of the residual
            block convs and the post-fusion convs (WNORM true).
        downsample_times: stride-2 convs in the stem (DOWNSAMPLE_TIMES 0 for CIFAR).
        num_layers: depth of the unrolled pretraining network (NUM_LAYERS 10); used by
            callers as ``EstimatorConfig("unrolled", k=num_layers)``.
        head_expansion: output factor of the head's bottleneck blocks (4).
        bn_momentum: BatchNorm momentum in stem and head (0.1).
        init_std: std of the normal init of every conv that is not weight-normed.
    """

    in_channels: int = 3
    num_classes: int = 10
    image_size: int = 32
    channels: tuple[int, ...] = (24, 24)
    head_channels: tuple[int, ...] = (8, 16)
    final_channels: int = 200
    blocks_per_branch: int = 1
    num_groups: int = 8
    expansion: int = 5
    dropout: float = 0.25
    weight_norm: bool = True
    downsample_times: int = 0
    num_layers: int = 10
    head_expansion: int = 4
    bn_momentum: float = 0.1
    init_std: float = 0.01

    def __post_init__(self) -> None:
        # Lists from YAML/JSON become tuples, so the config stays hashable.
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "head_channels", tuple(self.head_channels))
        if len(self.channels) < 1:
            raise ValueError("MDEQConfig.channels needs at least one branch")
        if len(self.head_channels) != len(self.channels):
            raise ValueError(f"head_channels {self.head_channels} must have one entry per "
                             f"branch (channels {self.channels})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.downsample_times not in (0, 1, 2):
            raise ValueError(f"downsample_times={self.downsample_times} must be 0, 1 or 2")
        factor = 2 ** (self.downsample_times + self.num_branches - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size={self.image_size} must be divisible by {factor} "
                             f"({self.num_branches} branches, {self.downsample_times} "
                             "stem downsamplings)")
        for c in self.channels:  # (the post-fusion norms use num_groups // 2, then fine too)
            if c % self.num_groups or (c * self.expansion) % self.num_groups:
                raise ValueError(f"branch channels {c} (and {c}x{self.expansion}) must be "
                                 f"divisible by num_groups={self.num_groups}")

    @property
    def num_branches(self) -> int:
        return len(self.channels)

    @classmethod
    def from_params(cls, params: dict, **data_fields) -> "MDEQConfig":
        """A run's ``model:`` block: ``preset`` (a key of ``PRESETS``) plus overrides.

        ``data_fields`` (in_channels, num_classes, image_size) come from the dataset and
        may not be set in the block. Unknown keys and presets are refused, naming them.
        """
        return from_preset(cls, params, PRESETS, "tiny", data_fields, DATA_FIELDS, "MDEQ",
                           "the dataset")

    def state_shapes(self, image_size: Optional[int] = None) -> list[Shape]:
        """(C, H, W) of each branch of the equilibrium state for a square input."""
        size = (self.image_size if image_size is None else image_size) // 2 ** self.downsample_times
        return [(c, size // 2 ** i, size // 2 ** i) for i, c in enumerate(self.channels)]


DATA_FIELDS = ("in_channels", "num_classes", "image_size")

# Named presets; each is the dataclass defaults (TINY) plus these changes. Counted at the
# presets' datasets: tiny 158,986 (CIFAR-10), large_cifar 11,098,398 (CIFAR-10),
# small_imagenet 16,808,936 (ImageNet, 224x224, 1000 classes); the official code counts the
# same, part by part (tests/test_mdeq.py COUNTED, which explains the MDEQ paper's 10M / 18M).
PRESETS: dict[str, dict] = {
    # locuslab/mdeq cls_mdeq_TINY.yaml
    "tiny": {},
    # Gsunshine/phantom_grad LARGE: 4 branches, dropout 0
    "large_cifar": {"channels": (32, 64, 128, 256), "head_channels": (14, 28, 56, 112),
                    "final_channels": 1680, "dropout": 0.0},
    # Gsunshine/phantom_grad ImageNet SMALL: expansion 5, 2 stem downsamplings, 5 layers
    "small_imagenet": {"channels": (32, 64, 128, 256), "head_channels": (24, 48, 96, 192),
                       "final_channels": 2048, "downsample_times": 2, "num_layers": 5,
                       "dropout": 0.0},
}


# ---------------------------------------------------------------------------------------
# Packing the multiscale state into one tensor for the solvers
# ---------------------------------------------------------------------------------------

def pack(zs: Sequence[Tensor]) -> Tensor:
    """[(B, C_i, H_i, W_i)] -> (B, sum_i C_i H_i W_i), branch 0 first."""
    return torch.cat([z.flatten(1) for z in zs], dim=1)


def unpack(h: Tensor, shapes: Sequence[Shape]) -> list[Tensor]:
    """Inverse of :func:`pack`: (B, n) -> [(B, C_i, H_i, W_i)] (views, no copies)."""
    sizes = [c * hh * ww for c, hh, ww in shapes]
    if h.shape[1] != sum(sizes):
        raise ValueError(f"state has {h.shape[1]} features per sample; shapes {list(shapes)} "
                         f"need {sum(sizes)}")
    return [part.view(h.shape[0], *shape) for part, shape in zip(h.split(sizes, dim=1), shapes)]


# ---------------------------------------------------------------------------------------
# The equilibrium module F
# ---------------------------------------------------------------------------------------

def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


def _maybe_weight_norm(conv: nn.Conv2d, enabled: bool) -> nn.Conv2d:
    """w = g v / ||v|| per output channel (dim 0), parameters g (C_out,1,1,1) and v.

    The official code computes w once per forward; PyTorch's parametrization recomputes
    it at every call of F. The maps and gradients are the same.
    """
    return weight_norm(conv, dim=0) if enabled else conv


class ResidualBlock(nn.Module):
    """MDEQ's residual block (MDEQ paper, Fig. 2), one per branch.

    out = GN3(ReLU(GN2(drop(conv2(ReLU(GN1(conv1(z))))) + u) + z)),
    with conv1: C -> expansion*C (3x3), conv2: expansion*C -> C (3x3); the injection u
    is added before GN2. Dropout multiplies conv2's output by the forward's mask.
    """

    def __init__(self, channels: int, config: MDEQConfig):
        super().__init__()
        hidden = config.expansion * channels
        self.conv1 = _maybe_weight_norm(_conv3x3(channels, hidden), config.weight_norm)
        self.gn1 = nn.GroupNorm(config.num_groups, hidden)
        self.conv2 = _maybe_weight_norm(_conv3x3(hidden, channels), config.weight_norm)
        self.gn2 = nn.GroupNorm(config.num_groups, channels)
        self.gn3 = nn.GroupNorm(config.num_groups, channels)

    def forward(self, z: Tensor, injection: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        out = F.relu(self.gn1(self.conv1(z)))
        out = self.conv2(out)
        if mask is not None:
            out = out * mask
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + z
        return self.gn3(F.relu(out))


class Downsample(nn.Module):
    """Branch j -> coarser branch i (i > j): i - j stride-2 conv3x3, each with GroupNorm.

    Intermediate steps keep branch j's channels and are followed by a ReLU; the last
    maps to branch i's channels and has none (official ``DownsampleModule``).
    """

    def __init__(self, cin: int, cout: int, levels: int, num_groups: int):
        super().__init__()
        steps: list[nn.Module] = []
        for k in range(levels):
            last = k == levels - 1
            width = cout if last else cin
            steps += [_conv3x3(cin, width, stride=2), nn.GroupNorm(num_groups, width)]
            if not last:
                steps.append(nn.ReLU())
        self.net = nn.Sequential(*steps)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Upsample(nn.Module):
    """Branch j -> finer branch i (i < j): conv1x1, GroupNorm, nearest upsampling by 2^(j-i)."""

    def __init__(self, cin: int, cout: int, levels: int, num_groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, bias=False),
                                 nn.GroupNorm(num_groups, cout),
                                 nn.Upsample(scale_factor=2 ** levels, mode="nearest"))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class MultiscaleCell(nn.Module):
    """The equilibrium function F of MDEQ (the official ``MDEQModule``).

    Step 1, per branch i: ``blocks[i]`` (the first block gets injection u_i).
    Step 2, fusion: y_i = sum_j T_ij(x_j), with T_ii = identity, T_ij a Downsample for
    j < i and an Upsample for j > i; then z_i' = GN(conv1x1(ReLU(y_i))).

    Every operation acts on one sample at a time (convolutions, GroupNorm, per-sample
    dropout masks), so the samples of a batch never interact inside F.
    """

    def __init__(self, config: MDEQConfig):
        super().__init__()
        chans, groups = config.channels, config.num_groups
        self.branches = nn.ModuleList(
            nn.ModuleList(ResidualBlock(c, config) for _ in range(config.blocks_per_branch))
            for c in chans)
        self.fuse = nn.ModuleDict()  # key "jtoi": branch j into branch i
        for i in range(len(chans)):
            for j in range(len(chans)):
                if i < j:
                    self.fuse[f"{j}to{i}"] = Upsample(chans[j], chans[i], j - i, groups)
                elif i > j:
                    self.fuse[f"{j}to{i}"] = Downsample(chans[j], chans[i], i - j, groups)
        self.post_fuse = nn.ModuleList(
            nn.Sequential(nn.ReLU(),
                          _maybe_weight_norm(nn.Conv2d(c, c, kernel_size=1, bias=False),
                                             config.weight_norm),
                          nn.GroupNorm(max(1, groups // 2), c))
            for c in chans)

    def forward(self, zs: Sequence[Tensor], injections: Sequence[Optional[Tensor]],
                masks: Optional[Sequence[Sequence[Tensor]]] = None) -> list[Tensor]:
        """F(z; u): ``zs`` and ``injections`` per branch; ``masks[i][b]`` for block b of branch i."""
        xs = []
        for i, blocks in enumerate(self.branches):
            x = zs[i]
            for b, block in enumerate(blocks):
                x = block(x, injections[i] if b == 0 else None,
                          None if masks is None else masks[i][b])
            xs.append(x)
        if len(xs) == 1:  # as the official module: no fusion, post_fuse left unused
            return xs
        out = []
        for i, post in enumerate(self.post_fuse):
            y = xs[i]
            for j in range(len(xs)):
                if j != i:
                    y = y + self.fuse[f"{j}to{i}"](xs[j])
            out.append(post(y))
        return out


# ---------------------------------------------------------------------------------------
# Stem and classification head (outside the equilibrium)
# ---------------------------------------------------------------------------------------

class Stem(nn.Module):
    """Input transformation: two conv3x3-BatchNorm-ReLU (official ``downsample`` module).

    A conv has stride 2 only if ``downsample_times`` asks for it (0 for CIFAR and
    digits). With downsample_times 0 and at most 2 branches the official code uses
    this output directly as the injection of branch 0 (its ``stage0`` is None);
    otherwise an extra conv1x1-BN-ReLU follows.
    """

    def __init__(self, config: MDEQConfig):
        super().__init__()
        c, m, d = config.channels[0], config.bn_momentum, config.downsample_times
        layers: list[nn.Module] = [
            _conv3x3(config.in_channels, c, stride=2 if d >= 1 else 1),
            nn.BatchNorm2d(c, momentum=m), nn.ReLU(),
            _conv3x3(c, c, stride=2 if d >= 2 else 1),
            nn.BatchNorm2d(c, momentum=m), nn.ReLU()]
        if not (d == 0 and config.num_branches <= 2):
            layers += [nn.Conv2d(c, c, kernel_size=1, bias=False),
                       nn.BatchNorm2d(c, momentum=m), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Bottleneck(nn.Module):
    """Head block (official ``Bottleneck``): 1x1 -> 3x3 -> 1x1 (x expansion) + projected skip.

    Its three BatchNorms have no affine parameters, as in the official code; the
    projection shortcut (conv1x1 + affine BatchNorm) exists whenever the width changes.
    """

    def __init__(self, cin: int, planes: int, expansion: int, momentum: float):
        super().__init__()
        cout = planes * expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=momentum, affine=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=momentum, affine=False)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, momentum=momentum, affine=False)
        self.shortcut: nn.Module = nn.Identity()
        if cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, bias=False),
                                          nn.BatchNorm2d(cout, momentum=momentum))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ClassificationHead(nn.Module):
    """MDEQ's classifier on the equilibrium (official ``MDEQClsNet._make_head``).

    y = incre_0(z_0); for i >= 1: y = incre_i(z_i) + down_i(y) (stride-2 conv3x3 with
    bias, BN, ReLU); then conv1x1 to ``final_channels`` (with bias), BN, ReLU, global
    average pool, linear.
    """

    def __init__(self, config: MDEQConfig):
        super().__init__()
        e, m = config.head_expansion, config.bn_momentum
        head = config.head_channels
        self.incre = nn.ModuleList(Bottleneck(c, h, e, m)
                                   for c, h in zip(config.channels, head))
        self.down = nn.ModuleList(
            nn.Sequential(_conv3x3(head[i] * e, head[i + 1] * e, stride=2, bias=True),
                          nn.BatchNorm2d(head[i + 1] * e, momentum=m), nn.ReLU())
            for i in range(len(head) - 1))
        self.final = nn.Sequential(nn.Conv2d(head[-1] * e, config.final_channels, kernel_size=1),
                                   nn.BatchNorm2d(config.final_channels, momentum=m), nn.ReLU())
        self.classifier = nn.Linear(config.final_channels, config.num_classes)

    def forward(self, zs: Sequence[Tensor]) -> Tensor:
        y = self.incre[0](zs[0])
        for i, down in enumerate(self.down):
            y = self.incre[i + 1](zs[i + 1]) + down(y)
        y = self.final(y)
        return self.classifier(y.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

class MDEQ(nn.Module):
    """MDEQ classifier: stem, equilibrium module F solved by ``implicit_layer``, head.

    >>> model = MDEQ(MDEQConfig())
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
    158986
    """

    def __init__(self, config: MDEQConfig):
        super().__init__()
        self.config = config
        self.stem = Stem(config)
        self.cell = MultiscaleCell(config)
        self.head = ClassificationHead(config)
        self._init_weights()

    def parts(self) -> dict[str, nn.Module]:
        """The model's parts for per-part gradient diagnostics: F (the implicit layer),
        the injection (stem) and the head."""
        return {"F": self.cell, "injection": self.stem, "head": self.head}

    def _init_weights(self) -> None:
        """The official ``init_weights``: N(0, init_std) convs, BatchNorm (1, 0).

        The official code also calls ``normal_`` on the weight-normed convs, but there it
        writes into the derived weight, which is recomputed from (g, v) before use, so
        those convs keep PyTorch's default (Kaiming-uniform) init with g = ||v||. We
        reproduce that effective init by skipping them. GroupNorm and the final linear
        layer keep PyTorch's defaults, as in the official code.
        """
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not parametrize.is_parametrized(m):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0.0, std)
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _state_shapes(self, u: Tensor) -> list[Shape]:
        _, _, height, width = u.shape
        levels = self.config.num_branches - 1
        if height % 2 ** levels or width % 2 ** levels:
            raise ValueError(f"feature map {height}x{width} must be divisible by {2 ** levels} "
                             f"for {self.config.num_branches} branches")
        return [(c, height // 2 ** i, width // 2 ** i) for i, c in enumerate(self.config.channels)]

    def _dropout_masks(self, like: Tensor, shapes: Sequence[Shape]) -> Optional[list[list[Tensor]]]:
        """Variational dropout masks (B, C_i, 1, 1), one per block, drawn once per forward.

        The same mask multiplies every pixel and every iteration of F within this
        forward (MDEQ's ``VariationalHidDropout2d``), so F stays one fixed map for the
        solver. None in eval mode or with dropout 0.
        """
        p = self.config.dropout
        if not self.training or p == 0.0:
            return None
        bsz = like.shape[0]
        return [[like.new_empty(bsz, c, 1, 1).bernoulli_(1.0 - p) / (1.0 - p)
                 for _ in range(self.config.blocks_per_branch)]
                for c, _, _ in shapes]

    def problem(self, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor, list[Shape]]:
        """(func, h0, shapes): F on the packed state, its start, and the branch shapes for
        :func:`unpack`, so a caller can run ``self.head(unpack(h, shapes))`` on any h."""
        u = self.stem(x)
        shapes = self._state_shapes(u)
        # Only the finest branch receives the input; the official code adds zero
        # tensors to the others, which we leave out.
        injections = [u] + [None] * (len(shapes) - 1)
        masks = self._dropout_masks(u, shapes)

        def func(h: Tensor) -> Tensor:
            return pack(self.cell(unpack(h, shapes), injections, masks))

        h0 = u.new_zeros(u.shape[0], sum(c * hh * ww for c, hh, ww in shapes))
        return func, h0, shapes

    def deq_problem(self, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """Stem + injection; returns (func, h0).

        ``func`` maps the packed state (B, n) to (B, n): it is F(.; u) with u = stem(x)
        and this forward's dropout masks (new masks on every call of deq_problem in
        training mode). h0 is zeros, MDEQ's initial state.
        """
        func, h0, _ = self.problem(x)
        return func, h0

    def forward(self, x: Tensor, solver: SolverConfig, estimator: EstimatorConfig
                ) -> tuple[Tensor, SolverStats]:
        """Logits (B, num_classes) and the forward solver's stats.

        Training mode runs ``implicit_layer`` with ``estimator``; eval mode runs the
        whole model without autograd (the no-grad solve, the head under no_grad), so the
        logits carry no graph. For gradients in eval mode use :meth:`deq_problem`.
        """
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            func, h0, shapes = self.problem(x)
            h, stats = implicit_layer(func, h0, solver, estimator, training=self.training)
            return self.head(unpack(h, shapes)), stats
