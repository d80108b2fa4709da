"""``KernelConvBase``: the conv-like plumbing every module of ``dk_detectron2.layers`` shares
(``nn.Conv2d``'s arguments checked once, bias, ``norm`` and ``activation`` as
``detectron2.layers.Conv2d``, initialisation, the per-sample grouped convolution, repr).

``forward`` and the helpers it calls compile with ``torch.jit.script``: the Python-only input
check (:meth:`KernelConvBase._check_input`, whose messages name the module and the shape) runs in
eager mode only, and scripted code runs a plainer check of the same condition. As for
``detectron2.layers.Conv2d``, a module scripts with a module ``activation`` (``nn.ReLU()``), not
with a function one (``F.relu``: TorchScript cannot call a function held in an attribute)."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import IntPair, check_int, pair

__all__ = ["KernelConvBase"]


class KernelConvBase(nn.Module):
    """Shared conv-like plumbing: geometry, validation, bias, ``norm`` and ``activation``.

    The constructor takes ``nn.Conv2d``'s arguments plus ``norm`` and ``activation``; the
    keyword-only options of a subclass go to its ``_build(**options)``, which creates
    ``self.weight`` (and the generators); subclasses implement ``_convolve(x)``. Those that predict
    where they sample (kernel rotations, image offsets) from the input name the predicting
    submodules in ``generator_names``; :meth:`generator_parameters` yields their parameters, which
    training usually gives a smaller learning rate (``MODEL.DK.GENERATOR_LR_FACTOR``).
    """

    generator_names: Tuple[str, ...] = ()

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = False,
        norm: Optional[nn.Module] = None,
        activation=None,
        **options,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            check_int(name, value)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair("kernel_size", kernel_size, 1)
        self.stride = pair("stride", stride, 1)
        self.padding = pair("padding", padding, 0)
        self.dilation = pair("dilation", dilation, 1)
        self.groups = groups
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        self.norm = norm
        self.activation = activation
        self._build(**options)

    def _build(self) -> None:
        """Creates ``self.weight`` and any generator from the subclass's keyword-only options."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects input [B, {self.in_channels}, H, W], got {got}"
            )

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # TorchScript cannot compile _check_input's formatting: the same check, plainer message.
            if x.dim() != 4 or x.size(1) != self.in_channels:
                raise ValueError(
                    "expects input [B, " + str(self.in_channels) + ", H, W], got "
                    + str(x.shape)
                )
        else:
            self._check_input(x)
        return self._finish(self._convolve(x))

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generator_parameters(self):
        """The parameters of the submodules named in ``generator_names``."""
        for name in self.generator_names:
            yield from getattr(self, name).parameters()

    def c2_msra_fill_(self) -> None:
        """Detectron2's ``c2_msra_fill`` (He normal, fan-out of the K x K kernel, zero bias).

        Generators are left at zero.
        """
        fan_out = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / fan_out))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _reset_weight(self) -> None:
        # nn.Conv2d's default initialisation, with the fan-in of the sampled K x K kernel.
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)

    def _convolve_per_sample(self, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """Convolves sample b of ``x`` [B, C_in, H, W] with ``kernels[b]`` [B, C_out,
        C_in/groups, Kh, Kw], all in one grouped convolution (the batch folded into the groups)."""
        batch, height, width = x.shape[0], x.shape[2], x.shape[3]
        kernel_shape = [batch * self.out_channels, kernels.shape[2], kernels.shape[3],
                        kernels.shape[4]]
        out = F.conv2d(
            x.reshape(1, batch * self.in_channels, height, width),
            kernels.reshape(kernel_shape),
            None,
            self.stride,
            self.padding,
            self.dilation,
            batch * self.groups,
        )
        return out.reshape(batch, self.out_channels, out.shape[2], out.shape[3])

    def _conv_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
