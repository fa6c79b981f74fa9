"""Fused AdamW / foreach SGD (issue 24 item 3): the same update as the textbook rule, a clean
fallback where torch has no fused kernel, and an exact optimizer state_dict round trip
(what resuming from last.pt needs), including a checkpoint written by the unfused optimizer."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from rankseg_core.config.train import TrainConfig
from rankseg_core.engine import optim
from rankseg_core.engine.optim import build_optimizer


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)


def _cfg(name: str) -> TrainConfig:
    cfg = TrainConfig()
    cfg.optim.name = name
    cfg.optim.lr = 0.01
    cfg.optim.weight_decay = 0.1
    # Two groups (lr 10x and no decay on the head) so per-group settings are exercised.
    cfg.optim.custom_keys = {"head": {"lr_mult": 10.0, "decay_mult": 0.0}}
    return cfg


def _grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, first: int, last: int) -> None:
    for s in range(first, last):
        for g in opt.param_groups:
            g["lr"] = 0.01 * g["lr_mult"]
        _grads(model, s)
        opt.step()


def test_adamw_is_fused_and_sgd_foreach_on_cpu() -> None:
    a = build_optimizer(Tiny(), _cfg("adamw"))
    s = build_optimizer(Tiny(), _cfg("sgd"))
    assert isinstance(a, torch.optim.AdamW) and a.defaults["fused"] is True
    assert isinstance(s, torch.optim.SGD) and s.defaults["foreach"] is True


def test_fused_adamw_follows_the_adamw_rule() -> None:
    """Against AdamW written out (Loshchilov & Hutter; torch's documented algorithm):
    p <- p (1 - lr wd); m, v moments; p <- p - lr m_hat / (sqrt(v_hat) + eps)."""
    torch.manual_seed(0)
    model = Tiny()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, _cfg("adamw"))
    b1, b2, eps = opt.defaults["betas"][0], opt.defaults["betas"][1], opt.defaults["eps"]
    m = {n: torch.zeros_like(p) for n, p in ref.items()}
    v = {n: torch.zeros_like(p) for n, p in ref.items()}
    _steps(model, opt, 0, 3)
    for t in range(1, 4):
        _grads(model, t - 1)  # the same gradients, in the same parameter order
        grads = {n: p.grad for n, p in model.named_parameters()}
        for n in ref:
            lr, wd = (0.1, 0.0) if n.startswith("head") else (0.01, 0.1)
            ref[n] = ref[n] * (1 - lr * wd)
            m[n] = b1 * m[n] + (1 - b1) * grads[n]
            v[n] = b2 * v[n] + (1 - b2) * grads[n] ** 2
            m_hat, v_hat = m[n] / (1 - b1 ** t), v[n] / (1 - b2 ** t)
            ref[n] = ref[n] - lr * m_hat / (v_hat.sqrt() + eps)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-5, atol=1e-6)


def test_falls_back_to_foreach_without_a_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.optim.AdamW

    def no_fused(params: Any, **kw: Any) -> torch.optim.Optimizer:
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(optim.torch.optim, "AdamW", no_fused)
    opt = build_optimizer(Tiny(), _cfg("adamw"))
    assert isinstance(opt, real) and not opt.defaults["fused"] and opt.defaults["foreach"] is True


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # how runs.load_checkpoint reads last.pt


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_state_dict_round_trip_resumes_exactly(name: str) -> None:
    torch.manual_seed(0)
    full = Tiny()
    cut = Tiny()
    cut.load_state_dict(full.state_dict())
    opt_full = build_optimizer(full, _cfg(name))
    _steps(full, opt_full, 0, 5)

    opt_cut = build_optimizer(cut, _cfg(name))
    _steps(cut, opt_cut, 0, 2)
    saved = _roundtrip({"model": cut.state_dict(), "optimizer": opt_cut.state_dict()})
    resumed = Tiny()
    resumed.load_state_dict(saved["model"])
    opt_res = build_optimizer(resumed, _cfg(name))
    opt_res.load_state_dict(saved["optimizer"])
    _steps(resumed, opt_res, 2, 5)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_unfused_checkpoint_resumes_into_fused_adamw() -> None:
    """last.pt of a run made before fused AdamW (per-tensor loop, CPU step counters) loads,
    and the next steps agree with the unfused optimizer to rounding."""
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    groups = [{"params": list(a.parameters()), "lr_mult": 1.0, "weight_decay": 0.1}]
    old = torch.optim.AdamW(groups, lr=0.01, foreach=False)
    _steps(a, old, 0, 2)
    b.load_state_dict(a.state_dict())
    new = optim.adamw([{"params": list(b.parameters()), "lr_mult": 1.0, "weight_decay": 0.1}], lr=0.01,
                      betas=(0.9, 0.999))
    new.load_state_dict(_roundtrip(old.state_dict()))
    _steps(a, old, 2, 4)
    _steps(b, new, 2, 4)
    assert new.defaults["fused"] is True
    assert all(math.isclose(float(s["step"]), 4.0) for s in new.state.values())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
