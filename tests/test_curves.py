"""TensorBoard scalars of a run (engine/scalars.py) and `rankseg viz curves` (viz/curves.py).

The curves' CSV is checked against a parse of metrics.jsonl written here (json.loads per
line, the restart rule applied by hand to a hand-built log); the event files are read back
with TensorBoard's own EventAccumulator and compared with metrics.jsonl.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, make_synthetic, tiny_run
from test_figure_layout import layout_problems
from typer.testing import CliRunner

from rankseg_cli.train_cmds import train as train_cmd
from rankseg_cli.viz_cmds import viz_app
from rankseg_core.engine import runs, scalars
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.viz import curves as C

runner = CliRunner()


def viz(*args) -> object:
    return runner.invoke(viz_app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------
# Logs as `rankseg train` writes them, at a real run's length


def write_log(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run / "metrics.jsonl").write_text(text)
    return run


def realistic(iters: int = 160_000, every: int = 50, eval_every: int = 16_000, seed: int = 0,
              ml: bool = True) -> list[dict]:
    """A Segmenter-style log: noisy decaying losses, poly lr, an evaluation every eval_every
    steps and a final one (null mAP / recall@κ for a run without a multi-label branch)."""
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for it in range(every, iters + 1, every):
        seg = 0.3 + 2.0 * math.exp(-it / (iters / 20)) + float(rng.normal(0, 0.06))
        rec = {"type": "train", "iter": it, "loss": seg + 0.1, "seg": seg}
        if ml:
            rec.update(ml=0.1 + float(rng.normal(0, 0.01)), coverage=0.9, recall=0.8, precision=0.2)
        rec.update(lr=1e-3 * (1 - (it - 1) / iters) ** 0.9, samples_per_s=28.0 + float(rng.normal(0, 1)))
        out.append(rec)
        if it % eval_every == 0 or it == iters:
            m = 0.18 * (1 - math.exp(-it / (iters / 4)))
            ev = {"type": "eval", "iter": it, "miou": m, "aacc": 0.5 + m, "map": 0.6 if ml else None,
                  "recall_at_kappa": 0.8 if ml else None, "num_images": 2000, "score": m}
            out.append({**ev, "final": True} if it == iters else ev)
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def independent_points(path: Path) -> dict[tuple[str, str, int], float]:
    """(type, metric, iter) -> value of a log without restarts: json per line, a torn line
    skipped, numbers only (null and booleans are not points)."""
    points = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in rec.items():
            if key not in ("type", "iter", "final") and type(value) in (int, float):
                points[(rec["type"], key, rec["iter"])] = float(value)
    return points


def ema(values: list[float], w: float) -> list[float]:
    """TensorBoard's debiased EMA written as explicit weighted means: y_t = sum_i w^(t-i) v_i /
    sum_i w^(t-i) (the same as its recursion with the 1 - w^(t+1) correction)."""
    out = []
    for t in range(len(values)):
        weights = [w ** (t - i) for i in range(t + 1)]
        out.append(sum(a * b for a, b in zip(weights, values[: t + 1])) / sum(weights))
    return out


# ---------------------------------------------------------------------------------------
# The figure's numbers


def test_csv_equals_an_independent_parse_of_metrics_jsonl(tmp_path: Path) -> None:
    a = write_log(tmp_path / "ade-vitb-rankseg", realistic(iters=20_000, eval_every=4000, seed=0),
                  tail='{"type": "train", "iter": 20050, "loss": 0.')  # a torn last line: still training
    b = write_log(tmp_path / "ade-vitb-baseline", realistic(iters=16_000, eval_every=4000, seed=1, ml=False))
    out = tmp_path / "fig" / "curves.png"
    res = viz("curves", a, b, "--out", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(out.with_suffix(".csv"))
    for run, label in ((a, "rankseg"), (b, "baseline")):
        expected = {k: v for k, v in independent_points(run / "metrics.jsonl").items()
                    if k[1] not in ("samples_per_s", "num_images", "score")}  # not drawn by default
        mine = [r for r in rows if r["run"] == str(run)]
        assert {r["label"] for r in mine} == {label}
        got = {(r["type"], r["metric"], int(r["iter"])): float(r["value"]) for r in mine}
        assert len(got) == len(mine)  # one row per point
        assert got == expected  # exactly: numbers are written in full
        # y is what is drawn: fractions in %, train curves smoothed (lr never), eval as logged.
        for (kind, metric) in {(k[0], k[1]) for k in expected}:
            series = sorted((int(r["iter"]), float(r["value"]), float(r["y"])) for r in mine
                            if (r["type"], r["metric"]) == (kind, metric))
            values = [v * (100 if metric in ("miou", "aacc", "map", "recall_at_kappa", "coverage", "recall",
                                             "precision") else 1) for _, v, _ in series]
            want = values if kind == "eval" or metric == "lr" else ema(values, 0.9)
            assert np.allclose([y for *_, y in series], want, rtol=1e-9, atol=1e-12), (label, metric)
    # The baseline has no multi-label branch: its null mAP is not a point, and the torn line is not either.
    assert not [r for r in rows if r["label"] == "baseline" and r["metric"] in ("ml", "map")]
    assert max(int(r["iter"]) for r in rows if r["label"] == "rankseg") == 20_000


def test_a_resumed_runs_repeated_records_are_dropped(tmp_path: Path) -> None:
    """A log as versions before the truncation on --resume left it: attempt 1 logged up to
    iteration 6 (and an eval at 6) after its checkpoint at 4; attempt 2 resumed from 4."""
    t = lambda it, loss: {"type": "train", "iter": it, "loss": loss, "lr": 0.1 / it}  # noqa: E731
    e = lambda it, m, **kw: {"type": "eval", "iter": it, "miou": m, **kw}  # noqa: E731
    log = [t(2, 9.0), t(4, 8.0), e(4, 0.10), t(6, 7.0), e(6, 0.20),  # attempt 1 (crashed after 6)
           t(6, 6.5), t(8, 6.0), e(8, 0.30, final=True),  # attempt 2 from the checkpoint at 4
           e(8, 0.30, final=True)]  # the same record twice (a requeued job appending again)
    run = write_log(tmp_path / "run", log)
    out = tmp_path / "c.svg"
    res = viz("curves", run, "--out", out, "--metrics", "loss,miou", "--smooth", "0")
    assert res.exit_code == 0, res.output
    assert b"<svg" in out.read_bytes()[:400]
    got = [(r["type"], r["metric"], int(r["iter"]), float(r["value"])) for r in read_csv(out.with_suffix(".csv"))]
    assert got == [("train", "loss", 2, 9.0), ("train", "loss", 4, 8.0), ("train", "loss", 6, 6.5),
                   ("train", "loss", 8, 6.0), ("eval", "miou", 4, 0.10), ("eval", "miou", 8, 0.30)]
    # A crash after the final evaluation, before the weights: the resume from the last
    # checkpoint (at the last iteration) logs only the final evaluation again.
    log = [t(2, 9.0), t(4, 8.0), e(4, 0.1, final=True), e(4, 0.1, final=True)]
    assert [(r["type"], r["iter"]) for r in C.clean_records(log)] == [("train", 2), ("train", 4), ("eval", 4)]
    # A periodic evaluation logged again without a train record first (log_every > eval.every).
    # log_every 4, eval.every 1, a crash after 5, the resume from the checkpoint at 2:
    log = [e(1, 0.1), e(2, 0.2), e(3, 0.3), t(4, 8.0), e(4, 0.4), e(5, 0.5), e(3, 0.33), t(4, 7.5), e(4, 0.44)]
    kept = C.clean_records(log)
    assert [(r["type"], r["iter"], r.get("miou", r.get("loss"))) for r in kept] == [
        ("eval", 1, 0.1), ("eval", 2, 0.2), ("eval", 3, 0.33), ("train", 4, 7.5), ("eval", 4, 0.44)]


def test_run_labels() -> None:
    labels, prefix = C.run_labels([Path("runs/ade-vitb-rankseg-k100"), Path("runs/ade-vitb-baseline")])
    assert (labels, prefix) == (["rankseg-k100", "baseline"], "ade-vitb-")
    labels, prefix = C.run_labels([Path("a/seed0/run"), Path("b/seed0/run")])  # same names: parents tell them apart
    assert (labels, prefix) == (["a/seed0/run", "b/seed0/run"], "")
    assert C.run_labels([Path("x/abc-1"), Path("x/abc-")]) == (["abc-1", "abc-"], "")  # nothing would be left
    assert C.run_labels([Path("runs/one")]) == (["one"], "")


# ---------------------------------------------------------------------------------------
# The figure


@pytest.mark.parametrize("n_runs", [1, 3])
def test_layout_of_a_real_length_run(tmp_path: Path, n_runs: int) -> None:
    """160k iterations logged every 50: every panel's texts clear of each other and of other
    panels; the legend (several runs) below the panels."""
    names = ["ade20k-full-segmenter-vitb-rankseg-kappa100-seed0", "ade20k-full-segmenter-vitb-rankseg-kappa200-seed0",
             "ade20k-full-segmenter-vitb-baseline-seed0"][:n_runs]
    dirs = [write_log(tmp_path / n, realistic(seed=i, ml="baseline" not in n)) for i, n in enumerate(names)]
    logs = C.load_logs(dirs)
    fig, drawn = C.draw_curves(logs, C.choose_metrics(logs, None))
    assert len(fig.axes) == 11  # loss, seg, ml, coverage, recall, precision, lr; mIoU, aAcc, mAP, recall@κ
    assert {c.metric for c in drawn} >= {"loss", "lr", "miou", "map"}
    assert not {c.metric for c in drawn} & {"samples_per_s", "num_images", "score"}
    if n_runs > 1:
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == ["rankseg-kappa100-seed0", "rankseg-kappa200-seed0",
                                                              "baseline-seed0"]
        assert legend.get_title().get_text() == "ade20k-full-segmenter-vitb-…"
    else:
        assert fig.get_suptitle() == names[0]
    assert layout_problems(fig) == []


def test_metrics_are_chosen_by_name(tmp_path: Path) -> None:
    run = write_log(tmp_path / "r", realistic(iters=2000, eval_every=1000))
    logs = C.load_logs([run])
    assert C.choose_metrics(logs, ["Loss", "eval/mIoU", "samples_per_s"]) == [("train", "loss"), ("eval", "miou"),
                                                                             ("train", "samples_per_s")]
    assert C.known_metrics(logs)[:8] == [("train", k) for k in ("loss", "seg", "ml", "coverage", "recall",
                                                                 "precision", "lr", "samples_per_s")]


# ---------------------------------------------------------------------------------------
# Bad inputs: one line, nothing written


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    run = write_log(tmp_path / "run", realistic(iters=400, eval_every=200))
    bare = tmp_path / "bare"
    bare.mkdir()
    empty = write_log(tmp_path / "empty", [], tail='{"type": "tra')
    out = tmp_path / "o" / "c.png"
    cases = [
        ((tmp_path / "nope", "--out", out), ["nope: no such run directory"]),
        ((bare, "--out", out), ["bare/metrics.jsonl: not found", "not a training run"]),
        ((empty, "--out", out), ["empty/metrics.jsonl: no training or evaluation record yet"]),
        ((run, "--out", out, "--metrics", "loss,mIoU,bogus"),
         ["--metrics: unknown metric 'bogus'", "the runs logged: loss, seg, ml", "miou"]),
        ((run, "--out", run / "metrics.jsonl"), ["is one of the inputs"]),
        ((run, "--out", out, "--smooth", "1"), ["--smooth 1: must be in [0, 1)"]),
        ((run, run, "--out", out), ["given twice"]),
        ((run, "--out", tmp_path / "c.jpg"), ["unknown figure format .jpg"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(viz("curves", *args), *fragments)
    png_run = write_log(tmp_path / "r.png", realistic(iters=400, eval_every=200))  # a run dir named like a figure
    assert_one_line_error(viz("curves", png_run, "--out", png_run), "is one of the inputs")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c.csv").exists()


# ---------------------------------------------------------------------------------------
# TensorBoard events of a training run


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("curves") / "data", num_classes=40, images=8, val_images=2,
                          size=32)


RUN = tiny_run() + ["schedule.iters=6", "ckpt_every=2", "eval.every=2"]


class Crash(Exception):
    pass


def crash_before_checkpoint(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    """Fail as a crash would just before last.pt of `iteration` is written: what was logged
    after the previous checkpoint (train 3, 4 and eval 4 here) is orphaned."""
    real = runs.save_checkpoint

    def save(path: Path, state: dict) -> Path:
        if path.name == "last.pt" and state["iteration"] == iteration:
            raise Crash
        return real(path, state)

    monkeypatch.setattr(runs, "save_checkpoint", save)


def events_by_tag(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_by_tag(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the tags TensorBoard should show: '<type>/<key>' -> [(iter, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if key not in ("type", "iter", "final") and type(value) in (int, float):
                out.setdefault(f"{rec['type']}/{key}", []).append((rec["iter"], float(value)))
    return out


def assert_events_equal_log(run: Path) -> None:
    events, log = events_by_tag(run), jsonl_by_tag(run)
    assert set(events) == set(log) and "train/loss" in log and "eval/miou" in log and "train/lr" in log
    for tag, points in log.items():
        steps = [s for s, _ in events[tag]]
        assert steps == [s for s, _ in points], tag  # every iteration once, in order: no duplicate
        assert np.allclose([v for _, v in events[tag]], [v for _, v in points], rtol=1e-6, atol=1e-30), tag


@pytest.mark.parametrize("first_tensorboard", ["true", "false"])
def test_events_mirror_metrics_jsonl_across_a_resume(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     first_tensorboard: str) -> None:
    """Crash after logging past the checkpoint, resume: the events show each iteration once,
    equal to metrics.jsonl. With TensorBoard off in the first attempt, the resume writes the
    history first."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    crash_before_checkpoint(monkeypatch, 4)
    with pytest.raises(Crash):
        train(build_train_config(None, RUN + [f"tensorboard={first_tensorboard}"], data), run, progress=False)
    monkeypatch.undo()
    logged = jsonl_by_tag(run)
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4] and [s for s, _ in logged["eval/miou"]] == [2, 4]
    if first_tensorboard == "true":
        assert [s for s, _ in events_by_tag(run)["eval/miou"]] == [2, 4]
    else:
        assert not (run / "tensorboard").exists()
    res = runner.invoke(_train_app(), ["--out", str(run), "--resume", "--set", "tensorboard=true"])
    assert res.exit_code == 0, res.output
    assert [s for s, _ in jsonl_by_tag(run)["eval/miou"]] == [2, 4, 6]
    assert_events_equal_log(run)


def _train_app():
    import typer

    app = typer.Typer()
    app.command()(train_cmd)
    return app


def test_tensorboard_off_and_missing(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = build_train_config(None, tiny_run() + ["schedule.iters=1", "tensorboard=false"], data)
    train(cfg, tmp_path / "off", progress=False)
    assert (tmp_path / "off" / "metrics.jsonl").is_file() and not (tmp_path / "off" / "tensorboard").exists()
    # Without the package: the default (null) quietly writes none; tensorboard=true is refused
    # in one line before the run directory is made.
    monkeypatch.setattr(scalars, "tensorboard_available", lambda: False)
    assert scalars.resolve_tensorboard(None) is False
    with pytest.raises(UserError, match="tensorboard package is not installed"):
        scalars.resolve_tensorboard(True)
    res = runner.invoke(_train_app(), ["--data", str(data), "--out", str(tmp_path / "want"),
                                       *sum((["--set", s] for s in tiny_run() + ["schedule.iters=1", "tensorboard=true"]),
                                            [])])
    assert_one_line_error(res, "tensorboard=true: the tensorboard package is not installed", "pip install tensorboard",
                          "--no-tensorboard")
    assert not (tmp_path / "want").exists()


def test_record_scalars() -> None:
    rec = {"type": "eval", "iter": 8, "final": True, "miou": 0.25, "map": None, "num_images": 4, "flag": False}
    assert scalars.record_scalars(rec) == {"eval/miou": 0.25, "eval/num_images": 4.0}
