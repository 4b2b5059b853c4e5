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

import checkpoint
import data
import losses
import train
from model import UserError

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
    evals = [h for h in out["history"] if "eval/rewards/accuracies" in h]
    assert evals[0]["step"] == 0 and 0.3 <= evals[0]["eval/rewards/accuracies"] <= 0.7
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9, evals[-1]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
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
    real = train.data.ref_cache

    def shifted(*a, **k):
        pairs, ref, meta = real(*a, **k)
        for p in pairs:
            p.ref_chosen_logps -= 5.0
        return pairs, ref, meta

    monkeypatch.setattr(train.data, "ref_cache", shifted)
    with pytest.raises(UserError, match="step-0 check failed"):
        demo(tmp_path, cache_dir, "--loss", "dpo", "--max-steps", "1", "--eval-split", "")


def test_resume_is_exact(tmp_path, cache_dir, monkeypatch):
    """6 steps in one go == 3 steps, a crash, and --resume (same schedule, data order, optimizer, loss state)."""
    common = ["--loss", "lmpo", "--max-steps", "6", "--save-every", "3", "--eval-split", ""]
    demo(tmp_path / "straight", cache_dir, *common)
    calls = {"n": 0}
    real_collate = train.data.collate

    def crashing_collate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real_collate(*a, **k)

    monkeypatch.setattr(train.data, "collate", crashing_collate)
    with pytest.raises(KeyboardInterrupt):
        demo(tmp_path / "resumed", cache_dir, *common)
    monkeypatch.setattr(train.data, "collate", real_collate)
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


def test_ddp_gloo_equals_one_process(tmp_path, cache_dir):
    """torchrun with 2 CPU processes (gloo) and the same global batch trains like one process: same loss and
    gradient norm at every step (a missing all-reduce or a wrong average changes the norm at step 1)."""
    common = [str(ROOT / "train.py"), "--demo", "--loss", "dpo", "--max-steps", "3", "--eval-split", "",
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
    assert names == set(train.HPARAMS)
    parser = train.build_parser()
    formatter = data.HelpFormatter("train.py")
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


def _step(model_dir, pairs, sizes, loss):
    """One train.train_step from a fresh copy of the model, with micro-batches of the given sizes."""
    model = train.Qwen2.from_pretrained(model_dir).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient: updates compare exactly
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    micro = [data.collate(pairs[s:s + n], 0) for s, n in zip(starts, sizes)]
    out = train.train_step(model.sequence_logps, opt, torch.amp.GradScaler("cpu", enabled=False), micro, loss,
                           batch_size=sum(sizes), dtype="fp32", grad_clip=1.0)
    return out, model


def test_train_step_is_one_exact_optimizer_step(tiny_model_dir):
    """train_step on its own: the loss is the mean over the global batch, gradient accumulation over micro-batches
    gives the same update as one batch, the grad norm is the unclipped norm, and a NaN loss skips the step."""
    from conftest import make_pref_rows
    pairs, _ = data.tokenize_pairs(make_pref_rows(4), data.load_tokenizer(tiny_model_dir), 256, 128)
    loss = functools.partial(losses.compute, "simpo")
    model = train.Qwen2.from_pretrained(tiny_model_dir).train()
    want = losses.compute("simpo", data.pair_logps(model.sequence_logps, data.collate(pairs, 0)))[0].mean()
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
    ("data.py", ["--model", "no/such/dir/", "--data", "x.jsonl", "--out", "c"], "'no/such/dir/' does not exist"),
    ("evaluate.py", ["diagnostics", "no_run", "--out", "d"], "diagnostics: no_run not found"),
])
def test_cli_user_error_is_one_line_exit_2(cli, argv, names, tmp_path):
    """A user mistake is one line `<cli>: error: ...` on stderr and exit status 2, no traceback."""
    extra = ["--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")] if cli == "train.py" else []
    r = subprocess.run([sys.executable, str(ROOT / cli), *argv, *extra], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"{cli}: error: ") and names in r.stderr and r.stderr.count("\n") == 1, r.stderr
