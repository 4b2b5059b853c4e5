"""The LLM judge of `evaluate.py judge`: a client for OpenAI-compatible chat-completions endpoints, and AlpacaEval's
pairwise annotation. mt_bench.py grades MT-Bench with the same client and cache; winrate.py computes the win rates
(its docstring states what is identical to alpaca_eval's computation of the LC win rate, and the residual difference:
the solver's tolerance, below 0.01 points).

Client. Requests run on --concurrency threads. Timeouts, connection errors, 429 and 5xx are retried after
backoff·2^attempt s (or the server's numeric Retry-After), at most 60 s; an item whose retries run out is counted as
failed and asked again by the next run; an unreachable endpoint, or another HTTP error (a bad key, an unknown model),
stops the run with one line. A reply without a usable verdict (not JSON, no choices, no verdict) is asked again up
to --parse-retries times, then kept as malformed (it was paid for; --retry-malformed asks again later). Each reply's
`usage` tokens are summed and priced (--price-input/--price-output, USD per 1M tokens; 0 = unknown). Every verdict
is appended to the cache as it arrives (one unbuffered write of a whole JSON line, then fsync, under a lock shared
by the threads): a kill loses at most the requests in flight; the same command then asks only for what is missing.

AlpacaEval (alpaca_eval 2's protocol). Each model output is compared with the reference output of its instruction
and written in alpaca_eval's annotation format (output_1 = reference, output_2 = model, preference in [1, 2],
2 = the model's answer is better, 1.5 = identical outputs), which alpaca_eval reads. The prompt is an alpaca_eval
template file (--judge-template, read unchanged: {instruction}, {output_1}, {output_2} each replaced once in order of
appearance, the ChatML text split into messages as its prompt_to_chatml does) or our built-in one; both call the
first output shown "m" and the second "M". The reference is shown first on even items, the model's output on odd
ones, so position bias cancels in the mean. --judge-mode weighted is alpaca_eval 2's default judge
(weighted_alpaca_eval_gpt4_turbo: max_tokens 1, temperature 1, top_logprobs 5; preference 2 - P(m) / (P(m) + P(M))
from the top log-probabilities, a token not listed having probability 0, neither listed = malformed).
--judge-mode binary asks at temperature 0 and reads the reply's text: m or M, nothing else.
"""
import hashlib
import http.client
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import data
from evaluation import winrate
from infra import cli, hub, provenance
from infra.cli import UserError

# Our own judge prompt (ChatML, alpaca_eval's template format); --judge-template replaces it with an official one.
BUILTIN_TEMPLATE = """<|im_start|>system
You compare two answers to the same instruction and say which one a careful human reader would prefer.
<|im_end|>
<|im_start|>user
Judge which answer is more helpful, correct and clear. The order of the answers is random, and a longer answer is
not better for being longer.

Instruction:
{instruction}

Answer m:
{output_1}

Answer M:
{output_2}

Reply with the identifier of the better answer, exactly one character: m or M.
<|im_end|>"""
LABELS = ("m", "M")  # the first and the second output shown, as in alpaca_eval's clf templates
MODES = {"weighted": {"max_tokens": 1, "temperature": 1, "logprobs": True, "top_logprobs": 5},
         "binary": {"max_tokens": 8, "temperature": 0}}


# ----------------------------------------------------------------------------- the client
@dataclass
class Endpoint:
    """An OpenAI-compatible chat-completions endpoint, the retry policy and the prices; counts requests, retries and
    tokens across the worker threads."""
    url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 1.0
    parse_retries: int = 2
    concurrency: int = 4
    price_input: float = 0.0  # USD per 1M prompt tokens (0 = unknown)
    price_output: float = 0.0  # USD per 1M completion tokens
    counts: dict = field(default_factory=lambda: dict(requests=0, retries=0, prompt_tokens=0, completion_tokens=0))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **n) -> None:
        with self.lock:
            for k, v in n.items():
                self.counts[k] += v

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if not (self.price_input or self.price_output):
            return None
        return (prompt_tokens * self.price_input + completion_tokens * self.price_output) / 1e6

    def usage(self, records: list) -> dict:
        """Tokens and cost of the judge records (None entries skipped), and the requests of this run."""
        tokens = [sum(r.get(k, 0) for r in records if r) for k in ("prompt_tokens", "completion_tokens")]
        return {"usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1], "cost_usd": self.cost(*tokens)},
                "usage_this_run": {**self.counts, "cost_usd": self.cost(self.counts["prompt_tokens"],
                                                                        self.counts["completion_tokens"])}}


def usage_line(res: dict) -> str:
    """The requests of this run, and the tokens and cost of all the verdicts used (cached ones included)."""
    u, totals = res["usage_this_run"], res["usage"]
    cost = "unknown (set --price-input/--price-output)" if totals["cost_usd"] is None else f"${totals['cost_usd']:.4f}"
    return (f"judge usage: {u['requests']} requests this run ({u['retries']} retries); all verdicts: "
            f"{totals['prompt_tokens']} prompt + {totals['completion_tokens']} completion tokens, cost {cost}")


def endpoint(args) -> Endpoint:
    """The endpoint of the CLI flags; a missing flag or API key is a UserError naming it."""
    for flag in ("judge_url", "judge_model"):
        if not getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is required to ask a judge")
    for flag, low in (("concurrency", 1), ("max_retries", 0), ("parse_retries", 0), ("backoff", 0),
                      ("price_input", 0), ("price_output", 0)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least {low}")
    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}: must be positive (seconds)")
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        raise UserError(f"the judge's API key: ${args.api_key_env} is not set; export it, name another variable with "
                        f"--api-key-env, or pass --api-key-env '' for an endpoint without a key")
    url = args.judge_url.rstrip("/")
    return Endpoint(url if url.endswith("/chat/completions") else url + "/chat/completions", args.judge_model, key,
                    args.timeout, args.max_retries, args.backoff, args.parse_retries, args.concurrency,
                    args.price_input, args.price_output)


def post(ep: Endpoint, body: dict) -> tuple[str, dict | None]:
    """POST one chat completion: ("ok", the reply's JSON object, or None if it is not one) or ("failed", None)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {})}
    request = urllib.request.Request(ep.url, json.dumps(body).encode(), headers)
    for attempt in range(ep.max_retries + 1):
        wait, unreachable = ep.backoff * 2 ** attempt, None
        ep.add(requests=1, retries=int(attempt > 0))
        try:
            with urllib.request.urlopen(request, timeout=ep.timeout) as r:
                raw = r.read()
            break
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise UserError(f"judge endpoint {ep.url} answered HTTP {e.code}: {e.read()[:300]!r}; check "
                                f"--judge-url, --judge-model and --api-key-env (verdicts so far are cached)") from None
            retry_after = (e.headers.get("Retry-After") or "").strip()
            wait = float(retry_after) if re.fullmatch(r"\d+(\.\d*)?", retry_after) else wait
        except urllib.error.URLError as e:  # connection refused, no such host; a connect timeout is only slow
            unreachable = None if isinstance(e.reason, TimeoutError) else e.reason
        except (TimeoutError, ConnectionError, http.client.HTTPException):  # read timeout, reset, bad status line
            pass
        if attempt == ep.max_retries:
            if unreachable is not None:
                raise UserError(f"judge endpoint {ep.url} is unreachable ({unreachable}) after {attempt + 1} "
                                f"attempts; check --judge-url (verdicts so far are cached)")
            return "failed", None
        time.sleep(min(wait, 60.0))
    try:
        reply = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        return "ok", None
    return "ok", reply if isinstance(reply, dict) else None


def ask(ep: Endpoint, messages: list[dict], parse, **params) -> dict | None:
    """Ask until parse(reply) gives a value (at most 1 + ep.parse_retries times): {"value" (None if no reply could
    be used), "reply" (the last reply's text), "prompt_tokens", "completion_tokens"}; None if the request failed."""
    out = {"value": None, "reply": None, "prompt_tokens": 0, "completion_tokens": 0}
    for _ in range(ep.parse_retries + 1):
        status, reply = post(ep, {"model": ep.model, "messages": messages, **params})
        if status == "failed":
            return None
        usage = reply.get("usage") if reply is not None else None
        for k in ("prompt_tokens", "completion_tokens"):
            out[k] += int(usage.get(k) or 0) if isinstance(usage, dict) else 0
        out["reply"] = content(reply)
        if (value := parse(reply) if reply is not None else None) is not None:
            out["value"] = value
            break
    ep.add(prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"])
    return out


def content(reply: dict | None) -> str | None:
    """The text of a chat completion, None if it has none."""
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


class Cache:
    """Judge records keyed by "key", appended to a JSONL file: one unbuffered write of a whole line, then fsync,
    under a lock (the workers write concurrently). A torn last line (a kill mid-write) is skipped and counted."""

    def __init__(self, path: Path):
        self.path, self.lock = Path(path), threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = data.read_records(self.path, strict=False) if self.path.is_file() else []
        self.records = {r["key"]: r for r in lines if isinstance(r, dict) and "key" in r}  # the last one wins
        self.bad_lines = sum(not (isinstance(r, dict) and "key" in r) for r in lines)
        self.file = open(self.path, "ab", buffering=0)
        if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self.file.write(b"\n")  # end a torn line, so the next record starts on its own line

    def get(self, key: str, retry_bad: bool, bad) -> dict | None:
        rec = self.records.get(key)
        return None if rec is None or (retry_bad and rec.get(bad) in (None, -1)) else rec

    def put(self, rec: dict) -> None:
        line = (json.dumps(rec) + "\n").encode()
        with self.lock:
            self.file.write(line)  # paid for: on disk before the next request
            os.fsync(self.file.fileno())
            self.records[rec["key"]] = rec

    def close(self) -> None:
        self.file.close()


def run_pool(fn, items: list, concurrency: int, desc: str) -> list:
    """[fn(item) for item in items] on `concurrency` threads, in input order. The first exception (a UserError, a
    KeyboardInterrupt) cancels the items not started and is raised once the running ones finish (their records are
    written by fn)."""
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(fn, it) for it in items]
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False):
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return [fut.result() for fut in futures]


def check_answered(failed: int, total: int, what: str, cache: Path, allow_partial: bool) -> dict:
    """A judge run whose requests failed for some items (retries ran out) has no result over all of them: a
    UserError (exit 2) saying how many are missing and that the same command asks only for them (the others are
    cached), unless --allow-partial; then {"partial": true, "missing_verdicts": n} for the result file to record."""
    if failed and not allow_partial:
        raise UserError(f"the judge never answered {failed} of {total} {what} (requests failed after --max-retries): "
                        f"no result is written. Run the same command again: it asks only for those {failed} (the "
                        f"others are cached in {cache}); or pass --allow-partial to accept a result over the answered "
                        "ones, recorded as partial")
    return {"partial": bool(failed), "missing_verdicts": failed}


# ----------------------------------------------------------------------------- AlpacaEval
def read_template(path: str | None) -> tuple[str, str]:
    """(template text, its name): an alpaca_eval template file read unchanged, or the built-in one."""
    if path is None:
        return BUILTIN_TEMPLATE, "builtin"
    if not Path(path).is_file():
        raise UserError(f"--judge-template {path}: no such file")
    text = Path(path).read_text(encoding="utf-8")
    keys = re.findall(r"{([^ \s]+?)}", text)
    if sorted(keys) != ["instruction", "output_1", "output_2"]:
        raise UserError(f"--judge-template {path}: needs each of {{instruction}}, {{output_1}}, {{output_2}} once "
                        f"(alpaca_eval's format), found {keys}")
    chatml(text, path)
    return text, Path(path).name


def chatml(prompt: str, source: str = "template") -> list[dict]:
    """A ChatML text as chat messages, as alpaca_eval's prompt_to_chatml splits it (a 'system name=x' role line
    gives a system message with name x)."""
    prompt = prompt.strip()
    if not (prompt.startswith("<|im_start|>") and prompt.endswith("<|im_end|>")):
        raise UserError(f"{source}: a judge template starts with <|im_start|> and ends with <|im_end|> (ChatML)")
    messages = []
    for part in prompt.split("<|im_start|>")[1:]:
        role, _, body = part.partition("\n")
        role, extra = role.strip(), {}
        if role.startswith("system") and role != "system":
            extra = dict(s.split("=", 1) for s in role[len("system"):].split(" ") if s)
            role = "system"
        messages.append({"content": body.split("<|im_end|>", 1)[0].strip(), "role": role, **extra})
    return messages


def fill(template: str, values: dict) -> str:
    """alpaca_eval's make_prompts for one example: each placeholder, in order of first appearance, replaced once."""
    for key in dict.fromkeys(re.findall(r"{([^ \s]+?)}", template)):
        template = template.replace("{" + key + "}", str(values[key]), 1)
    return template


def weighted_preference(reply: dict) -> float | None:
    """alpaca_eval's logprob_parser (numerator m, denominator m, M, not binarised): 2 - P(m) / (P(m) + P(M)) from
    the first token's top log-probabilities; None if neither token is among them."""
    try:
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        lp = {entry["token"]: float(entry["logprob"]) for entry in top if entry["token"] in LABELS}
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not lp:
        return None
    logp_m, logp_M = lp.get("m", -math.inf), lp.get("M", -math.inf)
    return 2 - math.exp(logp_m - np.logaddexp(logp_m, logp_M))


def binary_preference(reply: dict) -> float | None:
    """1 if the reply's text is m, 2 if it is M (quotes, asterisks and a full stop around it ignored), else None."""
    text = (content(reply) or "").strip().strip("\"'`*.() ")
    return {"m": 1.0, "M": 2.0}.get(text)


def annotate(items: list[dict], ep: Endpoint, cache: Cache, template: str, mode: str,
             retry_malformed: bool = False) -> tuple[list[dict | None], dict]:
    """A record per {instruction, output, reference} ({preference in alpaca_eval's terms, reply, tokens...}; None if
    the request failed) and the counts. Identical outputs are a draw (1.5) without a request."""
    counts = dict(cached=0, judged=0, identical=0, malformed=0, failed=0, cache_bad_lines=cache.bad_lines)
    version = hashlib.sha256(template.encode()).hexdigest()[:16]
    parse = weighted_preference if mode == "weighted" else binary_preference

    def one(i):
        it = items[i]
        model_first = i % 2 == 1
        shown = (it["output"], it["reference"]) if model_first else (it["reference"], it["output"])
        if it["output"] == it["reference"]:
            return {"preference": 1.5, "identical": True}
        key = hashlib.sha256(json.dumps([ep.model, mode, version, it["instruction"], *shown]).encode()).hexdigest()
        if (rec := cache.get(key, retry_malformed, "preference")) is not None:
            return dict(rec, cached=True)
        prompt = fill(template, {"instruction": it["instruction"], "output_1": shown[0], "output_2": shown[1]})
        got = ask(ep, chatml(prompt), parse, **MODES[mode])
        if got is None:
            return None
        v = got.pop("value")
        rec = {"key": key, "instruction": it["instruction"], "model_first": model_first,
               "preference": None if v is None else 3 - v if model_first else v, **got, "tstamp": time.time()}
        cache.put(rec)
        return rec

    records = run_pool(one, list(range(len(items))), ep.concurrency, "judge")
    for rec in records:
        counts["failed" if rec is None else "identical" if rec.get("identical") else "cached" if rec.get("cached")
               else "malformed" if rec["preference"] is None else "judged"] += 1
    counts["malformed_total"] = sum(r is not None and r["preference"] is None for r in records)
    return records, counts


def read_outputs(path: str) -> list[dict]:
    """An AlpacaEval outputs file: a list of {instruction, output, generator?}; UserError naming the entry."""
    rows = data.read_records(path)
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)):
            raise UserError(f"{data.row_name(path, i)}: needs string 'instruction' and 'output' (AlpacaEval format)")
    if not rows:
        raise UserError(f"{path}: no outputs in the file")
    return rows


def cmd_judge(args) -> dict:
    """`evaluate.py judge --bench alpaca_eval`: annotations (from --annotations, or by asking the judge), then the win
    rate and LC win rate, written to OUT/judge_results.json (and OUT/annotations.json)."""
    lc = None if args.no_lc else args.df_gamed
    if args.annotations:
        annotations = winrate.read_annotations(args.annotations)
        res = {"annotations": args.annotations, **winrate.scores(annotations, lc)}
        out = Path(args.out or Path(args.annotations).parent)
    else:
        if not (args.outputs and args.reference):
            raise UserError("judge --bench alpaca_eval: give --outputs and --reference (or --annotations)")
        if args.reference == "alpaca_eval":  # AlpacaEval 2's baseline: GPT-4 Turbo's outputs
            args.reference = str(hub.hub_file("tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json", "dataset",
                                              "download it elsewhere and pass --reference PATH"))
        outs, refs = read_outputs(args.outputs), read_outputs(args.reference)
        ref = {r["instruction"]: r for r in refs}
        items = [dict(r, reference=ref[r["instruction"]]["output"]) for r in outs if r["instruction"] in ref]
        if missing := len(outs) - len(items):
            print(f"judge: {missing} of {len(outs)} instructions have no reference in {args.reference}: skipped")
        if not items:
            raise UserError(f"judge: no instruction of {args.outputs} appears in {args.reference}")
        template, template_name = read_template(args.judge_template)
        ep = endpoint(args)
        if lc is not None:
            winrate.resolve_df_gamed(lc)  # before the first paid request: an unreachable Hub stops here
        out = Path(args.out or Path(args.outputs).parent)
        cache = Cache(Path(args.cache or out / "judge_cache") / "verdicts.jsonl")
        print(f"judge: {len(items)} pairs, {ep.url}, judge {ep.model}, {args.judge_mode}, template {template_name}, "
              f"{ep.concurrency} at a time, cache {cache.path}")
        try:
            records, counts = annotate(items, ep, cache, template, args.judge_mode, args.retry_malformed)
        finally:
            cache.close()
        partial = check_answered(counts["failed"], len(items), "items", cache.path, args.allow_partial)
        gen2 = outs[0].get("generator") or args.name or Path(args.outputs).parent.name
        annotator = f"{ep.model}:{args.judge_mode}:{template_name}"
        annotations = [{"instruction": it["instruction"], "output_1": it["reference"],
                        "generator_1": ref[it["instruction"]].get("generator", "reference"),
                        **({"dataset": it["dataset"]} if "dataset" in it else {}), "output_2": it["output"],
                        "generator_2": gen2, "annotator": annotator,
                        "preference": None if rec is None else rec["preference"],
                        "raw_completion": None if rec is None else rec.get("reply"),
                        "price_per_example": None if rec is None else ep.cost(rec.get("prompt_tokens", 0),
                                                                              rec.get("completion_tokens", 0))}
                       for it, rec in zip(items, records)]
        out.mkdir(parents=True, exist_ok=True)
        cli.atomic_write(out / "annotations.json", lambda p: p.write_text(json.dumps(annotations, indent=2)))
        res = {"outputs": args.outputs, "reference": args.reference, "judge_model": ep.model,
               "judge_mode": args.judge_mode, "judge_template": template_name, "annotator": annotator,
               "missing_reference": missing, **counts, **partial, **winrate.scores(annotations, lc),
               **ep.usage(records)}
        print(usage_line(res))
        if counts["failed"] or counts["malformed_total"]:
            print("judge: rerun to retry failed items; add --retry-malformed to ask again where replies were malformed")
    res = {"bench": "alpaca_eval", **res, "df_gamed": lc, "provenance": provenance.record(  # never the API key
        data_sources=[(f, None) for f in (args.outputs, args.reference, args.annotations)],
        judge=provenance.judge_entry(args.judge_model, args.judge_url) if not args.annotations else None)}
    out.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(out / "judge_results.json", lambda p: p.write_text(json.dumps(res, indent=2)))
    lc = "" if lc is None else f", LC {res['length_controlled_winrate']:.2f} ± {res['lc_standard_error']:.2f}"
    print(f"win rate {res['win_rate']:.2f} ± {res['standard_error']:.2f}{lc} (n={res['n_total']}) -> "
          f"{out / 'judge_results.json'}")
    return res
