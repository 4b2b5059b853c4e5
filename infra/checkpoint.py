"""The run folder: everything train.py writes, written so that nothing is lost and nothing is silently wrong.

    out_dir/args.json       the run's resolved arguments, written once when a fresh run starts
    out_dir/metrics.jsonl   one strict-JSON object per logged row (a non-finite value is null and named in "nonfinite")
    out_dir/ckpt-NNNNNN/    the newest checkpoint: the model (a Hugging Face folder), optimizer.safetensors,
                            loss_state.safetensors, rng.safetensors and train_state.json (step, counters, scaler...)
    out_dir/latest.json     which checkpoint is the newest
    out_dir/final/          the trained model, a Hugging Face folder

Every file goes to a temporary name, is fsynced and renamed into place, so at every instant the previous version is
whole; a checkpoint folder counts only once its train_state.json, written last, exists. Only safetensors and JSON:
nothing is pickled. A fresh run never replaces an earlier run unless asked (--overwrite; the demo replaces its own
demo runs, deleting only what a run writes), and --resume continues only a run with the same result-changing
arguments (docs/scale-out.md says which may change, and why).
"""
import json
import math
import os
import re
import shutil
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import data
from infra import cli, distributed, precision
from infra.cli import UserError, read_json
from model import CausalLM

# Arguments that do not change what is trained: they may differ when a run is resumed.
RESUME_FREE = {"resume", "overwrite", "out_dir", "device", "compile", "grad_checkpointing", "logps_chunk_size",
               "pack_tokens", "log_every", "eval_every", "save_every", "nan_patience", "cache_dir", "micro_batch_size"}
# What a run writes into out_dir (the module docstring; tensorboard/ with --report-to tensorboard; .NAME.tmpPID are
# cli.atomic_write's temporary files): all the demo deletes when it replaces its own run.
RUN_FILES = ("args.json", "metrics.jsonl", "provenance.json", "latest.json", "final", "final.tmp", "ckpt-*",
             "tensorboard", ".*.tmp*")


def _fsync_dir(folder: Path) -> None:
    """Make the files and renames inside folder durable (a crash after this cannot lose them)."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_fresh(args, out_dir: Path) -> None:
    """A fresh run may use out_dir if it is empty or missing, if --overwrite is given, or if it holds a demo run and
    this is the demo. Read-only, so every rank can ask before any rank writes."""
    if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
        demo_run = (out_dir / "args.json").is_file() and read_json(out_dir / "args.json").get("demo")
        if not (args.demo and demo_run):
            raise UserError(f"--out-dir {out_dir} holds an earlier run; continue it with --resume, replace it with "
                            "--overwrite, or choose another --out-dir")


def start(args, out_dir: Path) -> None:
    """A fresh run's folder, with args.json; what check_fresh allowed to be replaced is deleted first (by now every
    input has been checked): with --overwrite everything in it; when the demo replaces its own run, only what a run
    writes (RUN_FILES), so files the user put there (the README's runs/demo-lmpo/prefs.json) stay."""
    if out_dir.exists() and any(out_dir.iterdir()):
        ours = [p for p in out_dir.iterdir() if args.overwrite or any(fnmatch(p.name, pat) for pat in RUN_FILES)]
        kept = sorted(p.name for p in out_dir.iterdir() if p not in ours)
        print(f"{out_dir}: replacing the earlier run in it" + (f" (keeping {', '.join(kept)})" if kept else ""))
        for p in ours:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(out_dir / "args.json", lambda tmp: tmp.write_text(json.dumps(vars(args), indent=1)))


def check_resume(args, out_dir: Path) -> None:
    """--resume continues only the run this folder holds: its args.json must exist and agree with these arguments
    on everything that changes the result (all but RESUME_FREE); every differing field is listed."""
    if not (out_dir / "args.json").is_file():
        raise UserError(f"--resume: {out_dir / 'args.json'} is missing; {out_dir} holds no run to continue (start "
                        "without --resume)")
    old = read_json(out_dir / "args.json", fix=f"; {out_dir} cannot be resumed: start a new run in another --out-dir")
    new = json.loads(json.dumps(vars(args)))  # the form args.json has (tuples as lists)
    differ = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
              if k not in RESUME_FREE and old.get(k) != new.get(k)]
    if differ:
        raise UserError(f"--resume: these arguments differ from the run in {out_dir}: {'; '.join(differ)}. Resume "
                        "with the run's values, or start a new run in another --out-dir")


def _complete(ckpt: Path) -> int | None:
    """The step of a complete checkpoint folder (its train_state.json, written last, exists and is whole), else
    None."""
    if not (ckpt / "train_state.json").is_file():
        return None
    try:
        step = read_json(ckpt / "train_state.json").get("step")
    except UserError:  # torn by a kill while ckpt-N.tmp was written: that folder is not complete
        return None
    return step if isinstance(step, int) else None


def _pointer(out_dir: Path) -> tuple[Path | None, str]:
    """(the checkpoint folder latest.json names, "") or (None, what is wrong with latest.json)."""
    path = out_dir / "latest.json"
    if not path.is_file():
        return None, "is missing"
    try:  # a damaged pointer is not fatal: the checkpoints themselves say which is newest
        pointer = read_json(path)
    except UserError as e:
        return None, f"is unreadable ({str(e).removeprefix(f'{path}: ')})"
    name = pointer.get("checkpoint")
    if not (isinstance(name, str) and re.fullmatch(r"ckpt-\d+", name)):
        return None, f"names no checkpoint folder ({{\"checkpoint\": {json.dumps(name)}}})"
    return out_dir / name, ""


def find(out_dir: Path) -> Path:
    """The checkpoint latest.json names; if that pointer (missing, damaged, a wrong-typed field) or checkpoint
    (missing, incomplete) is not usable, the newest complete checkpoint, saying so in one line; UserError if there
    is none."""
    named, why = _pointer(out_dir)
    if named is not None and _complete(named) is not None:
        return named
    found = sorted((step, c) for c in out_dir.glob("ckpt-*") if c.is_dir() and (step := _complete(c)) is not None)
    if not found:
        raise UserError(f"--resume: {out_dir} holds no complete checkpoint (ckpt-*/train_state.json); start "
                        "without --resume, or point --out-dir at a run with checkpoints")
    print(f"--resume: {out_dir / 'latest.json'} {why or f'names {named.name}'}; using the newest complete "
          f"checkpoint, {found[-1][1].name} (step {found[-1][0]})")
    return found[-1][1]


def save(out_dir: Path, step: int, model, opt, scaler, loss_state: dict, counters: dict, args) -> Path | None:
    """ckpt-{step}, called on every rank: written whole to ckpt-{step}.tmp and fsynced, renamed into place (an
    existing folder of the same step is renamed aside first, not deleted), then latest.json is swapped and older
    checkpoints removed. A sharded (FSDP2) model and its AdamW state go to shards/ (torch.distributed.checkpoint,
    every rank its own); otherwise rank 0 writes the model as a Hugging Face folder and optimizer.safetensors. A
    failed write (disk full) is a UserError; the previous checkpoint and pointer stay as they were. Non-finite
    weights are never saved (None is returned)."""
    if not distributed.all_finite(model):  # the previous checkpoint stays the newest
        print(f"step {step}: the weights are not finite; no checkpoint is saved")
        return None
    final, tmp, aside = (out_dir / f"ckpt-{step:06d}{s}" for s in ("", ".tmp", ".old"))
    rank0, shards = distributed.rank() == 0, distributed.sharded(model)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        if shards:
            distributed.save_shards(tmp / "shards", model, opt)
        distributed.barrier()
        if rank0:
            _write_state(tmp, step, model, opt, scaler, loss_state, counters, args, shards)
    except (OSError, SafetensorError) as e:  # disk full, quota: safetensors reports its I/O errors as its own
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {tmp} ({_reason(e)}); the previous checkpoint, if any, is "
                        "intact: free disk space, then --resume") from None
    if rank0:
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        cli.atomic_write(out_dir / "latest.json", lambda p: p.write_text(json.dumps({"checkpoint": final.name,
                                                                                  "step": step})))
        _fsync_dir(out_dir)
        for old in out_dir.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _write_state(tmp: Path, step: int, model, opt, scaler, loss_state: dict, counters: dict, args,
                 shards: bool) -> None:
    """Rank 0's part of a checkpoint; train_state.json is written last and marks the folder complete."""
    rng = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    state = {"step": step, "sharded": shards, "scaler": scaler.state_dict(), "counters": counters,
             "loss_state": {k: v for k, v in loss_state.items() if not torch.is_tensor(v)}, "args": vars(args)}
    if not shards:
        model.save_pretrained(tmp)
        sd = opt.state_dict()
        save_file({f"{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()},
                  str(tmp / "optimizer.safetensors"))
        state["param_groups"] = sd["param_groups"]
    tensors = {k: v.detach().cpu() for k, v in loss_state.items() if torch.is_tensor(v)}
    save_file(tensors or {"_": torch.zeros(0)}, str(tmp / "loss_state.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "train_state.json").write_text(json.dumps(state, indent=1, default=str))
    for folder in [tmp] + ([tmp / "shards"] if shards else []):
        _fsync_dir(folder)


def load(ckpt: Path, model, opt, scaler, loss_state: dict) -> tuple[int, dict]:
    """Restore weights, optimizer, scaler, loss state and RNG from a checkpoint folder, on every rank; returns
    (step, counters). An unreadable file in it is a UserError naming the file."""
    state = read_json(ckpt / "train_state.json", fix=f"; delete {ckpt} to resume from an older checkpoint")
    try:
        if state.get("sharded"):
            distributed.load_shards(ckpt / "shards", model, opt)
        else:
            model.load_state_dict(CausalLM.from_pretrained(ckpt).state_dict())
            flat, opt_state = load_file(str(ckpt / "optimizer.safetensors")), {}
            for name, v in flat.items():
                i, k = name.split(".", 1)
                opt_state.setdefault(int(i), {})[k] = v
            opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        tensors = load_file(str(ckpt / "loss_state.safetensors"))
        rng = load_file(str(ckpt / "rng.safetensors"))
    except (OSError, SafetensorError) as e:
        raise UserError(f"--resume: {ckpt} is damaged ({e}); delete it to resume from an older checkpoint") from None
    scaler.load_state_dict(state["scaler"])
    loss_state.clear()
    loss_state.update({k: v for k, v in tensors.items() if k != "_"} | state["loss_state"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"], state["counters"]


def resume(out_dir: Path, model, opt, scaler, loss_state: dict, rank: int) -> tuple[int, dict, Path]:
    """train.py --resume: load the run's newest complete checkpoint (find says if it is not the one latest.json
    names) and drop the metrics rows logged after it: the resumed steps log them again. Returns (step, counters,
    folder)."""
    ckpt = find(out_dir)
    step, counters = load(ckpt, model, opt, scaler, loss_state)
    if rank == 0:
        truncate_log(out_dir, step)
    print(f"rank {rank}: resumed from {ckpt} (step {step})")
    return step, counters, ckpt


def export(model, out_dir: Path, dtype: str = "source") -> Path:
    """out_dir/final, called on every rank: the trained model as one Hugging Face folder (gathered from the shards
    under FSDP2), in `dtype` ("source": the dtype config.json of the model we started from names; or fp32, bf16,
    fp16), with the source folder's tokenizer and generation_config.json, files readable by everyone (0644); written
    whole before it replaces an older one."""
    if not distributed.all_finite(model):
        raise UserError("the trained weights are not finite: no final model is written (lower --lr, or use "
                        "--dtype bf16/fp32)")
    state, final, tmp = distributed.full_state_dict(model), out_dir / "final", out_dir / "final.tmp"
    if distributed.rank() == 0:
        target = getattr(torch, model.config.torch_dtype) if dtype == "source" else precision.DTYPES[dtype]
        with torch.device("meta"):
            out = CausalLM(model.config)
        out.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=True, assign=True)
        if model.config.tie_word_embeddings:  # assign=True gave the head its own Parameter: share it again
            out.lm_head.weight = out.model.embed_tokens.weight
        out.source_dir = model.source_dir
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            out.save_pretrained(tmp)
            for f in tmp.iterdir():
                f.chmod(0o644)
            _fsync_dir(tmp)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not write {final} ({_reason(e)}); the last checkpoint is intact: free disk "
                            "space, then --resume") from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    distributed.barrier()
    return final


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0]


def log(out_dir: Path, row: dict) -> dict:
    """Append a row to metrics.jsonl as strict JSON: a non-finite number becomes null and its key is listed under
    "nonfinite" (json's bare NaN is not JSON). Returns the row as written."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    row = {k: None if k in bad else v for k, v in row.items()} | ({"nonfinite": bad} if bad else {})
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")
    return row


def truncate_log(out_dir: Path, step: int) -> None:
    """On resume from the checkpoint of `step`: drop the metrics.jsonl rows the resumed run logs again, those of later
    steps and the held-out evaluation row of `step` itself (train.py evaluates before it saves, and the resumed loop
    starts at `step`, evaluating first). The training row of `step` (the update before the checkpoint) stays."""
    path = out_dir / "metrics.jsonl"
    if path.is_file():
        rows = data.read_records(path, strict=False)  # a torn last line of a killed run comes back as an error
        keep = [row for row in rows if isinstance(row, dict) and (row.get("step", 0) < step or (
            row.get("step") == step and not any(k.startswith("eval_") for k in row)))]
        cli.atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in keep)))
