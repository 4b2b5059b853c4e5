"""benchmarks/gpu_check.py's CPU mode, as CI runs it (torch.compile's aot_eager backend: inductor's C++ builds take
minutes on 2 cores): every check that exists on the CPU passes with sane figures, the CUDA-only ones are reported as
not run (and counted), and a shifted reference makes its check fail."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CPU_CHECKS = ["packed_sdpa", "decode_eager", "fp16_scaler", "bf16_generate", "compile", "fsdp2", "train_vs_trl",
              "generate_805"]


def gpu_check(tmp_path, *flags):
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--compile-backend", "aot_eager", "--out",
                        str(tmp_path / "t.json"), *flags],
                       cwd=ROOT, capture_output=True, text=True)
    return r, {row["check"]: row for row in json.loads((tmp_path / "t.json").read_text())["checks"]}


def test_cpu_mode_passes_every_check_and_counts_the_cuda_only_ones(tmp_path):
    r, rows = gpu_check(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    assert list(rows) == ["packed_sdpa", "flex_packed", "decode_eager", "cuda_graph", "fp16_scaler", "bf16_generate",
                          "compile", "fsdp2", "train_vs_trl", "generate_805"]
    assert {k for k, v in rows.items() if v["result"] == "not run: no CUDA"} == {"flex_packed", "cuda_graph"}
    assert {k: v["result"] for k, v in rows.items() if k in CPU_CHECKS} == dict.fromkeys(CPU_CHECKS, "PASS")
    assert "8 passed, 0 failed, 2 not run (no CUDA)" in r.stdout and "| check | result |" in r.stdout
    f = {k: v["figures"] for k, v in rows.items()}
    assert f["packed_sdpa"]["logps_err"] < 1e-4 and f["packed_sdpa"]["grad_err"] < 1e-3
    assert f["decode_eager"]["same_answers"] == "6/6" and f["compile"]["decode_same_answers"] == "4/4"
    assert f["compile"]["train_max_loss_diff"] < 1e-4 and f["compile"]["backend"] == "aot_eager"
    assert f["fp16_scaler"]["scale"] == 65536.0 * 0.5 ** f["fp16_scaler"]["skipped"]
    assert f["fp16_scaler"]["update_cosine"] > 0.99 and f["fsdp2"]["ranks"] == 2
    assert f["train_vs_trl"]["pairs/s"] > 0 and rows["train_vs_trl"]["reference"]["trl_pairs/s"] > 0
    assert f["train_vs_trl"]["first_logps_rel_diff"] < 1e-4
    assert f["generate_805"]["same_as_transformers"] == "16/16 answers"
    assert all(v["ratio"] is None or v["ratio"] > 0 for v in rows.values())


def test_a_shifted_reference_fails_its_check_and_only_it(tmp_path):
    """--perturb shifts a check's reference: that check must fail (the exit status says so) while the others pass."""
    r, rows = gpu_check(tmp_path, "--only", "packed_sdpa", "decode_eager", "bf16_generate", "--perturb",
                        "packed_sdpa", "bf16_generate")
    assert r.returncode == 1
    assert {k: v["result"] for k, v in rows.items()} == {"packed_sdpa": "FAIL", "decode_eager": "PASS",
                                                         "bf16_generate": "FAIL"}
    assert rows["packed_sdpa"]["figures"]["logps_err"] > 1e-2
    assert "FAILED packed_sdpa, bf16_generate" in r.stdout


def test_a_check_past_its_budget_is_killed_and_fails(monkeypatch, tmp_path):
    """A hung check is killed at its time budget (with what it started) and recorded as FAIL with a one-line error."""
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check
    monkeypatch.setitem(gpu_check.BUDGET_S["cpu"], "fsdp2", 1)
    args = gpu_check.argparse.Namespace(perturb=[], compile_backend="aot_eager", cache_dir=str(tmp_path))
    row = gpu_check.run_check("fsdp2", args, gpu_check.torch.device("cpu"))
    assert row["result"] == "FAIL" and row["figures"] == {"error": "timed out after 1 s"} and row["seconds"] < 10
