"""Deformable attention sampling vs an explicit bilinear loop; position encodings; reference points."""

from __future__ import annotations

import math

import pytest
import torch

from rankseg_core.model.mask2former.deform_attn import MSDeformAttn, ms_deform_sample
from rankseg_core.model.mask2former.pixel_decoder import reference_points
from rankseg_core.model.position import sine_position_embedding


def bilinear_zero_pad(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img D x h x w read at (x, y) in [0, 1] (pixel centres at (i + 0.5) / w), zeros outside."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=torch.float64)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            wgt = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += wgt * img[:, yy, xx].double()
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_ms_deform_sample_equals_naive_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, m, dh, lq, n_points = 2, 2, 3, 4, 3
    shapes = [(3, 5), (2, 2), (4, 3)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, dh, generator=g)
    # Locations include points outside [0, 1] (zero padding) and exact pixel centres.
    loc = torch.rand(b, lq, m, len(shapes), n_points, 2, generator=g) * 1.4 - 0.2
    loc[0, 0, 0, 0, 0] = torch.tensor([0.5 / 5, 0.5 / 3])
    weights = torch.rand(b, lq, m, len(shapes), n_points, generator=g)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    got = ms_deform_sample(value, shapes, loc, weights)

    expected = torch.zeros(b, lq, m * dh, dtype=torch.float64)
    starts = [0] + list(torch.tensor([h * w for h, w in shapes]).cumsum(0)[:-1].tolist())
    for bi in range(b):
        for q in range(lq):
            for head in range(m):
                acc = torch.zeros(dh, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    img = value[bi, starts[lvl]:starts[lvl] + h * w, head].t().reshape(dh, h, w)
                    for p in range(n_points):
                        x, y = loc[bi, q, head, lvl, p].tolist()
                        acc += float(weights[bi, q, head, lvl, p]) * bilinear_zero_pad(img, x, y)
                expected[bi, q, head * dh:(head + 1) * dh] = acc
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # A pixel centre reads the pixel itself.
    single = ms_deform_sample(value[:1, :15, :1], shapes[:1], loc[:1, :1, :1, :1, :1],
                              torch.ones(1, 1, 1, 1, 1))
    torch.testing.assert_close(single[0, 0], value[0, 0, 0])


def test_msdeformattn_init_directions_and_uniform_weights() -> None:
    attn = MSDeformAttn(dim=16, n_levels=2, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.reshape(4, 2, 2, 2)
    # head h looks along angle 2*pi*h/4: (1,0), (0,1), (-1,0), (0,-1); point p at distance p+1
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for p in range(2):
        torch.testing.assert_close(bias[:, 0, p], dirs * (p + 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(bias[:, 1, p], dirs * (p + 1), atol=1e-6, rtol=0)
    assert (attn.attention_weights.weight == 0).all() and (attn.sampling_offsets.weight == 0).all()
    q = torch.randn(1, 5, 16)
    out = attn(q, torch.rand(1, 5, 2, 2), torch.randn(1, 4 * 4 + 2 * 2, 16), [(4, 4), (2, 2)])
    assert out.shape == (1, 5, 16) and torch.isfinite(out).all()


def _detr_sine_loop(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's PositionEmbeddingSine (normalize=True, no mask), one value at a time."""
    out = torch.zeros(dim, h, w)
    npf, eps, scale = dim // 2, 1e-6, 2 * math.pi
    for i in range(h):
        for j in range(w):
            yy, xx = (i + 1) / (h + eps) * scale, (j + 1) / (w + eps) * scale
            for c in range(npf):
                t = temperature ** (2 * (c // 2) / npf)
                out[c, i, j] = math.sin(yy / t) if c % 2 == 0 else math.cos(yy / t)
                out[npf + c, i, j] = math.sin(xx / t) if c % 2 == 0 else math.cos(xx / t)
    return out


@pytest.mark.parametrize("h, w, dim", [(6, 6, 32), (3, 5, 8), (16, 16, 16)])
def test_sine_embedding_equals_detr_formula(h: int, w: int, dim: int) -> None:
    torch.testing.assert_close(sine_position_embedding(h, w, dim), _detr_sine_loop(h, w, dim), atol=1e-5, rtol=0)

def test_sine_embedding_hand_values() -> None:
    emb = sine_position_embedding(3, 5, 8)
    assert emb.shape == (8, 3, 5)
    # channel 4 = x-sine with dim_t = 1: sin(x_norm), x_norm = (j+1)/5 * 2pi (up to eps)
    j = 2
    assert emb[4, 1, j].item() == pytest.approx(math.sin((j + 1) / 5 * 2 * math.pi), abs=1e-5)
    assert emb[1, 2, 0].item() == pytest.approx(math.cos(3 / 3 * 2 * math.pi), abs=1e-5)  # y-cosine, dim_t = 1


def test_reference_points_are_pixel_centres() -> None:
    ref = reference_points([(2, 4), (1, 1)], torch.device("cpu"))
    assert ref.shape == (9, 2)
    torch.testing.assert_close(ref[0], torch.tensor([0.125, 0.25]))
    torch.testing.assert_close(ref[7], torch.tensor([0.875, 0.75]))
    torch.testing.assert_close(ref[8], torch.tensor([0.5, 0.5]))
