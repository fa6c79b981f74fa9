"""The replication's per-claim verdicts, decided mechanically from per-seed numbers.

"Beyond the seed spread" (docs/replication.md): for a claim A > B with per-seed values a_s and
b_s (run s of A and run s of B share the seed), the difference d_s = a_s - b_s is positive on
EVERY seed AND the mean difference exceeds the pooled sample std of the two sets,
sqrt((std(a)^2 + std(b)^2) / 2) (ddof = 1). A claim about one set against a fixed value
(Spearman rho < 0) uses that set's sample std instead. Each comparison is then
- "above" / "below": A is higher / lower than B beyond the seed spread;
- "within": neither (the seeds do not separate them).
A claim ">" holds when "above"; "≥" when not "below"; "≈" when "within".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass
class Comparison:
    """One claim A (relation) B over seeds, and its verdict."""

    claim: str  # what the paper says, in words
    a: str  # name of A
    b: str  # name of B (or the reference value)
    relation: str  # ">", "≥", "≈" or "<"
    diffs: list[float]  # a_s - b_s per seed
    mean_diff: float
    spread: float  # pooled sample std (or the one set's std against a fixed value)
    outcome: str  # "above", "below" or "within"
    holds: bool

    @property
    def verdict(self) -> str:
        """'holds' / 'does not hold' with the reason in words."""
        where = {"above": f"{self.a} higher beyond the seed spread", "below": f"{self.a} lower beyond the seed spread",
                 "within": "within the seed spread"}[self.outcome]
        return f"{'holds' if self.holds else 'does not hold'} ({where})"


def _std(v: Sequence[float]) -> float:
    n = len(v)
    if n < 2:
        return 0.0
    m = sum(v) / n
    return math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))


def outcome(a: Sequence[float], b: Sequence[float] | float) -> tuple[list[float], float, float, str]:
    """(per-seed differences, mean difference, spread, "above" / "below" / "within") of a vs b.

    b: the other set (same seeds, same order) or one fixed value."""
    if isinstance(b, (int, float)):
        diffs = [x - float(b) for x in a]
        spread = _std(a)
    else:
        if len(a) != len(b):
            raise ValueError(f"{len(a)} vs {len(b)} seeds")
        diffs = [x - y for x, y in zip(a, b)]
        spread = math.sqrt((_std(a) ** 2 + _std(b) ** 2) / 2)
    if not diffs:
        raise ValueError("no seeds")
    mean = sum(diffs) / len(diffs)
    if all(d > 0 for d in diffs) and mean > spread:
        return diffs, mean, spread, "above"
    if all(d < 0 for d in diffs) and -mean > spread:
        return diffs, mean, spread, "below"
    return diffs, mean, spread, "within"


def compare(claim: str, a_name: str, a: Sequence[float], relation: str, b_name: str,
            b: Sequence[float] | float) -> Comparison:
    """The verdict of `a relation b` (relation ">", "≥", "≈" or "<")."""
    diffs, mean, spread, out = outcome(a, b)
    holds = {">": out == "above", "≥": out != "below", "≈": out == "within", "<": out == "below"}[relation]
    return Comparison(claim, a_name, b_name, relation, diffs, mean, spread, out, holds)


TABLE1 = (("baseline", "Baseline"), ("mt", "+MT"), ("mt_ls", "+MT+LS"), ("rankseg", "+MT+LS+RA"))


def claims(seeds: dict[str, list[float]], kappa: int, num_classes: int) -> list[Comparison]:
    """Every claim the replication checks, from per-seed numbers.

    seeds: name -> one value per seed (mIoU of a run or evaluation, Spearman rho for
    "rho/rankseg"); names as bench/replicate.py stores them (`baseline`, `rankseg/gt_eval`,
    `rankseg/kappa10`, `rankseg_k200`, `rankseg/thr0.05`, `indep`, ...). A claim whose numbers
    are missing (e.g. no kappa sweep in --smoke) is left out.
    """
    out: list[Comparison] = []

    def add(claim: str, a: str, rel: str, b: str | float, a_label: str, b_label: str) -> None:
        if a in seeds and (not isinstance(b, str) or b in seeds):
            out.append(compare(claim, a_label, seeds[a], rel, b_label, seeds[b] if isinstance(b, str) else b))

    names = dict(TABLE1)
    for (lo, _), (hi, _) in zip(TABLE1, TABLE1[1:]):
        add(f"Table 1: {names[hi]} > {names[lo]}", hi, ">", lo, names[hi], names[lo])
    add("Table 1: RankSeg (+MT+LS+RA) > Baseline", "rankseg", ">", "baseline", "RankSeg", "Baseline")
    for v, label in TABLE1:
        add(f"Fig. 3: GT (train + eval) above {label}", "oracle", ">", v, "GT (train + eval)", label)
    add("Fig. 3: GT (eval) lifts the baseline", "baseline/gt_eval", ">", "baseline", "Baseline + GT (eval)", "Baseline")
    add("Fig. 3: GT (eval) lifts RankSeg", "rankseg/gt_eval", ">", "rankseg", "RankSeg + GT (eval)", "RankSeg")
    add("Table 3: joint scheme > independent scheme", "rankseg", ">", "indep", "joint (RankSeg)", "independent")
    add("Table 2: independent scheme > Baseline", "indep", ">", "baseline", "independent", "Baseline")
    sweep = sorted(int(n.split("_k")[1]) for n in seeds if n.startswith("rankseg_k"))
    for kap in sweep:
        rel = "≥" if kap == num_classes else ">"
        what = "κ = K (sort all classes)" if kap == num_classes else f"κ = {kap}"
        add(f"Table 4: RankSeg with {what} {rel} Baseline", f"rankseg_k{kap}", rel, "baseline", f"RankSeg κ={kap}",
            "Baseline")
    evals = sorted(int(n.split("kappa")[1]) for n in seeds if n.startswith("rankseg/kappa"))
    for kap in evals:
        if kappa / 2 <= kap <= 2 * kappa:  # the range the paper tried (25..100 for a kappa of 50)
            add(f"§4.2: robust to the evaluation κ ({kap} instead of {kappa})", f"rankseg/kappa{kap}", "≈", "rankseg",
                f"eval κ={kap}", f"eval κ={kappa}")
    for t in sorted((n.split("thr")[1] for n in seeds if n.startswith("rankseg/thr")), key=float, reverse=True):
        add(f"Suppl. Table 5: dynamic κ (score > {t}) > Baseline", f"rankseg/thr{t}", ">", "baseline",
            f"dynamic κ (t = {t})", "Baseline")
        add(f"Suppl. Table 5: dynamic κ (score > {t}) no better than fixed κ", "rankseg", "≥", f"rankseg/thr{t}",
            f"fixed κ={kappa}", f"dynamic κ (t = {t})")
    add(f"Fig. 7: 1/τ decreases with rank (Spearman ρ < 0, κ = {kappa})", "rho/rankseg", "<", 0.0, "ρ", "0")
    return out


def diagnoses(seeds: dict[str, list[float]], kappa: int) -> list[Comparison]:
    """Comparisons that explain why the selection helps or not (docs/replication.md, "Why
    the selection does not help here"): the GT (eval) selection filled up to kappa with the
    ranking's own best other classes (`rankseg/gt_ranked`) or with random ones (`gt_random`)."""
    out: list[Comparison] = []
    pairs = [
        ("Missed GT classes explain the loss: recall 100 % (GT + the ranking's best others) beats the own top-κ",
         "rankseg/gt_ranked", ">", "rankseg", "GT + ranked fill", f"own top-{kappa}"),
        ("The ranking's false positives are the confusable ones: random ones instead lift mIoU",
         "rankseg/gt_random", ">", "rankseg/gt_ranked", "GT + random fill", "GT + ranked fill"),
        ("The decoder gains from fewer competing classes: GT alone beats GT + random ones",
         "rankseg/gt_eval", ">", "rankseg/gt_random", "GT only", "GT + random fill"),
        ("The baseline gains the same from a random-filled GT selection",
         "baseline/gt_random", ">", "baseline", "Baseline + GT + random fill", "Baseline"),
    ]
    for claim, a, rel, b, a_label, b_label in pairs:
        if a in seeds and b in seeds:
            out.append(compare(claim, a_label, seeds[a], rel, b_label, seeds[b]))
    return out
