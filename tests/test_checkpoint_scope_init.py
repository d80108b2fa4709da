"""Kernels into DK scopes (dk_detectron2.checkpoint.kernel_to_scope): the sampling matrix, exact
reproduction of the convolution through the reference and the operator, placement and minimum norm."""
import pytest
import torch
import torch.nn.functional as F

from dk_detectron2.checkpoint import (
    kernel_to_scope,
    reproduction_error,
    sample_scope,
    scope_sampling_matrix,
)
from dk_detectron2.layers import deform_kernel2d
from dk_detectron2.layers.reference import deform_kernel2d_reference


@pytest.mark.parametrize("kernel_size,scope_size", [(3, 3), (3, 4), (3, 5), (3, 6), (1, 2), (5, 8)])
def test_sampling_matrix_is_a_full_rank_bilinear_read(kernel_size, scope_size):
    matrix = scope_sampling_matrix(kernel_size, scope_size)
    assert matrix.shape == (kernel_size, scope_size)
    torch.testing.assert_close(matrix.sum(1), torch.ones(kernel_size, dtype=torch.float64))
    assert torch.linalg.matrix_rank(matrix) == kernel_size
    # Each tap reads at k + (S - K) / 2: the centre of mass of its row.
    positions = matrix @ torch.arange(scope_size, dtype=torch.float64)
    expected = torch.arange(kernel_size, dtype=torch.float64) + (scope_size - kernel_size) / 2
    torch.testing.assert_close(positions, expected)


@pytest.mark.parametrize("difference", [0, 1, 2, 3])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_converted_scope_reproduces_conv2d_through_reference(difference, stride, padding):
    """The DK reference with zero rotation and the converted scope equals F.conv2d (float64)."""
    generator = torch.Generator().manual_seed(difference)
    kernel = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=generator)
    inputs = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=generator)
    scope = kernel_to_scope(kernel, 3 + difference)
    assert scope.shape == (6, 4, 3 + difference, 3 + difference)
    assert scope.dtype == torch.float64
    expected = F.conv2d(inputs, kernel, stride=stride, padding=padding)
    rotation = inputs.new_zeros(2, 3 * 3 * 2, *expected.shape[-2:])
    out = deform_kernel2d_reference(inputs, rotation, scope, 3, stride, padding)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert reproduction_error(kernel, scope) < 1e-13


@pytest.mark.parametrize("scope_size", [4, 5])
def test_converted_scope_reproduces_conv2d_through_the_operator(scope_size):
    """Same through the compiled full (groups 1) ``deform_kernel2d``."""
    generator = torch.Generator().manual_seed(scope_size)
    kernel = torch.randn(8, 6, 3, 3, dtype=torch.float64, generator=generator)
    inputs = torch.randn(2, 6, 7, 7, dtype=torch.float64, generator=generator)
    expected = F.conv2d(inputs, kernel, padding=1)
    rotation = inputs.new_zeros(2, 3 * 3 * 2, 7, 7)
    out = deform_kernel2d(inputs, rotation, kernel_to_scope(kernel, scope_size), 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_converted_scope_reproduces_grouped_rectangular_kernels():
    """Kh != Kw, Sh - Kh even and Sw - Kw odd, grouped weight."""
    generator = torch.Generator().manual_seed(7)
    kernel = torch.randn(4, 2, 3, 1, dtype=torch.float64, generator=generator)
    inputs = torch.randn(1, 4, 6, 5, dtype=torch.float64, generator=generator)
    scope = kernel_to_scope(kernel, (5, 2))
    expected = F.conv2d(inputs, kernel, padding=(1, 0), groups=2)
    rotation = inputs.new_zeros(1, 3 * 1 * 2, *expected.shape[-2:])
    out = deform_kernel2d_reference(inputs, rotation, scope, (3, 1), 1, (1, 0))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("difference", [0, 2])
def test_even_difference_places_kernel_at_scope_centre(difference):
    kernel = torch.randn(5, 3, 3, 3)
    scope = kernel_to_scope(kernel, 3 + difference)
    margin = difference // 2
    assert torch.equal(scope[..., margin : margin + 3, margin : margin + 3], kernel)
    scope[..., margin : margin + 3, margin : margin + 3] = 0
    assert torch.count_nonzero(scope) == 0


@pytest.mark.parametrize("kernel_size,scope_size", [(3, 4), (3, 6), (5, 6), (2, 5)])
def test_odd_difference_gives_the_minimum_norm_scope(kernel_size, scope_size):
    """Any other scope with the same samples differs by a null-space element and is larger."""
    generator = torch.Generator().manual_seed(scope_size)
    kernel = torch.randn(3, 2, kernel_size, kernel_size, dtype=torch.float64, generator=generator)
    scope = kernel_to_scope(kernel, scope_size)
    sampling = scope_sampling_matrix(kernel_size, scope_size)
    null_space = torch.linalg.svd(sampling).Vh[kernel_size:]  # [S-K, S], sampling @ n = 0
    assert null_space.shape[0] == scope_size - kernel_size
    for _ in range(5):
        # B_h N B_w^T = 0 whenever N's columns (or rows) lie in the null space.
        left = torch.randn(3, 2, scope_size - kernel_size, scope_size, dtype=torch.float64,
                           generator=generator)
        other = scope + null_space.t() @ left
        torch.testing.assert_close(sample_scope(other, kernel_size), kernel)
        assert other.norm() > scope.norm()
        # Minimum norm <=> orthogonal to the null space.
        assert abs(float((scope * (other - scope)).sum())) < 1e-9 * float(other.norm())


def test_kernel_to_scope_float32_error_is_at_rounding_level():
    kernel = torch.randn(64, 32, 3, 3)
    scope = kernel_to_scope(kernel, 4)
    assert scope.dtype == torch.float32
    assert reproduction_error(kernel, scope) < 1e-5 * float(kernel.abs().max())


def test_kernel_to_scope_validates_its_arguments():
    with pytest.raises(ValueError, match=r"scope_size 2x2 must be at least the kernel size 3x3"):
        kernel_to_scope(torch.randn(2, 2, 3, 3), 2)
    with pytest.raises(TypeError, match="floating point"):
        kernel_to_scope(torch.ones(2, 2, 3, 3, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="scope_size"):
        kernel_to_scope(torch.randn(2, 2, 3, 3), (4, 4, 4))
