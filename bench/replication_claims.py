"""The replication's per-claim verdicts, decided mechanically from per-seed numbers.

**The rule, "beyond the seed spread"** (docs/replication.md): for a comparison A > B with
per-seed values a_s and b_s (run s of A and run s of B share the seed), the difference
d_s = a_s - b_s is positive on EVERY seed AND the mean difference exceeds the pooled sample
std of the two sets, sigma = sqrt((std(a)^2 + std(b)^2) / 2) (ddof = 1). A comparison of one
set against a fixed value (Spearman rho < 0) uses that set's sample std instead. Each
comparison is then
- "above" / "below": A is higher / lower than B beyond the seed spread;
- "within": neither (the seeds do not separate them).
A comparison ">" holds when "above"; "≥" when not "below"; "≈" when "within"; "<" when "below".

**Minimum detectable effect (MDE)** of a comparison: the smallest mean difference the rule
would call "above" if the per-seed differences kept their observed scatter around their mean,
i.e. the smallest c for which d_s + (c - mean(d)) > 0 on every seed and c > sigma:
    MDE_above = max(sigma, mean(d) - min(d)),  MDE_below = max(sigma, max(d) - mean(d))
(adding a constant to every seed of A leaves sigma unchanged). A two-sided question (≈) uses
the larger of the two. The MDE does not shrink with more seeds (sigma is the spread of the
seeds, not the standard error of their mean): where the paper's effect is below it, this rule
cannot decide at any number of seeds, and `seeds_for` says how many seeds a one-sided paired
t-test (5 %, power 80 %) would need for the paper's effect at the observed scatter of d.

**Claims.** A claim is what the paper says, in its own direction, with one or more
comparisons as evidence (the dynamic-kappa comparison at four thresholds is ONE claim), and,
where the paper gives one, the effect it reports (COCO-Stuff, the paper's ablation dataset,
unless said). Its decision:
- ">" / "<" (every comparison must be above / below): "holds" when every one is; "does not
  hold" when one is beyond the spread the other way, or when one is within the spread though
  its MDE is at most the paper's effect (an effect of the paper's size would have shown);
  "inconclusive" when a comparison within the spread has an MDE above the paper's effect (or
  the paper gives no size).
- "≈" (no difference that matters; the paper's effect is the margin): "holds" when every
  comparison is within the spread AND its two-sided MDE is at most the margin; "does not
  hold" when one is beyond the spread; "inconclusive" otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Comparison:
    """One comparison A (relation) B over seeds, and its verdict."""

    claim: str  # what the paper says, in words
    a: str  # name of A
    b: str  # name of B (or the reference value)
    relation: str  # ">", "≥", "≈" or "<"
    diffs: list[float]  # a_s - b_s per seed
    mean_diff: float
    spread: float  # pooled sample std (or the one set's std against a fixed value)
    outcome: str  # "above", "below" or "within"
    holds: bool
    mde: float = math.nan  # the minimum detectable effect in the relation's direction (module docstring)

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


def mde(diffs: Sequence[float], spread: float, relation: str) -> float:
    """The minimum detectable effect of a comparison (module docstring): the smallest mean
    difference the rule calls beyond the spread in the relation's direction ("<": below;
    "≈": either), the per-seed differences keeping their scatter around their mean."""
    mean = sum(diffs) / len(diffs)
    up, down = max(spread, mean - min(diffs)), max(spread, max(diffs) - mean)
    return {"<": down, "≈": max(up, down)}.get(relation, up)


def compare(claim: str, a_name: str, a: Sequence[float], relation: str, b_name: str,
            b: Sequence[float] | float) -> Comparison:
    """The verdict of `a relation b` (relation ">", "≥", "≈" or "<")."""
    diffs, mean, spread, out = outcome(a, b)
    holds = {">": out == "above", "≥": out != "below", "≈": out == "within", "<": out == "below"}[relation]
    return Comparison(claim, a_name, b_name, relation, diffs, mean, spread, out, holds, mde(diffs, spread, relation))


def seeds_for(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, cap: int = 1000) -> int | None:
    """Seeds a one-sided paired t-test at level `alpha` needs to detect a true mean difference
    `effect` > 0 with probability `power`, when per-seed differences scatter with std `sd`
    (exact power from the noncentral t); None past `cap` or for effect <= 0."""
    from scipy.stats import nct, t

    if effect <= 0:
        return None
    if sd <= 0:
        return 2
    for n in range(2, cap + 1):
        crit = t.ppf(1 - alpha, n - 1)
        if nct.sf(crit, n - 1, effect / (sd / math.sqrt(n))) >= power:
            return n
    return None


@dataclass
class Claim:
    """One claim of the paper and its decision from one or more comparisons (module docstring)."""

    claim: str  # the paper's words, with the table or figure
    relation: str  # ">", "<" or "≈": what every comparison must show
    parts: list[Comparison]
    paper_effect: float | None = None  # the paper's effect (or margin for ≈), same units as the values
    paper_source: str = ""  # where the paper's effect comes from
    evidence: str = ""  # extra evidence in words (e.g. the classifiers' mAP)
    needs_ranking: bool = False  # tests the selection, so only where the ranking beats the decoder's (P1)
    decision: str = field(init=False)  # "holds", "does not hold" or "inconclusive"
    reason: str = field(init=False)
    mde: float = field(init=False)  # the claim's MDE: the largest of its comparisons'
    seeds_needed: int | None = field(init=False)  # paired t-test seeds for the paper's effect (see seeds_for)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"{self.claim}: no comparison")
        self.mde = max(c.mde for c in self.parts)
        self.decision, self.reason = decide(self.relation, self.parts, self.paper_effect)
        eff = self.paper_effect
        self.seeds_needed = (max(seeds_for(eff, _std(c.diffs)) or 10**9 for c in self.parts)
                             if eff is not None and eff > 0 and self.relation != "≈" else None)
        if self.seeds_needed is not None and self.seeds_needed >= 10**9:
            self.seeds_needed = None

    @property
    def holds(self) -> bool:
        return self.decision == "holds"


def decide(relation: str, parts: list[Comparison], paper_effect: float | None) -> tuple[str, str]:
    """(decision, reason) of a claim from its comparisons (module docstring)."""
    want = {">": "above", "<": "below", "≈": "within"}[relation]
    if relation == "≈":
        off = [c for c in parts if c.outcome != "within"]
        if off:
            return "does not hold", f"{off[0].a} vs {off[0].b} is {off[0].outcome} beyond the seed spread"
        worst = max(c.mde for c in parts)
        if paper_effect is not None and worst <= paper_effect:
            return "holds", "within the seed spread, and a difference of the margin would have shown"
        return "inconclusive", "within the seed spread, but the MDE exceeds the margin: these seeds cannot tell"
    if all(c.outcome == want for c in parts):
        return "holds", "beyond the seed spread"
    other = "below" if want == "above" else "above"
    against = [c for c in parts if c.outcome == other]
    if against:
        return "does not hold", f"{against[0].a} {'lower' if other == 'below' else 'higher'} beyond the seed spread"
    within = [c for c in parts if c.outcome == "within"]
    worst = max(c.mde for c in within)
    if paper_effect is not None and worst <= paper_effect:
        return "does not hold", "within the seed spread, though an effect of the paper's size would have shown"
    return "inconclusive", "within the seed spread; the MDE exceeds the paper's effect" if paper_effect is not None \
        else "within the seed spread; the paper gives no effect size to test against"


TABLE1 = (("baseline", "Baseline"), ("mt", "+MT"), ("mt_ls", "+MT+LS"), ("rankseg", "+MT+LS+RA"))
# The paper's numbers the effects come from (mIoU %, COCO-Stuff unless said; main paper).
PAPER_TABLE1 = {"baseline": 41.85, "mt": 42.38, "mt_ls": 44.31, "rankseg": 44.98}  # Table 1
PAPER_TABLE3 = {"indep": 44.42, "joint": 44.98, "indep_gain": 2.52}  # Table 3 (its printed Δ for indep)
PAPER: dict[str, float] = {
    "gt_train_eval": 24.0,  # §3.4: GT (train + eval) gains +24 mIoU on COCO-Stuff
    "table2_step": 44.42 - 42.87,  # Table 2: Swin-L (mAP 64.79) vs TResNetL (60.10), the smaller step
    "table4_k": 2.35,  # Table 4: kappa = K = 171, +2.35 over the baseline
    "table4_min": 2.35,  # Table 4: the smallest gain over the baseline of any kappa
    "eval_kappa": 0.09,  # §4.2: kappa 25 / 75 / 100 at evaluation move mIoU by at most 0.09
    "dynamic_min": 2.18,  # supplement Table 5: the smallest gain of dynamic kappa over the baseline
    "dynamic_gap": 44.98 - 44.64,  # supplement Table 5: fixed kappa above the best dynamic kappa
    "table5_min": min(44.98 - 44.11, 44.98 - 44.04),  # Table 5: weight 10 above weights 1 and 20
    "table6_min": min(44.98 - 43.19, 44.98 - 44.07),  # Table 6: TranEnc above GAP+Linear and 2x TranDec
}
ML_HEAD_NAMES = {"tranenc": "1× TranEnc", "trandec": "2× TranDec", "gap": "GAP+Linear"}


def claims(seeds: dict[str, list[float]], kappa: int, num_classes: int,
           maps: dict[str, list[float]] | None = None) -> list[Claim]:
    """Every claim the replication checks, from per-seed numbers (fractions: mIoU 0..1).

    seeds: name -> one value per seed (mIoU of a run or evaluation, Spearman rho for
    "rho/rankseg"); names as bench/replicate.py stores them (`baseline`, `rankseg/gt_eval`,
    `rankseg/kappa10`, `rankseg_k200`, `rankseg/thr0.05`, `indep`, `indep_pre`, `ml_gap`,
    `ml_w1`, ...). maps: name -> per-seed ranking mAP of the classifiers the independent
    scheme selects with (`classifier`, `pretrain`), the evidence of Table 2. A claim whose
    numbers are missing (e.g. no kappa sweep in --smoke) is left out.
    """
    out: list[Claim] = []
    pts = 0.01  # the paper's mIoU points in the units of the values

    def cmp(claim: str, a: str, rel: str, b: str | float, a_label: str, b_label: str) -> Comparison | None:
        if a in seeds and (not isinstance(b, str) or b in seeds):
            return compare(claim, a_label, seeds[a], rel, b_label, seeds[b] if isinstance(b, str) else b)
        return None

    def add(claim: str, rel: str, parts: list[Comparison | None], effect: float | None, source: str = "",
            evidence: str = "") -> None:
        found = [c for c in parts if c is not None]
        if found:
            out.append(Claim(claim, rel, found, effect, source, evidence))

    t1, names = PAPER_TABLE1, dict(TABLE1)
    for (lo, _), (hi, _) in zip(TABLE1, TABLE1[1:]):
        add(f"Table 1: {names[hi]} > {names[lo]}", ">", [cmp("", hi, ">", lo, names[hi], names[lo])],
            (t1[hi] - t1[lo]) * pts, "Table 1, COCO-Stuff")
    add("Table 1: RankSeg (+MT+LS+RA) > Baseline", ">", [cmp("", "rankseg", ">", "baseline", "RankSeg", "Baseline")],
        (t1["rankseg"] - t1["baseline"]) * pts, "Table 1, COCO-Stuff (ADE20K-Full: +0.85)")
    add("Fig. 3: GT (train + eval) > Baseline", ">",
        [cmp("", "oracle", ">", "baseline", "GT (train + eval)", "Baseline")], PAPER["gt_train_eval"] * pts,
        "§3.4, COCO-Stuff")
    add("Fig. 3: GT (eval) > Baseline", ">",
        [cmp("", "baseline/gt_eval", ">", "baseline", "Baseline + GT (eval)", "Baseline")], None,
        "Fig. 3 (bars only)")
    add("Fig. 3: GT (train + eval) > GT (eval)", ">",
        [cmp("", "oracle", ">", "baseline/gt_eval", "GT (train + eval)", "Baseline + GT (eval)")], None,
        "Fig. 3 (bars only)")
    t3 = PAPER_TABLE3
    add("Table 3: joint scheme > independent scheme", ">",
        [cmp("", "rankseg", ">", "indep", "joint (RankSeg)", "independent")], (t3["joint"] - t3["indep"]) * pts,
        "Table 3, COCO-Stuff")
    add("Table 3: independent scheme > Baseline", ">", [cmp("", "indep", ">", "baseline", "independent", "Baseline")],
        t3["indep_gain"] * pts, "Table 3, COCO-Stuff (Swin-L classifier)")
    maps = maps or {}
    evidence = ""
    if maps.get("pretrain") and maps.get("classifier"):
        pre_map = sum(maps["pretrain"]) / len(maps["pretrain"])
        tuned_map = sum(maps["classifier"]) / len(maps["classifier"])
        evidence = (f"classifier mAP {100 * pre_map:.1f} (pre-training run) vs {100 * tuned_map:.1f} (fine-tuned, "
                    "mean of seeds)")
        if pre_map > tuned_map:  # Table 2's claim needs the classifiers in this order
            add("Table 2: a more accurate classifier gives a higher mIoU (independent scheme)", ">",
                [cmp("", "indep_pre", ">", "indep", "selector mAP higher", "selector mAP lower")],
                PAPER["table2_step"] * pts, "Table 2, COCO-Stuff (Swin-L vs TResNetL)", evidence)
        else:
            add("Table 2: a more accurate classifier gives a higher mIoU (independent scheme)", ">",
                [cmp("", "indep", ">", "indep_pre", "selector mAP higher", "selector mAP lower")],
                PAPER["table2_step"] * pts, "Table 2, COCO-Stuff (Swin-L vs TResNetL)", evidence)
    sweep = sorted(int(n.split("_k")[1]) for n in seeds if n.startswith("rankseg_k"))
    add("Table 4: sorting alone (κ = K) > Baseline", ">",
        [cmp("", f"rankseg_k{num_classes}", ">", "baseline", f"RankSeg κ={num_classes}", "Baseline")],
        PAPER["table4_k"] * pts, "Table 4, COCO-Stuff κ = K = 171")
    add("Table 4: RankSeg > Baseline at every other κ", ">",
        [cmp("", f"rankseg_k{kap}", ">", "baseline", f"RankSeg κ={kap}", "Baseline") for kap in sweep
         if kap != num_classes], PAPER["table4_min"] * pts, "Table 4, COCO-Stuff, smallest gain")
    evals = sorted(int(n.split("kappa")[1]) for n in seeds if n.startswith("rankseg/kappa"))
    # The range the paper tried (25..100 for a kappa of 50).
    add(f"§4.2: the evaluation κ (κ/2 … 2κ) barely changes mIoU (trained with κ = {kappa})", "≈",
        [cmp("", f"rankseg/kappa{kap}", "≈", "rankseg", f"eval κ={kap}", f"eval κ={kappa}") for kap in evals
         if kappa / 2 <= kap <= 2 * kappa], PAPER["eval_kappa"] * pts, "§4.2, COCO-Stuff: largest change 0.09")
    thr = sorted((n.split("thr")[1] for n in seeds if n.startswith("rankseg/thr")), key=float, reverse=True)
    add("Suppl. Table 5: dynamic κ > Baseline at every threshold", ">",
        [cmp("", f"rankseg/thr{t}", ">", "baseline", f"dynamic κ (t = {t})", "Baseline") for t in thr],
        PAPER["dynamic_min"] * pts, "supplement Table 5, COCO-Stuff, smallest gain")
    add("Suppl. Table 5: dynamic κ no better than fixed κ", "≈",
        [cmp("", f"rankseg/thr{t}", "≈", "rankseg", f"dynamic κ (t = {t})", f"fixed κ={kappa}") for t in thr],
        PAPER["dynamic_gap"] * pts, "supplement Table 5: fixed κ 0.34 above the best threshold")
    weights = sorted(float(n.split("ml_w")[1]) for n in seeds if n.startswith("ml_w"))
    add("Table 5: ml loss weight 10 is best", ">",
        [cmp("", "rankseg", ">", f"ml_w{w:g}", "weight 10", f"weight {w:g}") for w in weights],
        PAPER["table5_min"] * pts, "Table 5, COCO-Stuff, smallest gap (weights 1, 20)")
    heads = sorted(n.split("ml_", 1)[1] for n in seeds if n.startswith("ml_") and not n.startswith("ml_w"))
    add("Table 6: the 1× TranEnc ml head is best", ">",
        [cmp("", "rankseg", ">", f"ml_{h}", ML_HEAD_NAMES["tranenc"], ML_HEAD_NAMES.get(h, h)) for h in heads],
        PAPER["table6_min"] * pts, "Table 6, COCO-Stuff, smallest gap")
    add(f"Fig. 7: 1/τ decreases with rank (Spearman ρ < 0, κ = {kappa})", "<",
        [cmp("", "rho/rankseg", "<", 0.0, "ρ", "0")], None, "Fig. 7 (curves only)")
    for c in out:
        c.needs_ranking = c.claim.split(":")[0] in RANKING_CLAIMS and c.claim != "Table 1: +MT > Baseline" \
            and "no better than" not in c.claim
        for part in c.parts:
            part.claim = c.claim
    return out


# Claims about what a learned selection does: they test the paper's mechanism only where its
# precondition holds (the ml head ranks better than the decoder's own ranking, P1).
RANKING_CLAIMS = ("Table 1", "Table 2", "Table 3", "Table 4", "Suppl. Table 5", "Table 5", "Table 6")
PAPER_PRECONDITION = (62.52 - 58.55) * 0.01  # §4.2: ml head mAP 62.52 vs 58.55 from the segmentation


def precondition_claim(ml_map: list[float], decoder_map: list[float], ml_scene: list[float] | None = None,
                       decoder_scene: list[float] | None = None) -> Claim:
    """P1, the paper's precondition (§4.2), paired by seed: RankSeg's ml head ranks an image's
    classes better than the ranking read off the full-K decoder's output (the baseline run of
    the same seed): mAP, and on the synthetic world scene accuracy (the paper gives the mAP gap
    only; the scene accuracy is held to the same number of points)."""
    parts = [compare("", "ml head mAP", ml_map, ">", "decoder ranking mAP", decoder_map)]
    if ml_scene is not None and decoder_scene is not None:
        parts.append(compare("", "ml head scene accuracy", ml_scene, ">", "decoder scene accuracy", decoder_scene))
    c = Claim("P1 (§4.2): the ml head out-ranks the decoder's own ranking", ">", parts, PAPER_PRECONDITION,
              "§4.2, COCO-Stuff: mAP 62.52 vs 58.55")
    for part in c.parts:
        part.claim = c.claim
    return c


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
