"""The reference model's log-probs, precomputed once and cached on disk, so training holds only the policy.

Reference cache (`python refcache.py --model M --data D --split S --out DIR`, or ref_cache() from training): DIR/
ref_logps.safetensors (float32 ref_chosen_logps, ref_rejected_logps = summed completion log-probs; long index =
source row of each kept pair) and DIR/meta.json, the header checked on load and the commit marker, written last.
A cache is reused only when every CACHE_KEYS field of its header matches; a stale one is rebuilt (the changed
fields printed), a corrupt one is a UserError that prints the command rebuilding it.
"""
import json
import shlex
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import packing
from batches import score_pairs
from chat import load_tokenizer
from data import DEFAULT_DATASET, Pair, TEMPLATE_ID, files_sha256, load_rows, tokenize_pairs
from infra import cli
from infra.cli import ArgumentParser, HelpFormatter, UserError, atomic_write, read_json
from infra.hub import DEFAULT_MODEL, resolve_model_dir
from infra.precision import DTYPES
from model import CausalLM

CACHE_FORMAT = 1
CACHE_KEYS = ("format_version", "weights_sha256", "tokenizer_sha256", "data_sha256", "max_length",
              "max_prompt_length", "template", "dtype")  # a cache is reused iff all of these match


def cache_folder(cache_dir, model: str, data_source: str, split: str, dtype: str, max_length: int,
                 max_prompt_length: int) -> Path:
    """The folder under --cache-dir where train.py keeps the reference cache of (model, data, split, dtype, lengths);
    evaluate.py prefs looks for a run's cache there. One folder per header a run can ask for: runs of the same data
    in another dtype or length must not rebuild (or, running at the same time, overwrite) each other's cache."""
    parts = (model, data_source, split, dtype, f"{max_length}-{max_prompt_length}")
    return Path(cache_dir) / "--".join(Path(x).name or x for x in parts).replace("/", "_")


def reference_model(run: dict) -> str:
    """The reference of a run, from its args.json: the model it started from, --model, or for the demo (--model
    demo) its initialisation from scratch, which train.py keeps in --cache-dir."""
    demo = run.get("demo") and run.get("model") == "demo"
    return str(Path(run["cache_dir"]) / f"demo_init-seed{run['seed']}") if demo else run["model"]


def _load_cache(out: Path, cmd: str) -> tuple[dict | None, dict | None]:
    """(meta, tensors) of a committed cache, (None, None) if there is none; UserError if corrupt."""
    meta_path, tensor_path = out / "meta.json", out / "ref_logps.safetensors"
    if not meta_path.exists():
        if tensor_path.exists():
            print(f"ref cache: {out} has no meta.json (an interrupted build); building it again")
        return None, None
    fix = f"; the cache is corrupt or truncated: rebuild it with: {cmd}"
    meta = read_json(meta_path, fix=fix)
    try:
        tensors = load_file(tensor_path)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{tensor_path}: {type(e).__name__}: {e}{fix}") from None
    if files_sha256([tensor_path]) != meta.get("tensors_sha256") or len(tensors.get("index", ())) != meta.get("n"):
        raise UserError(f"{tensor_path} does not match the tensors_sha256 and n in {meta_path}{fix}")
    return meta, tensors


def model_sha256(model_dir: Path) -> dict:
    """A model folder's header fields: weights_sha256 (its *.safetensors, sorted, and config.json) and
    tokenizer_sha256 (tokenizer.json, tokenizer_config.json and chat_template.jinja where present)."""
    return dict(weights_sha256=files_sha256(sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]),
                tokenizer_sha256=files_sha256(model_dir / f for f in ("tokenizer.json", "tokenizer_config.json",
                                                                 "chat_template.jinja") if (model_dir / f).is_file()))


def ref_cache(model_name_or_path: str, revision: str | None, data_source: str, split: str, max_length: int,
              max_prompt_length: int, out_dir, dtype: str = "fp16", batch_size: int = 8, device=None,
              skip_bad_rows: bool = False, rebuild: bool = False) -> tuple[list[Pair], dict[str, torch.Tensor], dict]:
    """Reference log-probs of every kept pair, from out_dir if its meta.json matches (CACHE_KEYS), else computed
    in one forward-only pass (fp32 weights, autocast in `dtype` on CUDA; on CPU fp16 falls back to fp32) and
    written atomically. Returns (pairs with ref_*_logps set, {"ref_chosen_logps", "ref_rejected_logps", "index"},
    meta); tensor position k belongs to pairs[k]. rebuild=True ignores (and replaces) an existing cache."""
    out, device = Path(out_dir), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute = "fp32" if device.type == "cpu" and dtype == "fp16" else dtype
    flags = dict(model=model_name_or_path, revision=revision, data=data_source, split=split, out=out,
                 max_length=max_length, max_prompt_length=max_prompt_length, dtype=dtype)
    cmd = shlex.join(["python", "refcache.py"] + [x for k, v in flags.items() if v is not None
                                              for x in (f"--{k.replace('_', '-')}", str(v))]
                     + ["--skip-bad-rows"] * skip_bad_rows + ["--rebuild"])
    model_dir = resolve_model_dir(model_name_or_path, revision)
    rows, data_hash, tok = *load_rows(data_source, split), load_tokenizer(model_dir)
    pairs, counts = tokenize_pairs(rows, tok, max_length, max_prompt_length,
                                   source=str(data_source), skip_bad_rows=skip_bad_rows)
    if not pairs:
        raise UserError(f"{data_source}: no pairs left after filtering ({counts}); nothing to cache")
    meta = dict(format_version=CACHE_FORMAT, model=str(model_name_or_path), revision=revision,
                **model_sha256(model_dir),
                data=str(data_source), split=split,
                data_sha256=data_hash, max_length=max_length, max_prompt_length=max_prompt_length,
                template=TEMPLATE_ID, dtype=compute, counts=counts, n=len(pairs))
    old, tensors = (None, None) if rebuild else _load_cache(out, cmd)
    diff = [f"{k}: {old.get(k)!r} -> {meta[k]!r}" for k in CACHE_KEYS if old.get(k) != meta[k]] if old else []
    if old and not diff:
        if tensors["index"].tolist() != [p.row for p in pairs]:  # same header, other rows: a data.py change
            raise UserError(f"{out}: its {len(tensors['index'])} cached rows differ from the {len(pairs)} rows "
                            f"kept from the data; rebuild it with: {cmd}")
        print(f"ref cache: reusing {out} ({len(pairs)} pairs; model, tokenizer, data, lengths, dtype match)")
        meta = old
    else:
        if old:
            print(f"ref cache: {out} is stale ({'; '.join(diff)}); rebuilding")
        model = CausalLM.from_pretrained(model_dir).to(device)
        print(f"ref cache: {model_name_or_path} on {device} in {compute} (asked {dtype}), batch {batch_size}")
        t0, n_tokens = time.time(), sum(map(packing.size, pairs))
        logps = score_pairs(model, pairs, tok.pad_id, batch_size, device, compute, 2 * max_length,
                            desc="ref logps")
        tensors = {"ref_chosen_logps": logps["chosen_logps"], "ref_rejected_logps": logps["rejected_logps"],
                   "index": torch.tensor([p.row for p in pairs], dtype=torch.long)}
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)  # the commit marker goes first: a crash below leaves no cache
        atomic_write(out / "ref_logps.safetensors", lambda tmp: save_file(tensors, tmp))
        tokens_per_s = n_tokens / (time.time() - t0)
        meta.update(tensors_sha256=files_sha256([out / "ref_logps.safetensors"]), tokens_per_s=round(tokens_per_s),
                    created=time.strftime("%Y-%m-%d %H:%M:%S"))
        atomic_write(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        print(f"ref cache: wrote {out} ({len(pairs)} pairs, {n_tokens} tokens, {tokens_per_s:.0f} tokens/s)")
    for p, c, r in zip(pairs, tensors["ref_chosen_logps"].tolist(), tensors["ref_rejected_logps"].tolist()):
        p.ref_chosen_logps, p.ref_rejected_logps = c, r
    return pairs, tensors, meta


def main(argv=None) -> None:
    p = ArgumentParser(description="Precompute the reference model's summed completion log-probs into "
                                "OUT/ref_logps.safetensors + OUT/meta.json (train.py reuses them when the header "
                                "matches).", formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="reference model: Hub id or local folder")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DEFAULT_DATASET, help="local .jsonl/.json/.parquet file or Hub dataset id")
    g.add_argument("--split", default="train", help="Hub split (ignored for local files)")
    g.add_argument("--max-length", type=int, default=1024, help="max prompt+completion tokens (Yao et al. 2025)")
    g.add_argument("--max-prompt-length", type=int, default=256, help="max prompt tokens, cut from the left")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of failing")
    g = p.add_argument_group("output and compute")
    g.add_argument("--out", required=True, help="cache folder (ref_logps.safetensors + meta.json)")
    g.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="autocast dtype (CPU: fp16 runs as fp32)")
    g.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--rebuild", action="store_true", help="rebuild even if a matching or corrupt cache exists")
    args = p.parse_args(argv)
    print("refcache.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()))
    ref_cache(args.model, args.revision, args.data, args.split, args.max_length, args.max_prompt_length,
              args.out, args.dtype, args.batch_size, args.device, args.skip_bad_rows, args.rebuild)


if __name__ == "__main__":
    cli.run_cli(main)
