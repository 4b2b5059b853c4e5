"""Preference rows: local files or a Hub dataset (infra/hub.py), TRL's formats parsed and checked, rendered with the
model's chat template (chat.py), tokenized and truncated into Pairs. Batches of pairs are batches.py.

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

The reference log-prob cache built from these pairs is refcache.py (`python refcache.py ...` runs its CLI).
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import jinja2

from chat import ChatTokenizer
from infra import hub
from infra.cli import UserError, read_json

DEFAULT_DATASET = "trl-lib/ultrafeedback_binarized"
TEMPLATE_ID = "model-template/v2"  # bump when rendering or the prompt/completion split changes: invalidates caches
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx")


# ----------------------------------------------------------------------------- inputs: data files
_SHA256: dict[tuple, str] = {}  # files' stat -> their hash: a run's provenance and its reference cache hash once


def files_sha256(files) -> str:
    """sha256 of the files' bytes, in order; each unchanged list (path, size, mtime, inode) is read once a process
    (a 7-8B model's weights are ~16 GB: the provenance record and the reference cache's header share one pass)."""
    stats = [(Path(f), os.stat(f)) for f in files]
    key = tuple((str(f.resolve()), s.st_size, s.st_mtime_ns, s.st_ino) for f, s in stats)
    if key not in _SHA256:
        h = hashlib.sha256()
        for f, _ in stats:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        _SHA256[key] = "sha256:" + h.hexdigest()
    return _SHA256[key]


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
        return read_json(path, expect=list)
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
    files = [path] if path else hub.dataset_files(source, split, revision)
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
        if v is not None and not math.isfinite(v):  # NaN (pandas' missing value) would route a pair arbitrarily
            raise ValueError(f"{key!r} must be a finite number, got {v}; drop the row or give it a score")
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
