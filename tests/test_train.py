"""train.py end to end on the offline demo (CPU): it learns, resumes exactly, saves atomically, survives NaNs,
runs every loss, and DDP under gloo equals one process; its parts (flags, curriculum, train_step) on their own."""
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import batches
import chat
import data
import losses
import packing
import train
from infra import checkpoint, cli, flags, recipes
from infra.cli import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One reference cache for the module: every demo run starts from the same seeded weights, so it is reused."""
    return tmp_path_factory.mktemp("ref_cache")


def demo(tmp, cache, *extra):
    argv = ["--demo", "--out-dir", str(tmp), "--cache-dir", str(cache), "--dtype", "fp32", *extra]
    return train.main(argv)


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("loss", ["dpo", "simpo", "lmpo"])
def test_demo_learns(loss, tmp_path, cache_dir):
    """Held-out accuracy starts at chance (policy = reference: ties count half) and ends >= 0.9."""
    out = demo(tmp_path, cache_dir, "--loss", loss, "--max-steps", "150")
    evals = [h for h in out["history"] if "eval_rewards/accuracies" in h]
    assert evals[0]["step"] == 0 and 0.3 <= evals[0]["eval_rewards/accuracies"] <= 0.7
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9, evals[-1]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "tokens_per_s", "padding_fraction"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    assert (tmp_path / "final" / "config.json").exists() and (tmp_path / "final" / "tokenizer.json").exists()


@pytest.mark.parametrize("loss", sorted(losses.LOSSES))
def test_every_loss_runs_two_steps(loss, tmp_path, cache_dir):
    out = demo(tmp_path, cache_dir, "--loss", loss, "--max-steps", "2", "--log-every", "1", "--eval-split", "")
    rows = [h for h in out["history"] if "loss" in h]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert all(torch.isfinite(p).all() for p in out["model"].parameters())


def test_fp16_gradscaler_path(tmp_path, cache_dir):
    """The papers' mode: fp16 autocast + GradScaler (emulated on CPU); the scale is logged, steps are taken."""
    out = demo(tmp_path, cache_dir, "--loss", "dpo", "--max-steps", "3", "--log-every", "1", "--eval-split", "",
               "--dtype", "fp16")
    rows = [h for h in out["history"] if "loss" in h]
    assert rows[-1]["fp16_scale"] > 1 and all(math.isfinite(r["loss"]) for r in rows)


def test_loss_flags_resolve_per_loss():
    assert train.get_args(["--loss", "simpo"]).hparams["beta"] == 2.0  # SimPO's default, not DPO's 0.1
    assert train.get_args(["--loss", "dpo"]).hparams["beta"] == 0.1
    assert train.get_args(["--loss", "dpo", "--beta", "0.3"]).hparams["beta"] == 0.3
    with pytest.raises(SystemExit):
        train.get_args(["--loss", "dpo", "--gamma-beta-ratio", "0.5"])  # not a DPO hyperparameter


def test_step0_check_catches_a_wrong_cache(tmp_path, cache_dir, monkeypatch):
    """A cache from other weights must stop training before the first update."""
    real = train.refcache.ref_cache

    def shifted(*a, **k):
        pairs, ref, meta = real(*a, **k)
        for p in pairs:
            p.ref_chosen_logps -= 5.0
        return pairs, ref, meta

    monkeypatch.setattr(train.refcache, "ref_cache", shifted)
    with pytest.raises(UserError, match="step-0 check failed"):
        demo(tmp_path, cache_dir, "--loss", "dpo", "--max-steps", "1", "--eval-split", "")


def test_runs_in_two_dtypes_keep_their_own_reference_cache(tmp_path, capsys):
    """An fp32 and a bf16 run of the same data sharing --cache-dir (a sweep) each keep their own reference cache:
    neither rebuilds, nor (running at the same time) overwrites, the other's."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(open(ROOT / "demo/train.jsonl").readlines()[:8]))
    said = []
    for dtype in ("fp32", "bf16", "fp32", "bf16"):
        args = train.get_args(["--demo", "--data", str(data), "--eval-split", "", "--cache-dir", str(tmp_path / "c"),
                               "--dtype", dtype])
        train.load_pairs(args, train.model_folder(args, 0), args.data, args.split, torch.device("cpu"), 0)
        said.append(capsys.readouterr().out)
    assert all("ref cache: reusing" in out and "rebuilding" not in out for out in said[2:]), said[2:]


def test_unequal_micro_batches_across_ranks_are_refused_where_they_are_collective(tmp_path):
    """A partial batch of 3 on 2 ranks with --micro-batch-size 1 is 2 micro-batches on rank 0 and 1 on rank 1. Where
    each micro-batch is a collective (FSDP2's forwards; the gathered batch statistics of kto, or of the SFT token mean
    under routing) rank 0 would wait forever for rank 1: refused before training; DDP with DPO runs it."""
    plan, pairs = [list(range(8)), [8, 9, 10]], list(range(11))
    for argv, refused in ((["--loss", "kto"], "--loss kto"), (["--loss", "simpo", "--route-difficult"],
                                                              "--route-difficult"), (["--loss", "dpo"], None)):
        args = train.get_args(["--demo", "--micro-batch-size", "1", "--eval-split", "", *argv])
        if refused is None:
            train.check_plan(args, pairs, [], plan, world=2)
            continue
        with pytest.raises(UserError, match=f"{refused}: a partial batch splits into unequal numbers of micro"):
            train.check_plan(args, pairs, [], plan, world=2)


def test_routing_around_a_gathering_loss_over_ranks_needs_pure_batches():
    """--route-difficult around a loss with batch statistics gathered over ranks (lmpo): in a batch mixing easy and
    difficult pairs a rank may hold no easy pair, skip the loss and so its gather, and the others wait forever. Only
    the two-stage orders (batches all easy or all difficult) are allowed over 2 ranks; one process takes any order."""
    plan, pairs = [list(range(8))], list(range(8))
    for order in ("length", "per-epoch", "random"):
        args = train.get_args(["--demo", "--loss", "lmpo", "--route-difficult", "--order", order, "--eval-split", ""])
        with pytest.raises(UserError, match="all easy or all difficult"):
            train.check_plan(args, pairs, [], plan, world=2)
        train.check_plan(args, pairs, [], plan, world=1)
    for order in ("two-stage", "reversed"):
        args = train.get_args(["--demo", "--loss", "lmpo", "--route-difficult", "--order", order, "--eval-split", ""])
        train.check_plan(args, pairs, [], plan, world=2)


def test_resume_is_exact(tmp_path, cache_dir, monkeypatch):
    """6 steps in one go == 3 steps, a crash, and --resume (same schedule, data order, optimizer, loss state)."""
    common = ["--loss", "lmpo", "--max-steps", "6", "--save-every", "3", "--eval-split", ""]
    demo(tmp_path / "straight", cache_dir, *common)
    calls = {"n": 0}
    real_pack = train.packing.pack

    def crashing_pack(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real_pack(*a, **k)

    monkeypatch.setattr(train.packing, "pack", crashing_pack)
    with pytest.raises(KeyboardInterrupt):
        demo(tmp_path / "resumed", cache_dir, *common)
    monkeypatch.setattr(train.packing, "pack", real_pack)
    demo(tmp_path / "resumed", cache_dir, *common, "--resume")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_atomic(tmp_path, cache_dir, monkeypatch):
    """A failed write in the middle of a checkpoint (disk full) is one clear error and leaves the previous checkpoint
    as `latest`, loadable: --resume then finishes the run."""
    common = ["--loss", "dpo", "--max-steps", "4", "--save-every", "2", "--eval-split", ""]
    real = checkpoint.save_file

    def crash(tensors, path, *a, **k):
        if path.endswith("optimizer.safetensors") and "ckpt-000004" in path:
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(UserError, match=r"could not write checkpoint .*ckpt-000004\.tmp \(No space left on device\)"):
        demo(tmp_path, cache_dir, *common)
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == "ckpt-000002"
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000002"] and not (tmp_path / "final").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    out = demo(tmp_path, cache_dir, *common, "--resume")
    assert [h["step"] for h in out["history"] if "loss" in h][-1] == 4 and (tmp_path / "final").is_dir()


def test_nan_loss_stops_without_saving_nans(tmp_path, cache_dir, monkeypatch):
    """IPO patched to return NaN from step 2 on: fp16's scaler skips each bad step (counted, scale halved), the
    run stops after --nan-patience bad steps naming the checkpoint saved before them, metrics.jsonl stays strict
    JSON (NaN written as null and flagged) and nothing after the blow-up is saved or exported."""
    real, calls = losses.LOSSES["ipo"], []

    def nan_ipo(*a, **k):
        calls.append(1)
        per_pair, c, r = real(*a, **k)
        return (per_pair * float("nan") if len(calls) > 2 else per_pair), c, r  # call 1: the parse-time probe

    monkeypatch.setitem(losses.LOSSES, "ipo", nan_ipo)
    with pytest.raises(UserError, match=r"stopping at step 4: 3 consecutive steps had a non-finite loss or "
                                        r"gradients; the last checkpoint before it is .*ckpt-000001"):
        demo(tmp_path, cache_dir, "--loss", "ipo", "--max-steps", "10", "--eval-split", "", "--nan-patience", "3",
             "--dtype", "fp16", "--log-every", "1", "--save-every", "1")
    assert not (tmp_path / "final").exists()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000001"]  # none saved during the bad streak
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
            for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["loss"] is not None and "loss" not in rows[0].get("nonfinite", [])
    assert rows[1]["loss"] is None and "loss" in rows[1]["nonfinite"]
    # every step skipped and counted, the scale halved each time: step 1's inf gradients are the scaler calibrating
    # its initial 65,536 (finite loss: not a bad step), steps 2-4 are the NaNs
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3]
    assert rows[2]["fp16_scale"] == rows[1]["fp16_scale"] / 2 == rows[0]["fp16_scale"] / 4


def test_fsdp_gloo_equals_one_process_and_resumes_exactly(tmp_path, cache_dir):
    """torchrun --fsdp with 2 CPU processes (gloo) and the same global batch: every logged loss, gradient norm and
    margin equals the single-process run's within 1e-5 relative or 1e-6 absolute (only the reduction order
    differs; margins near 0 need the absolute bound); a run killed
    after its step-2 sharded checkpoint and resumed ends with the same final weights, bit for bit; final/ is one
    Hugging Face folder with 0644 files."""
    common = ["--demo", "--loss", "dpo", "--max-steps", "4", "--eval-split", "", "--dtype", "fp32", "--cache-dir",
              str(cache_dir), "--batch-size", "8", "--log-every", "1", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def fsdp(script, *flags, port, crash_at=None):
        extra = {"CRASH_AT_PACK": crash_at} if crash_at else {}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(port), str(script), *common, "--fsdp", *flags], env={**env, **extra}, cwd=ROOT,
                              capture_output=True, text=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--out-dir", str(tmp_path / "one")], check=True,
                   env=env, cwd=ROOT, capture_output=True)
    straight = fsdp(ROOT / "train.py", "--out-dir", tmp_path / "fsdp", port=29541)
    assert straight.returncode == 0, straight.stderr[-3000:]
    rows = [[json.loads(line) for line in open(tmp_path / r / "metrics.jsonl")] for r in ("one", "fsdp")]
    for r1, r2 in zip(*rows, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-6), (r1["step"], key)
    assert (tmp_path / "fsdp" / "ckpt-000004" / "shards").is_dir()  # a sharded checkpoint: every rank its part
    # pack calls per rank: the step-0 check, steps 1 and 2, then step 3 dies (after the step-2 checkpoint)
    crashed = fsdp(ROOT / "tests" / "crash_after.py", "--out-dir", tmp_path / "resumed", port=29542, crash_at="4")
    assert crashed.returncode != 0 and (tmp_path / "resumed" / "ckpt-000002" / "shards").is_dir()
    resumed = fsdp(ROOT / "train.py", "--out-dir", tmp_path / "resumed", "--resume", port=29543)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "fsdp"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() == weights(tmp_path / "one").keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all((f.stat().st_mode & 0o777) == 0o644 for f in (tmp_path / "fsdp" / "final").iterdir())


@pytest.mark.parametrize("flags", [["--loss", "dpo"], ["--loss", "amapo", "--order", "random", "--max-pairs", "19"]],
                         ids=["dpo", "amapo-partial-batch"])
def test_ddp_gloo_equals_one_process(tmp_path, cache_dir, flags):
    """torchrun with 2 CPU processes (gloo) and the same global batch trains like one process: same loss and
    gradient norm at every step (a missing all-reduce or a wrong average changes the norm at step 1). With AMaPO on
    19 pairs in random order the third step is a partial batch of 3, split 2 + 1: its batch statistics are gathered
    from shards of different sizes and its mean is over 3 pairs."""
    common = [str(ROOT / "train.py"), "--demo", *flags, "--max-steps", "3", "--eval-split", "",
              "--dtype", "fp32", "--cache-dir", str(cache_dir), "--batch-size", "8", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "--out-dir", str(tmp_path / "one")], check=True, env=env, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    *common, "--out-dir", str(tmp_path / "two")], check=True, env=env, cwd=ROOT)
    rows = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("one", "two")]
    for r1, r2 in zip(*rows, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-7), (r1["step"], key)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    init = load_file(str(cache_dir / "demo_init-seed42" / "model.safetensors"))
    moved = max((a[k] - init[k]).abs().max().item() for k in init)
    differ = max((a[k] - b[k]).abs().max().item() for k in a)
    # Adam divides by sqrt(v): summation-order rounding in near-zero gradients grows, but stays far below a step
    assert differ < 0.05 * moved, (moved, differ)


def test_loss_flags_have_one_meaning_and_help_shows_defaults(capsys):
    """Every loss hyperparameter name has one documented meaning (HPARAMS) and one flag; --help shows a default for
    every flag (per loss for the loss flags); only the chosen loss's hyperparameters survive resolution."""
    names = {n for key in losses.LOSSES for n in losses.defaults(key)}
    assert names == set(flags.HPARAMS)
    parser = flags.build_parser()
    formatter = cli.HelpFormatter("train.py")
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in formatter._get_help_string(action), action.dest
    text = parser.format_help()
    assert "--label-smoothing" in text and "0.001 (exo)" in text and "--flip-rate" in text
    args = train.get_args(["--loss", "simpo", "--beta", "2.5"])
    assert args.hparams == {"beta": 2.5, "gamma_beta_ratio": 0.5}
    assert not any(hasattr(args, n) for n in names)  # no None-valued flags of other losses in args.json
    with pytest.raises(SystemExit):  # the loss rejects δ >= ln 2 at parse time, before any work
        train.get_args(["--loss", "margin_sigmoid", "--delta", "0.7"])
    assert "delta" in capsys.readouterr().err


def test_curriculum_ramps_only_margin_sigmoid_delta(tmp_path, cache_dir):
    """Yao et al. 2025 §5.4.4: δ goes linearly 0 -> --delta over --curriculum-steps. At step 0 (policy = reference,
    z = 0) margin-sigmoid's loss is ln 2 - δ, so the first logged loss shows which δ the loop used."""
    args = train.get_args(["--loss", "margin_sigmoid", "--delta", "0.2", "--curriculum-steps", "10"])
    assert [train.step_hparams(args, s)["delta"] for s in (0, 5, 10, 20)] == [0.0, 0.1, 0.2, 0.2]
    assert args.hparams["delta"] == 0.2 and train.step_hparams(args, 5)["beta"] == 0.1
    with pytest.raises(SystemExit):
        train.get_args(["--loss", "slic", "--curriculum-steps", "10"])
    first = {}
    for ramp in ("0", "100"):
        out = demo(tmp_path / ramp, cache_dir, "--loss", "margin_sigmoid", "--delta", "0.2", "--curriculum-steps",
                   ramp, "--max-steps", "1", "--log-every", "1", "--eval-split", "")
        first[ramp] = out["history"][0]["loss"]
    assert first["0"] == pytest.approx(math.log(2) - 0.2, abs=1e-5)
    assert first["100"] == pytest.approx(math.log(2), abs=1e-5)


def test_held_out_evaluation_uses_the_delta_of_its_step(tmp_path, cache_dir):
    """Evaluation at step s scores with the δ the training uses at s. With a learning rate too small to move fp32
    weights the policy stays the reference (z = 0), so margin-sigmoid's held-out loss is exactly ln 2 − δ(s):
    δ(s) = 0.2·s/4 at steps 0, 1, 2 (the last is the final evaluation). Evaluating with the unramped δ would read
    ln 2 − 0.2 each time."""
    out = demo(tmp_path, cache_dir, "--loss", "margin_sigmoid", "--delta", "0.2", "--curriculum-steps", "4",
               "--max-steps", "2", "--eval-every", "1", "--lr", "1e-30")
    evals = {h["step"]: h["eval_loss"] for h in out["history"] if "eval_loss" in h}
    assert evals == pytest.approx({0: math.log(2), 1: math.log(2) - 0.05, 2: math.log(2) - 0.1}, abs=1e-5)


def _step(model_dir, pairs, sizes, loss):
    """One train.train_step from a fresh copy of the model, with micro-batches of the given sizes."""
    model = train.CausalLM.from_pretrained(model_dir).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient: updates compare exactly
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    micro = [packing.pack(pairs[s:s + n], 0, budget=512) for s, n in zip(starts, sizes)]
    out = train.train_step(functools.partial(packing.packed_logps, model), opt,
                           torch.amp.GradScaler("cpu", enabled=False), micro, loss, batch_size=sum(sizes),
                           dtype="fp32", grad_clip=1.0)
    return out, model


def test_train_step_is_one_exact_optimizer_step(tiny_model_dir):
    """train_step on its own: the loss is the mean over the global batch, gradient accumulation over micro-batches
    gives the same update as one batch, the grad norm is the unclipped norm, and a NaN loss skips the step."""
    from conftest import make_pref_rows
    pairs, _ = data.tokenize_pairs(make_pref_rows(4), chat.load_tokenizer(tiny_model_dir), 256, 128)
    loss = functools.partial(losses.compute, "simpo")
    model = train.CausalLM.from_pretrained(tiny_model_dir).train()
    score = functools.partial(packing.packed_logps, model)
    want = losses.compute("simpo", batches.pair_logps(score, packing.pack(pairs, 0, budget=512)))[0].mean()
    want.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    whole, m1 = _step(tiny_model_dir, pairs, [4], loss)
    split, m2 = _step(tiny_model_dir, pairs, [1, 3], loss)
    for out in (whole, split):
        assert out["loss"] == pytest.approx(want.item(), rel=1e-5) and out["grad_norm"] == pytest.approx(norm.item())
        assert not out["skipped"] and out["pairs"] == 4 and out["sums"]["loss"] == pytest.approx(4 * want.item())
    moved = [(a - p).abs().max().item() for a, p in zip(m1.parameters(), model.parameters())]
    assert max(moved) > 1e-4  # the step happened
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(m1.parameters(), m2.parameters()))
    nan = lambda t: (lambda out: (out[0] * float("nan"), out[1]))(losses.compute("simpo", t))  # noqa: E731
    out, m3 = _step(tiny_model_dir, pairs, [4], nan)
    assert out["skipped"] and not math.isfinite(out["loss"])
    assert all(torch.equal(a, b) for a, b in zip(m3.parameters(), model.parameters()))  # untouched


@pytest.mark.parametrize("cli, argv, names", [
    ("train.py", ["--demo", "--loss", "dpo", "--data", "missing.jsonl"], "missing.jsonl: no such file"),
    ("refcache.py", ["--model", "no/such/dir/", "--data", "x.jsonl", "--out", "c"], "'no/such/dir/' does not exist"),
    ("evaluate.py", ["diagnostics", "no_run", "--out", "d"], "diagnostics: no_run not found"),
])
def test_cli_user_error_is_one_line_exit_2(cli, argv, names, tmp_path):
    """A user mistake is one line `<cli>: error: ...` on stderr and exit status 2, no traceback."""
    extra = ["--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")] if cli == "train.py" else []
    r = subprocess.run([sys.executable, str(ROOT / cli), *argv, *extra], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"{cli}: error: ") and names in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ----------------------------------------------------------------------------- recipes
def test_every_recipe_resolves_to_its_values_and_flags_override_it():
    """--recipe NAME sets each of its values (loss hyperparameters land in args.hparams); an explicit flag wins."""
    for name, recipe in recipes.RECIPES.items():
        assert recipe["source"] and set(recipe["sources"]) == set(recipe["args"]), name
        args = train.get_args(["--recipe", name])
        resolved = {**vars(args), **args.hparams}
        assert {k: resolved[k] for k in recipe["args"]} == recipe["args"], name
        assert args.recipe == name
    args = train.get_args(["--recipe", "lmpo-mistral-7b-base", "--lr", "1e-6", "--beta", "3", "--epochs", "2"])
    assert (args.lr, args.hparams["beta"], args.epochs) == (1e-6, 3.0, 2)
    assert (args.batch_size, args.schedule, args.warmup_ratio, args.hparams["gamma_beta_ratio"]) == (128, "cosine", 0.1, 0.8)
    assert train.get_args(["--recipe", "mixdpo-mistral-7b-base"]).order == "two-stage"


def test_print_config_and_list_recipes_exit_0_and_touch_nothing(tmp_path):
    """--print-config prints the resolved arguments (what args.json would hold) as JSON; --list-recipes prints every
    recipe with its source; both exit 0 without creating the run folder."""
    common = [sys.executable, str(ROOT / "train.py"), "--out-dir", str(tmp_path / "run")]
    r = subprocess.run([*common, "--recipe", "amapo-llama-3-8b-base", "--beta", "3", "--print-config"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config == json.loads(json.dumps(vars(train.get_args(["--recipe", "amapo-llama-3-8b-base", "--beta", "3",
                                                                "--out-dir", str(tmp_path / "run")]))))
    assert config["hparams"]["beta"] == 3.0 and config["lr"] == 6e-7 and "print_config" not in config
    r = subprocess.run([*common, "--list-recipes"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and all(f"{name}: {recipe['source']}" in r.stdout
                                     for name, recipe in recipes.RECIPES.items()), r.stdout[-2000:]
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())


def test_defaults_are_trls_schedule_and_the_demo_keeps_its_own():
    """Without a recipe the schedule is TRL's (Yao et al.): linear decay from the peak, no warmup; the demo keeps
    cosine with 5% warmup."""
    args = train.get_args([])
    assert (args.schedule, args.warmup_ratio, args.lr, args.batch_size, args.epochs) == ("linear", 0.0, 1e-6, 8, 3)
    assert [train.get_lr(s, 10, args) for s in (0, 5)] == [1e-6, 0.5e-6]
    demo_args = train.get_args(["--demo"])
    assert (demo_args.schedule, demo_args.warmup_ratio, demo_args.order) == ("cosine", 0.05, "length")


# ----------------------------------------------------------------------------- MixDPO's order and routing
MARGINS = [0.2, 3.0, -0.5, 0.5, 1.5, 0.0, 2.5, 0.4, 1.0, 0.1, 0.75, 2.0, 0.3]  # 7 easy (≥ τ = ½, one exactly ½)


def _pairs(margins):
    return [data.Pair([1, 2], [3], [4], row=i, score_chosen=m, score_rejected=0.0,
                      ref_chosen_logps=-m, ref_rejected_logps=0.0) for i, m in enumerate(margins)]


def test_curriculum_batches_orders():
    """13 pairs, batch 4, τ = ½. two-stage: epochs 0-1 the 7 easy pairs easy -> hard ([4, 3] each), epochs 2-3 the 6
    difficult ones ([4, 2]); a margin of exactly τ is easy. reversed: difficult pairs first, each stage hard -> easy.
    per-epoch: all pairs easy -> hard, the single leftover pair joins the last batch ([4, 4, 5]). random: every
    pair, shuffled per seed. discard_difficult: only the easy pairs. ref_margin reads the reference margins."""
    pairs, tau = _pairs(MARGINS), 0.5
    margins = lambda batches: [[MARGINS[i] for i in b] for b in batches]  # noqa: E731
    batch = lambda epoch, **kw: batches.curriculum_batches(pairs, 4, epoch, epochs=2, seed=epoch, min_last=2,  # noqa: E731
                                                        **kw)
    easy, hard = [[3.0, 2.5, 2.0, 1.5], [1.0, 0.75, 0.5]], [[0.4, 0.3, 0.2, 0.1], [0.0, -0.5]]
    assert [margins(batch(e)) for e in range(4)] == [easy, easy, hard, hard]
    assert [margins(batch(e, order="reversed")) for e in range(4)] == [
        [[-0.5, 0.0, 0.1, 0.2], [0.3, 0.4]]] * 2 + [[[0.5, 0.75, 1.0, 1.5], [2.0, 2.5, 3.0]]] * 2
    assert margins(batch(0, order="per-epoch")) == [[3.0, 2.5, 2.0, 1.5], [1.0, 0.75, 0.5, 0.4],
                                                    [0.3, 0.2, 0.1, 0.0, -0.5]]
    shuffled = batch(0, order="random")
    assert sorted(i for b in shuffled for i in b) == list(range(13)) and shuffled != batch(1, order="random")
    assert [len(b) for b in shuffled] == [4, 4, 5]
    assert [margins(batch(e, discard_difficult=True)) for e in range(4)] == [easy, easy, [], []]
    assert sorted(m for b in margins(batch(0, order="random", discard_difficult=True)) for m in b) == [
        0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0]
    by_ref = [[m for m in b] for b in margins(batch(0, difficulty="ref_margin", difficulty_threshold=-tau))]
    assert by_ref == [[-0.5, 0.0, 0.1, 0.2], [0.3, 0.4, 0.5]]  # reference margin = −score margin here
    assert margins(batch(2, difficulty_threshold=0.3)) == [[0.2, 0.1, 0.0, -0.5]]  # 0.3 itself is easy


def test_mixdpo_two_stages_through_train_py(tmp_path, cache_dir, monkeypatch):
    """--loss mixdpo on 13 scored pairs, batch 4, 2 epochs: the steps train the easy pairs easy -> hard twice (batches
    of 4 and 3: the partial batch trains), then the difficult ones twice (4 and 2), 26 pairs in all. Each logged row's
    sft_fraction is the share of its pairs trained with SFT: 0 in stage 1, 1 in stage 2. Routing SimPO with
    --order per-epoch alternates instead: easy -> hard over all pairs each epoch, [4, 4, 5]."""
    rows = [dict(prompt=f"Sort these numbers: {i + 10} {i}", chosen=f"{i} {i + 10}", rejected=f"{i + 10} {i}",
                 score_chosen=5.0 + m, score_rejected=5.0) for i, m in enumerate(MARGINS)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen, real = [], train.train_step

    def spy(scorer, opt, scaler, micro_batches, loss, **kw):
        seen.append([round(float(m), 4) for b in micro_batches for m in b["chosen_scores"] - b["rejected_scores"]])
        assert kw["batch_size"] == len(seen[-1])  # a partial batch's loss is the mean over its own pairs
        return real(scorer, opt, scaler, micro_batches, loss, **kw)

    monkeypatch.setattr(train, "train_step", spy)
    common = ["--data", str(path), "--eval-split", "", "--batch-size", "4", "--epochs", "2", "--log-every", "1"]
    out = demo(tmp_path / "mixdpo", cache_dir, "--loss", "mixdpo", *common)
    easy, hard = [[3.0, 2.5, 2.0, 1.5], [1.0, 0.75, 0.5]], [[0.4, 0.3, 0.2, 0.1], [0.0, -0.5]]
    assert seen == easy + easy + hard + hard
    assert [r["sft_fraction"] for r in out["history"]] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r["epoch"] for r in out["history"]] == [2 * s / 8 for s in range(1, 9)]
    seen.clear()
    out = demo(tmp_path / "routed", cache_dir, "--loss", "simpo", "--route-difficult", "--order", "per-epoch", *common)
    per_epoch = [[3.0, 2.5, 2.0, 1.5], [1.0, 0.75, 0.5, 0.4], [0.3, 0.2, 0.1, 0.0, -0.5]]
    assert seen == per_epoch * 2
    assert [r["sft_fraction"] for r in out["history"]] == [0, 0.25, 1] * 2
    rows = [json.loads(line) for line in open(tmp_path / "routed" / "metrics.jsonl")]
    assert [r["sft_fraction"] for r in rows] == [0, 0.25, 1] * 2
    seen.clear()  # MixDPO's Fig. 4a "DPO + sorted": the easy -> hard order with no routing, every pair DPO
    out = demo(tmp_path / "sorted", cache_dir, "--loss", "dpo", "--order", "per-epoch", *common)
    assert seen == per_epoch * 2 and not any("sft_fraction" in r for r in out["history"])


def test_curriculum_ties_are_shuffled_per_epoch():
    """Pairs with equal margins keep the easy -> hard order between groups, but within a tie their order is the seed's
    shuffle: it differs between epochs (seeds) and is not the file order. (Left unshuffled, every epoch would train
    the tied pairs in file order.)"""
    pairs = _pairs([1.0] * 6 + [0.0] * 6)
    orders = [batches.curriculum_batches(pairs, 12, 0, epochs=1, order="per-epoch", seed=seed)[0] for seed in range(4)]
    assert all(sorted(o[:6]) == list(range(6)) and sorted(o[6:]) == list(range(6, 12)) for o in orders)
    assert len({tuple(o[:6]) for o in orders}) > 1 and len({tuple(o[6:]) for o in orders}) > 1
    assert all(o != list(range(12)) for o in orders)
    two_stage = [batches.curriculum_batches(pairs, 6, 0, epochs=1, seed=seed)[0] for seed in range(4)]
    assert len({tuple(o) for o in two_stage}) > 1 and all(sorted(o) == list(range(6)) for o in two_stage)


def test_margin_sigmoid_flags_and_recipe_overrides_at_parse_time(capsys):
    """Softplus_τ's temperature and the focal weight are options of margin_sigmoid (Yao §5.4.4); a flag the chosen
    truncation does not use is refused, as is the δ curriculum with the focal weight (it has no δ). A recipe's loss
    hyperparameters that another --loss does not take are dropped (MixDPO's Fig. 4a "DPO + sorted")."""
    hp = train.get_args(["--loss", "margin_sigmoid", "--truncation", "softplus", "--softplus-temperature",
                         "0.5"]).hparams
    assert hp["truncation"] == "softplus" and hp["softplus_temperature"] == 0.5
    hp = train.get_args(["--loss", "margin_sigmoid", "--truncation", "focal", "--focal-gamma", "3"]).hparams
    assert hp["truncation"] == "focal" and hp["focal_gamma"] == 3.0
    for argv, flag in [(["--truncation", "focal", "--delta", "0.2"], "--delta"),
                       (["--softplus-temperature", "0.5"], "--softplus-temperature"),
                       (["--truncation", "softplus", "--focal-gamma", "3"], "--focal-gamma"),
                       (["--truncation", "focal", "--curriculum-steps", "5"], "--curriculum-steps"),
                       (["--truncation", "huber"], "truncation"), (["--softplus-temperature", "0"], "temperature")]:
        with pytest.raises(SystemExit):
            train.get_args(["--loss", "margin_sigmoid", *argv])
        assert flag in capsys.readouterr().err, argv
    args = train.get_args(["--recipe", "mixdpo-mistral-7b-base", "--loss", "dpo", "--order", "per-epoch"])
    assert args.hparams == {"beta": 0.01, "label_smoothing": 0.0} and args.route is None and args.order == "per-epoch"
    with pytest.raises(SystemExit):  # typed by the user, it is still an error
        train.get_args(["--loss", "dpo", "--difficulty-threshold", "1"])
    assert train.get_args(["--loss", "lmpo", "--lmpo-stats-order", "paper"]).hparams["lmpo_stats_order"] == "paper"


def test_mixdpo_flags_are_checked_at_parse_time():
    with pytest.raises(SystemExit):
        train.get_args(["--loss", "dpo", "--order", "two-stage"])  # no difficulty without MixDPO
    with pytest.raises(SystemExit):
        train.get_args(["--loss", "mixdpo", "--route-difficult"])  # mixdpo routes itself
    with pytest.raises(SystemExit):
        train.get_args(["--loss", "simpo", "--difficulty-threshold", "1"])  # only with --route-difficult
    with pytest.raises(SystemExit):
        train.get_args(["--loss", "simpo", "--route-difficult", "--difficulty", "rating"])  # the routing rule refuses it
    args = train.get_args(["--loss", "simpo", "--route-difficult", "--difficulty-threshold", "1"])
    assert args.route == {"difficulty_threshold": 1.0, "difficulty": "score"} and args.order == "two-stage"
    assert args.hparams == {"beta": 2.0, "gamma_beta_ratio": 0.5}
    assert train.get_args(["--loss", "amapo", "--no-adaptive", "--amapo-form", "paper"]).hparams["adaptive"] is False
    assert train.get_args(["--loss", "lmpo", "--lmpo-margin-grad"]).hparams["lmpo_margin_grad"] is True
    args = train.get_args(["--loss", "margin_sigmoid", "--truncation", "softplus", "--delta", "0.8"])
    assert args.hparams["delta"] == 0.8


def test_adamw_with_its_state_allocated_up_front_steps_exactly_as_adamw():
    """train.adamw allocates AdamW's state before step 1 (so step 1's peak already holds it): three steps give the
    same parameters and state as torch's AdamW allocating lazily."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1, weight_decay=0.01, fused=True)
    opt_b = train.adamw(b.parameters(), lr=0.1, weight_decay=0.01)
    assert all(len(opt_b.state[p]) == 3 for p in b.parameters())
    for step in range(3):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for p, q in zip(a.parameters(), b.parameters()):
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_tensorboard_gets_the_metrics_rows(tmp_path, cache_dir):
    """--report-to tensorboard: every number of every metrics.jsonl row, at its step, read back from the event
    files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    demo(tmp_path, cache_dir, "--loss", "simpo", "--max-steps", "4", "--log-every", "2", "--eval-every", "2",
         "--report-to", "tensorboard")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("loss", "learning_rate", "rewards/margins", "eval_rewards/accuracies", "num_tokens"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert len(want) >= 2 and [s for s, _ in got] == [s for s, _ in want], key
        assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(got, want)), key


def test_report_to_a_missing_package_is_a_one_line_hint(monkeypatch, capsys):
    from infra import tracking
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        train.get_args(["--report-to", "wandb"])
    assert e.value.code == 2 and "pip install wandb" in capsys.readouterr().err


def test_final_is_saved_in_the_source_dtype_or_save_dtype(tmp_path, cache_dir):
    """final/ keeps the dtype the source config.json names (the demo's: float32) unless --save-dtype; the tokenizer
    and generation files of the source come along; every file is 0644."""
    from safetensors import safe_open
    demo(tmp_path / "src", cache_dir, "--loss", "simpo", "--max-steps", "1", "--eval-split", "")
    demo(tmp_path / "bf16", cache_dir, "--loss", "simpo", "--max-steps", "1", "--eval-split", "", "--save-dtype", "bf16")
    for run, dtype, name in (("src", torch.float32, "float32"), ("bf16", torch.bfloat16, "bfloat16")):
        final = tmp_path / run / "final"
        with safe_open(final / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}, run
        assert json.loads((final / "config.json").read_text())["torch_dtype"] == name
        assert (final / "tokenizer.json").is_file() and (final / "tokenizer_config.json").is_file()
        assert all((f.stat().st_mode & 0o777) == 0o644 for f in final.iterdir())
    a, b = weights(tmp_path / "src"), weights(tmp_path / "bf16")
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)  # the same weights, rounded


def test_dry_run_plans_memory_from_the_config_alone(tmp_path, capsys):
    """A folder holding only Qwen2.5-0.5B's config.json (no weights: nothing can be loaded): P by hand from the
    config = 494,032,768; fp32 weights 4P = 1.84 GiB, gradients 1.84, AdamW 8P = 3.68 per device on one process;
    --fsdp over 4 devices divides them by 4 (the weights add one gathered fp16 layer: 2 x 14.9M bytes)."""
    from dataclasses import asdict
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", **asdict(train.Config())}))
    D, I, V, L, H, kv, hd = 896, 4864, 151936, 24, 14, 2, 64
    layer = D * H * hd + H * hd + 2 * (D * kv * hd + kv * hd) + H * hd * D + 3 * D * I + 2 * D
    P = V * D + L * layer + D  # tied: no separate LM head
    assert P == 494_032_768
    common = ["--model", str(tmp_path), "--data", "x/y", "--dry-run", "--device", "cuda", "--device-memory", "80"]
    for argv, shard, extra in (([], 1, 0), (["--fsdp", "--devices", "4", "--dtype", "fp16"], 4, 2 * 2 * layer)):
        with pytest.raises(SystemExit) as e:
            train.get_args(common + argv)
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert f"{P / 1e6:,.0f}M parameters" in text
        assert f"| weights | {(4 * P / shard + extra) / 2 ** 30:.2f} |" in text
        assert f"| gradients | {4 * P / shard / 2 ** 30:.2f} |" in text and f"| adamw | {8 * P / shard / 2 ** 30:.2f} |" in text
        assert "80.0 GiB -> fits" in text
    acts = {}
    for argv in ([], ["--grad-checkpointing"]):
        with pytest.raises(SystemExit):
            train.get_args(common[:-1] + ["4", "--batch-size", "16"] + argv)
        text = capsys.readouterr().out
        acts[bool(argv)] = float(text.split("| activations | ")[1].split(" |")[0])
        assert "does NOT fit" in text
    assert acts[True] < acts[False] / 4  # checkpointing keeps a layer's input, not its insides


def test_the_readme_says_how_the_defaults_differ_from_yao_et_al():
    """README: the defaults follow Yao et al. 2025 except the batch order (length-bucketed, TRL shuffles), which is the
    one default that changes the result; `--recipe yao-dpo` is the paper's run, which also sets its release's gradient
    checkpointing and logging intervals (no effect on the numbers). If a default moves, this fails until the sentence
    is made true again."""
    default, yao = vars(train.get_args(["--loss", "dpo"])), vars(train.get_args(["--recipe", "yao-dpo"]))
    differ = {k: (default[k], yao[k]) for k in default if default[k] != yao[k] and k != "recipe"}
    assert differ == {"order": ("length", "random"), "grad_checkpointing": (False, True), "log_every": (10, 50),
                      "save_every": (1000, 20000)}
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "prompts cut to 256 tokens" in readme and "One default is our choice: length-bucketed batches" in readme
    assert "gradient checkpointing and logging intervals" in readme
    assert "Defaults reproduce" not in readme


def test_scale_out_pointers_lead_to_a_page_that_exists():
    """recipes.py and LOSSES.md point to docs/scale-out.md (there was no "README: Scale-out" section); the page says
    what --resume may change, that it cannot extend a run, and how to plan GPU memory without a GPU."""
    page = ROOT / "docs" / "scale-out.md"
    for f in ("infra/recipes.py", "LOSSES.md", "README.md"):
        text = (ROOT / f).read_text()
        assert "README: Scale-out" not in text and "docs/scale-out.md" in text, f
    text = page.read_text()
    assert "## Resuming: what may change, and why a run cannot be made longer" in text
    assert all(f"`--{name.replace('_', '-')}`" in text for name in checkpoint.RESUME_FREE)
    assert "--device cuda --device-memory 80" in text


def test_dry_run_without_a_gpu_says_how_to_plan_for_one(capsys, monkeypatch):
    """On a machine without a GPU, --dry-run plans against the RAM and says how to plan for a GPU instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train.get_args(["--demo", "--dry-run"])
    out = capsys.readouterr().out
    assert "this machine's RAM" in out and "no GPU here" in out and "--device cuda --device-memory 80" in out
    with pytest.raises(SystemExit):
        train.get_args(["--demo", "--dry-run", "--device", "cuda", "--device-memory", "80"])
    out = capsys.readouterr().out
    assert "--device-memory 80 GiB: 80.0 GiB" in out and "no GPU here" not in out
