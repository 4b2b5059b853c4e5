"""Fault cases, each run as a real subprocess of a CLI the way a user runs it: the exit status (0 only when the run
trained what it was asked to, 2 for a mistake in the input), the one-line message naming the flag, file, row or
field at fault, and that the files which must survive (an earlier run, a checkpoint) are byte-identical afterwards.

Every case starts from a copy of one finished demo run (`base`: SimPO, 2 steps, a checkpoint per step), so a
case can damage its copy freely. Subprocesses see no GPU and no Hub (CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE=1).
"""
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_pref_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
BASE_ARGS = ["--demo", "--loss", "simpo", "--max-steps", "2", "--save-every", "1", "--eval-split", ""]


def run(cli: str, *argv, cwd: Path, limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes,) * 2)) if limit_file_bytes else None
    return subprocess.run([sys.executable, str(ROOT / cli), *map(str, argv)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, preexec_fn=limit, timeout=300)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_error(r: subprocess.CompletedProcess, cli: str, *names: str) -> str:
    """Exit status 2, one line `<cli>: error: ...` on stderr naming every one of names, no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip() and "it/s]" not in x and "%|" not in x]  # tqdm bars
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"{cli}: error: "), r.stderr[-3000:]
    assert all(n in lines[0] for n in names), (names, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A finished 2-step demo run (its cache folder also holds the demo model, a plain local model folder)."""
    top = tmp_path_factory.mktemp("faults")
    r = run("train.py", *BASE_ARGS, "--out-dir", top / "run", "--cache-dir", top / "cache", cwd=top)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [dict(prompt=f"Sort {i} {i + 1}", chosen=f"{i} {i + 1}", rejected=f"{i + 1} {i}") for i in range(20)]
    return {"top": top, "run": top / "run", "cache": top / "cache", "model": top / "cache" / "demo_init-seed42",
            "pairs": write_jsonl(top / "pairs.jsonl", rows), "snap": snapshot(top / "run")}


@pytest.fixture
def case(base, tmp_path) -> dict:
    """A private copy of the base run; `train(*flags)` runs train.py with the base's arguments plus flags."""
    run_dir = tmp_path / "run"
    shutil.copytree(base["run"], run_dir)

    def train(*flags, out=run_dir, limit_file_bytes=None):
        return run("train.py", *BASE_ARGS, "--cache-dir", base["cache"], "--out-dir", out, *flags, cwd=tmp_path,
                   limit_file_bytes=limit_file_bytes)
    return {**base, "run": run_dir, "tmp": tmp_path, "train": train}


# ----------------------------------------------------------------------------- flags, at parse time
@pytest.mark.parametrize("flags, names", [
    (["--batch-size", "-4"], ["--batch-size -4", "positive"]),
    (["--max-steps", "-5"], ["--max-steps -5"]),
    (["--epochs", "0"], ["--epochs 0", "at least 1"]),
    (["--nan-patience", "0"], ["--nan-patience 0"]),
    (["--log-every", "0"], ["--log-every 0"]),
    (["--lr", "0"], ["--lr 0.0", "positive"]),
    (["--warmup-ratio", "1.5"], ["--warmup-ratio 1.5", "[0, 1)"]),
    (["--max-length", "64", "--max-prompt-length", "64"], ["--max-prompt-length 64", "--max-length - 1 = 63"]),
    (["--micro-batch-size", "-1"], ["--micro-batch-size -1"]),
    (["--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
    (["--device", "tpu"], ["--device tpu", "auto, cpu, cuda"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--fsdp"], ["--fsdp", "torchrun --nproc_per_node N"]),
    (["--save-dtype", "int8"], ["--save-dtype", "'int8'"]),
    (["--loss", "margin_sigmoid", "--delta", "0.7"], ["delta=0.7", "ln 2"]),
    (["--loss", "sft", "--beta", "0.1"], ["--beta is not a hyperparameter of --loss sft"]),
    (["--loss", "slic", "--curriculum-steps", "10"], ["--curriculum-steps", "slic"]),
    (["--loss", "no_such_loss"], ["--loss", "no_such_loss"]),
    (["--data", "missing.jsonl"], ["--data", "missing.jsonl: no such file"]),
    (["--data", "pairs.csv"], ["--data", "pairs.csv: no such file"]),  # a file name: never a Hub download attempt
])
def test_bad_flags_are_refused_before_anything_is_touched(case, flags, names):
    """Each bad flag is named with the fix, and the run folder it points at is left byte-identical."""
    line = user_error(case["train"](*flags), "train.py", *names)
    assert "Hub" not in line
    assert snapshot(case["run"]) == case["snap"]


def test_a_csv_file_is_refused_by_format(case):
    (case["tmp"] / "pairs.csv").write_text("prompt,chosen,rejected\nhi,a,b\n")
    user_error(case["train"]("--data", "pairs.csv"), "train.py", "pairs.csv: expected a .jsonl, .json or .parquet")


def test_a_local_file_without_held_out_data_is_refused(case):
    """Without --eval-data, a local file's 'test split' would be its training pairs: refused, not silently used."""
    r = run("train.py", "--model", case["model"], "--data", case["pairs"], "--out-dir", case["tmp"] / "new",
            "--cache-dir", case["cache"], "--dtype", "fp32", cwd=case["tmp"])
    user_error(r, "train.py", "--eval-data", "no splits")
    assert not (case["tmp"] / "new").exists()


# ----------------------------------------------------------------------------- earlier runs are never lost
def test_a_fresh_run_refuses_a_folder_holding_a_run(case):
    """A non-demo run into the demo run's folder (or any run's): refused with the two ways out, nothing touched."""
    r = run("train.py", "--model", case["model"], "--data", case["pairs"], "--eval-data", case["pairs"],
            "--out-dir", case["run"], "--cache-dir", case["cache"], "--dtype", "fp32", cwd=case["tmp"])
    user_error(r, "train.py", str(case["run"]), "--resume", "--overwrite")
    assert snapshot(case["run"]) == case["snap"]


def test_the_demo_does_not_replace_a_folder_that_is_not_a_demo_run(case):
    mine = case["tmp"] / "results"
    mine.mkdir()
    (mine / "table.csv").write_text("loss,acc\ndpo,0.7\n")
    user_error(case["train"](out=mine), "train.py", "holds an earlier run")
    assert (mine / "table.csv").read_text() == "loss,acc\ndpo,0.7\n" and len(list(mine.iterdir())) == 1


def test_the_demo_replaces_its_own_demo_run(case):
    """The README's first command works twice in a row, and keeps what the user added to the run folder (the
    README's `evaluate.py prefs ... --out runs/demo-lmpo/prefs.json`): only what a run writes is replaced."""
    (case["run"] / "prefs.json").write_text('{"rewards/accuracies": 0.9}')
    (case["run"] / "notes").mkdir()
    (case["run"] / "notes" / "todo.txt").write_text("compare with simpo")
    (case["run"] / "ckpt-000007").mkdir()  # a stale checkpoint of the earlier run: the run's own, replaced
    assert (case["run"] / "provenance.json").is_file()  # the earlier run's record: replaced, not kept
    r = case["train"]("--max-steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "replacing the earlier run" in r.stdout and "(keeping notes, prefs.json)" in r.stdout
    assert (case["run"] / "final" / "model.safetensors").is_file()
    assert (case["run"] / "prefs.json").read_text() == '{"rewards/accuracies": 0.9}'
    assert (case["run"] / "notes" / "todo.txt").read_text() == "compare with simpo"
    assert sorted(p.name for p in case["run"].glob("ckpt-*")) == ["ckpt-000001"]
    assert [json.loads(x)["step"] for x in (case["run"] / "metrics.jsonl").read_text().splitlines()] == [1]


def test_overwrite_with_a_typo_in_the_data_keeps_the_old_run(case):
    """--overwrite deletes the old run only after every input has been checked."""
    user_error(case["train"]("--overwrite", "--eval-split", "test", "--eval-data", "heldout.jsonl"), "train.py",
               "--eval-data", "heldout.jsonl")
    bad = case["tmp"] / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    user_error(case["train"]("--overwrite", "--data", bad), "train.py", "bad.jsonl: line 1:",
               "missing field 'rejected'")
    assert snapshot(case["run"]) == case["snap"]


def test_overwrite_replaces_the_run(case):
    r = case["train"]("--overwrite", "--max-steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((case["run"] / "args.json").read_text())["max_steps"] == 1
    assert [json.loads(x)["step"] for x in (case["run"] / "metrics.jsonl").read_text().splitlines()] == [1]


# ----------------------------------------------------------------------------- --resume continues only this run
@pytest.mark.parametrize("flags, field", [
    (["--lr", "5e-4"], "lr: 0.001 -> 0.0005"),
    (["--loss", "dpo"], "loss: 'simpo' -> 'dpo'"),
    (["--max-steps", "3"], "max_steps: 2 -> 3"),
    (["--batch-size", "4"], "batch_size: 8 -> 4"),
    (["--beta", "2.5"], "hparams"),
    (["--data", "pairs.jsonl"], "data: "),
])
def test_resume_refuses_different_arguments(case, flags, field):
    shutil.copy(case["pairs"], case["tmp"] / "pairs.jsonl")
    user_error(case["train"]("--resume", *flags), "train.py", "--resume", field)
    assert snapshot(case["run"]) == case["snap"]


def test_resume_without_a_run_is_an_error(case):
    user_error(case["train"]("--resume", out=case["tmp"] / "empty"), "train.py", "--resume", "args.json",
               "holds no run")


def test_resume_with_a_dangling_pointer_falls_back_to_the_newest_checkpoint(case):
    (case["run"] / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000009", "step": 9}))
    r = case["train"]("--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "names ckpt-000009; using the newest complete checkpoint, ckpt-000002 (step 2)" in r.stdout


def test_resume_with_a_torn_pointer_falls_back(case):
    (case["run"] / "latest.json").write_text('{"checkpoint": "ckpt-00')
    r = case["train"]("--resume")
    assert r.returncode == 0 and "using the newest complete checkpoint, ckpt-000002" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("pointer", ['{"checkpoint": null}', '{"step": 2}', '{"checkpoint": 2, "step": 2}',
                                     '{"checkpoint": "../../elsewhere"}', '["ckpt-000002"]'])
def test_resume_with_a_wrong_typed_pointer_falls_back(case, pointer):
    """latest.json with a null, missing or wrong-typed field: said in one line, then the newest complete checkpoint,
    as for a missing pointer; never a TypeError."""
    (case["run"] / "latest.json").write_text(pointer)
    r = case["train"]("--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    said = [x for x in r.stdout.splitlines() if x.startswith("--resume: ")]
    assert len(said) == 1 and str(case["run"] / "latest.json") in said[0], r.stdout[-2000:]
    assert said[0].endswith("using the newest complete checkpoint, ckpt-000002 (step 2)")
    assert "Traceback" not in r.stderr


def test_resume_with_a_damaged_args_json_names_it(case):
    (case["run"] / "args.json").write_text('{"loss": "simpo", "lr": 0.0')
    user_error(case["train"]("--resume"), "train.py", str(case["run"] / "args.json"), "not valid JSON")


def test_resume_from_an_incomplete_checkpoint_is_an_error(case):
    (case["run"] / "ckpt-000002" / "train_state.json").unlink()  # a save killed before its last file
    user_error(case["train"]("--resume"), "train.py", "holds no complete checkpoint")


def test_resume_from_a_damaged_checkpoint_names_the_file(case):
    weights = case["run"] / "ckpt-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    user_error(case["train"]("--resume"), "train.py", str(weights), "not a readable safetensors file")
    assert (case["run"] / "args.json").read_bytes() == case["snap"]["args.json"]


# ----------------------------------------------------------------------------- inputs
def test_non_utf8_data_names_the_file_and_line(case):
    """The line holding the bad byte (line 3, 1-based as editors count), not a byte offset."""
    bad = case["tmp"] / "latin1.jsonl"
    good = '{"prompt": "Sort 2 1", "chosen": "1 2", "rejected": "2 1"}\n'
    latin1 = '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    bad.write_bytes((2 * good).encode() + latin1)
    user_error(case["train"]("--data", bad, "--out-dir", case["tmp"] / "new"), "train.py", "latin1.jsonl: line 3:",
               "not UTF-8")
    assert not (case["tmp"] / "new").exists()
    r = run("evaluate.py", "prefs", "--model", case["model"], "--data", bad, "--out", "m.json", cwd=case["tmp"])
    user_error(r, "evaluate.py", "latin1.jsonl: line 3:", "not UTF-8")


def test_every_tool_names_a_bad_row_by_the_same_line(case):
    """train.py, evaluate.py prefs and evaluate.py generate name the third line of a file "line 3"."""
    rows = [dict(prompt="Sort 2 1", chosen="1 2", rejected="2 1")] * 2 + [dict(prompt="Sort 3 1", chosen="1 3")]
    bad = write_jsonl(case["tmp"] / "bad.jsonl", rows)
    user_error(case["train"]("--data", bad, "--out-dir", case["tmp"] / "new"), "train.py", "bad.jsonl: line 3:")
    r = run("evaluate.py", "prefs", "--model", case["model"], "--data", bad, "--out", "m.json", cwd=case["tmp"])
    user_error(r, "evaluate.py", "bad.jsonl: line 3:", "missing field 'rejected'")
    prompts = write_jsonl(case["tmp"] / "prompts.jsonl", [{"instruction": "Sort 2 1"}] * 2 + [{"instruction": ""}])
    r = run("evaluate.py", "generate", "--model", case["model"], "--bench", prompts, "--out", "g", cwd=case["tmp"])
    user_error(r, "evaluate.py", "prompts.jsonl: line 3:")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_a_model_json_cut_in_half_is_one_line(case, name):
    """config.json (or tokenizer_config.json) cut in half: train.py, train.py --dry-run and evaluate.py prefs each
    name the file in one line, never a JSONDecodeError traceback."""
    model = case["tmp"] / "model"
    shutil.copytree(case["model"], model)
    text = (model / name).read_text()
    (model / name).write_text(text[:len(text) // 2])
    flags = ["--model", model, "--data", case["pairs"], "--eval-data", case["pairs"], "--out-dir", case["tmp"] / "new",
             "--cache-dir", case["tmp"] / "c", "--dtype", "fp32", "--loss", "simpo"]
    user_error(run("train.py", *flags, cwd=case["tmp"]), "train.py", str(model / name), "not valid JSON")
    if name == "config.json":
        user_error(run("train.py", *flags, "--dry-run", cwd=case["tmp"]), "train.py", str(model / name),
                   "not valid JSON")
    r = run("evaluate.py", "prefs", "--model", model, "--data", case["pairs"], "--out", "m.json", cwd=case["tmp"])
    user_error(r, "evaluate.py", str(model / name), "not valid JSON")
    assert not (case["tmp"] / "new").exists()


def test_a_parquet_file_that_is_not_parquet_is_one_line(case):
    """train.py, refcache.py and evaluate.py prefs: one line naming the file, not an ArrowInvalid traceback."""
    fake = case["tmp"] / "pairs.parquet"
    fake.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    user_error(case["train"]("--data", fake, "--out-dir", case["tmp"] / "new"), "train.py", str(fake),
               "not a readable parquet file")
    r = run("refcache.py", "--model", case["model"], "--data", fake, "--out", "c", cwd=case["tmp"])
    user_error(r, "refcache.py", str(fake), "not a readable parquet file")
    r = run("evaluate.py", "prefs", "--model", case["model"], "--data", fake, "--out", "m.json", cwd=case["tmp"])
    user_error(r, "evaluate.py", str(fake), "not a readable parquet file")
    assert not (case["tmp"] / "new").exists()


def test_zero_usable_pairs(case):
    same = write_jsonl(case["tmp"] / "same.jsonl", [dict(prompt=f"q{i}", chosen="x", rejected="x") for i in range(9)])
    user_error(case["train"]("--data", same, "--out-dir", case["tmp"] / "new"), "train.py", "--data", "same.jsonl",
               "no usable training pairs")
    assert not (case["tmp"] / "new").exists()


def test_zero_usable_pairs_with_a_reference_loss(case):
    same = write_jsonl(case["tmp"] / "same.jsonl", [dict(prompt=f"q{i}", chosen="x", rejected="x") for i in range(9)])
    user_error(case["train"]("--loss", "dpo", "--data", same, "--out-dir", case["tmp"] / "new"), "train.py",
               "same.jsonl", "no pairs left")


def test_fewer_pairs_than_one_batch(case):
    few = write_jsonl(case["tmp"] / "few.jsonl", make_pref_rows(3))
    user_error(case["train"]("--data", few, "--out-dir", case["tmp"] / "new"), "train.py", "--batch-size 8",
               "only 3 training pairs")
    assert not (case["tmp"] / "new").exists()


def test_truncated_model_weights_name_the_file(case):
    model = case["tmp"] / "model"
    shutil.copytree(case["model"], model)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:4096])
    r = run("train.py", "--model", model, "--data", case["pairs"], "--eval-data", case["pairs"], "--out-dir",
            case["tmp"] / "new", "--cache-dir", case["tmp"] / "c", "--dtype", "fp32", "--loss", "simpo", cwd=case["tmp"])
    user_error(r, "train.py", str(model / "model.safetensors"), "not a readable safetensors file")
    assert not (case["tmp"] / "new").exists()


def test_model_folder_without_config(case):
    model = case["tmp"] / "model"
    model.mkdir()
    r = run("train.py", "--model", model, "--data", case["pairs"], "--eval-data", case["pairs"], "--out-dir",
            case["tmp"] / "new", "--loss", "simpo", "--dtype", "fp32", cwd=case["tmp"])
    user_error(r, "train.py", str(model), "not a model folder (no config.json)")


def test_missing_model_folder(case):
    r = run("train.py", "--model", "./models/mine", "--data", case["pairs"], "--eval-data", case["pairs"],
            "--out-dir", case["tmp"] / "new", "--loss", "simpo", cwd=case["tmp"])
    user_error(r, "train.py", "'./models/mine' does not exist")


# ----------------------------------------------------------------------------- runs that go wrong
def test_exploding_lr_stops_non_zero_with_strict_json_and_no_export(case):
    """fp32 with lr 1e4: step 1 blows the weights up, every later step has non-finite gradients and is skipped;
    after --nan-patience bad steps the run stops, naming the checkpoint saved before them."""
    out = case["tmp"] / "boom"
    line = user_error(case["train"]("--lr", "1e4", "--dtype", "fp32", "--max-steps", "20", "--log-every", "1",
                                    "--nan-patience", "3", out=out), "train.py", "stopping at step 4",
                      "3 consecutive steps had a non-finite loss or gradients", "ckpt-000001")
    assert "Try a lower --lr" in line and not (out / "final").exists()
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(f"bare {c}")) for x in open(out / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2] and rows[1]["grad_norm"] is None
    assert rows[1]["nonfinite"] == ["grad_norm"]
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-000001"]


def test_disk_full_during_a_checkpoint_keeps_what_was_there(case):
    """Files may not grow past the size of the model weights: the optimizer state (2x the weights) cannot be
    written, which is one clear line; no partial checkpoint is left behind."""
    limit = (case["run"] / "ckpt-000002" / "model.safetensors").stat().st_size + 65536
    out = case["tmp"] / "full"
    user_error(case["train"](out=out, limit_file_bytes=limit), "train.py", "could not write checkpoint",
               "ckpt-000001.tmp", "File too large")
    assert not list(out.glob("ckpt-*")) and not (out / "final").exists()
    assert json.loads((out / "args.json").read_text())["loss"] == "simpo"


def test_disk_full_during_the_final_export(case):
    limit = (case["run"] / "ckpt-000002" / "model.safetensors").stat().st_size - 1
    user_error(case["train"]("--resume", limit_file_bytes=limit), "train.py", "could not write",
               str(case["run"] / "final"), "the last checkpoint is intact")
    assert snapshot(case["run"] / "ckpt-000002") == {k.split("/", 1)[1]: v for k, v in case["snap"].items()
                                                    if k.startswith("ckpt-000002/")}


# ----------------------------------------------------------------------------- the other CLIs
def test_evaluate_prefs_missing_data(case):
    r = run("evaluate.py", "prefs", "--model", case["model"], "--data", "nope.jsonl", "--out", "m.json",
            cwd=case["tmp"])
    user_error(r, "evaluate.py", "nope.jsonl: no such file")


def test_evaluate_bad_flag_value_is_one_line(case):
    r = run("evaluate.py", "prefs", "--model", case["model"], "--data", "x.jsonl", "--out", "m.json",
            "--batch-size", "many", cwd=case["tmp"])
    user_error(r, "evaluate.py prefs", "--batch-size", "'many'")


def test_report_on_a_folder_without_a_run_is_an_error(case):
    """`evaluate.py report` of a folder train.py never wrote into: exit 2 naming it, not exit 0 with an empty row."""
    (case["tmp"] / "empty").mkdir()
    (case["tmp"] / "empty" / "notes.txt").write_text("nothing here")
    r = run("evaluate.py", "report", case["run"], case["tmp"] / "empty", "--out", case["tmp"] / "rep", cwd=case["tmp"])
    user_error(r, "evaluate.py", str(case["tmp"] / "empty"), "holds no run")
    assert not (case["tmp"] / "rep").exists()


@pytest.mark.parametrize("loss, flags", [("kto", ["--batch-size", "64"]), ("aot", ["--order", "random"]),
                                         ("aot_unpaired", ["--order", "per-epoch"])])
def test_route_difficult_around_losses_that_need_two_pairs(case, loss, flags):
    """--route-difficult around KTO and AOT (>= 2 pairs per batch): the run trains (batches exchange pairs so that
    each leaves the loss 0 or >= 2 easy pairs), held-out evaluation included."""
    out = case["tmp"] / "routed"
    r = case["train"]("--loss", loss, "--route-difficult", "--max-steps", "3", "--eval-split", "test",
                      "--eval-every", "0", *flags, out=out)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "eval_rewards/accuracies" in rows[-1] and (out / "final").is_dir()


def test_data_cli_refuses_a_csv(case):
    (case["tmp"] / "p.csv").write_text("a,b\n")
    r = run("refcache.py", "--model", case["model"], "--data", "p.csv", "--out", "c", cwd=case["tmp"])
    user_error(r, "refcache.py", "p.csv: expected a .jsonl, .json or .parquet")
