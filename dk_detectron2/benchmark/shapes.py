"""The shapes the suite measures: a ResNet-50's 3x3 convolutions, and tiny ones for ``--quick``."""

from dataclasses import asdict, dataclass
from typing import List, Tuple

__all__ = [
    "OpShape",
    "RESNET50_STAGES",
    "op_shapes",
    "headline_shape",
    "full_dk_shape",
    "scaling_sizes",
]

# (channels, spatial size) of the bottleneck 3x3 convolution of res2..res5 at a 224x224 input.
RESNET50_STAGES: Tuple[Tuple[int, int], ...] = ((64, 56), (128, 28), (256, 14), (512, 7))
_QUICK_STAGES: Tuple[Tuple[int, int], ...] = ((8, 8), (16, 4))


@dataclass(frozen=True)
class OpShape:
    """One operator problem: input [batch, channels, size, size], K x K taps from an S x S scope.

    ``groups`` is the convolution's groups (``channels`` = depthwise); stride 1 and padding
    ``kernel_size // 2`` keep the spatial size, as in a bottleneck's 3x3 convolution.
    """

    batch: int
    channels: int
    size: int
    kernel_size: int = 3
    scope_size: int = 4
    rotation_groups: int = 1
    groups: int = 0  # 0 means depthwise (groups = channels)

    @property
    def conv_groups(self) -> int:
        return self.groups or self.channels

    @property
    def depthwise(self) -> bool:
        return self.conv_groups == self.channels

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    @property
    def stage_key(self) -> Tuple[int, int, int, int]:
        """What a plain convolution's cost depends on (not the scope or rotation groups)."""
        return (self.batch, self.channels, self.size, self.conv_groups)

    def label(self) -> str:
        text = f"B{self.batch} C{self.channels} {self.size}x{self.size} S{self.scope_size}"
        text += f" G{self.rotation_groups}"
        if not self.depthwise:
            text += f" groups{self.conv_groups}"
        return text

    def to_dict(self):
        return dict(asdict(self), groups=self.conv_groups, label=self.label())


def op_shapes(quick: bool) -> List[OpShape]:
    """Every (stage, batch, S, G) combination: 32 shapes, or 4 tiny ones with ``quick``."""
    stages = _QUICK_STAGES if quick else RESNET50_STAGES
    batches = (2,) if quick else (1, 8)
    scopes = (4,) if quick else (4, 5)
    rotation_groups = (1, 2) if quick else (1, 4)
    return [
        OpShape(batch, channels, size, 3, scope, g)
        for batch in batches
        for channels, size in stages
        for scope in scopes
        for g in rotation_groups
    ]


def headline_shape(quick: bool) -> OpShape:
    """The shape of the issue's CPU targets: B 8, C 64, 56x56, K 3, S 4, G 1."""
    return OpShape(2, 8, 8, 3, 4, 1) if quick else OpShape(8, 64, 56, 3, 4, 1)


def full_dk_shape(quick: bool) -> OpShape:
    """Full (groups 1) Deformable Kernel: B 8, C 256, 28x28, K 3, S 4."""
    return OpShape(2, 16, 8, 3, 4, 1, groups=1) if quick else OpShape(8, 256, 28, 3, 4, 1, groups=1)


def scaling_sizes(quick: bool) -> List[int]:
    """Spatial sizes of the H*W scaling sweep (B and C as the headline shape)."""
    return [4, 8, 16] if quick else [14, 28, 56, 112]
