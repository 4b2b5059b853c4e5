"""provenance.json: a run records the commit of the code that trained it (run from a copy of the code in a temp git
checkout, and from a copy outside any checkout), a --resume keeps that record and appends what changed, the report
shows and marks each row's commit, evaluation outputs carry their own record, and git can neither hang a run nor
write to the terminal."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy
import pytest
import torch

import evaluate
from infra import provenance

ROOT = Path(__file__).resolve().parents[1]
GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True,
                          env=GIT_ENV).stdout.strip()


def commit_all(folder: Path, message: str) -> str:
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", message)
    return git(folder, "rev-parse", "HEAD")


def copy_code(dst: Path) -> Path:
    """The code a run needs (every top-level .py, infra/, evaluation/, demo/, .gitignore), copied to dst."""
    dst.mkdir(parents=True)
    for f in [*ROOT.glob("*.py"), ROOT / ".gitignore"]:
        shutil.copy(f, dst)
    for folder in ("infra", "evaluation", "demo"):
        shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def train_demo(code: Path, run: Path, cache: Path, *extra: str, ceiling: Path) -> subprocess.CompletedProcess:
    """train.py of the copy in `code`, run from there; git looks for a checkout no higher than `ceiling`."""
    r = subprocess.run([sys.executable, str(code / "train.py"), "--demo", "--out-dir", str(run), "--cache-dir",
                        str(cache), "--dtype", "fp32", "--max-steps", "2", "--eval-split", "", *extra], cwd=code,
                       capture_output=True, text=True, env={**GIT_ENV, "GIT_CEILING_DIRECTORIES": str(ceiling),
                                                            "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def sha256(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return "sha256:" + h.hexdigest()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One demo init and reference cache for the module's runs (same seed, same data bytes)."""
    return tmp_path_factory.mktemp("cache")


def test_a_run_records_its_commit_and_a_resume_appends_what_changed(tmp_path, cache):
    code = copy_code(tmp_path / "code")
    git(code, "init", "-q")
    first = commit_all(code, "one")
    run = tmp_path / "run"
    train_demo(code, run, cache, ceiling=tmp_path)
    text = (run / "provenance.json").read_text()
    doc = json.loads(text)
    start = doc["start"]
    assert doc["resumes"] == []
    assert start["code"]["commit"] == first and start["code"]["dirty"] is False
    assert start["code"]["diff_sha256"] is None and start["code"]["untracked"] == 0
    assert Path(start["code"]["checkout"]).resolve() == code.resolve()
    assert start["packages"]["torch"] == torch.__version__ and start["packages"]["numpy"] == numpy.__version__
    assert start["python"] == ".".join(map(str, sys.version_info[:3]))
    assert (start["world_size"], start["dtype"], start["recipe"]) == (1, "fp32", None)
    assert start["device"]["type"] == "cpu" and start["device"]["count"] == 1
    model_dir = Path(start["model"]["path"])
    assert start["model"]["weights_sha256"] == sha256(model_dir / "model.safetensors", model_dir / "config.json")
    [meta] = [json.loads(p.read_text()) for p in cache.glob("*/meta.json")]
    assert start["model"]["weights_sha256"] == meta["weights_sha256"]  # the reference cache's own field
    assert start["model"]["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert start["data"] == [{"source": str(code / "demo/train.jsonl"), "split": "train",
                              "sha256": sha256(code / "demo/train.jsonl")}]
    assert meta["data_sha256"] == start["data"][0]["sha256"]

    (code / "losses.py").write_text((code / "losses.py").read_text() + "\n# a change between start and resume\n")
    second = commit_all(code, "two")
    (code / "notes.txt").write_text("uncommitted")
    r = train_demo(code, run, cache, "--resume", ceiling=tmp_path)
    doc = json.loads((run / "provenance.json").read_text())
    assert doc["start"] == json.loads(text)["start"]  # the start record is kept as it was
    [entry] = doc["resumes"]
    assert entry["step"] == 2
    assert entry["changed"]["code.commit"] == [first, second]
    assert entry["changed"]["code.dirty"] == [False, True] and entry["changed"]["code.untracked"] == [0, 1]
    assert not {k for k in entry["changed"] if not k.startswith("code.")}  # nothing else changed
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"{first[:7]}," in warnings[0] and f"{second[:7]}+dirty" in warnings[0]
    assert provenance.run_code(run) == {"commit": f"{first[:7]}→{second[:7]}", "dirty": True}


def test_a_run_outside_a_git_checkout_says_so(tmp_path, cache):
    code = copy_code(tmp_path / "code")
    run = tmp_path / "run"
    train_demo(code, run, cache, ceiling=tmp_path)
    code_state = json.loads((run / "provenance.json").read_text())["start"]["code"]
    assert code_state["commit"] is None and "not a git repository" in code_state["git"]
    assert provenance.run_code(run) == {"commit": "no git", "dirty": False}


def test_the_diff_hash_counts_changes_and_untracked_files_not_ignored_ones(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("ignored/\n")
    git(repo, "init", "-q")
    head = commit_all(repo, "one")
    clean = provenance.code_state(repo)
    assert (clean["commit"], clean["dirty"], clean["diff_sha256"]) == (head, False, None)
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_bytes(b"0" * 100)
    assert provenance.code_state(repo)["dirty"] is False  # ignored files do not count
    (repo / "a.py").write_text("x = 2\n")
    edited = provenance.code_state(repo)
    assert edited["dirty"] and edited["diff_sha256"].startswith("sha256:")
    (repo / "new.py").write_text("y = 1\n")
    added = provenance.code_state(repo)
    assert added["untracked"] == 1 and added["diff_sha256"] != edited["diff_sha256"]
    (repo / "new.py").write_text("y = 2\n")
    assert provenance.code_state(repo)["diff_sha256"] != added["diff_sha256"]  # its content counts, not just its name
    (repo / "new.py").write_text("y = 1\n")
    assert provenance.code_state(repo)["diff_sha256"] == added["diff_sha256"]
    (repo / "run").mkdir()
    (repo / "run" / "args.json").write_text("{}")
    skipped = provenance.code_state(repo, skip=repo / "run")  # a run's own folder inside the checkout
    assert skipped["diff_sha256"] == added["diff_sha256"] and str(repo / "run") in skipped["diff_covers"]
    assert provenance.code_state(repo)["diff_sha256"] != added["diff_sha256"]
    git(repo / "run", "init", "-q")  # a nested checkout: listed, since its files are not hashed
    assert provenance.code_state(repo)["not_hashed_nested_checkouts"] == [str(repo / "run")]


def test_git_missing_failing_or_hanging_is_recorded_never_printed(tmp_path, monkeypatch, capfd):
    bin_dir, sleep = tmp_path / "bin", shutil.which("sleep")
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert "git is not installed" in provenance.code_state(ROOT)["git"]
    fake = bin_dir / "git"
    fake.write_text("#!/bin/sh\necho 'fatal: broken' >&2\necho noise\nexit 128\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert provenance.code_state(ROOT) == {"commit": None,
                                           "git": f"the code's commit is unknown: git in {ROOT}: fatal: broken"}
    fake.write_text(f"#!/bin/sh\nexec {sleep} 30\n")
    monkeypatch.setattr(provenance, "GIT_TIMEOUT", 0.5)
    state = provenance.code_state(ROOT)
    assert state["commit"] is None and "timed out after 0.5 seconds" in state["git"]
    assert capfd.readouterr() == ("", "")


def _run(path: Path, start_code: dict | None, resumes=()) -> Path:
    path.mkdir(parents=True)
    (path / "args.json").write_text(json.dumps({"loss": "dpo"}))
    if start_code is not None:
        (path / "provenance.json").write_text(json.dumps({"start": {"code": start_code}, "resumes": list(resumes)}))
    return path


def test_the_report_shows_each_rows_commit_and_marks_other_commits_and_dirty_trees(tmp_path):
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    runs = [_run(tmp_path / "one", {"commit": a, "dirty": False}),
            _run(tmp_path / "two", {"commit": a, "dirty": True, "diff_sha256": "sha256:1"}),
            _run(tmp_path / "three", {"commit": b, "dirty": False}),
            _run(tmp_path / "four", None),
            _run(tmp_path / "five", {"commit": a, "dirty": False},
                 [{"step": 3, "changed": {"code.commit": [a, c]}}]),
            _run(tmp_path / "six", {"commit": None, "git": "git is not installed"})]
    rows = evaluate.main(["report", *map(str, runs), "--out", str(tmp_path / "report")])
    assert [(r["commit"], r["dirty"]) for r in rows] == [("aaaaaaa", False), ("aaaaaaa", True), ("bbbbbbb", False),
                                                         (None, None), ("aaaaaaa→ccccccc", False), ("no git", False)]
    md = (tmp_path / "report" / "report.md").read_text()
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[-1][:-2] for line in md.splitlines()
             if line.startswith("| ") and not line.startswith("| run ")}
    assert cells == {"one": "aaaaaaa", "two": "aaaaaaa+dirty", "three": "bbbbbbb ≠", "four": "–",
                     "five": "aaaaaaa→ccccccc ≠", "six": "no git ≠"}
    assert "≠: not aaaaaaa, the commit of most rows: 4 commits in this table" in md and "+dirty: uncommitted" in md
    same = evaluate.main(["report", str(runs[0]), "--out", str(tmp_path / "report1")])
    assert same[0]["commit"] == "aaaaaaa" and "≠" not in (tmp_path / "report1" / "report.md").read_text()


def test_prefs_output_carries_its_own_record(tiny_model_dir, pref_jsonl, tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    res = evaluate.main(["prefs", "--model", str(tiny_model_dir), "--data", str(pref_jsonl), "--out",
                         str(tmp_path / "prefs.json"), "--max-length", "64", "--max-prompt-length", "32"])
    got = json.loads((tmp_path / "prefs.json").read_text())["provenance"]
    assert got == json.loads(json.dumps(res["provenance"])) and got["code"]["commit"] == expected
    assert got["model"]["weights_sha256"] == sha256(*sorted(tiny_model_dir.glob("*.safetensors")),
                                                    tiny_model_dir / "config.json")
    assert got["data"] == [{"source": str(pref_jsonl), "split": "test", "sha256": sha256(pref_jsonl)}]
    assert got["dtype"] == "fp32" and got["device"]["type"] == "cpu"


def test_a_judge_records_its_model_and_endpoint_not_the_key(tmp_path, monkeypatch):
    from test_judge import FakeOpenAI, completion
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    srv.requests, srv.lock, srv.inflight, srv.max_inflight = [], threading.Lock(), 0, 0
    srv.respond = lambda body: (200, completion("m", {"m": -0.1, "M": -2.4}))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        outs, refs = tmp_path / "out" / "model_outputs.json", tmp_path / "ref.json"
        outs.parent.mkdir()
        outs.write_text(json.dumps([{"instruction": "q", "output": "a", "generator": "g"}]))
        refs.write_text(json.dumps([{"instruction": "q", "output": "b", "generator": "r"}]))
        monkeypatch.setenv("SECRET_KEY_ENV", "sk-very-secret-123")
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        evaluate.main(["judge", "--outputs", str(outs), "--reference", str(refs), "--no-lc", "--judge-url", url,
                       "--judge-model", "fake-judge", "--api-key-env", "SECRET_KEY_ENV"])
    finally:
        srv.shutdown()
        srv.server_close()
    assert srv.requests[0][1] == "Bearer sk-very-secret-123"  # the key was used...
    text = (tmp_path / "out" / "judge_results.json").read_text()
    assert "sk-very-secret-123" not in text  # ...and is written nowhere
    got = json.loads(text)["provenance"]
    assert got["judge"] == {"model": "fake-judge", "url": url}
    assert [d["sha256"] for d in got["data"]] == [sha256(outs), sha256(refs)]
    assert provenance.judge_entry("m", "https://user:pw@host.example:8443/v1?key=abc#x") == {
        "model": "m", "url": "https://host.example:8443/v1"}


def test_resuming_a_run_from_before_provenance_records_it_whole_and_a_bad_record_is_named(tiny_model_dir,
                                                                                           pref_jsonl, tmp_path):
    from types import SimpleNamespace
    args = SimpleNamespace(data=str(pref_jsonl), split="train", eval_data=None, eval_split="", dtype="bf16",
                           recipe="yao-dpo")
    run = tmp_path / "run"
    run.mkdir()
    provenance.write_run(run, args, tiny_model_dir, "cpu", 1, resumed_step=7)
    doc = json.loads((run / "provenance.json").read_text())
    [entry] = doc["resumes"]
    assert doc["start"] is None and entry["step"] == 7 and "changed" not in entry
    assert (entry["record"]["dtype"], entry["record"]["recipe"]) == ("bf16", "yao-dpo")
    assert [d["source"] for d in entry["record"]["data"]] == [str(pref_jsonl)]  # no held-out data: none recorded
    (run / "provenance.json").write_text('{"start": {')
    with pytest.raises(provenance.UserError, match="provenance.json: not valid JSON .*move it away"):
        provenance.write_run(run, args, tiny_model_dir, "cpu", 1, resumed_step=8)
    (run / "provenance.json").write_text('{"start": null}')
    with pytest.raises(provenance.UserError, match="provenance.json: not a provenance record"):
        provenance.write_run(run, args, tiny_model_dir, "cpu", 1, resumed_step=8)


def test_on_cuda_the_record_names_the_gpu_and_the_cuda_libraries(monkeypatch):
    """The CUDA branch, wired on a CPU machine: what torch reports for the GPU and its libraries is what is recorded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H100")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    env = provenance.environment()
    assert env["device"] | {"cpu_threads": None} == {"type": "cuda", "name": "Fake H100", "count": 8,
                                                    "cpu_threads": None}
    assert (env["cuda"], env["cudnn"], env["nccl"]) == ("12.8", 91002, "2.27.3")
