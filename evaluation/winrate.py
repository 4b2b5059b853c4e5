"""AlpacaEval's numbers from alpaca_eval-format annotations, computed as alpaca_eval 0.6 computes them, numpy only.

An annotation is {instruction, output_1, output_2, generator_1, generator_2, preference}: output_1 is the baseline
(reference) answer, output_2 the model's; preference is in [1, 2], 2 = the model's answer is better (a weighted
judge gives any value in between), 1.5 (or the legacy 0) = a draw, null = no verdict.

win_rate (alpaca_eval.metrics.get_winrate): x = preference - 1 over the annotations with a verdict;
win rate 100·mean(x), standard error 100·std(x, ddof=1)/√n, n_wins = #(x > ½), n_wins_base = #(x < ½), n_draws =
#(preference = 1.5), discrete_win_rate = the same mean with each x rounded to 0 or 1 (draws stay ½).

length_controlled (alpaca_eval.metrics.get_length_controlled_winrate, glm_name="length_controlled_v1"; Dubois et al.
2024, arXiv 2404.04475). Training rows: ours, and those of the two "gamed" baselines (the reference model prompted
to be verbose / concise) from the Hub file tatsu-lab/alpaca_eval:df_gamed.csv. Features (no intercept)

    tanh(std_delta_len),  instruction_difficulty,  not_gamed_baseline (1 for ours, 0 for the gamed rows)

with std_delta_len = (len(output_1) - len(output_2)) / their std over our annotations (characters, ddof=1; the gamed
rows carry their own), instruction_difficulty looked up by the annotation's position i (alpaca_eval reads
df_gamed.drop_duplicates("index")["instruction_difficulty"][i], a row label, so annotation i must be AlpacaEval
instruction i: judge all 805 outputs in the benchmark's order), label y = preference - 1 used as a soft label, weight
1 for our rows and λ/2 = 0.1 for each gamed row (the regularisation toward the baselines), rows without a label
dropped. The GLM is sklearn's LogisticRegressionCV(penalty="l1", solver="liblinear", fit_intercept=False, Cs=10,
cv=GroupKFold(5)) on the soft labels (each row duplicated with labels 1 and 0, weights w·y and w·(1-y)): for each C
in logspace(-4, 4, 10) it minimises ||θ||₁ + C·Σ w·CE(y, σ(xθ)) on 4 folds and scores the 5th by -mean(w·CE), sums
the 5 fold scores, keeps the first best C and refits on all rows. GroupKFold puts training rows g and g' in one fold
when g - g' is a multiple of 5 (equal-sized groups, dealt out in turn). LC = 100·mean σ(θ_difficulty·d_i +
θ_not_gamed) over all our annotations (the length term at 0: "had both answers been equally long"), and its standard
error is 100·std(ddof=1)/√n of those per-instruction predictions (alpaca_eval's lc_standard_error).

Identical to alpaca_eval 0.6: the features, weights, labels, folds, C grid, cross-validation score and selection
rule, the refit and the prediction; the win rate and its statistics line for line. Residual difference: the solver.
liblinear stops at tol=1e-4 (relative to the first gradient), l1_logistic below iterates proximal Newton to steps of
1e-12. tests/test_judge.py runs alpaca_eval's own functions on the same annotations: LC and its SE agree within 0.01
points (within 1e-6 once liblinear's tol is 1e-13, and so do the per-C cross-validation scores), the win rate and its
SE to 1e-12 relative, the counts exactly. Where alpaca_eval would divide by a zero length spread (every length
difference equal) we set the length feature to 0; identical generators give LC 50, as there.
"""
import csv
import math
from pathlib import Path

import numpy as np

import data
from infra import hub
from infra.cli import UserError

GAMED_HUB = ("tatsu-lab/alpaca_eval", "df_gamed.csv")  # dataset repo, file
CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV(Cs=10)
N_SPLITS, LAMBDA = 5, 0.2  # GLM_INFO["length_controlled_v1"]: n_splits, regularize_to_baseline_lambda


def win_rate(preferences) -> dict:
    """alpaca_eval's get_winrate on a list of preferences (None/NaN = no verdict, dropped; 0 = a draw)."""
    p = np.array([math.nan if v is None else 1.5 if v == 0 else v for v in preferences], dtype=np.float64)
    x = p[(p >= 1) & (p <= 2)] - 1
    n = x.size
    discrete = np.where(x == 0.5, 0.5, np.round(x))
    return {"win_rate": 100 * x.mean() if n else math.nan,
            "standard_error": 100 * x.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan,
            "n_wins": int((x > 0.5).sum()), "n_wins_base": int((x < 0.5).sum()), "n_draws": int((x == 0.5).sum()),
            "n_total": int(n), "discrete_win_rate": 100 * discrete.mean() if n else math.nan}


def resolve_df_gamed(spec: str) -> Path:
    """A local df_gamed.csv, or spec == "hub": the Hub file (huggingface_hub's cache); UserError if unreachable."""
    if spec != "hub":
        if not Path(spec).is_file():
            raise UserError(f"--df-gamed {spec}: no such file")
        return Path(spec)
    return hub.hub_file(*GAMED_HUB, "dataset", "the length-controlled win rate needs it: download it elsewhere and "
                        "pass --df-gamed PATH, or --no-lc")


def read_df_gamed(path) -> dict:
    """The gamed baselines' rows of df_gamed.csv as arrays (x: [tanh(std_delta_len), difficulty, 0], y: the soft
    label, NaN if none) and the instruction difficulty by row label of the first row of each "index" (alpaca_eval's
    lookup); UserError naming the row of a malformed one."""
    need = ("index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (df_gamed.csv is a UTF-8 CSV)") from None
    if missing := [c for c in need if not rows or c not in rows[0]]:
        raise UserError(f"{path}: not alpaca_eval's df_gamed.csv (no rows, or no column {', '.join(missing)})")
    x, y, difficulty = [], [], {}
    for label, r in enumerate(rows):
        try:
            d, s = float(r["instruction_difficulty"]), float(r["std_delta_len"])
            pref = float(r["preference"]) if r["preference"].strip() else math.nan
        except (ValueError, TypeError, AttributeError):  # not a number, or a short row (None)
            raise UserError(f"{path}: line {label + 2}: a field that should be a number is not") from None
        if not (math.isnan(pref) or 0 <= pref <= 1) or r["not_gamed_baseline"] not in ("True", "False"):
            raise UserError(f"{path}: line {label + 2}: preference must be in [0, 1] and not_gamed_baseline "
                            f"True/False")
        difficulty.setdefault(r["index"], (label, d))
        x.append([math.tanh(s), d, float(r["not_gamed_baseline"] == "True")])
        y.append(pref)
    return {"x": np.array(x), "y": np.array(y), "difficulty": dict(difficulty.values())}


def l1_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, C: float, max_iter: int = 200) -> np.ndarray:
    """argmin_θ ||θ||₁ + C·Σ_i w_i·CE(y_i, σ(x_i·θ)), soft labels y ∈ [0, 1] (liblinear's L1 logistic regression on
    the rows duplicated with labels 1 and 0, weights w·y and w·(1-y)). Proximal Newton: each step minimises the
    quadratic model plus the L1 term by coordinate descent, then backtracks until the objective falls enough."""
    def objective(t):
        z = x @ t
        return np.abs(t).sum() + C * (w * (y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z))).sum()
    theta, f = np.zeros(x.shape[1]), objective(np.zeros(x.shape[1]))
    for _ in range(max_iter):
        q = 1 / (1 + np.exp(-(x @ theta)))
        g = C * x.T @ (w * (q - y))
        h = C * (x.T * (w * q * (1 - q))) @ x
        d = np.zeros_like(theta)
        for _ in range(1000):  # coordinate descent on g·d + ½dᵀhd + ||θ + d||₁
            old = d.copy()
            for j in range(d.size):
                a = h[j, j] + 1e-300
                b = g[j] + h[j] @ d - h[j, j] * d[j]
                u = theta[j] - b / a
                d[j] = np.sign(u) * max(abs(u) - 1 / a, 0.0) - theta[j]
            if np.abs(d - old).max() <= 1e-15 * max(1.0, np.abs(d).max()):
                break
        decrease = g @ d + np.abs(theta + d).sum() - np.abs(theta).sum()
        step = 1.0
        while (new := objective(theta + step * d)) > f + 1e-4 * step * decrease and step > 1e-10:
            step /= 2
        theta, f = theta + step * d, min(new, f)
        if np.abs(step * d).max() <= 1e-12 * max(1.0, np.abs(theta).max()):
            break
    return theta


def length_controlled(annotations: list[dict], gamed: dict) -> dict:
    """LC win rate and its standard error as alpaca_eval's length_controlled_v1 (see the module docstring); also
    the fitted weights (length, difficulty, not gamed), the chosen C and each C's summed cross-validation score."""
    if len({a["generator_2"] for a in annotations}) > 1:
        raise UserError("length-controlled win rate: the annotations hold more than one generator_2 (model)")
    n = len(annotations)
    if annotations and annotations[0]["generator_1"] == annotations[0]["generator_2"]:
        return {"length_controlled_winrate": 50.0, "lc_standard_error": 0.0, "lc_weights": [0.0] * 3, "lc_C": None,
                "lc_cv_scores": None}
    if missing := [i for i in range(n) if i not in gamed["difficulty"]]:
        raise UserError(f"length-controlled win rate: annotation {missing[0]} has no instruction difficulty in "
                        f"df_gamed.csv ({len(gamed['difficulty'])} instructions): annotation i must be AlpacaEval "
                        f"instruction i, in the benchmark's order")
    delta = np.array([len(a["output_1"]) - len(a["output_2"]) for a in annotations], dtype=np.float64)
    sd = delta.std(ddof=1) if n > 1 else 0.0
    diff = np.array([gamed["difficulty"][i] for i in range(n)])
    ours = np.stack([np.tanh(delta / sd) if sd > 0 else np.zeros(n), diff, np.ones(n)], 1)
    pref = np.array([math.nan if a["preference"] is None else a["preference"] for a in annotations], dtype=float)
    x, y = np.concatenate([gamed["x"], ours]), np.concatenate([gamed["y"], np.where(pref == 0, 1.5, pref) - 1])
    w = np.concatenate([np.full(len(gamed["y"]), LAMBDA / 2), np.ones(n)])
    keep = ~np.isnan(y)
    x, y, w = x[keep], y[keep], w[keep]
    fold = (len(y) - 1 - np.arange(len(y))) % N_SPLITS  # GroupKFold: each (duplicated) row is a group
    scores = np.zeros(len(CS))
    for k, C in enumerate(CS):
        for f in range(N_SPLITS):
            theta = l1_logistic(x[fold != f], y[fold != f], w[fold != f], C)
            q = np.clip(1 / (1 + np.exp(-(x[fold == f] @ theta))), 1e-15, 1 - 1e-15)
            yt, wt = y[fold == f], w[fold == f]
            scores[k] -= np.mean(wt * -(yt * np.log(q) + (1 - yt) * np.log(1 - q)))
    best = int(np.argmax(scores))
    theta = l1_logistic(x, y, w, CS[best])
    lc = 1 / (1 + np.exp(-(theta[1] * diff + theta[2])))
    return {"length_controlled_winrate": 100 * lc.mean(),
            "lc_standard_error": 100 * lc.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan,
            "lc_weights": theta.tolist(), "lc_C": float(CS[best]), "lc_cv_scores": scores.tolist()}


def read_annotations(path: str) -> list[dict]:
    """An alpaca_eval annotations file (ours or alpaca_eval's annotations.json); UserError naming the entry."""
    rows = data.read_records(path)
    for i, r in enumerate(rows):
        ok = isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("output_1", "output_2", "generator_1",
                                                                            "generator_2"))
        p = r.get("preference") if ok else "x"
        if not ok or not (p is None or isinstance(p, (int, float)) and (p == 0 or 1 <= p <= 2 or math.isnan(p))):
            raise UserError(f"{data.row_name(path, i)}: needs strings output_1, output_2, generator_1, generator_2 "
                            f"and a preference in [1, 2] (0 = draw, null = none), alpaca_eval's annotation format")
    if not rows:
        raise UserError(f"{path}: no annotations in the file")
    return rows


def scores(annotations: list[dict], df_gamed: str | None) -> dict:
    """Win rate, length-controlled win rate (unless df_gamed is None) and the model's average answer length
    (characters) of alpaca_eval annotations."""
    res = win_rate([a["preference"] for a in annotations])
    if df_gamed is not None:
        res.update(length_controlled(annotations, read_df_gamed(resolve_df_gamed(df_gamed))))
    return res | {"avg_length": float(np.mean([len(a["output_2"]) for a in annotations]))}
