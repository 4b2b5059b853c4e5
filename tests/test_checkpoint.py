"""checkpoint.py in-process: a loadable checkpoint exists at every instant of a save (even re-saving the same step),
strict-JSON metrics rows, and the resume pointer's fallback. The end-to-end fault cases are in test_faults.py."""
import argparse
import json

import pytest
import torch

from infra import checkpoint
from model import CausalLM, Config


@pytest.fixture
def state(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = argparse.Namespace(loss="dpo", lr=0.1)
    return dict(out_dir=tmp_path, model=model, opt=opt, scaler=scaler, loss_state={}, counters={"updates": 1},
                args=args)


def save(s, step):
    return checkpoint.save(s["out_dir"], step, s["model"], s["opt"], s["scaler"], s["loss_state"], s["counters"],
                           s["args"])


def test_resaving_a_step_never_leaves_no_checkpoint(state, monkeypatch):
    """A kill between 'move the old ckpt-2 aside' and 'rename the new one in' leaves ckpt-2.old and the new
    ckpt-2.tmp, both complete; --resume's lookup takes one of them although latest.json names the missing ckpt-2."""
    out = state["out_dir"]
    save(state, 2)
    real, calls = checkpoint.os.replace, []

    def killed_after_the_first_rename(src, dst):
        calls.append((src, dst))
        real(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save(state, 2)
    assert calls[0][1].name == "ckpt-000002.old" and not (out / "ckpt-000002").exists()
    monkeypatch.setattr(checkpoint.os, "replace", real)
    found = checkpoint.find(out)
    assert found.name in ("ckpt-000002.old", "ckpt-000002.tmp")
    model = CausalLM(state["model"].config)
    assert checkpoint.load(found, model, state["opt"], state["scaler"], {})[0] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), state["model"].parameters()))


def test_non_finite_weights_are_never_saved(state):
    with torch.no_grad():
        next(state["model"].parameters())[0, 0] = float("inf")
    assert save(state, 3) is None and not list(state["out_dir"].glob("ckpt-*"))
    with pytest.raises(checkpoint.UserError, match="not finite"):
        checkpoint.export(state["model"], state["out_dir"])
    assert not (state["out_dir"] / "final").exists()


def test_metrics_rows_are_strict_json(tmp_path):
    row = checkpoint.log(tmp_path, {"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    assert row == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5, "nonfinite": ["loss", "grad_norm"]}
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == row


def test_truncate_log_keeps_rows_up_to_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    checkpoint.truncate_log(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_truncate_log_drops_the_evaluation_the_resumed_run_repeats(tmp_path):
    """A run evaluates at step 2, then saves ckpt-2, then logs step 3 and is killed. Resuming at step 2 evaluates at
    step 2 again (the loop evaluates before it saves): that row goes, or metrics.jsonl would hold it twice; the
    training row of step 2 (the update before the checkpoint) and the evaluation of step 1 stay."""
    rows = [{"step": 1, "eval_rewards/accuracies": 0.5}, {"step": 2, "loss": 0.6},
            {"step": 2, "eval_rewards/accuracies": 0.7}, {"step": 3, "loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.truncate_log(tmp_path, 2)
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == rows[:2]


def test_check_resume_lists_every_result_changing_difference(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"loss": "dpo", "lr": 0.1, "device": "cpu", "max_steps": 5}))
    new = argparse.Namespace(loss="dpo", lr=0.2, device="cuda", max_steps=6)
    with pytest.raises(checkpoint.UserError) as e:
        checkpoint.check_resume(new, tmp_path)
    assert "lr: 0.1 -> 0.2" in str(e.value) and "max_steps: 5 -> 6" in str(e.value) and "device" not in str(e.value)
    checkpoint.check_resume(argparse.Namespace(loss="dpo", lr=0.1, device="cuda", max_steps=5), tmp_path)
