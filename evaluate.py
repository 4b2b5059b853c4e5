"""Measure what a trained model learned, the way the DPO-family papers report it (model.py and data.py are
imported lazily: judge and diagnostics need neither).

    python evaluate.py prefs --model DIR --data test.jsonl [--ref-model M | --ref-cache DIR] --out prefs.json
    python evaluate.py generate --model DIR --bench alpaca_eval|mt_bench|PATH.jsonl --out DIR [--sampling]
    python evaluate.py judge --outputs model_outputs.json --reference ref.json --judge-url URL --judge-model NAME
    python evaluate.py diagnostics RUN_DIR [RUN_DIR ...] --out DIR
"""
import argparse
import hashlib
import http.client
import importlib.util
import inspect
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}


def read_rows(path) -> list[dict]:
    """A JSON list or a JSONL file of objects; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object per line") from None
    return rows


def length_stats(values) -> dict:
    """n, mean, median and 90th percentile (numpy's linear interpolation) of a list of lengths."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90))}


def load_policy(args):
    import data
    from model import Qwen2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.cmd == "generate" else torch.float32  # prefs: fp32 weights + autocast
    policy = Qwen2.from_pretrained(args.model, revision=args.revision, dtype=dtype).to(device).eval()
    return policy, data.load_tokenizer(policy.source_dir)


# ----------------------------------------------------------------------------- preference metrics
@torch.no_grad()
def pair_logps(policy, pairs, pad_id: int, batch_size: int = 8, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """S(y), the summed completion log-probs (model.sequence_logps, autocast in `dtype` as in training), and |y|
    of each pair's chosen and rejected answer."""
    import data
    device, parts = next(policy.parameters()).device, []
    for i in range(0, len(pairs), batch_size):
        b = data.collate(pairs[i:i + batch_size], pad_id)
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
            lp = policy.sequence_logps(*(b[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask")))
        parts.append(torch.stack([lp.float().cpu(), b["lens"].float()]).view(2, 2, -1))  # [S | |y|, w | l, pair]
    t = torch.cat(parts, -1)
    return {"chosen": t[0, 0], "rejected": t[0, 1], "chosen_lens": t[1, 0], "rejected_lens": t[1, 1]}


def preference_metrics(logps: dict, ref: dict | None, beta: float) -> dict:
    """TRL-named held-out metrics from summed log-probs S(y).

    With reference log-probs: the DPO implicit reward r(y) = β·(S(y) − S_ref(y)) (Rafailov et al. 2023, Eq. 5).
    Without: the reference-free reward r(y) = β·S(y)/|y| (SimPO, Meng et al. 2024): average log-prob ranking.
    rewards/accuracies = mean of [r_w > r_l] + ½·[r_w = r_l] (train.py's convention; TRL's strict '>' scores a
    model equal to its reference 0 rather than ½); logps/* are means of the summed log-probs.
    """
    s_w, s_l = logps["chosen"].double(), logps["rejected"].double()
    if ref is not None:
        r_w, r_l = beta * (s_w - ref["ref_chosen_logps"].double()), beta * (s_l - ref["ref_rejected_logps"].double())
    else:
        r_w, r_l = beta * s_w / logps["chosen_lens"].double(), beta * s_l / logps["rejected_lens"].double()
    m = r_w - r_l
    acc = ((m > 0).double() + 0.5 * (m == 0).double()).mean().item()
    q = np.percentile(m.numpy(), [10, 50, 90]).tolist()
    return {"reward": "beta*(S-S_ref)" if ref is not None else "beta*S/|y|", "beta": beta, "n_pairs": len(m),
            "rewards/accuracies": acc, "rewards/accuracies_se": math.sqrt(acc * (1 - acc) / len(m)),
            "rewards/margins": m.mean().item(), "rewards/chosen": r_w.mean().item(),
            "rewards/rejected": r_l.mean().item(), "logps/chosen": s_w.mean().item(),
            "logps/rejected": s_l.mean().item(), "margins_p10": q[0], "margins_p50": q[1], "margins_p90": q[2]}


def loss_report(key: str, logps: dict, ref: dict | None, scores: torch.Tensor, beta: float) -> dict:
    """Mean per-pair loss of losses.LOSSES[key] (paper defaults, this beta) and its extra metrics, such as a hinge
    loss's active fraction (pairs still receiving gradient), on all pairs and on each quartile of the pair length
    (|y_w| + |y_l|)/2: the by-length view that Yao et al. 2025 §5.2 leave to future work. Batch-statistic losses
    (AMaPO, LMPO, KTO...) compute their statistics over the pairs of each group."""
    import losses
    fn = losses.get_loss(key)
    lens = (logps["chosen_lens"] + logps["rejected_lens"]) / 2
    quartile = torch.bucketize(lens, torch.quantile(lens, torch.tensor([0.25, 0.5, 0.75])), right=True)
    groups = {"all": lens >= 0} | {f"len_q{q + 1} ({lens[b].min():.0f}-{lens[b].max():.0f} tokens)": b
                                   for q in range(4) if (b := quartile == q).any()}
    out = {}
    for name, sel in groups.items():
        kw = {"metrics": {}, **({"beta": beta} if "beta" in inspect.signature(fn).parameters else {})}
        if key in losses.STATEFUL:
            kw["state"] = {}
        if key in losses.NEEDS_SCORES:
            kw.update(chosen_scores=scores[0][sel], rejected_scores=scores[1][sel])
        r = [ref["ref_chosen_logps"][sel], ref["ref_rejected_logps"][sel]] if ref is not None else [None, None]
        per_pair = fn(logps["chosen"][sel], logps["rejected"][sel], *r, logps["chosen_lens"][sel],
                      logps["rejected_lens"][sel], **kw)[0]
        out[name] = {"n": int(sel.sum()), "loss": per_pair.mean().item(),
                     **{k: float(v) for k, v in kw["metrics"].items()}}
    return out


def cmd_prefs(args) -> dict:
    import data
    policy, tok = load_policy(args)
    meta, ref = {}, None
    if args.ref_cache and (Path(args.ref_cache) / "meta.json").is_file():  # its lengths, dtype, model are defaults
        meta = json.loads((Path(args.ref_cache) / "meta.json").read_text())
    max_len = args.max_length or meta.get("max_length", 1024)
    max_prompt = args.max_prompt_length or meta.get("max_prompt_length", 256)
    if args.ref_model or args.ref_cache:
        if not (args.ref_model or meta.get("model")):
            raise SystemExit(f"--ref-cache {args.ref_cache}: no meta.json there naming the reference; add --ref-model")
        ref_model, revision = (args.ref_model, None) if args.ref_model else (meta["model"], meta.get("revision"))
        pairs, ref, meta = data.ref_cache(ref_model, revision, args.data, args.split, max_len, max_prompt,
                                          args.ref_cache or Path(args.out).with_suffix(".ref_cache"),
                                          dtype=meta.get("dtype", args.dtype), batch_size=args.batch_size,
                                          device=next(policy.parameters()).device)
        counts = meta["counts"]
    else:
        pairs, counts = data.tokenize_pairs(data.load_rows(args.data, args.split)[0], tok, max_len, max_prompt,
                                            source=args.data)
    loss_beta = None
    if args.loss:  # the loss decides the reward (reference-based or not) and the default beta, as in training
        import losses
        if args.loss in losses.NEEDS_REF and ref is None:
            raise SystemExit(f"--loss {args.loss} uses a reference model: add --ref-model or --ref-cache")
        ref = ref if args.loss in losses.NEEDS_REF else None
        param = inspect.signature(losses.get_loss(args.loss)).parameters.get("beta")
        loss_beta = param.default if param else 1.0  # slic, orpo, sft have no beta: rewards are S/|y|
    beta = args.beta if args.beta is not None else loss_beta or (0.1 if ref is not None else 2.0)
    print(f"prefs: {len(pairs)} pairs (max_length {max_len}, max_prompt_length {max_prompt}), "
          f"reward {'beta*(S-S_ref)' if ref is not None else 'beta*S/|y|'}, beta={beta}")
    logps = pair_logps(policy, pairs, tok.token_to_id(data.PAD_TOKEN), args.batch_size, args.dtype)
    res = {**preference_metrics(logps, ref, beta), "model": args.model, "data": args.data, "split": args.split,
           "data_counts": counts, "args": vars(args)}
    if args.loss:
        scores = torch.tensor([[math.nan if x is None else x for x in (p.score_chosen, p.score_rejected)]
                               for p in pairs]).T
        res["loss"] = {"key": args.loss, **loss_report(args.loss, logps, ref, scores, beta)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps({k: v for k, v in res.items() if "/" in k or k == "loss"}, indent=1))
    return res


# ----------------------------------------------------------------------------- generation
def load_prompts(bench: str) -> tuple[str, list[dict]]:
    """('alpaca', rows with 'instruction') or ('mt_bench', rows with 'question_id', 'category', 'turns')."""
    hub = {"alpaca_eval": ("tatsu-lab/alpaca_eval", "alpaca_eval.json"),
           "mt_bench": ("HuggingFaceH4/mt_bench_prompts", "raw/question.jsonl")}
    if bench in hub:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError
        try:
            bench = hf_hub_download(*hub[bench], repo_type="dataset")
        except (OSError, HfHubHTTPError) as e:  # offline, unreachable, no such file: all one message
            raise SystemExit(f"cannot download {hub[bench][1]} of the Hub dataset {hub[bench][0]} "
                             f"({type(e).__name__}); download it elsewhere and pass --bench PATH.json[l]") from None
    rows, out = read_rows(bench), []
    kind = "mt_bench" if rows and isinstance(rows[0].get("turns", rows[0].get("prompt")), list) else "alpaca"
    for i, r in enumerate(rows, 1):
        if kind == "mt_bench":
            turns = r.get("turns", r.get("prompt"))  # FastChat's key, or the Hub copy's renamed one
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise SystemExit(f"{bench}: row {i}: 'turns' must be a non-empty list of strings (FastChat format)")
            out.append({"question_id": r.get("question_id", r.get("prompt_id", i)), "turns": turns})
        else:
            text = r.get("instruction", r.get("prompt"))
            if not isinstance(text, str) or not text.strip():
                raise SystemExit(f"{bench}: row {i}: needs a non-empty string 'instruction' (or 'prompt'), "
                                 f"or a 'turns' list")
            out.append({"instruction": text, **({"dataset": r["dataset"]} if "dataset" in r else {})})
    return kind, out


def sampling_config(model_dir) -> dict:
    """temperature/top_k/top_p of the model's generation_config.json, defaulting as Hugging Face does (1.0/50/1.0)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        raise SystemExit(f"--sampling: {path} not found; drop --sampling (greedy) or add the file")
    g = json.loads(path.read_text())
    if not g.get("do_sample", False):
        print(f"--sampling: {path} says do_sample=false: decoding greedily")
        return GREEDY
    if ignored := {k: g[k] for k in ("repetition_penalty", "min_p", "typical_p") if k in g}:
        print(f"--sampling: model.generate does not implement {ignored}: not applied")
    return {"temperature": float(g.get("temperature", 1.0)), "top_k": int(g.get("top_k", 50)),
            "top_p": float(g.get("top_p", 1.0))}


def generate_texts(policy, tok, prompts: list[str], *, batch_size: int, max_new_tokens: int, sampling: dict,
                   eos_ids: tuple, pad_id: int, seed: int = 0) -> tuple[list[str], list[int], float]:
    """One answer per rendered prompt: (texts, new-token counts, seconds inside model.generate).

    Prompts go longest first, so a batch wastes little padding and an out-of-memory shows in the first batch;
    they are left-padded (model.generate derives positions from the mask); answers come back in input order.
    """
    device = next(policy.parameters()).device
    enc = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    texts, ntok, secs = [""] * len(enc), [0] * len(enc), 0.0
    for s in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
        idx = order[s:s + batch_size]
        pad = [len(enc[idx[0]]) - len(enc[i]) for i in idx]
        ids = torch.tensor([[pad_id] * p + enc[i] for p, i in zip(pad, idx)], device=device)
        mask = torch.tensor([[0] * p + [1] * len(enc[i]) for p, i in zip(pad, idx)], device=device)
        t0 = time.perf_counter()
        new = policy.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos_ids, seed=seed + s,
                              **sampling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs += time.perf_counter() - t0
        for i, toks in zip(idx, new):
            texts[i], ntok[i] = tok.decode(list(toks), skip_special_tokens=True).strip(), len(toks)
    return texts, ntok, secs


def cmd_generate(args) -> dict:
    import data
    policy, tok = load_policy(args)
    sampling = sampling_config(policy.source_dir) if args.sampling else GREEDY
    eos = policy.config.eos_token_id
    eos = (list(eos) if isinstance(eos, list) else [eos]) + [tok.token_to_id(t) for t in ("<|im_end|>", data.PAD_TOKEN)]
    eos_ids = tuple(dict.fromkeys(e for e in eos if e is not None))
    kind, rows = load_prompts(args.bench)
    rows = rows[:args.limit] if args.limit else rows
    name = args.name or "-".join(Path(args.model).parts[-2:])  # runs/dpo/final -> dpo-final
    print(f"generate: {len(rows)} {kind} prompts, generator={name}, sampling={sampling}, eos={eos_ids}")
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=eos_ids,
              pad_id=tok.token_to_id(data.PAD_TOKEN), seed=args.seed)
    turns = [r["turns"] if kind == "mt_bench" else [r["instruction"]] for r in rows]
    convs, answers, ntok, secs = [[] for _ in rows], [[] for _ in rows], [], 0.0
    for t in range(max(map(len, turns), default=0)):  # turn t+1 is conditioned on the model's own turn-t answer
        live = [i for i in range(len(rows)) if t < len(turns[i])]
        for i in live:
            convs[i].append({"role": "user", "content": turns[i][t]})
        prompts = [data.render_chatml(convs[i], add_generation_prompt=True) for i in live]
        texts, n, s = generate_texts(policy, tok, prompts, **kw)
        for i, a in zip(live, texts):
            convs[i].append({"role": "assistant", "content": a})
            answers[i].append(a)
        ntok, secs = ntok + n, secs + s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "alpaca":
        path = out / "model_outputs.json"
        path.write_text(json.dumps([{"instruction": r["instruction"], "output": a[0], "generator": name,
                                     **{k: r[k] for k in ("dataset",) if k in r}} for r, a in zip(rows, answers)],
                                   indent=2))
    else:
        path = out / f"{name}.jsonl"  # FastChat reads data/mt_bench/model_answer/<model_id>.jsonl
        path.write_text("".join(json.dumps({"question_id": r["question_id"], "answer_id": uuid.uuid4().hex,
                                            "model_id": name, "choices": [{"index": 0, "turns": a}],
                                            "tstamp": time.time()}) + "\n" for r, a in zip(rows, answers)))
    chars = [len(a) for a in sum(answers, [])]
    stats = {"bench": args.bench, "kind": kind, "generator": name, "n_prompts": len(rows), "n_answers": len(chars),
             "tokens": length_stats(ntok), "chars": length_stats(chars), "generated_tokens": sum(ntok),
             "hit_max_new_tokens": sum(n >= args.max_new_tokens for n in ntok), "generate_seconds": secs,
             "tokens_per_s": sum(ntok) / max(secs, 1e-9), "sampling": sampling, "args": vars(args)}
    (out / "generation_stats.json").write_text(json.dumps(stats, indent=2))
    print(f"wrote {path}\nanswer tokens {stats['tokens']}\nanswer chars  {stats['chars']}\n"
          f"{stats['hit_max_new_tokens']} answers hit --max-new-tokens; {sum(ntok)} tokens in {secs:.1f} s "
          f"= {stats['tokens_per_s']:.1f} tokens/s")
    return stats


# ----------------------------------------------------------------------------- pairwise judge
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
                raise SystemExit(f"judge endpoint {url} answered HTTP {e.code}: {e.read()[:300]!r}; check "
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
    mean. Each verdict is appended to cache_path (JSONL, flushed at once) under a hash of judge model, prompt
    version and the three texts: a rerun never pays twice. Malformed replies are cached too (they were paid for)
    and re-asked only with retry_malformed; items whose retries ran out ('failed') are not cached.
    """
    cache, counts = {}, dict(cached=0, judged=0, identical=0, malformed=0, failed=0, cache_bad_lines=0)
    for line in Path(cache_path).read_text().splitlines() if Path(cache_path).is_file() else []:
        try:
            rec = json.loads(line)
            cache[rec["key"]] = rec
        except (ValueError, KeyError, TypeError):  # a run killed mid-write leaves a torn last line
            counts["cache_bad_lines"] += 1
    records = []
    with open(cache_path, "a", encoding="utf-8") as f:
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
            f.write(json.dumps(rec) + "\n")
            f.flush()
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
    outs, refs = read_rows(args.outputs), read_rows(args.reference)
    for path, rows in ((args.outputs, outs), (args.reference, refs)):
        for i, r in enumerate(rows):
            if not (isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)):
                raise SystemExit(f"{path}: entry {i}: needs string 'instruction' and 'output' (AlpacaEval format)")
    ref = {r["instruction"]: r["output"] for r in refs}
    items = [dict(r, reference=ref[r["instruction"]]) for r in outs if r["instruction"] in ref]
    if missing := len(outs) - len(items):
        print(f"judge: {missing} of {len(outs)} instructions have no reference in {args.reference}: skipped")
    if not items:
        raise SystemExit(f"judge: no instruction of {args.outputs} appears in {args.reference}")
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


# ----------------------------------------------------------------------------- training diagnostics
def read_metrics(run: str) -> tuple[list[dict], int]:
    """Rows of RUN/metrics.jsonl (or of the file itself; train.py's keys, eval ones prefixed "eval/") and the number
    of unparsable lines skipped (a killed run leaves a torn last line)."""
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise SystemExit(f"diagnostics: {path} not found; pass run folders containing metrics.jsonl")
    rows, bad = [], 0
    for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        rows += [r] if isinstance(r, dict) else []
        bad += not isinstance(r, dict)
    return rows, bad


def series(rows, key) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows holding a finite number under key; step = row["step"], else the row index."""
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def run_summary(rows) -> dict:
    """Start and end (means of the first and last 10% of points) of the log-prob and reward curves, train and eval;
    likelihood displacement (Razin et al. 2024: the chosen answers' log-prob falls although the margin grows); every
    '*active*' metric (hinge active-pair fraction, overall and per length bucket); quantiles of the logged margins."""
    out = {}
    keys = [p + k for p in ("", "eval/") for k in ("logps/chosen", "logps/rejected", "rewards/margins",
                                                  "rewards/accuracies")]
    for key in keys + sorted({k for r in rows for k in r if "active" in k}):
        if (v := series(rows, key)[1]).size:
            k = max(1, v.size // 10)
            out[key] = {"start": float(v[:k].mean()), "end": float(v[-k:].mean()), "mean": float(v.mean()),
                        "n": int(v.size)}
    for p in ("", "eval/"):
        if p + "logps/chosen" in out:
            out[p + "likelihood_displacement"] = out[p + "logps/chosen"]["end"] < out[p + "logps/chosen"]["start"]
    if (m := series(rows, "eval/rewards/margins")[1]).size or (m := series(rows, "rewards/margins")[1]).size:
        out["margins_quantiles"] = dict(zip(("p10", "p50", "p90"), np.percentile(m, [10, 50, 90]).tolist()))
    return out


def cmd_diagnostics(args) -> dict:
    runs = {str(r): read_metrics(r) for r in args.runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, lines = {name: {"bad_lines": bad, **run_summary(rows)} for name, (rows, bad) in runs.items()}, []
    for name, s in summary.items():
        lines.append(f"== {name}" + (f"  ({s['bad_lines']} unparsable lines skipped)" if s["bad_lines"] else ""))
        for key, val in s.items():
            if isinstance(val, dict):
                lines.append(f"  {key:<40} " + "  ".join(f"{k}={x:.4g}" for k, x in val.items()))
            elif key.endswith("likelihood_displacement"):
                lines.append(f"  {key:<40} {'YES: logps/chosen fell' if val else 'no: logps/chosen did not fall'}")
    print("\n".join(lines))
    (out / "diagnostics.txt").write_text("\n".join(lines) + "\n")
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=2))
    try:
        import matplotlib
    except ImportError:
        print("diagnostics: matplotlib is not installed: text table only (pip install matplotlib for plots)")
        return summary
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for c, (name, (rows, _)) in enumerate(runs.items()):
        color, label = f"C{c}", Path(name).name or name
        for key, style in (("logps/chosen", "-"), ("logps/rejected", "--"), ("eval/logps/chosen", "o-"),
                           ("eval/logps/rejected", "o--")):
            ax[0, 0].plot(*series(rows, key), style, color=color, label=f"{label} {key}")
        ax[0, 1].plot(*series(rows, "rewards/margins"), color=color, label=f"{label} train")
        ax[0, 1].plot(*series(rows, "eval/rewards/margins"), "o-", color=color, label=f"{label} eval")
        for j, key in enumerate(sorted({k for r in rows for k in r if "active" in k})):
            ax[1, 0].plot(*series(rows, key), ["-", "--", ":", "-."][j % 4], color=color, label=f"{label} {key}")
        ax[1, 1].hist(series(rows, "rewards/margins")[1], bins=30, alpha=0.5, color=color, label=label)
    for a, title in zip(ax.flat, ("summed log-probs (chosen solid, rejected dashed, eval o)", "reward margin",
                                  "active-pair fraction", "distribution of logged train rewards/margins")):
        a.set_title(title, fontsize=10)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "diagnostics.png", dpi=100)
    plt.close(fig)
    print(f"diagnostics: wrote {out / 'diagnostics.png'}, diagnostics.txt, diagnostics.json")
    return summary


# ----------------------------------------------------------------------------- CLI
class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):  # shows defaults, except the None/False of unset flags
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = DefaultsHelp

    def model_group(sp, dtype_help):
        g = sp.add_argument_group("model")
        g.add_argument("--model", required=True, help="checkpoint folder or Hub model id")
        g.add_argument("--revision", default=None, help="Hub revision of --model")
        g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
        g.add_argument("--dtype", choices=DTYPES, default="fp32", help=dtype_help)
        g.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass / prompts per generate call")
        return sp.add_argument_group(sp.prog.split()[-1])

    g = model_group(sub.add_parser("prefs", help="held-out preference metrics (TRL names), JSON", formatter_class=fmt),
                    "autocast dtype of the forward passes (weights stay fp32, as in training)")
    g.add_argument("--data", required=True, help="local .jsonl/.json/.parquet or Hub dataset id (data.load_rows)")
    g.add_argument("--split", default="test", help="dataset split")
    g.add_argument("--max-length", type=int, default=None, help="token cap (default: the ref cache's, else 1024)")
    g.add_argument("--max-prompt-length", type=int, default=None, help="prompt cap (default: ref cache's, else 256)")
    g.add_argument("--ref-model", default=None, help="reference model: reward beta*(S-S_ref) (reference-based losses)")
    g.add_argument("--ref-cache", default=None, help="ref log-prob cache folder (data.ref_cache; built if absent)")
    g.add_argument("--loss", default=None, help="losses.py key: its reward type, beta, loss and extras (by length)")
    g.add_argument("--beta", type=float, default=None, help="reward scale (default: the loss's; else 0.1 with a "
                   "reference, 2.0 without)")
    g.add_argument("--out", required=True, help="metrics JSON to write")

    g = model_group(sub.add_parser("generate", help="answers for AlpacaEval, MT-Bench or a JSONL of prompts",
                                   formatter_class=fmt), "weight dtype (bf16 is the fast choice on a GPU)")
    g.add_argument("--bench", required=True, help="alpaca_eval | mt_bench (Hub) | PATH.json[l]: instruction or turns")
    g.add_argument("--out", required=True, help="folder: model_outputs.json or <name>.jsonl, generation_stats.json")
    g.add_argument("--name", default=None, help="generator / model_id in the outputs (default: last 2 path parts)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="answer token cap per turn")
    g.add_argument("--sampling", action="store_true", help="sample as the model's generation_config.json says")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (batch s uses seed + s)")
    g.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")

    sp = sub.add_parser("judge", help="pairwise win rate and LC win rate via an OpenAI-compatible endpoint",
                        formatter_class=fmt)
    g = sp.add_argument_group("outputs")
    g.add_argument("--outputs", required=True, help="model_outputs.json of the model to judge")
    g.add_argument("--reference", required=True, help="reference outputs, same format (e.g. AlpacaEval's baseline)")
    g.add_argument("--out", default=None, help="results JSON (default: CACHE/judge_results.json)")
    g = sp.add_argument_group("judge endpoint")
    g.add_argument("--judge-url", required=True, help="base URL (.../v1) or the full .../chat/completions URL")
    g.add_argument("--judge-model", required=True, help="model name sent to the endpoint")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--cache", default=None, help="verdict cache folder (default: judge_cache next to --outputs)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    g.add_argument("--max-retries", type=int, default=6, help="retries on timeout, 429 and 5xx")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")
    g.add_argument("--retry-malformed", action="store_true", help="ask again where the cached reply was malformed")

    sp = sub.add_parser("diagnostics", help="log-prob curves, hinge active fraction and margins from metrics.jsonl")
    sp.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl) or metrics.jsonl files")
    sp.add_argument("--out", required=True, help="folder for diagnostics.png, .txt and .json")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    print("evaluate.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()))
    commands = {"prefs": cmd_prefs, "generate": cmd_generate, "judge": cmd_judge, "diagnostics": cmd_diagnostics}
    try:
        return commands[args.cmd](args)
    except (OSError, ValueError, KeyError) as e:  # missing files, unreachable Hub, bad data rows, unknown loss key
        raise SystemExit(f"evaluate.py {args.cmd}: error: {e}") from e


if __name__ == "__main__":
    main()
