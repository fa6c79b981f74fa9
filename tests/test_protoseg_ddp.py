"""ProtoSeg's prototype update under DDP (losses/protoseg.py `assign_and_update`, issue 20): 2 gloo
processes (torchrun, as tests/test_ddp.py), each clustering its own crop, end with the same
prototypes: the normalised mean of the two processes' single-process updates.

The single-process updates are recomputed here from the supplement's Algorithm 1 (float64) and
the momentum rule, not by calling the code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from rankseg_core.losses.protoseg import assign_and_update
from rankseg_core.model.protoseg import ProtoSegOutput

IGN = 65535
K, M, D, P = 4, 3, 8, 16  # classes, prototypes per class, embedding width, pixels per crop (a 4 x 4 grid)
GAMMA = 0.5  # a visible move per update

SCRIPT = """
import sys
import torch
import torch.distributed as dist
from rankseg_core.losses.protoseg import assign_and_update
from rankseg_core.model.protoseg import ProtoSegOutput

dist.init_process_group("gloo")
rank = dist.get_rank()
out_dir = sys.argv[1]
crop = torch.load(f"{out_dir}/inputs.pt")[rank]
protos = crop["protos"].clone()
out = ProtoSegOutput(mask_logits=crop["logits"], embeddings=crop["emb"], bank=protos[None].clone(), prototypes=protos)
assigned = assign_and_update(out, crop["targets"], 65535, 0.05, 3, float(sys.argv[2]))
torch.save({"protos": protos, "assigned": assigned}, f"{out_dir}/out{rank}.pt")
dist.destroy_process_group()
"""


def _crop(seed: int, protos: torch.Tensor, classes: list[int]) -> dict[str, torch.Tensor]:
    """One process's crop: P unit embeddings near prototypes of `classes`, their labels (two
    ignored) and a prediction that is wrong on two pixels (those never move a prototype)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor(classes)[torch.randint(len(classes), (P,), generator=g)]
    m = torch.randint(M, (P,), generator=g)
    emb = F.normalize(protos[targets, m] + 0.6 * torch.randn(P, D, generator=g), dim=-1)
    pred = targets.clone()
    pred[:2] = (targets[:2] + 1) % K
    targets[-2:] = IGN
    logits = F.one_hot(pred, K).float().t().reshape(1, K, 4, 4)
    return {"protos": protos, "emb": emb[None], "targets": targets, "logits": logits}


def _algorithm_1(cos: torch.Tensor, iters: int = 3, eps: float = 0.05) -> torch.Tensor:
    """The supplement's Algorithm 1 on N pixels x M prototypes (float64): L = exp(C/eps), rows
    (prototypes) then columns (pixels) normalised `iters` times -> N x M."""
    big_l = torch.exp(cos.t().double() / eps)
    big_l /= big_l.sum()
    m, n = big_l.shape
    for _ in range(iters):
        big_l /= big_l.sum(dim=1, keepdim=True) * m
        big_l /= big_l.sum(dim=0, keepdim=True) * n
    return (big_l * n).t()


def _single_update(crop: dict[str, torch.Tensor], gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One process alone (world size 1): each present class's pixels -> Algorithm 1 -> argmax
    prototype; a prototype with correct pixels moves to gamma * old + (1 - gamma) * the
    normalised sum of their embeddings, then every prototype is re-normalised."""
    protos, emb, targets = crop["protos"].clone(), crop["emb"][0], crop["targets"]
    pred = crop["logits"].flatten(2)[0].argmax(0)
    assigned = torch.full_like(targets, IGN)
    for k in sorted(set(targets.tolist()) - {IGN}):
        sel = (targets == k).nonzero().flatten()
        m = _algorithm_1(emb[sel] @ protos[k].t()).argmax(1)
        assigned[sel] = m
        for j in range(M):
            good = sel[(m == j) & (pred[sel] == k)]
            if len(good):
                mean = F.normalize(emb[good].sum(0), dim=0)
                protos[k, j] = gamma * protos[k, j] + (1 - gamma) * mean
    return F.normalize(protos, dim=-1), assigned


def test_two_processes_end_with_the_normalised_mean_of_their_updates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    protos = F.normalize(torch.randn(K, M, D), dim=-1)
    # Classes 1, 2 on both processes, 0 only on the first, 3 only on the second.
    crops = [_crop(1, protos, [0, 1, 2]), _crop(2, protos, [1, 2, 3])]
    torch.save(crops, tmp_path / "inputs.pt")
    script = tmp_path / "update.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), str(GAMMA)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]

    singles = [_single_update(c, GAMMA) for c in crops]
    (p0, a0), (p1, a1) = singles
    # The two crops move different prototypes (else the mean would test nothing).
    assert not torch.allclose(p0, p1, atol=1e-3) and not torch.allclose(p0, protos, atol=1e-3)
    assert torch.allclose(p0[3], protos[3]) and torch.allclose(p1[0], protos[0])  # absent: untouched alone
    expected = F.normalize((p0 + p1) / 2, dim=-1)
    assert torch.equal(outs[0]["protos"], outs[1]["protos"])  # identical replicas
    torch.testing.assert_close(outs[0]["protos"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0]["protos"].norm(dim=-1), torch.ones(K, M))
    # Each process's targets are its own crop's, the same as alone.
    assert torch.equal(outs[0]["assigned"], a0) and torch.equal(outs[1]["assigned"], a1)


def test_one_process_update_equals_the_reference() -> None:
    """The reference above against `assign_and_update` without a process group (world size 1)."""
    torch.manual_seed(0)
    protos = F.normalize(torch.randn(K, M, D), dim=-1)
    crop = _crop(1, protos, [0, 1, 2])
    ref, ref_assigned = _single_update(crop, GAMMA)
    mine = protos.clone()
    out = ProtoSegOutput(mask_logits=crop["logits"], embeddings=crop["emb"], bank=mine[None].clone(), prototypes=mine)
    assigned = assign_and_update(out, crop["targets"], IGN, 0.05, 3, GAMMA)
    assert torch.equal(assigned, ref_assigned)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
