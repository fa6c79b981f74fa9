"""The cost of ProtoSeg's prototypes on Segmenter (issue 20): time and memory, CPU, one thread.

    python bench/bench_protoseg.py [--quick] [--repeats 3] [--label-size 128] [--no-write]

In one run, side by side:
(1) online clustering alone: `sinkhorn` on 10,000 pixels x 10 prototypes (ProtoSeg's supplement:
    ~2.5 ms), and `assign_and_update` for one realistic step (B = 2 crops of 512 -> 32 x 32 =
    1,024 patches, 15 classes per crop, M = 10) at D = 192 / 768 and K = 150 / 847 in its two
    forms: `assign_per_class` (the released code's loop over the classes; the CPU's) and
    `assign_all_classes` (every class in one pass; an accelerator's), checked to give the same
    assignment and prototypes;
(2) one training step of the decoder head alone (`model.head(feats)` + the family's criterion
    + backward; feats B x 192 x 32 x 32, labels at --label-size) for the heads segmenter,
    rankseg, protoseg and rankproto at K = 150 (kappa 50) and K = 847 (kappa 100), ms/step and
    the ratio to segmenter; the upsampled cross-entropy alone at the 512 label size (the part of
    a real step that every head with the same channel count pays alike, and that makes a
    512-label head step too long to time reliably on a shared CPU); then the whole ViT-T model at
    512 (K = 150) to put the head in proportion;
(3) memory at K = 847, M = 10 for p = 1,024 and 4,096 patches (crops 512 and 1024): the peak
    resident memory of (a) the naive scoring + PPC that keeps all B x p x K*M cosines (written
    here: one einsum, amax over M, cross-entropy over K*M, autograd), (b) the library's chunked
    and checkpointed `max_cosine` + `ppc_loss`, (c) the same chunks without checkpointing, and
    of whole head steps (segmenter and protoseg, labels on the patch grid). Each case runs in a
    fresh process (glibc's mmap threshold fixed at 64 KiB, so freed blocks leave RSS); the peak is
    VmHWM - VmRSS after resetting VmHWM (/proc/self/clear_refs) once the inputs are built, i.e.
    what the step adds on top of its inputs. Then the CPU time of
    scoring + PPC for CHUNK_COSINES = 2^22 / 2^24 / 2^26, with and without the checkpoint
    recomputation, against the single-thread GEMM rate (the physical floor).
Times are CPU time (`time.process_time`), best of --repeats rounds run in turns: the machine is
shared. About 5 minutes of CPU (--quick: 1.5). Writes the `bench_protoseg` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

import rankseg_core.losses.protoseg as loss_mod  # noqa: E402
import rankseg_core.model.protoseg as head_mod  # noqa: E402
from rankseg_core.config.model import ModelConfig  # noqa: E402
from rankseg_core.config.train import TrainConfig  # noqa: E402
from rankseg_core.families.segmenter import SEGMENTER  # noqa: E402
from rankseg_core.losses.protoseg import assign_all_classes, assign_per_class, ppc_loss, sinkhorn  # noqa: E402
from rankseg_core.model.heads import MaskTransformerHead  # noqa: E402
from rankseg_core.model.protoseg import ProtoSegOutput, max_cosine  # noqa: E402
from rankseg_core.model.segmenter import RankSegModel  # noqa: E402
from rankseg_core.shards.codec import IGNORE  # noqa: E402

B = 2  # crops per process
M = 10  # prototypes per class (ProtoSeg)
GRID = 32  # 512 crop / patch 16
CLASSES_PER_CROP = 15  # about ADE20K's classes per 512 crop
KAPPA = {150: 50, 847: 100}  # the ade20k / ade20k-full recipes (families/vit.py)
HEADS = ("segmenter", "rankseg", "protoseg", "rankproto")
CHUNKS = (22, 24, 26)  # log2 CHUNK_COSINES compared; the library's is 24


# --------------------------------------------------------------------------- inputs and timing

def blob_labels(k: int, size: int, seed: int) -> tuple[Tensor, list[Tensor]]:
    """B x size x size labels: per crop a Voronoi partition into CLASSES_PER_CROP cells of
    distinct classes drawn from [0, k) (region-like maps, unlike per-pixel noise, which would
    put all K classes in every crop and make the per-class clustering K times too costly).
    Also each crop's class list."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out, classes = [], []
    for _ in range(B):
        seeds = torch.rand(CLASSES_PER_CROP, 2, generator=g) * size
        cls = torch.randperm(k, generator=g)[:CLASSES_PER_CROP]
        d = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
        out.append(cls[d.argmin(0)])
        classes.append(cls)
    return torch.stack(out), classes


def cpu_seconds() -> float:
    """This process's CPU time (user + system). On a shared machine at a load above its core
    count, wall time mostly measures how long the scheduler kept us waiting; with one compute
    thread, CPU time is the work done (still slowed by other jobs' use of caches and memory)."""
    return time.process_time()


def round_robin(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` CPU seconds per function, run in turns so that load from other jobs on
    the shared cores hits every variant alike (the minimum is the least disturbed run; the first
    round also warms each variant up)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = cpu_seconds()
            fn()
            best[name] = min(best[name], cpu_seconds() - t)
    return best


def gemm_rate() -> float:
    """Single-thread float32 GFLOP/s of the cosine GEMM's shape (2,048 x 192 @ 192 x 8,470)."""
    a, b = torch.randn(B * GRID * GRID, 192), torch.randn(847 * M, 192)
    t = round_robin({"mm": lambda: a @ b.t()}, 7)["mm"]
    return 2 * a.shape[0] * a.shape[1] * b.shape[0] / t / 1e9


@contextmanager
def chunk_cosines(log2: int, checkpointed: bool = True) -> Iterator[None]:
    """Run the library with CHUNK_COSINES = 2**log2 and, if not `checkpointed`, its
    `checkpoint` calls replaced by a plain call (same chunks, activations kept)."""
    saved = head_mod.CHUNK_COSINES, head_mod.checkpoint, loss_mod.checkpoint
    head_mod.CHUNK_COSINES = 1 << log2
    if not checkpointed:
        def plain(fn: Callable[..., Tensor], *args: Any, **_: Any) -> Tensor:
            return fn(*args)
        head_mod.checkpoint = loss_mod.checkpoint = plain  # type: ignore[assignment]
    try:
        yield
    finally:
        head_mod.CHUNK_COSINES, head_mod.checkpoint, loss_mod.checkpoint = saved


# --------------------------------------------------------------------------- (1) online clustering

@torch.no_grad()
def clustering_case(k: int, d: int, seed: int = 0) -> tuple[ProtoSegOutput, Tensor]:
    """A ProtoSegOutput of one step (B x 1,024 unit embeddings, K x M x D prototypes, logits
    that predict the label on ~60 % of the patches) and the B*p patch labels."""
    g = torch.Generator().manual_seed(seed)
    labels, _ = blob_labels(k, GRID, seed)
    flat = labels.flatten()
    emb = F.normalize(torch.randn(B, GRID * GRID, d, generator=g), dim=-1)
    protos = F.normalize(torch.randn(k, M, d, generator=g), dim=-1)
    logits = torch.randn(B, GRID * GRID, k, generator=g)
    hit = torch.rand(B, GRID * GRID, generator=g) < 0.6
    logits.view(-1, k)[hit.flatten(), flat[hit.flatten()]] += 10.0
    mask_logits = logits.transpose(1, 2).reshape(B, k, GRID, GRID)
    return ProtoSegOutput(mask_logits=mask_logits, embeddings=emb, prototypes=protos), flat


def clustering(repeats: int) -> dict[str, Any]:
    n = 10_000
    g = torch.Generator().manual_seed(0)
    cos = F.normalize(torch.randn(n, 64, generator=g), dim=-1) @ F.normalize(torch.randn(M, 64, generator=g), dim=-1).t()
    res: dict[str, Any] = {"sinkhorn_ms": 1000 * round_robin({"s": lambda: sinkhorn(cos)}, 5 * repeats)["s"], "rows": []}
    for d in (192, 768):
        for k in (150, 847):
            out, flat = clustering_case(k, d)
            assert out.prototypes is not None and out.embeddings is not None
            twin = dataclasses.replace(out, prototypes=out.prototypes.clone())
            # Equivalence first, from the same starting prototypes (both update them in place).
            same = bool((assign_per_class(twin, flat, IGNORE, 0.05, 3, 0.999)
                         == assign_all_classes(out, flat, IGNORE, 0.05, 3, 0.999)).all())
            same = same and torch.allclose(twin.prototypes, out.prototypes, atol=1e-6)
            classes = int(torch.unique(flat).numel())
            t = round_robin({
                "loop": lambda: assign_per_class(twin, flat, IGNORE, 0.05, 3, 0.999),  # noqa: B023
                "batched": lambda: assign_all_classes(out, flat, IGNORE, 0.05, 3, 0.999)},  # noqa: B023
                5 * repeats)
            res["rows"].append({"d": d, "k": k, "classes": classes, "loop_ms": 1000 * t["loop"],
                                "batched_ms": 1000 * t["batched"], "same": same})
            print("clustering", res["rows"][-1], flush=True)
    return res


# --------------------------------------------------------------------------- (2) training step

def criterion_for(m: ModelConfig) -> Callable[[Any, dict[str, Tensor]], dict[str, Tensor]]:
    """The family's own loss for this model (families/segmenter.py `_criterion`, resolved defaults)."""
    cfg = TrainConfig(model=m)
    SEGMENTER.resolve(cfg)
    return SEGMENTER.criterion(cfg)


def trained_selection(head: MaskTransformerHead, classes: list[Tensor]) -> None:
    """Make an untrained ml branch rank the crops' GT classes first (a bias on their logits), as
    a trained one would: otherwise the top-kappa of K = 847 holds ~2 of 15 GT classes and the
    selecting heads' losses skip most pixels, which is not a training step's cost."""
    with torch.no_grad():
        head.ml_fc.b[0, torch.cat(classes)] += 100.0


def head_steps(k: int, label_size: int, repeats: int) -> dict[str, float]:
    """ms per decoder-head step (forward + criterion + backward) for each head at K = k."""
    labels, classes = blob_labels(k, label_size, 1)
    batch = {"label": labels}
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(B, 192, GRID, GRID, generator=g, requires_grad=True)
    steps = {}
    for head in HEADS:
        torch.manual_seed(0)
        m = ModelConfig(model="segmenter-vitt", num_classes=k, kappa=KAPPA[k], head=head)
        model = cast(RankSegModel, SEGMENTER.build(m).train())
        if head in ("rankseg", "rankproto"):
            trained_selection(model.head, classes)
        crit = criterion_for(m)

        def step(model: RankSegModel = model, crit: Callable = crit) -> None:
            crit(model.head(feats), batch)["loss"].backward()
            model.zero_grad(set_to_none=True)
            feats.grad = None
        steps[head] = step
    t = round_robin(steps, repeats)
    print("head step K", k, {h: f"{1000 * s:.0f} ms" for h, s in t.items()}, flush=True)
    return {h: 1000 * s for h, s in t.items()}


def seg_ce_ms(channels: int, size: int) -> float:
    """ms of what `seg_loss` adds at label size `size`: B x channels x 32 x 32 logits (laid out as
    the heads return them) upsampled bilinearly, cross-entropy, backward. One run (it is long)."""
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(B, GRID * GRID, channels, generator=g, requires_grad=True)
    target = torch.randint(0, channels, (B, size, size), generator=g)
    t = cpu_seconds()
    logits = scores.transpose(1, 2).reshape(B, channels, GRID, GRID)
    up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    F.cross_entropy(up, target, reduction="sum").backward()
    return 1000 * (cpu_seconds() - t)


def model_steps(k: int, repeats: int) -> dict[str, float]:
    """ms per whole-model step (ViT-T backbone at 512 + head + criterion + backward)."""
    labels, classes = blob_labels(k, 512, 3)
    images = torch.randn(B, 3, 512, 512, generator=torch.Generator().manual_seed(4))
    steps = {}
    for head in HEADS:
        torch.manual_seed(0)
        m = ModelConfig(model="segmenter-vitt", num_classes=k, kappa=KAPPA[k], head=head, img_size=512)
        model = cast(RankSegModel, SEGMENTER.build(m).train())
        if head in ("rankseg", "rankproto"):
            trained_selection(model.head, classes)
        crit = criterion_for(m)

        def step(model: RankSegModel = model, crit: Callable = crit) -> None:
            crit(model(images), {"label": labels})["loss"].backward()
            model.zero_grad(set_to_none=True)
        steps[head] = step
    t = round_robin(steps, repeats)
    print("model step K", k, {h: f"{1000 * s:.0f} ms" for h, s in t.items()}, flush=True)
    return {h: 1000 * s for h, s in t.items()}


# --------------------------------------------------------------------------- (3) memory and chunks

def scoring_inputs(p: int, k: int = 847, d: int = 192, seed: int = 5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """emb B x p x D (unit, a leaf with grad), bank 1 x K x M x D, PPC target B x p in [0, K*M)
    (a pixel's class*M + prototype), and g B x p x K: the upstream gradient of the class scores
    (stands in for the segmentation loss)."""
    gen = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(B, p, d, generator=gen), dim=-1).requires_grad_(True)
    bank = F.normalize(torch.randn(1, k, M, d, generator=gen), dim=-1)
    target = torch.randint(0, k * M, (B, p), generator=gen)
    return emb, bank, target, torch.randn(B, p, k, generator=gen)


def naive_scoring(emb: Tensor, bank: Tensor, target: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The reference that keeps every cosine: B x p x K x M at once, amax over M for the class
    scores, cross-entropy over all K*M for PPC, plain autograd. -> (scores B x p x K, PPC)."""
    cos = torch.einsum("bpd,kmd->bpkm", emb, bank[0])
    scores = cos.amax(-1)
    ppc = F.cross_entropy(cos.flatten(2).flatten(0, 1), target.flatten())
    (scores * g).sum().add(ppc).backward()
    return scores.detach(), ppc.detach()


def chunked_scoring(emb: Tensor, bank: Tensor, target: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The library's `max_cosine` + `ppc_loss` (chunked, checkpointed), same loss as `naive_scoring`."""
    scores = max_cosine(emb, bank)
    ppc = ppc_loss(emb, bank, target)
    (scores * g).sum().add(ppc).backward()
    return scores.detach(), ppc.detach()


def check_scoring() -> float:
    """Largest relative difference of scores, PPC and d emb between naive and chunked (p = 2,500:
    three chunks at the library's CHUNK_COSINES); raises if they disagree."""
    emb, bank, target, g = scoring_inputs(2500)
    s1, p1 = naive_scoring(emb, bank, target, g)
    g1, emb.grad = emb.grad, None
    s2, p2 = chunked_scoring(emb, bank, target, g)
    assert emb.grad is not None and g1 is not None
    torch.testing.assert_close(s2, s1)
    torch.testing.assert_close(p2, p1)
    torch.testing.assert_close(emb.grad, g1, rtol=1e-4, atol=1e-6)
    return max(float(((a - b).abs().max() / b.abs().max())) for a, b in ((s2, s1), (p2, p1), (emb.grad, g1)))


def counted_gflop(p: int) -> dict[str, float]:
    """GFLOP of scoring + PPC forward + backward as torch's FlopCounterMode counts them (matmuls
    only), for naive, chunked and chunked without checkpoint: how many cosine GEMMs each runs."""
    from torch.utils.flop_counter import FlopCounterMode

    emb, bank, target, g = scoring_inputs(p)
    res = {}
    for name, ckpt, fn in (("naive", True, naive_scoring), ("chunked", True, chunked_scoring),
                           ("nockpt", False, chunked_scoring)):
        with chunk_cosines(24, ckpt), FlopCounterMode(display=False) as fc:
            fn(emb, bank, target, g)
        emb.grad = None
        res[name] = fc.get_total_flops() / 1e9
    return res


def _status_mb(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024  # type: ignore[union-attr]


def _case(case: str, p: int) -> Callable[[], None]:
    """The step of one memory case on p patches (inputs built here, before the measurement)."""
    side = int(round(p ** 0.5))
    if case in ("segmenter", "protoseg"):
        torch.manual_seed(0)
        m = ModelConfig(model="segmenter-vitt", num_classes=847, head=case)
        model = cast(RankSegModel, SEGMENTER.build(m).train())
        crit = criterion_for(m)
        feats = torch.randn(B, 192, side, side, requires_grad=True)
        batch = {"label": blob_labels(847, side, 6)[0]}  # on the patch grid: no upsampled K-channel CE

        def head_step() -> None:
            crit(model.head(feats), batch)["loss"].backward()
        return head_step
    emb, bank, target, g = scoring_inputs(p)

    def scoring() -> None:
        (naive_scoring if case == "naive" else chunked_scoring)(emb, bank, target, g)
    return scoring


def child(case: str, p: int, log2: int) -> None:
    """One memory case in this fresh process: warm the code paths up on 16 patches (the first
    call pages in kernels and allocator pools, which would count as the step's memory), build
    the real inputs, reset the peak, run once, print JSON."""
    torch.set_num_threads(1)
    with chunk_cosines(log2, checkpointed=case != "nockpt"):
        _case(case, 16)()
        run = _case(case, p)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
        base = _status_mb("VmRSS")
        t = cpu_seconds()
        run()
        wall = cpu_seconds() - t
        print(json.dumps({"peak_mb": _status_mb("VmHWM") - base, "base_mb": base, "s": wall}))


def run_child(case: str, p: int, log2: int = 24) -> dict[str, float] | None:
    cmd = [sys.executable, __file__, "--child", case, "--pixels", str(p), "--chunk", str(log2)]
    # A fixed mmap threshold: every block of 64 KiB or more is mmapped and unmapped when freed. glibc's
    # default raises the threshold up to 32 MiB after the first free, and freed heap blocks below
    # it stay resident, so RSS would count dead chunks (small CHUNK_COSINES looked costlier than
    # large ones for that reason alone).
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"{case} p={p} failed ({res.returncode}): {res.stderr[-1500:]}", file=sys.stderr)
        return None
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print("memory", case, p, log2, out, flush=True)
    return out


def chunk_times(p: int, repeats: int) -> dict[str, float]:
    """ms of scoring + PPC forward + backward (K = 847, B = 2, D = 192) per chunk size, with and
    without checkpointing, and the naive reference."""
    emb, bank, target, g = scoring_inputs(p)

    def variant(log2: int, ckpt: bool) -> Callable[[], None]:
        def fn() -> None:
            with chunk_cosines(log2, ckpt):
                chunked_scoring(emb, bank, target, g)
            emb.grad = None
        return fn
    fns: dict[str, Callable[[], object]] = {f"{log2}{'' if ckpt else '-'}": variant(log2, ckpt)
                                            for log2 in CHUNKS for ckpt in (True, False)}
    fns["naive"] = lambda: naive_scoring(emb, bank, target, g)
    t = round_robin(fns, repeats)
    print("chunks p", p, {h: f"{1000 * s:.0f} ms" for h, s in t.items()}, flush=True)
    return {h: 1000 * s for h, s in t.items()}


# --------------------------------------------------------------------------- report

def cosine_gflop(p: int, classes: int, d: int = 192) -> float:
    """One B x p x D @ D x classes*M product."""
    return 2 * B * p * classes * M * d / 1e9


def render(r: dict[str, Any], args: argparse.Namespace) -> str:
    rate, cl, mem, ct, fl = r["gemm"], r["clustering"], r["memory"], r["chunks"], r["flops"]
    crows = "\n".join(
        f"| {x['d']} | {x['k']} | {x['classes']} | {x['loop_ms']:.1f} | {x['batched_ms']:.1f} | "
        f"{x['loop_ms'] / x['batched_ms']:.1f} | {'yes' if x['same'] else 'NO'} |" for x in cl["rows"])
    hrows = []
    for k, t in r["heads"].items():
        for h in HEADS:
            kappa = f" (kappa {KAPPA[k]})" if h in ("rankseg", "rankproto") else ""
            hrows.append(f"| {k} | {h}{kappa} | {t[h]:.0f} | {t[h] / t['segmenter']:.2f} | "
                         f"{t[h] - t['segmenter']:+.0f} |")
    head_table = "\n".join(hrows)
    h150, h847 = r["heads"][150], r["heads"][847]
    loop = {(x["d"], x["k"]): x for x in cl["rows"]}
    whole = ""
    if r.get("model"):
        t = r["model"]
        rows = "\n".join(f"| {h} | {t[h]:.0f} | {t[h] / t['segmenter']:.2f} |" for h in HEADS)
        whole = f"""
Whole ViT-T model at 512 x 512 (backbone forward and backward too; B = 2, K = 150, labels
512 x 512, the same criteria):

| head | ms / step | ratio to segmenter |
| --- | --- | --- |
{rows}

The head steps above put the prototypes' cost at K = 150 at {h150['protoseg'] - h150['segmenter']:+.0f} ms,
{(h150['protoseg'] - h150['segmenter']) / t['segmenter']:+.0%} of this whole segmenter step: far below the
+-20 % this machine's noise allows on a {t['segmenter'] / 1000:.0f} s step, so the whole-model difference of
protoseg and segmenter ({t['protoseg'] - t['segmenter']:+.0f} ms in this run) is noise, not the prototypes.
The ranking heads' gain is real: their CE at 512 x 512 has kappa instead of K channels. At K = 847
the prototypes add {h847['protoseg'] - h847['segmenter']:+.0f} ms per head step, while the 512-label CE of a
K-channel head alone takes {(r.get('ce512') or {}).get(847, float('nan')) / 1000:.0f} s.
"""
    gf = cosine_gflop(GRID * GRID, 847)  # at the step's p = 1,024

    def cell(p: int, case: str, log2: int = 24) -> str:
        x = mem.get(f"{case}/{p}/{log2}")
        return "n/a" if x is None else f"{x['peak_mb']:.0f}"
    mrows = "\n".join(
        f"| {p} ({int(p ** 0.5) * 16} crop) | {4 * B * p * 847 * M / 2**20:.0f} | {cell(p, 'naive')} | "
        f"{cell(p, 'chunked')} | {cell(p, 'nockpt')} | {cell(p, 'segmenter')} | {cell(p, 'protoseg')} |"
        for p in r["pixels"])
    big, p_ct = max(r["pixels"]), r["chunk_pixels"]
    chunk_mem = "; ".join(f"2^{c} ({4 * (1 << c) / 2**20:.0f} MiB of cosines): {cell(big, 'chunked', c)} MiB"
                          for c in CHUNKS)
    gf_ct = cosine_gflop(p_ct, 847)
    crow = "\n".join(
        f"| 2^{c} ({(1 << c) // (B * 847 * M)} px) | {-(-p_ct // ((1 << c) // (B * 847 * M)))} | {ct[str(c)]:.0f} | "
        f"{ct[f'{c}-']:.0f} | {ct[str(c)] / ct[f'{c}-']:.2f} |" for c in CHUNKS)
    c847 = loop[(192, 847)]
    naive_big = mem.get(f"naive/{big}/24")
    mem_ratio = naive_big["peak_mb"] / (4 * B * big * 847 * M / 2**20) if naive_big else float("nan")
    fastest = min(CHUNKS, key=lambda c: ct[str(c)])
    smallest = min(CHUNKS, key=lambda c: (mem.get(f"chunked/{big}/{c}") or {"peak_mb": float("inf")})["peak_mb"])
    ckpt_cost = ct["24"] - ct["24-"]
    ckpt_1024 = ckpt_cost * GRID * GRID / p_ct  # GEMM work is linear in p
    ce = r.get("ce512")
    ce_line = "" if not ce else (
        f"""At 512 x 512 labels (the real crop) every step also pays the upsampled cross-entropy, the same op
for heads with the same channel count: measured alone (one run, forward + backward),
**{ce[847]:.0f} ms for K = 847 channels** (segmenter, protoseg) and {ce[KAPPA[847]]:.0f} ms for kappa = {KAPPA[847]}
(rankseg, rankproto): a 512-label step costs about that much more than the rows above (which
include the CE at their own label size); the differences between heads of one channel count stay.
""")
    return f"""
## Prototype heads: the cost of ProtoSeg's prototypes (`bench/bench_protoseg.py`)

{machine()}; one thread (`torch.set_num_threads(1)`); load average {r['load'][0]:.1f} at the start,
{r['load'][1]:.1f} at the end. Other jobs share the 2 cores, so every time below is this process's
**CPU time** (user + system, `time.process_time`), not wall time, which at such a load mostly measures
the scheduler; the variants of each comparison run in turns in the same run, best of
{args.repeats} or more rounds. Other jobs still compete for caches and memory bandwidth: expect
+-20 % on single figures.
B = 2 crops, M = 10 prototypes per class, ViT-T width D = 192 unless stated; labels with
{CLASSES_PER_CROP} classes per crop (Voronoi regions).
Single-thread float32 GEMM rate of the cosine shape (2,048 x 192 @ 192 x 8,470), best at the start
and end: **{rate:.0f} GFLOP/s**. The bench took {r['seconds']:.0f} s wall, {r['cpu']:.0f} s CPU.

### 1. Online clustering alone

`sinkhorn` on 10,000 pixels x 10 prototypes (3 iterations): **{cl['sinkhorn_ms']:.2f} ms** (ProtoSeg's
supplement, limitation analysis: "about 2.5 ms to cluster 10K pixels into 10 prototypes", device not
stated). The clustering and prototype update of one step (2 crops of 512 -> 2 x 1,024 patches;
every present class clustered, prototypes updated in place) in the library's two forms, checked
here to give the same assignment and prototypes: `assign_per_class`, the released code's loop
over the present classes (what `assign_and_update` runs on the CPU), and `assign_all_classes`,
every class in one pass (each Sinkhorn sum a sum per class over the pixels' classes; what it runs
on an accelerator: nothing read on the host):

| D | K | classes in the batch | loop over classes (ms) | all classes at once (ms) | loop / at once | same result |
| --- | --- | --- | --- | --- | --- | --- |
{crows}

The loop costs about {c847['loop_ms'] / max(1, c847['classes']):.2f} ms per class (D = 192: about
35 small tensor ops). On a GPU each of those classes is a few waits for the device, which the
one-pass form does not have: it is a fixed few dozen ops. On this CPU the one-pass form costs
more where D or K is large. It scores every pixel against its own class's M prototypes
(a gather of N x M x D values) and updates all K x M prototypes (several passes over the K x M x D
buffer), where the loop touches only the classes present. Hence the CPU keeps the loop. Either
way the clustering is {c847['loop_ms'] / h847['protoseg']:.1%} of the protoseg head step at
K = 847 below.

### 2. One training step of the head (decoder + criterion + backward)

`model.head(feats)` on feats B x 192 x 32 x 32 (given directly, with grad; 2 decoder blocks),
labels {args.label_size} x {args.label_size},
the family's criterion (`SEGMENTER.criterion`: CE on the logits upsampled to the labels, ASL for
the ranking heads, and for the prototype heads clustering, momentum update, PPC and PPD), then
backward. The ranking heads' ml branch is biased to rank the crops' GT classes first, as a
trained branch would (an untrained one selects ~2 of 15 at K = 847 and the loss skips most pixels).

| K | head | ms / step | ratio to segmenter | difference (ms) |
| --- | --- | --- | --- | --- |
{head_table}

{ce_line}{whole}
Where protoseg's time goes: the pixel-prototype cosines are a B*p x D @ D x K*M GEMM, at K = 847
and p = 1,024 {gf:.1f} GFLOP ({gf / rate * 1000:.0f} ms at the GEMM rate). FlopCounterMode counts
{fl['chunked']:.1f} GFLOP for the library's scoring + PPC forward + backward (p = 1,024), i.e.
**{fl['chunked'] / gf:.1f} such GEMMs**: `max_cosine` runs forward, checkpoint recomputation and the
gradient w.r.t. the embeddings, and `ppc_loss` the same three again on the same cosines (the
bank is a buffer: no gradient GEMM for it). Without checkpointing {fl['nockpt'] / gf:.1f}; the naive
form, which computes the cosines once for both, {fl['naive'] / gf:.1f}. So the floor of protoseg's
extra work at K = 847 is {fl['chunked'] / rate * 1000:.0f} ms per step at this GEMM rate; sharing one
(chunked) cosine pass between the class scores and PPC would make it {4 * gf / rate * 1000:.0f} ms
(forward, recomputation, one gradient GEMM). rankproto scores kappa*M = {KAPPA[847] * M} prototypes
per pixel instead of {847 * M}: its head step is {h847['rankproto'] / h847['rankseg']:.2f}x rankseg's at K = 847
({h150['rankproto'] / h150['rankseg']:.2f}x at K = 150).

### 3. Memory at K = 847, M = 10

Peak resident memory added by one forward + loss + backward, MiB. Each case runs in a fresh
process: the code paths warmed up on 16 patches, the real inputs built, VmHWM reset
(`/proc/self/clear_refs` 5), the step run once; the figure is VmHWM - VmRSS at the reset. The
processes run with `MALLOC_MMAP_THRESHOLD_=65536`, so glibc maps every block of 64 KiB or more
and gives it back when freed: RSS then follows the tensors' lifetimes (with glibc's default,
freed blocks under 32 MiB stay resident and small chunks look costlier than they are). "Scoring + PPC":
the class scores (max over M, with an upstream gradient standing in for the seg loss) and PPC over
all K*M prototypes from emb B x p x 192; "naive" keeps every cosine (one B x p x K*M float32 tensor
in the second column), "chunked" is the library (`max_cosine` + `ppc_loss`, CHUNK_COSINES = 2^24),
"no checkpoint" the same chunks without the recomputation. The head steps run the whole decoder
head (labels on the patch grid, so no upsampled K-channel CE); their difference is what the
prototypes add.

| p (patches) | one B x p x K*M tensor | naive | chunked | chunked, no checkpoint | segmenter head step | protoseg head step |
| --- | --- | --- | --- | --- | --- | --- |
{mrows}

The naive peak is about {mem_ratio:.1f} B x p x K*M tensors (cosines, log-softmax, their gradients) and
grows with p; the chunked one is a few chunks' worth plus the B x p x K class scores and their
gradient ({4 * B * big * 847 / 2**20:.0f} MiB each at p = {big}), so it grows far slower. Chunked peak at
p = {big} by chunk size: {chunk_mem}. The head steps at p = {big} are dominated by the decoder's
attention over p + K tokens, not by the prototypes: one attention map is B x 3 heads x
{big + 847:,}^2 floats = {4 * B * 3 * (big + 847) ** 2 / 2**20:.0f} MiB, kept per block for the backward.

Time of scoring + PPC, forward + backward, at p = {p_ct} ({int(p_ct ** 0.5) * 16} crop; {gf_ct:.1f} GFLOP per
cosine GEMM, {fl['chunked'] / gf * gf_ct / rate * 1000:.0f} ms for the library's {fl['chunked'] / gf:.0f} GEMMs at the
GEMM rate); naive reference {ct['naive']:.0f} ms:

| CHUNK_COSINES (pixels per chunk) | chunks | checkpointed (ms) | no checkpoint (ms) | ratio |
| --- | --- | --- | --- | --- |
{crow}

Fastest here: 2^{fastest}; smallest peak: 2^{smallest}. The checkpoint recomputation at the library's 2^24 costs {ckpt_cost:.0f} ms at
p = {p_ct} (two extra GEMMs per chunk; scaled to p = 1,024, {ckpt_1024:.0f} ms, about
{ckpt_1024 / h847['protoseg']:.0%} of the K = 847 protoseg head step) and buys the flat memory above.

Scores, PPC and the embedding gradient of the chunked path equal the naive reference (largest
relative difference {r['check']:.1e}, p = 2,500 in 3 chunks).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="no whole-model step or 512 CE, p = 1024 only, 2 rounds")
    ap.add_argument("--repeats", type=int, default=3, help="best-of rounds of the step timings")
    ap.add_argument("--label-size", type=int, default=128, help="label maps of the head steps")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--pixels", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=24, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.pixels, args.chunk)
        return
    if args.quick:
        args.repeats = 2
    # One thread: multi-threaded kernels on 2 shared cores spin-wait and scatter by 10x.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    r: dict[str, Any] = {"load": [os.getloadavg()[0]]}
    rate = gemm_rate()
    r["check"] = check_scoring()
    r["flops"] = counted_gflop(GRID * GRID)
    r["clustering"] = clustering(args.repeats)
    # Two more rounds for the head steps: their differences are a fraction of each step.
    r["heads"] = {k: head_steps(k, args.label_size, args.repeats + 2) for k in (150, 847)}
    r["ce512"] = None if args.quick else {c: seg_ce_ms(c, 512) for c in (847, KAPPA[847])}
    r["model"] = None if args.quick else model_steps(150, args.repeats)
    r["pixels"] = [1024] if args.quick else [1024, 4096]
    r["memory"] = {}
    for p in r["pixels"]:
        for case in ("naive", "chunked", "nockpt", "segmenter", "protoseg"):
            r["memory"][f"{case}/{p}/24"] = run_child(case, p)
    big = max(r["pixels"])
    for c in CHUNKS:
        if c != 24:
            r["memory"][f"chunked/{big}/{c}"] = run_child("chunked", big, c)
    r["chunk_pixels"] = big
    r["chunks"] = chunk_times(big, args.repeats)
    r["gemm"] = max(rate, gemm_rate())  # the less disturbed of the two
    r["load"].append(os.getloadavg()[0])
    r["seconds"] = time.perf_counter() - t0
    r["cpu"] = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                       resource.getrusage(resource.RUSAGE_CHILDREN)))
    body = render(r, args)
    print(body)
    if not args.no_write:
        write_section("bench_protoseg", body)


if __name__ == "__main__":
    main()
