"""The rule of csrc/bilinear.h for non-finite values, as pure-PyTorch references.

dk_detectron2/layers/reference.py multiplies every corner by its weight (a corner outside the grid
reads cell 0 with weight 0, so inf there gives NaN): it is exact for finite values only. The
functions below state the rule for any value: a tap whose image point or scope point reads nothing
is skipped, and a corner outside the grid is never read (torch.where, not a product with 0),
gradients included. cases.py checks the emulated CUDA kernels against them, and
tests/test_ops_nonfinite.py the CPU kernels.
"""
import torch

from harness import F64, Geometry, compare


def _skip_corners(y, x, height, width):
    """(inside [same shape as y], [(index, weight, valid)] * 4), weight 0 where not valid."""
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0, x0 = torch.floor(y).detach(), torch.floor(x).detach()
    ly, lx = y - y0, x - x0
    corners = []
    for dy, dx, w in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)),
                      (1, 1, ly * lx)):
        cy, cx = y0 + dy, x0 + dx
        valid = inside & (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
        index = torch.where(valid, cy * width + cx, torch.zeros_like(cy)).long()
        corners.append((index, torch.where(valid, w, torch.zeros_like(w)), valid))
    return inside, corners


def _skip_taps(input, offset, rotation, weight, geo: Geometry):
    """Yields, per tap: the image corners [(read [B, C_in, P], weight [B, P], valid [B, P])],
    reads_image [B, P], the scope corners [(index, weight, valid)] over [B, G, P], and
    reads_scope [B, G, P]. An integer tap (offset None) has one image corner of weight 1."""
    B, c_in, H, W = input.shape
    ho, wo = geo.out()
    P = ho * wo
    Sh, Sw = weight.shape[2:]
    flat = input.reshape(B, c_in, H * W)
    rot = rotation.reshape(B, geo.G, geo.K[0] * geo.K[1], 2, P)
    oy = (torch.arange(ho, dtype=F64) * geo.stride[0] - geo.pad[0]).view(-1, 1).expand(ho, wo)
    ox = (torch.arange(wo, dtype=F64) * geo.stride[1] - geo.pad[1]).view(1, -1).expand(ho, wo)
    for kh in range(geo.K[0]):
        for kw in range(geo.K[1]):
            tap = kh * geo.K[1] + kw
            iy = (oy + kh * geo.dil[0]).reshape(1, P).expand(B, P)
            ix = (ox + kw * geo.dil[1]).reshape(1, P).expand(B, P)
            if offset is None:
                reads_image = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                index = torch.where(reads_image, iy * W + ix, torch.zeros_like(iy)).long()
                corners = [(index, torch.ones_like(iy), reads_image)]
            else:
                py = iy + offset[:, 2 * tap].reshape(B, P)
                px = ix + offset[:, 2 * tap + 1].reshape(B, P)
                reads_image, corners = _skip_corners(py, px, H, W)
            image = [(flat.gather(2, index.unsqueeze(1).expand(-1, c_in, -1)), w, valid)
                     for index, w, valid in (corners if H * W else ())]
            sy = rot[:, :, tap, 0] + kh + (Sh - geo.K[0]) / 2
            sx = rot[:, :, tap, 1] + kw + (Sw - geo.K[1]) / 2
            reads_scope, scope = _skip_corners(sy, sx, Sh, Sw)
            yield image, reads_image, scope, reads_scope


def _read(got, weight, keep):
    """sum_j where(keep_j, got_j, 0) * weight_j: a masked value is never multiplied, so neither
    the sum nor autograd's chain rule meets 0 * inf."""
    total = 0
    for g, w, k in zip(got, weight, keep):
        total = total + torch.where(k, g, torch.zeros_like(g)) * w
    return total


def skip_reference_depthwise(input, offset, rotation, weight, geo: Geometry):
    """The depthwise kernels' rule (offset None: deform_kernel2d): out = sum over the taps that
    read something of value * kernel, each a sum over the corners inside the grid."""
    B, C = input.shape[:2]
    ho, wo = geo.out()
    flat_w = weight.reshape(1, C, -1).expand(B, -1, -1)
    out = input.new_zeros(B, C, ho * wo)

    def per_channel(t):  # [B, G, P] -> [B, C, P]
        return t.repeat_interleave(C // geo.G, dim=1)

    for image, reads_image, scope, reads_scope in _skip_taps(input, offset, rotation, weight,
                                                             geo):
        reads = per_channel(reads_scope) & reads_image.unsqueeze(1)
        value = _read([g for g, _, _ in image], [w.unsqueeze(1) for _, w, _ in image],
                      [v.unsqueeze(1) & reads for _, _, v in image])
        kernel = _read([flat_w.gather(2, per_channel(i)) for i, _, _ in scope],
                       [per_channel(w) for _, w, _ in scope],
                       [per_channel(v) & reads for _, _, v in scope])
        if not image:  # an empty image: nothing is read
            continue
        out = out + torch.where(reads, value * kernel, torch.zeros_like(kernel))
    return out.reshape(B, C, ho, wo)


def skip_reference_scope_space(input, offset, rotation, weight, groups, geo: Geometry):
    """The grouped / full path's rule: columns U[b, g, c, s, p] built from the taps that read
    something and the corners inside the grid, then out[o] = sum_{c, s} W[o, c, s] U[g(o), c, s]
    (a GEMM: a non-finite weight reaches every output of its channel, as in any convolution)."""
    B, c_in = input.shape[:2]
    c_out, cq, Sh, Sw = weight.shape
    ho, wo = geo.out()
    P = ho * wo
    U = input.new_zeros(B, geo.G, c_in, Sh * Sw, P)
    for image, reads_image, scope, reads_scope in _skip_taps(input, offset, rotation, weight,
                                                             geo):
        if not image:
            continue
        reads = (reads_scope & reads_image.unsqueeze(1)).unsqueeze(2)  # [B, G, 1, P]
        value = _read([g.unsqueeze(1) for g, _, _ in image],
                      [w.unsqueeze(1).unsqueeze(2) for _, w, _ in image],
                      [v.unsqueeze(1).unsqueeze(2) & reads for _, _, v in image])  # [B,G,C,P]
        for index, w, valid in scope:
            keep = valid.unsqueeze(2) & reads
            product = w.unsqueeze(2) * value
            spread = torch.where(keep, product, torch.zeros_like(product))
            at = index.unsqueeze(2).unsqueeze(3).expand(-1, -1, c_in, 1, -1)
            U = U.scatter_add(3, at, spread.unsqueeze(3))
    outs = []
    for o in range(c_out):
        g, q = o // (c_out // geo.G), o // (c_out // groups)
        outs.append(torch.einsum("cs,bcsp->bp", weight[o].reshape(cq, -1),
                                 U[:, g, q * cq:(q + 1) * cq]))
    return torch.stack(outs, 1).reshape(B, c_out, ho, wo)


def skip_reference_nd(input, coord):
    M, H, W = input.shape
    flat = input.reshape(M, H * W)
    out = input.new_zeros(coord.shape[0], M)
    for index, w, valid in _skip_corners(coord[:, 0], coord[:, 1], H, W)[1]:
        got = flat[:, index].t()
        out = out + torch.where(valid.unsqueeze(1), got, torch.zeros_like(got)) * w.unsqueeze(1)
    return out


def compare_nonfinite(name, got, want, dtype, errors):
    """Non-finite at the same places, finite values within tolerance. (Whether a place holds NaN
    or inf depends on where the product with inf is taken: inf * (a - b) in a kernel, inf * a -
    inf * b in autograd; the rule is about which places a non-finite value reaches.)"""
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        errors.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        return
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    if not torch.equal(bad_got, bad_want):
        extra = (bad_got & ~bad_want).nonzero()[:3].tolist()
        missing = (bad_want & ~bad_got).nonzero()[:3].tolist()
        errors.append(f"{name}: non-finite at {int(bad_got.sum())} places, expected "
                      f"{int(bad_want.sum())} (unexpected at {extra}, missing at {missing})")
        return
    if (~bad_want).any():
        compare(name, got[~bad_want], want[~bad_want], dtype, errors)


