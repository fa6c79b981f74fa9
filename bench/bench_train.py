"""Model cost (baseline vs RankSeg head), data-loader throughput and training speed on CPU.

    python bench/bench_train.py [--img-size 256] [--model segmenter-vitt] [--repeats 7]

In one run:
(a) params, FLOPs and CPU latency (batch 1, eval, median of --repeats) of the Segmenter
    baseline head vs RankSeg at K = 150 / 847 / 1284 with kappa = 25 / 50 / 100, on a
    reduced backbone and image size (ViT-T/16 at 256 px by default) so it runs on a CPU;
    ratios RankSeg / baseline side by side;
(b) training data pipeline: decoding samples from shards alone vs the full training
    pipeline (decode + random resize/crop/flip/photometric + normalise) through the DataLoader
    with 0 and 2 workers, samples/s;
(c) training iterations/s of the tiny model (ViT-T, 64 px, K = 100, batch 8), baseline vs RankSeg.
Writes the `bench_train` section of docs/benchmarks.md.

    python bench/bench_train.py --gpu [--cpu-scale] [--iters 20] [--warmup 5]

The training step on the engine's own code (engine/train.py `_setup`, `_forward_backward`,
`_optimizer_step`, `Window`): Segmenter ViT-B/16 at 512 px, batch 8 and Mask2Former Swin-L at
640 px, batch 16 (the paper's batch sizes) on synthetic shards (K = 150), AMP on and off, and
the statistics collected the old way (legacy: every statistic copied to the host and the loss
read every step) against the new (kept on the device, gathered every `log_every` steps).
Reports images/s, peak GPU memory (torch.cuda.max_memory_allocated) and the data-loader wait
per step (time blocked in next(loader)). `--cpu-scale`: the same columns for tiny models on a
CPU (< 3 minutes; AMP is CUDA-only, so only its off rows); writes `bench_train_gpu`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.convert.common import ConvertOptions  # noqa: E402
from rankseg_core.convert.synthetic import prepare_synthetic  # noqa: E402
from rankseg_core.data.device import to_device  # noqa: E402
from rankseg_core.data.loading import make_loader  # noqa: E402
from rankseg_core.engine import runs  # noqa: E402
from rankseg_core.engine import train as T  # noqa: E402
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.model_stats import model_stats  # noqa: E402
from rankseg_core.engine.optim import build_optimizer  # noqa: E402
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.losses.rankseg import RankSegCriterion  # noqa: E402
from rankseg_core.shards.read import ShardDataset  # noqa: E402
from rankseg_core.utils.distributed import DistInfo  # noqa: E402

KS = (150, 847, 1284)
KAPPAS = (25, 50, 100)


@torch.no_grad()
def latencies_ms(cfgs: list[ModelConfig], repeats: int) -> list[float]:
    """Best-of-`repeats` single-thread latency per config, measured round-robin so that load
    from other jobs hits every config alike (the minimum is the least disturbed run)."""
    models = []
    for cfg in cfgs:
        torch.manual_seed(0)
        models.append(SEGMENTER.build(cfg).eval())
    x = torch.randn(1, 3, cfgs[0].img_size, cfgs[0].img_size)
    for m in models:
        m(x)  # warm-up (allocations, pos-embed resampling)
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, m in enumerate(models):
            t = time.perf_counter()
            m(x)
            best[i] = min(best[i], time.perf_counter() - t)
    return [1000 * b for b in best]


def model_table(backbone: str, img: int, repeats: int) -> str:
    rows = ["| K | head | kappa | params (M) | GFLOPs | latency (ms) | params ratio | GFLOPs ratio | latency ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in KS:
        cfgs = [ModelConfig(model=backbone, num_classes=k, img_size=img, head="segmenter")]
        cfgs += [ModelConfig(model=backbone, num_classes=k, img_size=img, head="rankseg", kappa=kappa) for kappa in KAPPAS]
        stats = [model_stats(c) for c in cfgs]
        lat = latencies_ms(cfgs, repeats)
        bs, bl = stats[0], lat[0]
        for c, s, t in zip(cfgs, stats, lat):
            head, kappa = ("baseline", "-") if c.head == "segmenter" else ("RankSeg", str(c.kappa))
            rows.append(f"| {k} | {head} | {kappa} | {s['params_m']:.2f} | {s['gflops']:.2f} | {t:.1f} | "
                        f"{s['params_m'] / bs['params_m']:.3f} | {s['gflops'] / bs['gflops']:.3f} | {t / bl:.2f} |")
        print("\n".join(rows[-4:]), flush=True)
    return "\n".join(rows)


def loader_rate(data: Path, workers: int, batches: int, crop: int) -> float:
    cfg = build_train_config(None, [f"model.img_size={crop}", "schedule.batch_size=8", "aug.photometric=true",
                                    f"data.num_workers={workers}"], data)
    it = iter(make_loader(cfg, [127.5] * 3, [127.5] * 3, DistInfo(), 0))
    cpu = torch.device("cpu")
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    for _ in range(batches):
        # The workers ship uint8 crops; normalising (on the training device) is part of the path.
        to_device(next(it), cpu, [127.5] * 3, [127.5] * 3)
    return batches * 8 / (time.perf_counter() - t)


def decode_rate(data: Path, n: int) -> float:
    ds = ShardDataset(data, "train")
    ds.load(0)
    t = time.perf_counter()
    for i in range(n):
        ds.load(i % len(ds))
    return n / (time.perf_counter() - t)


def train_rate(head: str, iters: int) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(model="segmenter-vitt", num_classes=100, img_size=64, head=head, kappa=10,
                      dropout=0.0, drop_path=0.0)
    model = SEGMENTER.build(cfg).train()
    crit = RankSegCriterion(100, 65535, ml_weight=10.0)
    tc = TrainConfig()
    tc.model = cfg  # the parameter groups follow the model trained (the baseline has no ml branch)
    opt = build_optimizer(model, tc)  # the paper's SGD settings
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 100, (8, 64, 64))

    def step() -> None:
        crit(model(x), y)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return iters / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------
# --gpu: the training step of the engine, images/s, peak memory, data-loader wait

# (label, --set overrides) at the paper's batch sizes: Segmenter ADE20K batch 8 (METHOD.md),
# Mask2Former batch 16 (docs/mask2former.md; 2 per GPU on the official 8 GPUs).
GPU_MODELS = [
    ("Segmenter ViT-B/16 + RankSeg, 512 px, batch 8",
     ["model.model=segmenter-vitb", "model.img_size=512", "schedule.batch_size=8", "optim.name=sgd"]),
    ("Mask2Former Swin-L + RankSeg, 640 px, batch 16",
     ["model.model=mask2former-swinl", "model.img_size=640", "schedule.batch_size=16", "optim.name=adamw"]),
]
# --cpu-scale: the same two families, small enough for a shared CPU (the tests' tiny recipes).
TINY_M2F = ["model.mask2former.hidden_dim=32", "model.mask2former.conv_dim=32", "model.mask2former.mask_dim=32",
            "model.mask2former.nheads=4", "model.mask2former.num_queries=8", "model.mask2former.dec_layers=3",
            "model.mask2former.enc_layers=1", "model.mask2former.dim_feedforward=64",
            "model.mask2former.enc_dim_feedforward=64", "model.mask2former.ml_hidden_dim=32",
            "model.mask2former.ml_query_layer=2", "model.mask2former.train_num_points=256",
            "model.mask2former.freeze_bn=false"]
CPU_MODELS = [
    ("Segmenter ViT-T/16 + RankSeg, 64 px, batch 8",
     ["model.model=segmenter-vitt", "model.img_size=64", "schedule.batch_size=8", "optim.name=sgd"]),
    ("Mask2Former R50 (tiny decoder) + RankSeg, 64 px, batch 4",
     ["model.model=mask2former-r50", "model.img_size=64", "schedule.batch_size=4", "optim.name=adamw", *TINY_M2F]),
]


def _legacy_host_reads(stats: Tensor) -> None:
    """What the loop did per step before issue 24: each statistic copied to the host (per
    micro-batch), the loss read for the non-finite check and the progress postfix, and the
    window's `.tolist()`: the host waits for the step's backward before the optimizer step."""
    for v in stats:
        v.cpu()
    float(stats[0])
    float(stats[0])
    stats.tolist()


def _timed(loader: Iterator[dict], wait: list[float]) -> Iterator[dict]:
    """The loader, adding the time blocked in next() to wait[0]."""
    while True:
        t = time.perf_counter()
        batch = next(loader)
        wait[0] += time.perf_counter() - t
        yield batch


def step_rate(data: Path, run: Path, sets: list[str], device: torch.device, amp: bool, legacy: bool,
              iters: int, warmup: int, workers: int) -> dict[str, float] | None:
    """images/s, peak GPU memory (GiB; NaN on a CPU), loader wait per step (ms) and step time
    (ms) over `iters` steps after `warmup`; None when the GPU runs out of memory."""
    cfg = build_train_config(None, [*sets, f"amp={str(amp).lower()}", f"data.num_workers={workers}",
                                    "data.val_split=", f"log_every={max(iters // 2, 1)}",
                                    f"schedule.iters={iters + warmup}", f"device={device.type}"], data)
    cuda = device.type == "cuda"
    st = None
    run.mkdir(parents=True, exist_ok=True)
    try:
        st = T._setup(cfg, runs.run_paths(run), False, device, DistInfo())
        wait = [0.0]
        st.loader = _timed(st.loader, wait)
        st.model.train()
        batch = cfg.schedule.batch_size
        for i in range(warmup + iters):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0, wait[0] = time.perf_counter(), 0.0
            stats = T._forward_backward(st, cfg, device, False)
            if legacy:
                _legacy_host_reads(stats)
            T._optimizer_step(st, cfg)
            st.window.add(stats, batch, i + 1)
            if (i + 1) % cfg.log_every == 0:
                T._gather(st, cfg, runs.run_paths(run))
        T._gather(st, cfg, runs.run_paths(run))  # the last gather point: the device has finished
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return {"images_s": iters * batch / elapsed, "peak_gib": peak, "wait_ms": 1000 * wait[0] / iters,
                "step_ms": 1000 * elapsed / iters}
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        st = None
        if cuda:
            torch.cuda.empty_cache()


def gpu_table(device: torch.device, cpu_scale: bool, iters: int, warmup: int, workers: int, repeats: int) -> str:
    rows = ["| model | AMP | statistics | images/s | peak GPU memory (GiB) | loader wait / step (ms) | step (ms) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    models = CPU_MODELS if cpu_scale else GPU_MODELS
    size = 96 if cpu_scale else 640
    amps = (False,) if device.type != "cuda" else (True, False)  # autocast is CUDA-only (train.py _autocast)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_synthetic(data, num_classes=150, images=48 if cpu_scale else 160, val_images=2, size=size, seed=0,
                          opts=ConvertOptions(samples_per_shard=50))
        n = 0
        for label, sets in models:
            for amp in amps:
                best: dict[bool, dict[str, float] | None] = {}
                for _ in range(repeats):  # legacy / new alternated: load from other jobs hits both alike
                    for legacy in (True, False):
                        n += 1
                        res = step_rate(data, Path(tmp) / f"run{n}", sets, device, amp, legacy, iters, warmup,
                                        workers)
                        old = best.get(legacy)
                        best[legacy] = res if old is None or (res is not None and res["images_s"] > old["images_s"]) \
                            else old
                for legacy in (True, False):
                    res = best[legacy]
                    what = "legacy: host copy every step" if legacy else "new: on device, gathered"
                    amp_s = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if amp else "off"
                    if res is None:
                        rows.append(f"| {label} | {amp_s} | {what} | OOM | - | - | - |")
                    else:
                        mem = "n/a" if res["peak_gib"] != res["peak_gib"] else f"{res['peak_gib']:.1f}"
                        rows.append(f"| {label} | {amp_s} | {what} | {res['images_s']:.2f} | {mem} | "
                                    f"{res['wait_ms']:.1f} | {res['step_ms']:.0f} |")
                    print(rows[-1], flush=True)
    return "\n".join(rows)


def gpu_main(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available() and not args.cpu_scale
    if not cuda and not args.cpu_scale:
        raise SystemExit("--gpu needs a CUDA device; add --cpu-scale to run the tiny CPU configuration")
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # see main(): stable numbers on a shared machine
    iters = args.iters or (6 if args.cpu_scale else 20)
    warmup = args.warmup if args.warmup is not None else (2 if args.cpu_scale else 5)
    workers = args.workers if args.workers is not None else (0 if args.cpu_scale else 8)
    repeats = args.repeats_gpu or (2 if args.cpu_scale else 1)
    load, t = os.getloadavg()[0], time.perf_counter()
    table = gpu_table(device, args.cpu_scale, iters, warmup, workers, repeats)
    load_end = os.getloadavg()[0]
    card = torch.cuda.get_device_name(0) if cuda else "none (CPU only)"
    cpu_note = "" if cuda else (
        "\nOn a CPU every op runs before the next is issued, so a host read costs nothing extra and "
        "legacy and new should be\nequal: differences here are load noise. What the switch removes is "
        "the GPU's idle time while the host waits.\n")
    scope = ("tiny models on the CPU (`--cpu-scale`): **no GPU was available in this session**; the GPU "
             "columns are n/a and AMP rows are absent (autocast is CUDA-only)") if not cuda else f"GPU: {card}"
    body = f"""
## The training step on a GPU (`bench/bench_train.py --gpu`)

{machine()}; {scope}. {iters} timed steps after {warmup} warm-up steps, {workers} loader
workers, synthetic shards (K = 150), the best of {repeats} alternated run(s) per row;
{time.perf_counter() - t:.0f} s in all; load average {load:.1f} at the start, {load_end:.1f} at the end.
{cpu_note}
To measure on a GPU (one card, about 10 minutes):

    python bench/bench_train.py --gpu --iters 20 --warmup 5

"legacy" collects the logged statistics as the loop did before issue 24 (every statistic
copied to the host every step, the loss read twice, `.tolist()`): the host waits for each
step's backward before it can queue the next step. "new" keeps them on the device and gathers
them every `log_every` steps (here every {max(iters // 2, 1)}). Both columns use the new
Mask2Former targets (one host transfer per batch) and fused AdamW, so the difference is the
statistics alone. Loader wait = time blocked in next(loader) per step; peak memory =
torch.cuda.max_memory_allocated over the timed steps. Mask2Former's batch 16 is the paper's
global batch (2 per GPU on 8 GPUs): on one card it may not fit, which the table says (OOM).

{table}
"""
    print(body)
    if not args.no_write:
        write_section("bench_train_gpu", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="segmenter-vitt")
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--gpu", action="store_true", help="the training step: images/s, peak GPU memory, loader wait")
    ap.add_argument("--cpu-scale", action="store_true", help="with --gpu: tiny models on the CPU (< 3 minutes)")
    ap.add_argument("--iters", type=int, default=0, help="with --gpu: timed steps (default 20, 6 with --cpu-scale)")
    ap.add_argument("--warmup", type=int, default=None, help="with --gpu: untimed steps first (5; 2 with --cpu-scale)")
    ap.add_argument("--repeats-gpu", type=int, default=0, help="with --gpu: alternated runs per row (1; 2 with --cpu-scale)")
    ap.add_argument("--workers", type=int, default=None, help="with --gpu: loader workers (8; 0 with --cpu-scale)")
    args = ap.parse_args()
    if args.gpu:
        gpu_main(args)
        return

    # One thread: on a shared 2-core machine, multi-threaded CPU kernels spin-wait on busy cores
    # and latencies scatter by 10x; single-thread numbers are stable and comparable.
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print("model cost ...", flush=True)
    table = model_table(args.model, args.img_size, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_synthetic(data, num_classes=1000, images=args.images, val_images=8, size=256, seed=0,
                          opts=ConvertOptions(samples_per_shard=100))
        print("data loader ...", flush=True)
        dec = decode_rate(data, args.images)
        l0 = loader_rate(data, 0, 15, 128)
        l2 = loader_rate(data, 2, 15, 128)
    print("training ...", flush=True)
    tb, tr = train_rate("segmenter", 10), train_rate("rankseg", 10)
    load_end = os.getloadavg()[0]

    body = f"""
## Training and model cost (`bench/bench_train.py`)

{machine()}; load average {load:.1f} at the start, {load_end:.1f} at the end (other jobs share
these cores, so absolute times are pessimistic; ratios come from the same run).

### Baseline vs RankSeg head: {args.model} at {args.img_size}x{args.img_size}, batch 1, CPU

FLOPs count every matmul (attention included) with torch's FlopCounterMode; latency is the
best of {args.repeats} single-thread eval forwards, measured round-robin across the variants. RankSeg adds the multi-label branch (1 TranEnc block
over 64 pooled + K tokens, GroupWiseLinear) but its decoder sees only kappa class tokens instead
of K, and its mask LayerNorm has kappa instead of K channels. With ViT-T at 256 px the head is
a large share of the cost, so the ratios are larger than for ViT-B at 512 px (docs/model.md).

{table}

### Data pipeline (synthetic shards, 256x256 JPEG, K = 1000; crop 128, batch 8)

| path | samples/s |
| --- | --- |
| decode alone (HDF5 read + JPEG + 16-bit PNG decode, 1 process) | {dec:.0f} |
| training DataLoader, 0 workers (decode + resize/crop/flip/photometric/normalise) | {l0:.0f} |
| training DataLoader, 2 workers | {l2:.0f} |

The augmentation costs a bit over half as much as decoding (the crop choice, the bilinear resize
of the crop's region and the HSV round trip of the photometric distortion; stage by stage in
"Training loader" above). Workers only help when cores are free: with the load average above,
the 2-worker loader competes with other jobs for the same 2 cores.

### Training speed of the tiny model (ViT-T, 64 px, K = 100, batch 8, SGD, 1 thread)

| head | iterations/s | images/s |
| --- | --- | --- |
| Segmenter baseline | {tb:.2f} | {8 * tb:.1f} |
| RankSeg (kappa 10) | {tr:.2f} | {8 * tr:.1f} |
"""
    print(body)
    if not args.no_write:
        write_section("bench_train", body)


if __name__ == "__main__":
    main()
