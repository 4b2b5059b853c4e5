"""The LLM judge of `evaluate.py judge`: a pairwise AlpacaEval-style client for any OpenAI-compatible
chat-completions endpoint (verdict cache, retries with backoff), and the win-rate statistics it reports."""
import hashlib
import http.client
import importlib.util
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

import data
from model import UserError

JUDGE_VERSION = "pairwise-v1"  # part of the cache key: bump it when the prompt changes
JUDGE_PROMPT = ("Which output follows the instruction better? Judge helpfulness, correctness and clarity. The order "
                "of the outputs is random; do not prefer an output for being longer.\n\n# Instruction\n{instruction}"
                "\n\n# Output (a)\n{a}\n\n# Output (b)\n{b}\n\nReply with one letter and nothing else: a or b.")


def parse_verdict(reply: str | None) -> str | None:
    """'a' or 'b' from a judge reply such as 'a', 'B.', '(b)', 'Output (a)'; None for anything else."""
    m = re.fullmatch(r"\W*(?:output\s*)?\(?([ab])\)?\W*", reply or "", re.I)
    return m.group(1).lower() if m else None


def chat_completion(url: str, body: dict, *, api_key: str | None, timeout: float, max_retries: int,
                    backoff: float) -> tuple[str, str | None]:
    """POST one OpenAI chat completion: ("ok", content, None if the reply is malformed) or ("failed", None).

    Timeouts, connection errors, 429 and 5xx are retried after backoff·2^attempt s (or the server's numeric
    Retry-After), at most 60 s. Other HTTP errors (bad key, unknown model) stop the run: verdicts so far are on disk.
    """
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    for attempt in range(max_retries + 1):
        wait = backoff * 2 ** attempt
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                raw = r.read()
            break
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise UserError(f"judge endpoint {url} answered HTTP {e.code}: {e.read()[:300]!r}; check "
                                f"--judge-url, --judge-model and --api-key-env") from None
            retry_after = (e.headers.get("Retry-After") or "").strip()
            wait = float(retry_after) if re.fullmatch(r"\d+(\.\d*)?", retry_after) else wait
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException):
            pass
        if attempt == max_retries:
            return "failed", None
        time.sleep(min(wait, 60.0))
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "ok", None
    return "ok", content if isinstance(content, str) else None


def judge_pairs(items: list[dict], *, url: str, judge_model: str, cache_path, api_key=None, timeout=60.0,
                max_retries=6, backoff=1.0, retry_malformed=False) -> tuple[list[dict], dict]:
    """A verdict per {instruction, output, reference}: 1 output wins, 0 reference wins, ½ identical, None malformed.

    The output is shown first on even items and second on odd ones, so the judge's position bias cancels in the
    mean. Each verdict is appended to cache_path as it arrives (JSONL; one unbuffered write of the whole line, then
    fsync, so a killed run leaves whole lines) under a hash of judge model, prompt version and the three texts: a
    rerun, or a run after a kill, never pays twice. Malformed replies are cached too (they were paid for)
    and re-asked only with retry_malformed; items whose retries ran out ('failed') are not cached.
    """
    counts = dict(cached=0, judged=0, identical=0, malformed=0, failed=0, cache_bad_lines=0)
    lines = data.read_records(cache_path, strict=False) if Path(cache_path).is_file() else []
    cache = {rec["key"]: rec for rec in lines if isinstance(rec, dict) and "key" in rec}
    counts["cache_bad_lines"] = len(lines) - len(cache)  # a run killed mid-write leaves a torn last line
    records = []
    with open(cache_path, "ab", buffering=0) as f:  # unbuffered append: each record is one write() of a line
        for i, it in enumerate(tqdm(items, desc="judge", leave=False)):
            texts = [judge_model, JUDGE_VERSION, it["instruction"], it["output"], it["reference"]]
            key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
            if (rec := cache.get(key)) is not None and (rec["verdict"] is not None or not retry_malformed):
                counts["cached"] += 1
                records.append(rec)
                continue
            first, reply, verdict = i % 2 == 0, "identical outputs", 0.5
            if it["output"].strip() != it["reference"].strip():
                a, b = (it["output"], it["reference"])[::1 if first else -1]
                prompt = JUDGE_PROMPT.format(instruction=it["instruction"], a=a, b=b)
                body = {"model": judge_model, "temperature": 0, "max_tokens": 8,
                        "messages": [{"role": "user", "content": prompt}]}
                status, reply = chat_completion(url, body, api_key=api_key, timeout=timeout,
                                                max_retries=max_retries, backoff=backoff)
                if status == "failed":
                    counts["failed"] += 1
                    continue
                verdict = None if (letter := parse_verdict(reply)) is None else float((letter == "a") == first)
            counts["malformed" if verdict is None else "judged" if reply != "identical outputs" else "identical"] += 1
            rec = {"key": key, "instruction": it["instruction"], "verdict": verdict, "output_first": first,
                   "reply": reply, "len_output": len(it["output"]), "len_reference": len(it["reference"])}
            f.write((json.dumps(rec) + "\n").encode())  # paid for: on disk before the next request
            os.fsync(f.fileno())
            records.append(rec)
    return records, counts


def win_rate(verdicts) -> dict:
    """AlpacaEval's win rate 100·mean(v), v ∈ {1 win, ½ draw, 0 loss}, and its standard error 100·std(v)/√n
    (ddof = 1)."""
    v = np.asarray(verdicts, dtype=np.float64)
    return {"win_rate": 100 * v.mean() if v.size else math.nan, "n_total": int(v.size),
            "standard_error": 100 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else math.nan,
            "n_wins": int((v == 1).sum()), "n_draws": int((v == 0.5).sum())}


def lc_win_rate(verdicts, len_output, len_reference, l2: float = 1.0, iters: int = 100) -> dict:
    """Length-controlled win rate, a simplified form of Dubois et al. 2024 (arXiv 2404.04475, Eq. 2):

        logit P(output wins) = θ0 + θ_len·tanh(Δ/σ_Δ),   Δ = len(output) − len(reference) (characters), σ_Δ = std(Δ)

    fitted by Newton/IRLS on the verdicts as soft labels (draws = ½) with a penalty ½·l2·θ_len² (AlpacaEval
    regularises its GLM too; this keeps θ_len finite when length separates the verdicts). LC = 100·σ(θ0): the win
    rate predicted with the length term at 0, "had both answers been equally long". The official GLM also fits an
    instruction-difficulty term across all leaderboard models; with one pair of generators it is not identifiable.
    """
    v = np.asarray(verdicts, dtype=np.float64)
    d = np.asarray(len_output, dtype=np.float64) - np.asarray(len_reference, dtype=np.float64)
    sd = d.std() if d.size else 0.0
    x = np.stack([np.ones_like(d), np.tanh(d / sd) if sd > 0 else np.zeros_like(d)], 1)
    theta, reg = np.zeros(2), np.array([1e-6, l2])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(x @ theta)))
        step = np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + np.diag(reg), x.T @ (p - v) + reg * theta)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return {"lc_win_rate": 100 / (1 + math.exp(-theta[0])) if v.size else math.nan, "lc_theta": theta.tolist(),
            "length_diff_sd": float(sd)}


def cmd_judge(args) -> dict:
    """`evaluate.py judge`: every output against the reference output of the same instruction; writes and returns
    the counts, win rate and LC win rate."""
    outs, refs = data.read_records(args.outputs), data.read_records(args.reference)
    for path, rows in ((args.outputs, outs), (args.reference, refs)):
        for i, r in enumerate(rows):
            if not (isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)):
                raise UserError(f"{path}: entry {i}: needs string 'instruction' and 'output' (AlpacaEval format)")
    ref = {r["instruction"]: r["output"] for r in refs}
    items = [dict(r, reference=ref[r["instruction"]]) for r in outs if r["instruction"] in ref]
    if missing := len(outs) - len(items):
        print(f"judge: {missing} of {len(outs)} instructions have no reference in {args.reference}: skipped")
    if not items:
        raise UserError(f"judge: no instruction of {args.outputs} appears in {args.reference}")
    api_key, url = os.environ.get(args.api_key_env), args.judge_url.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    cache = Path(args.cache or Path(args.outputs).parent / "judge_cache")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"judge: {len(items)} pairs, {url}, judge model {args.judge_model}, key from ${args.api_key_env}"
          f"{'' if api_key else ' (unset: no Authorization header)'}, cache {cache / 'verdicts.jsonl'}")
    records, counts = judge_pairs(items, url=url, judge_model=args.judge_model, cache_path=cache / "verdicts.jsonl",
                                  api_key=api_key, timeout=args.timeout, max_retries=args.max_retries,
                                  backoff=args.backoff, retry_malformed=args.retry_malformed)
    ok = [r for r in records if r["verdict"] is not None]
    v, lo, lr = ([r[k] for r in ok] for k in ("verdict", "len_output", "len_reference"))
    res = {"outputs": args.outputs, "reference": args.reference, "judge_model": args.judge_model,
           "judge_prompt": JUDGE_VERSION, "missing_reference": missing, **counts, **win_rate(v),
           **lc_win_rate(v, lo, lr), "avg_length_output": float(np.mean(lo)) if ok else math.nan}
    out = Path(args.out or cache / "judge_results.json")
    out.write_text(json.dumps(res, indent=2))
    print(f"win rate {res['win_rate']:.2f} ± {res['standard_error']:.2f}, LC win rate {res['lc_win_rate']:.2f} "
          f"(n={res['n_total']}; {counts}) -> {out}")
    if counts["failed"] or counts["malformed"]:
        print("judge: rerun to retry failed items; add --retry-malformed to ask again where replies were malformed")
    if importlib.util.find_spec("alpaca_eval"):
        print(f"alpaca_eval is installed: for the official LC win rate (instruction-difficulty term included) run "
              f"alpaca_eval --model_outputs {args.outputs} --reference_outputs {args.reference}")
    return res
