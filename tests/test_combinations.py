"""The runs researchers launch, end to end on the demo model: a recipe with flags overriding it, in one process or on
2 ranks (torchrun, gloo: DDP or FSDP2), with held-out evaluation, killed by the cluster (SIGKILL) after a checkpoint
and resumed, in every loss family, with gradient checkpointing or micro-batches, in fp32 or bf16.

Every combination would be 3 x 2 x 2 x 4 x 3 x 2 x 2 = 576 runs, so RUNS is a covering array: any two values of two
different factors meet in at least one run (test_runs_cover_every_pair computes it from the table). Each run must
exit 0 and its final/ must load in transformers and give our logits. A killed run must end, after --resume, with the
final weights (bit for bit) and the metrics.jsonl rows of its uninterrupted twin; a DDP or FSDP2 run must log the
metrics of the same run in one process, within rounding. Twins and one-process references are derived from the
table (`needed`), each run once, shared where two rows need the same run.

Every run: 32 pairs (12 easy, 20 difficult by score margin, so routing sends whole and partial batches to SFT), batch
8, 4 steps, a checkpoint every 2 steps, held-out evaluation every 2 steps on 16 pairs; a killed run is SIGKILLed (its
torchrun agent and every rank) at its 4th optimizer step, after the step-2 checkpoint and step 3's metrics row.
"""
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from model import CausalLM

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}

Run = namedtuple("Run", "layout eval kill loss memory dtype recipe")
FACTORS = {  # every value of every factor; the loss factor is covered by kind (KIND)
    "layout": ("one", "ddp", "fsdp"), "eval": ("eval", "no-eval"), "kill": ("fresh", "killed"),
    "loss": ("reference", "state", "batch-stats", "routed"), "memory": ("grad-ckpt", "micro", "neither"),
    "dtype": ("fp32", "bf16"), "recipe": ("recipe", "flags")}
KIND = {"dpo": "reference", "lmpo": "state", "kto": "batch-stats", "amapo": "batch-stats", "mixdpo": "routed",
        "simpo+route": "routed"}
RECIPES = {"dpo": "yao-dpo", "lmpo": "lmpo-mistral-7b-base", "amapo": "amapo-llama-3-8b-instruct",
           "mixdpo": "mixdpo-mistral-7b-base"}  # a recipe row runs this recipe; its flags override batch size, order

RUNS = [Run(*row.split()) for row in """
    one   eval     killed  kto          neither    fp32  flags
    one   no-eval  killed  mixdpo       grad-ckpt  fp32  recipe
    one   no-eval  fresh   dpo          neither    bf16  flags
    one   no-eval  fresh   lmpo         micro      fp32  flags
    ddp   no-eval  killed  dpo          micro      fp32  recipe
    ddp   no-eval  fresh   lmpo         grad-ckpt  bf16  recipe
    ddp   no-eval  fresh   kto          grad-ckpt  bf16  flags
    ddp   eval     fresh   simpo+route  neither    fp32  flags
    fsdp  eval     killed  lmpo         neither    bf16  recipe
    fsdp  eval     fresh   dpo          grad-ckpt  fp32  flags
    fsdp  no-eval  fresh   amapo        micro      fp32  recipe
    fsdp  eval     fresh   mixdpo       micro      bf16  flags
""".strip().splitlines()]
STEPS, SAVE_EVERY, EVAL_EVERY, KILL_AT_STEP = 4, 2, 2, 4
TRL_KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "sft_fraction")
# One process vs 2 ranks differ by summation order only (fp32: a summed log-prob of ~40 nats moves by ~1e-5, a
# reward by β times that); in bf16 also by where the rounding falls (FSDP2 computes with bf16 weights, its
# mixed-precision policy; one process with fp32 weights under bf16 autocast)
TOLERANCE = {"fp32": dict(rel=1e-4, abs=1e-5), "bf16": dict(rel=2e-2, abs=2e-3)}


def twin(run: Run) -> Run:
    """The uninterrupted run a killed-and-resumed run must equal."""
    return run._replace(kill="fresh")


def reference(run: Run) -> Run:
    """The one-process run a 2-rank run must log the metrics of."""
    return run._replace(layout="one", kill="fresh")


def needed(rows) -> list[Run]:
    """The rows, then the twins and references they need, each once."""
    out = list(rows)
    for run in rows:
        out += [twin(run)] * (run.kill == "killed") + [reference(run)] * (run.layout != "one")
    return list(dict.fromkeys(out))


def flags(run: Run, files: dict) -> list[str]:
    world = 1 if run.layout == "one" else 2
    loss = ["--loss", "simpo", "--route-difficult"] if run.loss == "simpo+route" else ["--loss", run.loss]
    return ["--demo", "--data", files["train"], "--eval-data", files["test"], "--cache-dir", files["cache"],
            "--batch-size", "8", "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY),
            "--eval-every", str(EVAL_EVERY), "--log-every", "1", "--dtype", run.dtype,
            *(["--recipe", RECIPES[run.loss]] if run.recipe == "recipe" else loss),
            *(["--order", "per-epoch"] if KIND[run.loss] == "routed" else []),  # difficult pairs within 4 steps
            *{"grad-ckpt": ["--grad-checkpointing"], "neither": [],
              "micro": ["--micro-batch-size", str(4 // world)]}[run.memory],  # 2 micro-batches, as many pairs each
            *(["--eval-split", ""] if run.eval == "no-eval" else []), *(["--fsdp"] if run.layout == "fsdp" else [])]


def launch(run: Run, files: dict, out: Path, *extra: str, kill: bool = False) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if run.layout != "one" else []
    script = ROOT / ("tests/crash_after.py" if kill else "train.py")
    env = {**ENV, "KILL_AT_STEP": str(KILL_AT_STEP)} if kill else ENV
    return subprocess.run([sys.executable, *launcher, str(script), *flags(run, files), "--out-dir", str(out), *extra],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def execute(run: Run, files: dict) -> dict:
    """Run it (killed: launch, SIGKILL at step KILL_AT_STEP, then --resume); its folder and processes."""
    out = files["top"] / "-".join(run)
    procs = [launch(run, files, out, kill=run.kill == "killed")]
    if run.kill == "killed":
        procs.append(launch(run, files, out, "--resume"))
    return {"out": out, "procs": procs}


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict[Run, dict]:
    """Every run the chosen rows need (all of RUNS, or what -k selects), done: the one-process runs two at a time (a
    core each), then the 2-rank runs one by one. The demo model and the reference caches they share are built first,
    so that concurrent runs only read them."""
    top = tmp_path_factory.mktemp("combinations")
    rows = [json.loads(line) for line in open(ROOT / "demo/train.jsonl")]
    easy = [r for r in rows if r["score_chosen"] - r["score_rejected"] >= 0.5]
    hard = [r for r in rows if r["score_chosen"] - r["score_rejected"] < 0.5]
    (top / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in easy[:12] + hard[:20]))
    (top / "test.jsonl").write_text("".join(open(ROOT / "demo/test.jsonl").readlines()[:16]))
    files = {"top": top, "train": str(top / "train.jsonl"), "test": str(top / "test.jsonl"),
             "cache": str(top / "cache")}
    selected = {item.callspec.params["run"] for item in request.session.items  # this module's test_run rows chosen
                if item.nodeid.startswith(request.node.nodeid + "::test_run[")}
    runs = needed([run for run in RUNS if run in selected])
    for run in runs:  # the shared inputs, in this process: the demo model, each reference cache a run reads
        args = train.get_args([f for f in flags(run, files) if f != "--fsdp"])
        model_dir = train.model_folder(args, 0)
        for source, split in ((args.data, args.split), (args.eval_data, args.eval_split)):
            if train.needs_ref(args) and split:
                train.load_pairs(args, model_dir, source, split, torch.device("cpu"), 0)
    done = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {run: pool.submit(execute, run, files) for run in runs if run.layout == "one"}
        done |= {run: job.result() for run, job in jobs.items()}
    done |= {run: execute(run, files) for run in runs if run.layout != "one"}
    return done


def metrics(result: dict) -> list[dict]:
    return [json.loads(line) for line in open(result["out"] / "metrics.jsonl")]


def final_weights(result: dict) -> dict:
    return load_file(str(result["out"] / "final" / "model.safetensors"))


def test_runs_cover_every_pair():
    """Every value of every factor meets every value of every other factor in some row of RUNS; every loss of KIND
    runs; a recipe row runs a loss that has a recipe."""
    assert tuple(FACTORS) == Run._fields
    seen = {(a, x, b, y) for run in RUNS for (a, x), (b, y) in itertools.combinations(
        zip(FACTORS, run._replace(loss=KIND[run.loss])), 2)}
    missing = [(a, x, b, y) for a, b in itertools.combinations(FACTORS, 2) for x in FACTORS[a] for y in FACTORS[b]
               if (a, x, b, y) not in seen]
    assert not missing, missing
    assert {run.loss for run in RUNS} == set(KIND)
    assert all(run.loss in RECIPES for run in RUNS if run.recipe == "recipe")
    assert all(getattr(run, f) in values for run in RUNS for f, values in FACTORS.items() if f != "loss")


@pytest.mark.parametrize("run", RUNS, ids=["-".join(run) for run in RUNS])
def test_run(run, results):
    result = results[run]
    *killed, last = result["procs"]
    assert all(p.returncode == -9 for p in killed), [p.stderr[-3000:] for p in killed]  # SIGKILL, not a crash
    assert last.returncode == 0, last.stderr[-3000:]
    args = json.loads((result["out"] / "args.json").read_text())
    if run.recipe == "recipe":  # the recipe's values, but the flags' batch size
        assert args["recipe"] == RECIPES[run.loss] and args["batch_size"] == 8 and args["loss"] == run.loss
    assert_transformers_logits_equal_ours(result["out"] / "final")
    rows = metrics(result)
    assert [(r["step"], "loss" in r) for r in rows] == expected_rows(run)
    if run.kill == "killed":  # resumed: the uninterrupted run's weights bit for bit, and its rows (but the timings)
        a, b = final_weights(result), final_weights(results[twin(run)])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        untimed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
        assert untimed(rows) == untimed(metrics(results[twin(run)]))
    if run.layout != "one":
        assert_metrics_close(rows, metrics(results[reference(run)]), run.dtype)


def assert_metrics_close(rows: list[dict], one: list[dict], dtype: str) -> None:
    """A 2-rank run's metrics rows = the one-process run's: the same steps, every TRL metric (eval_ too) within
    TOLERANCE, and the same accuracies in fp32 once the policy has moved. An accuracy counts the margins above 0, so
    it is noise where rounding is the size of the margins: where the policy is still the reference (step 0's
    evaluation, step 1's training row: reference-based margins are 0 up to rounding), and in bf16 (~1e-3 rounding
    of a log-prob, early margins ~1e-2); the margins themselves are compared everywhere."""
    assert [(r["step"], "loss" in r) for r in rows] == [(r["step"], "loss" in r) for r in one]
    for r1, r2 in zip(one, rows):
        moved = r1["step"] > (1 if "loss" in r1 else 0)
        for key in [k for k in r1 if k.removeprefix("eval_") in TRL_KEYS]:
            if not key.endswith("accuracies"):
                assert r2[key] == pytest.approx(r1[key], **TOLERANCE[dtype]), (r1["step"], key)
            elif moved and dtype == "fp32":
                assert r2[key] == r1[key], (r1["step"], key)


def expected_rows(run: Run) -> list[tuple[int, bool]]:
    """(step, is a training row) of each metrics.jsonl row: the training row of every step, and with evaluation on,
    the held-out row of steps 0, 2 and 4 (the end), logged after the training row of the same step."""
    return [row for step in range(STEPS + 1) for row in [(step, True)] * (step > 0)
            + [(step, False)] * (run.eval == "eval" and step % EVAL_EVERY == 0)]


def assert_transformers_logits_equal_ours(folder: Path) -> None:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = CausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=0)
