"""Preference data: inputs (model folders and datasets, local or from the Hub), rows rendered with the model's chat
template (chat.py), tokenization, batches, their log-probs, and the reference log-prob cache.

Rows, in TRL's formats (optional numbers score_chosen / score_rejected are kept for MixDPO and ODPO):
  standard        {"prompt": str, "chosen": str, "rejected": str}: raw text, no chat template (as TRL)
  conversational  {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}, msgs = [{"role", "content", ...}, ...]
  implicit prompt either of them without "prompt": the prompt is what chosen and rejected share at their start (TRL's
                  extract_prompt): whole messages, or characters (a space just before they differ goes to the answers)
Roles are system, user, assistant and tool; an assistant message may carry tool_calls (then content may be null).
Every key of a message reaches the template, and so do a row's "tools" (JSON schemas, or a JSON string of them) and
"chat_template_kwargs". A conversational prompt ends with a user or tool message; each completion is the assistant's
turn (assistant messages, tool results between them). A row that breaks this (or is invalid JSON, lacks a field, has
a wrong type or empty text, or makes the template raise) is a UserError naming file and row; with skip_bad_rows it is
skipped and counted. A string prompt beside conversational chosen/rejected is ignored (TRL's maybe_extract_prompt).

Rendering and tokens follow TRL's DPOTrainer. Conversational rows go through the model's own chat template, rendered
with jinja2 as transformers renders it (ChatTokenizer.render): prompt = render(prompt, add_generation_prompt=True),
and render(prompt + chosen), render(prompt + rejected), tokenized without added special tokens (the template writes
them). Standard rows are raw text: prompt, and prompt + completion + eos_token, with the tokenizer's own special
tokens (a Llama BOS). The answers start where the tokenized prompt and prompt + answer part (the prompt's end, or a
token earlier where BPE merges across it), so chosen and rejected share the prompt tokens exactly. A completion ends
with its last end-of-turn id (ChatTokenizer.end_of_turn: the eos_token and the template's <|im_end|>, <|eot_id|>,
</s>...); what the template puts after it (ChatML's "\n") is never generated, so it is not scored (TRL scores it; the
difference is log p("\n" | <|im_end|>) ~ 0).

Truncation (defaults: max_length 1024 as Yao et al. 2025, max_prompt_length 256 where their TRL setting has 512):
the prompt keeps its END (cut from the left), then completions are cut from the right to fit max_length. Pairs left
with an empty completion, and pairs whose chosen and rejected tokens are identical, are dropped. Every cut and drop
is counted and printed.

Batches are packed (packing.py: one segment prompt ‖ chosen ‖ rejected per pair, several to a row); pair_logps is
the one place that turns a packed batch into per-pair tensors named as losses.compute reads them. make_batches
buckets pairs by size; curriculum_batches gives MixDPO's orders (two stages easy -> hard, and the paper's
ablations), training every pair.

The reference log-prob cache built from these pairs is refcache.py (`python data.py ...` runs its CLI).
"""
import functools
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import jinja2
import torch
from tqdm import tqdm

import packing
from chat import ChatTokenizer
from infra.cli import UserError
from model import TOKENIZER_FILES, CausalLM

DEFAULT_DATASET = "trl-lib/ultrafeedback_binarized"
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
TEMPLATE_ID = "model-template/v2"  # bump when rendering or the prompt/completion split changes: invalidates caches
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx")


def autocast(device: torch.device, dtype: str):
    """Mixed precision in `dtype` ("fp16", "bf16"; "fp32" = off) on the device; weights stay as they are."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


# ----------------------------------------------------------------------------- inputs: model folders and files
def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder as is, else a Hub repo id fetched by `huggingface_hub.snapshot_download` (config, safetensors,
    index and tokenizer files only: never pickled `.bin` weights). Hub ids look like `name` or `owner/name`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model folder (no config.json)")
    if path.is_dir():
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path) or name_or_path.startswith("."):
        raise UserError(f"model folder {name_or_path!r} does not exist (give a folder with config.json and "
                        f"*.safetensors, or a Hub id such as {DEFAULT_MODEL})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise UserError(f"{name_or_path!r} (revision {revision}) is neither a local folder nor a Hub repo") from None
    except OSError as e:  # LocalEntryNotFoundError (offline, not cached) and connection errors are OSErrors
        raise UserError(f"{name_or_path!r} is not a local folder and the Hugging Face Hub is unreachable (repo not "
                        f"cached, {type(e).__name__}): download it where there is network and pass the local "
                        "folder instead") from None


def load_model(name_or_path: str, revision: str | None = None, dtype=torch.float32) -> CausalLM:
    """CausalLM.from_pretrained of a local folder or a Hub id (downloaded first), in eval mode."""
    return CausalLM.from_pretrained(resolve_model_dir(name_or_path, revision), dtype=dtype)


def files_sha256(files) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _hub_files(repo: str, split: str, revision: str | None) -> list[Path]:
    """Download only the split's parquet files of a Hub dataset (data/{split}-*.parquet or {split}/*.parquet)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    patterns = [f"{split}-*.parquet", f"*/{split}-*.parquet", f"{split}/*.parquet", f"*/{split}/*.parquet"]
    try:
        root = Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=patterns))
    except (OSError, HfHubHTTPError, HFValidationError) as e:  # offline, unreachable, no such repo: one line
        raise UserError(f"{repo}: could not get split {split!r} from the Hugging Face Hub ({type(e).__name__}); "
                        "offline? pass a local .jsonl, .json or .parquet file instead (--data my_prefs.jsonl)"
                        ) from None
    files = sorted(p for p in root.rglob("*.parquet") if any(fnmatch(p.relative_to(root).as_posix(), pat)
                                                              for pat in patterns))
    if not files:
        raise UserError(f"{repo}: no parquet files for split {split!r} (looked for {', '.join(patterns)})")
    return files


def row_name(path, i: int) -> str:
    """How every tool names row i (0-based, the position in read_records' list) of a data file: "FILE: line N" in a
    JSON Lines file, where row i is line i + 1, else "FILE: row N" (an element of a JSON array, a parquet row), N
    counted from 1 as editors and `sed -n Np` count."""
    return f"{path}: {'line' if Path(path).suffix == '.jsonl' else 'row'} {i + 1}"


def read_records(path, strict: bool = True) -> list:
    """The objects of a .jsonl (one per line), a .json (an array, or JSON Lines) or a .parquet file (one per row).
    A line that is not valid JSON (a torn last line of a killed run, a blank line) is a UserError naming the file
    and line if strict, else a ValueError object in its place, so that callers can report, skip or count it while
    row i stays line i + 1. A file that is not what its suffix says (not parquet, not UTF-8) is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:  # ArrowInvalid: not a parquet file, or a damaged one
            raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]}); convert it with "
                            "pyarrow.parquet.write_table, or give a .jsonl") from None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text; save the file as UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array; otherwise JSON Lines
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    rows = []
    for i, line in enumerate(text.splitlines()):
        try:
            rows.append(json.loads(line) if line.strip() else ValueError("blank line"))
        except json.JSONDecodeError as e:
            rows.append(ValueError(f"invalid JSON: {e.msg} (column {e.colno})"))
        if strict and isinstance(rows[-1], ValueError):
            raise UserError(f"{path}: line {i + 1}: {rows[-1]}; expected one JSON object per line")
    return rows


def local_data_file(source: str) -> Path | None:
    """The local data file that `source` names, or None for a Hub dataset id (`name` or `owner/name`). Anything that
    looks like a path (it exists, has a file suffix, starts with . / ~ or has two slashes) must be an existing
    .jsonl / .json / .parquet file: UserError otherwise, never a Hub download attempt."""
    path = Path(source).expanduser()
    if not (path.exists() or path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~"))
            or source.count("/") > 1):
        return None
    if not path.exists():
        raise UserError(f"{source}: no such file")
    if path.is_dir() or path.suffix not in (".jsonl", ".json", ".parquet"):
        raise UserError(f"{source}: expected a .jsonl, .json or .parquet file, or a Hub dataset id")
    return path


def load_rows(source: str, split: str = "train", revision: str | None = None) -> tuple[list, str]:
    """Rows of a local .jsonl / .json / .parquet file (read_records, not strict: bad lines come back as ValueError
    objects for tokenize_pairs to report or skip with file and row), or of a Hub dataset's split (parquet files
    only; split and revision are ignored for local files). Returns (rows, "sha256:<hex>" of the bytes read)."""
    path = local_data_file(source)
    files = [path] if path else _hub_files(source, split, revision)
    return [row for f in files for row in read_records(f, strict=False)], files_sha256(files)


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int  # 0-based position of the source row in load_rows' list (the cache's `index`)
    score_chosen: float | None = None
    score_rejected: float | None = None
    ref_chosen_logps: float | None = None  # summed reference log-probs, set by ref_cache
    ref_rejected_logps: float | None = None


def _messages(value, key: str) -> list[dict]:
    """A message list checked (role system/user/assistant/tool; text, or tool_calls for an assistant), copied with
    every key (tool_calls, tool_call_id, name, ...) for the template."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a non-empty list of messages (as 'chosen' is), got {type(value).__name__}")
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise ValueError(f"{key}[{j}] must be a message {{'role': str, 'content': str, ...}}, got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"{key}[{j}]: role {m['role']!r} is not system, user, assistant or tool")
        calls = m["role"] == "assistant" and m.get("tool_calls")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise ValueError(f"{key}[{j}] must be a message {{'role': str, 'content': str, ...}}, got {m!r:.80}")
        if m["role"] != "tool" and not calls and not m["content"].strip():
            raise ValueError(f"{key}[{j}] ({m['role']}): empty text")
    return [dict(m) for m in value]


def _parse_row(row) -> dict:
    """A row as {prompt, chosen, rejected} (strings: standard; message lists: conversational) + tools, template kwargs
    and scores, with an implicit prompt made explicit as TRL's extract_prompt does; or ValueError(problem)."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if missing := [key for key in ("chosen", "rejected") if key not in row]:
        raise ValueError(f"missing field {missing[0]!r}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, list):  # conversational; a string prompt beside conversations is ignored, as TRL does
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if isinstance(prompt, list):
            prompt = _messages(prompt, "prompt")
        else:  # implicit prompt: the messages the two share (if all, all but the last, where TRL's loop ends)
            last = min(len(chosen), len(rejected)) - 1
            n = next((k for k, (c, r) in enumerate(zip(chosen, rejected)) if c != r), last)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise ValueError("no prompt: add a 'prompt' field, or make chosen/rejected whole conversations")
        if prompt[-1]["role"] not in ("user", "tool"):
            raise ValueError(f"the prompt's last message is {prompt[-1]['role']!r}; it must be a user or tool message, "
                             "which the assistant's reply follows")
        for key, msgs in (("chosen", chosen), ("rejected", rejected)):
            roles = [m["role"] for m in msgs]
            if not roles or roles[-1] != "assistant" or not set(roles) <= {"assistant", "tool"}:
                raise ValueError(f"{key}: the completion after the prompt is {' -> '.join(roles) or 'empty'}; it must "
                                 "be the assistant's turn (assistant messages, tool results between them)")
    elif not isinstance(chosen, str):
        raise ValueError(f"'chosen' must be a string or a non-empty list of messages, got {type(chosen).__name__}")
    elif not isinstance(rejected, str) or not isinstance(prompt, str | None):
        raise ValueError("'chosen' is a string (standard format), so 'rejected' and 'prompt' must be strings too")
    else:  # standard: raw text
        if prompt is None:  # implicit prompt: the common prefix, a space before the divergence left to the answers
            n = len(os.path.commonprefix([chosen, rejected]))
            if n == min(len(chosen), len(rejected)) or n > 0 and chosen[n - 1] == " ":  # (no divergence: as TRL)
                n -= 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        for key, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ValueError(f"{key!r}: empty text" + (" (no common prefix)" if "prompt" not in row else ""))
    tools = row.get("tools")
    try:
        tools = json.loads(tools) if isinstance(tools, str) else tools
    except json.JSONDecodeError as e:
        raise ValueError(f"'tools' is not valid JSON ({e.msg})") from None
    if not (tools is None or isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"'tools' must be a list of JSON schemas (objects), got {tools!r:.60}")
    if not isinstance(kwargs := row.get("chat_template_kwargs") or {}, dict):
        raise ValueError(f"'chat_template_kwargs' must be an object, got {kwargs!r:.60}")
    scores = []
    for key in ("score_chosen", "score_rejected"):
        v = row.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{key!r} must be a number, got {v!r:.40}")
        scores.append(None if v is None else float(v))
    return dict(prompt=prompt, chosen=chosen, rejected=rejected, tools=tools or None, kwargs=kwargs, scores=scores)


def _texts(r: dict, tok: ChatTokenizer) -> tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) as text. Standard rows: raw strings, each completion ending with
    the eos_token (appended unless already there, as TRL does). Conversational: the model's chat template, the prompt
    with its generation prompt (the assistant header)."""
    if isinstance(r["prompt"], str):
        if (eos := tok.special.get("eos_token")) is None:
            raise UserError(f"{tok.source}/tokenizer_config.json names no eos_token, which ends every standard-format "
                            "(string) completion; add it, or use conversational rows")
        return r["prompt"], *(r["prompt"] + c + ("" if c.endswith(eos) else eos) for c in (r["chosen"], r["rejected"]))
    kw, prompt = dict(tools=r["tools"], **r["kwargs"]), r["prompt"]
    try:
        answers = [tok.render(prompt + r[k], **kw) for k in ("chosen", "rejected")]
        return tok.render(prompt, True, **kw), *answers
    except (jinja2.TemplateError, TypeError) as e:  # the template's raise_exception, or it could not render a message
        raise ValueError(f"the chat template refused it: {type(e).__name__}: {e}") from None


def tokenize_pairs(rows, tokenizer: ChatTokenizer, max_length: int = 1024, max_prompt_length: int = 256,
                   source: str = "<rows>", skip_bad_rows: bool = False) -> tuple[list[Pair], dict]:
    """Parse, render, tokenize and truncate rows (see the module docstring). Returns the kept pairs and counts:
    rows, kept, bad_rows (skipped), prompts_truncated / completions_truncated (among kept pairs; a pair can
    count two completions), dropped_empty, dropped_identical."""
    if not 0 < max_prompt_length <= max_length:
        raise UserError(f"need 0 < --max-prompt-length ({max_prompt_length}) <= --max-length ({max_length})")
    encoded, bad = [], []
    for i, row in enumerate(rows):
        try:
            r = _parse_row(row)
            texts = _texts(r, tokenizer)
        except ValueError as e:
            where = row_name(source, i)
            if not skip_bad_rows:
                raise UserError(f"{where}: {e}. Fix the row, or pass --skip-bad-rows to skip and count it") from None
            bad.append(f"{where}: {e}")
            continue
        raw = isinstance(r["prompt"], str)  # raw text gets the tokenizer's special tokens (a BOS); templates, theirs
        encoded.append((i, *r["scores"], *(e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=raw))))
    counts = dict(rows=len(rows), kept=0, bad_rows=len(bad), prompts_truncated=0, completions_truncated=0,
                  dropped_empty=0, dropped_identical=0)
    pairs, stops = [], set(tokenizer.end_of_turn)
    for i, sc, sr, p, c, r in encoded:
        n = min(len(os.path.commonprefix([p, c])), len(os.path.commonprefix([p, r])))  # the answers start here
        c, r = (_through_last_stop(x[n:], stops) for x in (c, r))
        p_cut = p[:n][-max_prompt_length:]  # keep the end: the last user turn and the assistant header
        budget = max_length - len(p_cut)
        c_cut, r_cut = c[:budget], r[:budget]
        if not p_cut or not c_cut or not r_cut:
            counts["dropped_empty"] += 1
        elif c_cut == r_cut:
            counts["dropped_identical"] += 1
        else:
            counts["prompts_truncated"] += len(p_cut) < n
            counts["completions_truncated"] += (len(c_cut) < len(c)) + (len(r_cut) < len(r))
            pairs.append(Pair(p_cut, c_cut, r_cut, i, sc, sr))
    counts["kept"] = len(pairs)
    print(f"data {source}: {len(rows)} rows -> {len(pairs)} pairs | truncated: {counts['prompts_truncated']} "
          f"prompts (from the left), {counts['completions_truncated']} completions | dropped: "
          f"{counts['dropped_empty']} empty after truncation, {counts['dropped_identical']} identical chosen/rejected"
          f" | bad rows skipped: {len(bad)}" + "".join(f"\n  skipped {b}" for b in bad[:5]))
    return pairs, counts


def _through_last_stop(ids: list[int], stops: set[int]) -> list[int]:
    """ids up to and including the last end-of-turn id, if any: what the template puts after it (ChatML's "\\n") is
    never generated (generation stops at that id), so it is not scored."""
    last = max((j for j, t in enumerate(ids) if t in stops), default=len(ids) - 1)
    return ids[:last + 1]


def pair_logps(score, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch's per-pair tensors plus the policy's summed completion log-probs S(y) split by side:
    "chosen_logps", "rejected_logps" [B] fp32, i.e. what losses.compute reads. `score(**layout, n_seqs=2B) -> [2B]`
    (chosen answers first) is packing.packed_logps with its model, or train.py's (DDP-wrapped) Scorer."""
    logps = score(**{k: batch[k] for k in packing.LAYOUT}, n_seqs=2 * len(batch["chosen_lens"])).float()
    chosen, rejected = logps.chunk(2)
    pairs = {k: v for k, v in batch.items() if k not in packing.LAYOUT}
    return {**pairs, "chosen_logps": chosen, "rejected_logps": rejected}


@torch.no_grad()
def score_pairs(model: CausalLM, pairs: list[Pair], pad_id: int, batch_size: int, device, dtype: str = "fp32",
                budget: int = 2048, desc: str = "log-probs") -> dict[str, torch.Tensor]:
    """pair_logps of every pair under autocast(dtype), packed `batch_size` pairs at a time into rows of at most
    `budget` tokens, in pair order ([N] tensors on the CPU). Batches go longest first, so an out-of-memory shows at
    once; tqdm shows the progress."""
    parts, batches = [], make_batches(pairs, batch_size, shuffle=False)[::-1]
    score = functools.partial(packing.packed_logps, model)
    for idx in tqdm(batches, desc=desc, unit="batch", leave=False):
        batch = packing.pack([pairs[i] for i in idx], pad_id, budget, device)
        with autocast(device, dtype):
            parts.append({k: v.cpu() for k, v in pair_logps(score, batch).items()})
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    order = torch.tensor([i for idx in batches for i in idx], dtype=torch.long)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return {k: v[inverse] for k, v in out.items()}


def make_batches(pairs: list[Pair], batch_size: int, *, seed: int = 0, shuffle: bool = True, order: str = "length",
                 chunk_batches: int = 64) -> list[list[int]]:
    """Lists of indices into pairs, deterministic given seed (`packing.padding_fraction` reports what they cost).
    order="length": shuffle, then sort by packed size (prompt + chosen + rejected) within mega-chunks of
      chunk_batches batches, cut into batches and shuffle the batches (shuffle=False: one global sort, shortest
      first), so that packed rows come out nearly full.
    order="margin": MixDPO's easy -> hard order over all pairs (`curriculum_batches`' "per-epoch")."""
    if order == "margin":
        return curriculum_batches(pairs, batch_size, 0, epochs=1, order="per-epoch", seed=seed, shuffle=shuffle)
    if order != "length":
        raise ValueError(f"order={order!r}: expected 'length' or 'margin'")
    rng = random.Random(seed)
    idx = list(range(len(pairs)))
    if shuffle:
        rng.shuffle(idx)
    chunk = batch_size * chunk_batches if shuffle else max(len(idx), 1)
    batches = []
    for k in range(0, len(idx), chunk):
        part = sorted(idx[k:k + chunk], key=lambda i: packing.size(pairs[i]))
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def difficulty_margins(pairs: list[Pair], difficulty: str = "score") -> list[float]:
    """MixDPO's difficulty margin of each pair, as `losses.difficult` computes it from a packed batch (in float32,
    so that the order and the loss agree on a margin at τ): score_chosen - score_rejected ("score"), or the
    reference's log-likelihood margin ref_chosen_logps - ref_rejected_logps ("ref_margin")."""
    fields = ("score_chosen", "score_rejected") if difficulty == "score" else ("ref_chosen_logps", "ref_rejected_logps")
    missing = sum(getattr(p, fields[0]) is None or getattr(p, fields[1]) is None for p in pairs)
    if missing:
        need = "score_chosen and score_rejected" if difficulty == "score" else "reference log-probs"
        raise UserError(f"MixDPO's easy-to-hard order needs {need}; {missing} of {len(pairs)} pairs lack them")
    chosen, rejected = (torch.tensor([getattr(p, f) for p in pairs], dtype=torch.float32) for f in fields)
    return (chosen - rejected).tolist()


def curriculum_batches(pairs: list[Pair], batch_size: int, epoch: int, *, epochs: int, order: str = "two-stage",
                       difficulty_threshold: float = 0.5, difficulty: str = "score", discard_difficult: bool = False,
                       seed: int = 0, shuffle: bool = True, min_last: int = 1) -> list[list[int]]:
    """MixDPO's batches for epoch `epoch` of a run (Pang et al. 2026, arXiv 2602.00954). A pair is difficult when its
    `difficulty_margins` value is < difficulty_threshold. "two-stage" (the paper): epochs 0..epochs-1 hold the easy
    pairs, easy -> hard (margin descending), epochs..2*epochs-1 the difficult ones in the same order; "reversed":
    the difficult pairs first, then the easy ones, each hard -> easy; "per-epoch": every epoch all pairs easy -> hard
    (with any loss too: MixDPO's Fig. 4a "DPO + sorted", the curriculum without routing);
    "random": every epoch all pairs shuffled (no margins needed unless discarding), as transformers' Trainer samples.
    Ties (and "random") in an order shuffled by seed (none if not shuffle); discard_difficult drops the difficult
    pairs. Every pair trains: the last batch may be partial, and one smaller than min_last (2 for batch statistics,
    or the DDP world size) joins the batch before it."""
    margins = difficulty_margins(pairs, difficulty) if order != "random" or discard_difficult else None
    hard = [m < difficulty_threshold for m in margins] if margins is not None else [False] * len(pairs)
    idx = [i for i in range(len(pairs)) if not (discard_difficult and hard[i])]
    if shuffle:
        random.Random(seed).shuffle(idx)
    if order in ("two-stage", "reversed"):
        stage_two = epoch >= epochs
        idx = [i for i in idx if hard[i] == (stage_two == (order == "two-stage"))]
    elif order not in ("per-epoch", "random"):
        raise ValueError(f"order={order!r}: expected 'two-stage', 'reversed', 'per-epoch' or 'random'")
    if order != "random":
        idx.sort(key=margins.__getitem__, reverse=order != "reversed")  # stable: ties keep the shuffled order
    batches = [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_last:
        last = batches.pop()  # (`batches[-2] += batches.pop()` would read [-2] before the pop, write it after)
        batches[-1] += last
    return batches


def balance_routed(batches: list[list[int]], hard: list[bool], min_pairs: int = 2) -> list[list[int]]:
    """Batches for --route-difficult around a loss that needs min_pairs pairs in a batch (losses.NEEDS_TWO: AOT
    sorts them, KTO's z0 is their mean): in each batch the pairs the loss sees, the easy ones (not hard[i]), number
    0 or at least min_pairs. A batch with too few gets easy pairs from a batch that can spare them (>= min_pairs + 1
    easy, or its only one), each in exchange for one of its difficult pairs (trained with SFT); else gives its easy
    pairs away in exchange for difficult ones, to a batch that then has more. Every pair trains once and every batch
    keeps its size; batches that already qualify are moved only when they give or take a pair. UserError if the
    data leaves no way (fewer than min_pairs easy pairs in all)."""
    batches = [list(b) for b in batches]

    def easy(b):
        return [i for i in b if not hard[i]]

    def swap(a, give, b, take):  # pair `give` of batch a <-> pair `take` of batch b
        a[a.index(give)], b[b.index(take)] = take, give

    for a in batches:
        while 0 < len(easy(a)) < min_pairs:
            need, others = min_pairs - len(easy(a)), [b for b in batches if b is not a]
            donor = next((b for b in others if len(easy(b)) - 1 >= min_pairs or len(easy(b)) == 1), None)
            taker = next((b for b in others if len(easy(b)) >= min_pairs and len(b) > len(easy(b))), None)
            if donor is not None and len(a) > len(easy(a)):
                swap(a, next(i for i in a if hard[i]), donor, easy(donor)[0])
            elif taker is not None:
                swap(a, easy(a)[0], taker, next(i for i in taker if hard[i]))
            else:
                raise UserError(f"--route-difficult: a batch holds {len(easy(a))} easy pair(s) and no other batch can "
                                f"give it {need} more or take them ({sum(not h for h in hard)} easy pairs in all); the "
                                f"loss needs 0 or >= {min_pairs} per batch: raise --batch-size, lower "
                                "--difficulty-threshold, or use --order two-stage")
    return batches


if __name__ == "__main__":  # `python data.py ...` builds a reference cache (refcache.py)
    from infra import cli
    import refcache
    cli.run_cli(refcache.main)
