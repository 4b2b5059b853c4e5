"""Which code, packages, machine and inputs produced a run or an evaluation output: every table row traceable.

record(): code = the git checkout holding these files (commit, dirty, diff_sha256 over DIFF_COVERS), or {commit:
null, git: why} outside one; Python and PACKAGES' versions, CUDA/cuDNN/NCCL where CUDA is available; device name
and count; world size, dtype, recipe; the model folder's weights_sha256 and tokenizer_sha256 as the reference cache
header has them (refcache.model_sha256); each data file's sha256 as data.load_rows hashes it; a judge's model and
endpoint, never its key. train.py's rank 0 writes RUN/provenance.json = {"start": record, "resumes": []} when a run
starts; a --resume appends {"step", "created", "changed": {field: [at start, now]}} and leaves "start" as it is,
warning on stderr when the code differs. evaluate.py prefs/generate/judge add "provenance" to the JSON they write.
"""
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import torch

import data
import refcache
from infra import cli, hub
from infra.cli import UserError

HERE = Path(__file__).resolve().parent.parent  # the repository root: the code whose commit is recorded
PACKAGES = ("torch", "numpy", "tokenizers", "safetensors", "jinja2", "transformers", "triton")  # None: not installed
GIT_TIMEOUT = 20  # seconds: a git stuck on a lock or a network filesystem must not stop a run
DIFF_COVERS = ("`git diff HEAD --binary` (staged and unstaged changes to tracked files), then the path and sha256 of "
               "every untracked file; files .gitignore ignores are not counted")


def _git(folder: Path, *args: str) -> bytes:
    """git's stdout; it never reads or writes the terminal, never prompts, never takes an optional lock."""
    r = subprocess.run(["git", "--no-pager", "-C", str(folder), *args], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=GIT_TIMEOUT, env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"})
    if r.returncode:
        raise ChildProcessError((r.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1])
    return r.stdout


def code_state(folder: Path = HERE, skip: Path | None = None) -> dict:
    """{commit, dirty, diff_sha256 (None when clean), diff_covers, untracked (count), checkout} of the git checkout
    holding folder, the untracked files under skip (a run's own folder) left out and said so; {commit: None, git:
    why} outside a checkout, without git, or when git fails or hangs."""
    try:
        top, commit = _git(folder, "rev-parse", "--show-toplevel", "--verify", "HEAD").decode().splitlines()
        status = _git(folder, "status", "--porcelain=v1", "-z", "--untracked-files=all")
        h = hashlib.sha256(_git(folder, "diff", "HEAD", "--binary", "--no-ext-diff", "--no-textconv", "--no-color"))
    except FileNotFoundError:
        return {"commit": None, "git": "git is not installed: the code's commit is unknown"}
    except (ChildProcessError, subprocess.TimeoutExpired) as e:
        return {"commit": None, "git": f"the code's commit is unknown: git in {folder}: {e}"}
    untracked = [Path(top, os.fsdecode(e[3:])) for e in status.split(b"\0") if e.startswith(b"?? ")]
    untracked = sorted(p for p in untracked if not (skip and p.resolve().is_relative_to(Path(skip).resolve())))
    nested = [str(p) for p in untracked if p.is_dir() and not p.is_symlink()]  # git lists a nested checkout whole
    for path in untracked:  # name and content of each: a new or edited untracked file changes the hash
        h.update(f"\0{path.relative_to(top)}\0".encode(errors="surrogateescape") + (
            f"link:{os.readlink(path)}" if path.is_symlink() else data.files_sha256([path]) if path.is_file()
            else "not a file").encode())
    dirty = bool(untracked) or any(e[:3] != b"?? " for e in status.split(b"\0") if e)
    return {"commit": commit, "dirty": dirty, "diff_sha256": "sha256:" + h.hexdigest() if dirty else None,
            "diff_covers": DIFF_COVERS + (f"; nor the files under {skip} (this run's folder)" if skip else ""),
            "untracked": len(untracked), "checkout": top, **({"not_hashed_nested_checkouts": nested} if nested else {})}


def environment(device=None) -> dict:
    """Python, package, CUDA/cuDNN/NCCL versions and the device (default: cuda if available, else cpu)."""
    cuda = torch.cuda.is_available()
    device = torch.device(device or ("cuda" if cuda else "cpu"))
    on_cuda = device.type == "cuda"
    installed = dict(reversed([((d.metadata["Name"] or "").lower(), d.version)  # the first on sys.path wins, as
                               for d in importlib.metadata.distributions()]))  # in importlib.metadata.version
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": {name: installed.get(name) for name in PACKAGES}, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda and torch.distributed.is_nccl_available()
            else None,
            "device": {"type": device.type, "count": torch.cuda.device_count() if on_cuda else 1,
                       "name": torch.cuda.get_device_name(device) if on_cuda  # CPU: its SIMD level changes sums
                       else f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}",
                       "cpu_threads": torch.get_num_threads()}}


def data_entry(source, split: str | None = None) -> dict:
    """A data input: a local file's sha256 (data.files_sha256), a Hub dataset split's parquet files' as
    data.load_rows hashes them (the reference cache's data_sha256; not parsed again), or a Hub name without a split,
    recorded unhashed and said so."""
    path = Path(source).expanduser()
    if not path.is_file() and split is None:
        return {"source": str(source), "sha256": None, "note": "a Hub name, not a local file: not hashed"}
    sha = data.files_sha256([path] if path.is_file() else hub.dataset_files(str(source), split, None))
    return {"source": str(source), "split": split, "sha256": sha}


def judge_entry(model: str | None, url: str | None) -> dict:
    """The judge's model and endpoint URL without user info, query or fragment (they can hold keys)."""
    u = urllib.parse.urlsplit(url or "")
    host = (u.hostname or "") + (f":{u.port}" if u.port else "")
    return {"model": model, "url": urllib.parse.urlunsplit((u.scheme, host, u.path, "", "")) if url else None}


def record(*, model_dir=None, data_sources=(), device=None, world_size: int = 1, dtype=None, recipe=None,
           judge: dict | None = None, skip=None) -> dict:
    """This process's provenance; data_sources = [(source, split or None), ...], empty sources left out."""
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code": code_state(skip=skip),
            **environment(device), "world_size": world_size, "dtype": dtype, "recipe": recipe,
            "model": {"path": str(model_dir), **refcache.model_sha256(Path(model_dir))} if model_dir else None,
            "data": [data_entry(s, split) for s, split in data_sources if s], **({"judge": judge} if judge else {})}


def _flat(d: dict, prefix: str = "") -> dict:
    return {k: v for key, val in d.items() for k, v in
            (_flat(val, f"{prefix}{key}.") if isinstance(val, dict) else {prefix + key: val}).items()}


def write_run(out_dir: Path, args, model_dir: Path, device, world: int, resumed_step: int | None) -> None:
    """Rank 0: RUN/provenance.json's "start" for a fresh run (resumed_step None), else one more "resumes" entry: what
    changed since the start, or the whole record for a run started before provenance was recorded."""
    path = Path(out_dir) / "provenance.json"
    now = record(model_dir=model_dir, data_sources=[(args.data, args.split), (args.eval_split and args.eval_data,
                 args.eval_split)], device=device, world_size=world, dtype=args.dtype, recipe=args.recipe, skip=out_dir)
    doc = {"start": now, "resumes": []}
    if resumed_step is not None:
        doc = read_doc(path) if path.is_file() else {"start": None, "resumes": []}
        old, new = _flat(doc["start"] or {}), _flat(now)
        changed = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
                   if k != "created" and old.get(k) != new.get(k)}
        doc["resumes"].append({"step": resumed_step, "created": now["created"],
                               **({"changed": changed} if doc["start"] else {"record": now})})
        if doc["start"] and {"code.commit", "code.diff_sha256"} & changed.keys():
            print(f"{Path(sys.argv[0]).name}: warning: --resume: the run started with the code at "
                  f"{describe(doc['start']['code'])}, it is now at {describe(now['code'])}: its steps come from both "
                  f"(see {path})", file=sys.stderr)
    cli.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))


def read_doc(path: Path) -> dict:
    """A provenance.json's content (cli.read_json); UserError naming it if it is not one."""
    doc = cli.read_json(path, fix="; move it away to go on without it")
    if not (isinstance(doc, dict) and isinstance(doc.get("resumes"), list) and "start" in doc):
        raise UserError(f"{path}: not a provenance record ({str(doc)[:80]}); move it away to go on without it")
    return doc


def describe(code: dict) -> str:
    """A record's code in a few characters: short commit and +dirty, or "no git"."""
    return code["commit"][:7] + "+dirty" * bool(code.get("dirty")) if code.get("commit") else "no git"


def run_code(run) -> dict:
    """RUN/provenance.json as the report shows it: {"commit": short commit, "a→b" when a resume ran other code,
    "no git", or None without a record; "dirty": whether any part ran with uncommitted changes}."""
    path = Path(run) / "provenance.json"
    if not path.is_file():
        return {"commit": None, "dirty": None}
    doc = read_doc(path)
    start = (doc["start"] or {}).get("code")
    codes = [start] * bool(start) + [r["record"]["code"] if "record" in r else
                                     {**start, **{k[5:]: v[1] for k, v in r["changed"].items() if k[:5] == "code."}}
                                     for r in doc["resumes"]]
    commits = dict.fromkeys((c.get("commit") or "")[:7] or "no git" for c in codes)
    return {"commit": "→".join(commits) or None, "dirty": any(c.get("dirty") for c in codes)}


def commit_cells(rows: list[dict]) -> tuple[list[str], str]:
    """Each report row's commit cell ({"commit", "dirty"} of run_code) and the note under the table: ≠ marks a row
    whose commit is not the one most rows have, +dirty one that ran with uncommitted changes."""
    known = [r["commit"] for r in rows if r["commit"]]
    common = max(known, key=known.count) if known else None
    cells = [(r["commit"] or "–") + "+dirty" * bool(r["dirty"]) + " ≠" * bool(r["commit"] and r["commit"] != common)
             for r in rows]
    note = ("Commit: the code's git commit when the run trained (its provenance.json; a→b: resumed with other code; "
            "–: no record)." + (f" ≠: not {common}, the commit of most rows: {len(set(known))} commits in this "
                                "table, numbers may come from different code." if len(set(known)) > 1 else "")
            + (" +dirty: uncommitted changes (diff_sha256 in provenance.json)." if any(r["dirty"] for r in rows)
               else ""))
    return cells, note
