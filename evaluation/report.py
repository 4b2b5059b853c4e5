"""Runs side by side: the training diagnostics of `evaluate.py diagnostics` and the results table and plots of
`evaluate.py report`.

A run folder is what train.py writes (args.json, metrics.jsonl) plus what evaluate.py wrote into it: prefs.json
(`evaluate.py prefs --out RUN/prefs.json`), AlpacaEval's judge_results.json and MT-Bench's mt_bench_results.json
(`evaluate.py judge`, next to the answers, e.g. RUN/alpaca_eval/ and RUN/mt_bench/). Each is optional; a run holding
two results of one benchmark is an error (say which to keep by moving the other).

Metric names are TRL's: `learning_rate`, held-out metrics prefixed `eval_` (`eval_rewards/margins`). Older runs
logged `lr` and `eval/...`; rows are read in either form and renamed to TRL's (normalise).
"""
import csv
import json
import math
from pathlib import Path

import numpy as np

import data
import losses
from infra import cli, provenance
from infra.cli import UserError, read_json


def normalise(row: dict) -> dict:
    """A metrics.jsonl row with TRL's names: lr -> learning_rate, eval/x -> eval_x (other keys unchanged)."""
    return {"learning_rate" if k == "lr" else "eval_" + k[5:] if k.startswith("eval/") else k: v
            for k, v in row.items()}


def read_metrics(run: str) -> tuple[list[dict], int]:
    """Rows of RUN/metrics.jsonl (or of the file itself), with TRL's names, and the number of unparsable lines
    skipped (a killed run leaves a torn last line)."""
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise UserError(f"diagnostics: {path} not found; pass run folders containing metrics.jsonl")
    lines = data.read_records(path, strict=False)
    rows = [normalise(r) for r in lines if isinstance(r, dict)]
    return rows, len(lines) - len(rows)


def series(rows, key) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows holding a finite number under key; step = row["step"], else the row index."""
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def run_summary(rows) -> dict:
    """Start and end (means of the first and last 10% of points) of the log-prob and reward curves, train and eval;
    likelihood displacement (Razin et al. 2024: the chosen answers' log-prob falls although the margin grows); every
    '*active*' metric (hinge active-pair fraction, overall and per length bucket); quantiles of the logged margins."""
    out = {}
    keys = [p + k for p in ("", "eval_") for k in ("logps/chosen", "logps/rejected", "rewards/margins",
                                                  "rewards/accuracies")]
    for key in keys + sorted({k for r in rows for k in r if "active" in k}):
        if (v := series(rows, key)[1]).size:
            k = max(1, v.size // 10)
            out[key] = {"start": float(v[:k].mean()), "end": float(v[-k:].mean()), "mean": float(v.mean()),
                        "n": int(v.size)}
    for p in ("", "eval_"):
        if p + "logps/chosen" in out:
            out[p + "likelihood_displacement"] = out[p + "logps/chosen"]["end"] < out[p + "logps/chosen"]["start"]
    if (m := series(rows, "eval_rewards/margins")[1]).size or (m := series(rows, "rewards/margins")[1]).size:
        out["margins_quantiles"] = dict(zip(("p10", "p50", "p90"), np.percentile(m, [10, 50, 90]).tolist()))
    return out


def margin_kind(run: str) -> str:
    """What a run's reward margin measures, from its args.json loss: β·(log-ratio) with a reference model, the
    loss's own reward without one, or unknown. Margins of different kinds are never drawn on one axis."""
    args = optional_json(Path(run) / "args.json") if Path(run).is_dir() else None
    loss = (args or {}).get("loss")
    return "unknown" if loss not in losses.LOSSES else "reference-based" if loss in losses.NEEDS_REF \
        else "reference-free"


MARGIN_UNITS = {"reference-based": "β·(log π/π_ref of chosen − of rejected), nats",
                "reference-free": "the loss's reward margin (e.g. SimPO: β·mean log-prob per token)",
                "unknown": "reward units of the run's loss (no args.json)"}


def plot_curves(axes: dict, runs: dict) -> None:
    """Training curves of runs {name: (rows, kind)} on axes {"logps", "accuracy", "active", ("margin", kind),
    ("hist", kind)} (each optional). x: optimizer step; log-probs summed over the answer's tokens, in nats."""
    def line(ax, key, rows, style, **kw):
        if (xy := series(rows, key))[0].size:
            ax.plot(*xy, style, ms=3, **kw)
    for c, (name, (rows, kind)) in enumerate(runs.items()):
        color, label = f"C{c}", Path(name).name or name
        for panel, keys in (("logps", ("logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected")),
                            ("accuracy", ("rewards/accuracies", "", "eval_rewards/accuracies"))):
            for key, style in zip(keys, ("-", "--", "o-", "o--")):
                if panel in axes and key:
                    line(axes[panel], key, rows, style, color=color, label=f"{label} {key}")
        if ("margin", kind) in axes:
            line(axes["margin", kind], "rewards/margins", rows, "-", color=color, label=f"{label} train")
            line(axes["margin", kind], "eval_rewards/margins", rows, "o-", color=color, label=f"{label} eval")
        if "active" in axes:
            for j, key in enumerate(sorted({k for r in rows for k in r if "active" in k})):
                line(axes["active"], key, rows, ["-", "--", ":", "-."][j % 4], color=color, label=f"{label} {key}")
        if ("hist", kind) in axes:
            axes["hist", kind].hist(series(rows, "rewards/margins")[1], bins=30, alpha=0.5, color=color, label=label)
    labels = {"logps": ("summed log-probs (chosen solid, rejected dashed, eval o)", "log-prob (nats)"),
              "accuracy": ("reward accuracy (train solid, held-out o)", "fraction of pairs, chosen reward higher"),
              "active": ("hinge active-pair fraction", "fraction of pairs")}
    for key, ax in axes.items():
        if isinstance(key, tuple):
            title = f"{'reward margin' if key[0] == 'margin' else 'logged train margins'}, {key[1]} losses"
            ylabel = MARGIN_UNITS[key[1]] if key[0] == "margin" else "rows of metrics.jsonl"
            ax.set_xlabel(f"margin: {MARGIN_UNITS[key[1]]}" if key[0] == "hist" else "optimizer step", fontsize=8)
        else:
            title, ylabel = labels[key]
            ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)


def figure(panels: list, projection: dict | None = None):
    """A figure of len(panels) axes, 3 per row, returned as {panel: ax}; matplotlib is imported here (optional)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = -(-len(panels) // 3)
    fig = plt.figure(figsize=(15, 4.3 * rows))
    axes = {p: fig.add_subplot(rows, 3, i + 1, projection=(projection or {}).get(p)) for i, p in enumerate(panels)}
    return fig, axes, plt


def cmd_diagnostics(args) -> dict:
    """`evaluate.py diagnostics`: a text table, JSON and (with matplotlib) plots of the runs' training curves."""
    runs = {str(r): read_metrics(r) for r in args.runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, lines = {name: {"bad_lines": bad, **run_summary(rows)} for name, (rows, bad) in runs.items()}, []
    for name, s in summary.items():
        lines.append(f"== {name}" + (f"  ({s['bad_lines']} unparsable lines skipped)" if s["bad_lines"] else ""))
        for key, val in s.items():
            if isinstance(val, dict):
                lines.append(f"  {key:<40} " + "  ".join(f"{k}={x:.4g}" for k, x in val.items()))
            elif key.endswith("likelihood_displacement"):
                lines.append(f"  {key:<40} {'YES: logps/chosen fell' if val else 'no: logps/chosen did not fall'}")
    print("\n".join(lines))
    (out / "diagnostics.txt").write_text("\n".join(lines) + "\n")
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=2))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("diagnostics: matplotlib is not installed: text table only (pip install matplotlib for plots)")
        return summary
    curves = {name: (rows, margin_kind(name)) for name, (rows, _) in runs.items()}
    kinds = list(dict.fromkeys(k for _, k in curves.values()))
    fig, axes, plt = figure(["logps", "accuracy", "active"] + [("margin", k) for k in kinds] +
                            [("hist", k) for k in kinds])
    plot_curves(axes, curves)
    fig.tight_layout()
    fig.savefig(out / "diagnostics.png", dpi=100)
    plt.close(fig)
    print(f"diagnostics: wrote {out / 'diagnostics.png'}, diagnostics.txt, diagnostics.json")
    return summary


# ----------------------------------------------------------------------------- the results table
def optional_json(path: Path) -> dict | None:
    """A JSON object file's content (cli.read_json: UserError if it is damaged), None if there is no such file."""
    return read_json(path) if path.is_file() else None


def find_one(run: Path, name: str):
    """The content of the one file `name` under run (judge caches excepted), None if there is none."""
    found = [p for p in sorted(run.rglob(name)) if "judge_cache" not in p.parts]
    if len(found) > 1:
        raise UserError(f"{run}: {len(found)} files named {name} ({', '.join(map(str, found))}); the report reads "
                        f"one per run: move the others out of the run folder")
    return optional_json(found[0]) if found else None


def read_run(run: str) -> dict:
    """Everything the report shows about one run folder."""
    path = Path(run)
    if not path.is_dir():
        raise UserError(f"report: {run} is not a run folder")
    args = optional_json(path / "args.json") or {}
    rows = read_metrics(path)[0] if (path / "metrics.jsonl").is_file() else []
    prefs = optional_json(path / "prefs.json")
    alpaca, mt = find_one(path, "judge_results.json"), find_one(path, "mt_bench_results.json")
    if not (args or rows or prefs or alpaca or mt):
        raise UserError(f"report: {run} holds no run (no args.json, metrics.jsonl, prefs.json, judge_results.json or "
                        "mt_bench_results.json); pass the folders train.py wrote (its --out-dir)")
    evals = [r for r in rows if isinstance(r.get("eval_rewards/accuracies"), (int, float))]
    held = ({"acc": prefs.get("rewards/accuracies"), "margin": prefs.get("rewards/margins"), "from": "prefs.json"}
            if prefs else {"acc": evals[-1]["eval_rewards/accuracies"], "margin": evals[-1].get("eval_rewards/margins"),
                           "from": f"metrics.jsonl step {evals[-1].get('step')}"} if evals else {})
    hp = {"lr": args.get("learning_rate", args.get("lr")), "epochs": args.get("epochs"),
          "batch": args.get("batch_size"), **(args.get("hparams") or {})}
    return {"name": path.name, "path": str(path), "loss": args.get("loss"), "kind": margin_kind(run),
            "hparams": {k: v for k, v in hp.items() if v is not None}, "rows": rows,
            "alpaca": alpaca, "mt": mt,
            "held": held, "code": provenance.run_code(path)}


def table_row(r: dict) -> dict:
    """One CSV row: numbers as numbers, missing ones empty."""
    a, m, h = r["alpaca"] or {}, r["mt"] or {}, r["held"]
    return {"run": r["name"], "loss": r["loss"], "hyperparameters": " ".join(f"{k}={v:g}" if isinstance(v, float)
                                                                            else f"{k}={v}"
                                                                            for k, v in r["hparams"].items()),
            "alpaca_wr": a.get("win_rate"), "alpaca_wr_se": a.get("standard_error"),
            "alpaca_lc": a.get("length_controlled_winrate"), "alpaca_lc_se": a.get("lc_standard_error"),
            "avg_length_chars": a.get("avg_length"), "mt_bench_turn_1": m.get("turn_1"),
            "mt_bench_turn_2": m.get("turn_2"), "mt_bench_mean": m.get("mean"), "heldout_reward_accuracy": h.get("acc"),
            "heldout_reward_margin": h.get("margin"), "heldout_from": h.get("from"),
            "alpaca_judge": a.get("annotator"), "mt_bench_judge": m.get("judge_model"), "path": r["path"],
            "commit": r["code"]["commit"], "dirty": r["code"]["dirty"]}


def markdown(rows: list[dict]) -> str:
    def num(x, fmt=".1f"):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}"

    def pm(x, se):
        return "–" if x is None else f"{num(x)} ± {num(se)}"
    commits, commit_note = provenance.commit_cells(rows)  # ≠: another commit than most rows; +dirty
    head = ("| run | loss | hyperparameters | AlpacaEval WR (%) | LC WR (%) | avg length (chars) | MT-Bench turn 1 | "
            "turn 2 | mean | held-out reward acc. | held-out margin | commit |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row, commit in zip(rows, commits):
        lines.append(f"| {row['run']} | {row['loss'] or '–'} | {row['hyperparameters'] or '–'} | "
                     f"{pm(row['alpaca_wr'], row['alpaca_wr_se'])} | {pm(row['alpaca_lc'], row['alpaca_lc_se'])} | "
                     f"{num(row['avg_length_chars'], '.0f')} | {num(row['mt_bench_turn_1'], '.2f')} | "
                     f"{num(row['mt_bench_turn_2'], '.2f')} | {num(row['mt_bench_mean'], '.2f')} | "
                     f"{num(row['heldout_reward_accuracy'], '.3f')} | {num(row['heldout_reward_margin'], '.3f')} | "
                     f"{commit} |")
    judges = sorted({f"AlpacaEval: {row['alpaca_judge']}" for row in rows if row["alpaca_judge"]} |
                    {f"MT-Bench: {row['mt_bench_judge']}" for row in rows if row["mt_bench_judge"]})
    notes = ["", "WR: AlpacaEval win rate against the reference outputs; LC: alpaca_eval's length-controlled win rate "
             "(± standard error). MT-Bench: FastChat single-answer grades, 1–10. Held-out reward accuracy and margin: "
             "prefs.json if the run has one, else the last eval_ row of metrics.jsonl.", "",
             "Judges: " + ("; ".join(judges) or "none"), "", commit_note]
    return "\n".join(lines + notes) + "\n"


def plot_report(runs: list[dict], path: Path, title: str = "") -> dict:
    """MT-Bench category radar, AlpacaEval WR/LC bars with standard errors, training curves, one PNG; returns each
    axis's title -> its x label (the radar: its categories), y label and line labels."""
    kinds = list(dict.fromkeys(r["kind"] for r in runs if r["rows"]))
    fig, axes, plt = figure(["radar", "bars", "logps", "accuracy"] + [("margin", k) for k in kinds],
                            {"radar": "polar"})
    if title:
        fig.suptitle(title, fontsize=10)
    cats = sorted({c for r in runs if r["mt"] for c in r["mt"]["categories"]})
    angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False).tolist()
    ax = axes["radar"]
    for c, r in enumerate(runs):
        if r["mt"] and cats:
            v = [r["mt"]["categories"].get(k, {}).get("mean") or 0.0 for k in cats]
            ax.plot(angles + angles[:1], v + v[:1], "o-", color=f"C{c}", ms=3, label=r["name"])
            ax.fill(angles + angles[:1], v + v[:1], color=f"C{c}", alpha=0.1)
    ax.set_xticks(angles, cats, fontsize=8)
    ax.set_ylim(0, 10)
    ax.set_title("MT-Bench score by category (1–10, both turns)", fontsize=9)
    ax = axes["bars"]
    x, width = np.arange(len(runs)), 0.38
    for j, (key, se, label) in enumerate((("win_rate", "standard_error", "win rate"),
                                          ("length_controlled_winrate", "lc_standard_error", "LC win rate"))):
        vals = [(r["alpaca"] or {}).get(key, math.nan) for r in runs]
        errs = [(r["alpaca"] or {}).get(se, math.nan) for r in runs]
        ax.bar(x + (j - 0.5) * width, vals, width, yerr=errs, capsize=3, label=label, color=f"C{j}")
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [r["name"] for r in runs], fontsize=8, rotation=15)
    ax.set_xlabel("run", fontsize=8)
    ax.set_ylabel("% of instructions (± standard error)", fontsize=8)
    ax.set_title("AlpacaEval vs the reference outputs", fontsize=9)
    ax.legend(fontsize=7)
    plot_curves({k: a for k, a in axes.items() if k not in ("radar", "bars")},
                {r["name"]: (r["rows"], r["kind"]) for r in runs if r["rows"]})
    if any(r["mt"] for r in runs):
        axes["radar"].legend(fontsize=7, loc="lower left", bbox_to_anchor=(-0.25, -0.15))
    info = {ax.get_title(): {"x": [t.get_text() for t in ax.get_xticklabels()] if key == "radar" else ax.get_xlabel(),
                             "y": ax.get_ylabel(), "lines": [x.get_label() for x in ax.get_lines()
                                                             if not x.get_label().startswith("_")]}
            for key, ax in axes.items()}
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return info


def cmd_report(args) -> list[dict]:
    """`evaluate.py report`: report.md, report.csv and (with matplotlib) report.png in --out."""
    runs = [read_run(r) for r in args.runs]
    rows = [table_row(r) for r in runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    cli.atomic_write(out / "report.md", lambda p: p.write_text(text))

    def write_csv(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    cli.atomic_write(out / "report.csv", write_csv)
    print(text)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("report: matplotlib is not installed: table only (pip install matplotlib for plots)")
        return rows
    plot_report(runs, out / "report.png", args.title)
    print(f"report: wrote {out / 'report.md'}, report.csv, report.png")
    return rows
