"""Measure what a trained model learned, the way the DPO-family papers report it.

    python evaluate.py prefs --model DIR --data test.jsonl [--ref-model M | --ref-cache DIR] --out RUN/prefs.json
    python evaluate.py generate --model RUN/final --bench alpaca_eval|mt_bench|PATH.jsonl --out RUN/alpaca_eval
    python evaluate.py judge --outputs RUN/alpaca_eval/model_outputs.json --reference REF.json --judge-url URL ...
    python evaluate.py judge --bench mt_bench --answers RUN/mt_bench/NAME.jsonl --judge-url URL ...
    python evaluate.py diagnostics RUN [RUN ...] --out DIR
    python evaluate.py report RUN [RUN ...] --out DIR

prefs scores held-out pairs with the training path (batches.score_pairs -> losses.compute), generate decodes with
generate.py, judge is judge.py's client with AlpacaEval's protocol (winrate.py's statistics) or mt_bench.py's
FastChat grading, diagnostics and report (report.py) read what train.py and the other commands wrote.
"""
import argparse
import json
import math
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import batches
import chat
import data
import generate
import losses
import refcache
from evaluation import judge, mt_bench, report
from infra import cli, flags, hub, precision, provenance
from infra.cli import UserError, read_json


def length_stats(values) -> dict:
    """n, mean, median and 90th percentile (numpy's linear interpolation) of a list of lengths."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90))}


def load_policy(args, dtype=torch.float32):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = hub.load_model(args.model, args.revision, dtype=dtype).to(device)
    return policy, chat.load_tokenizer(policy.source_dir)


# ----------------------------------------------------------------------------- preference metrics
def preference_metrics(metrics: dict[str, torch.Tensor]) -> dict:
    """Held-out TRL metrics (means over pairs) from losses.compute's per-pair metrics, plus the standard error of
    the accuracy and the 10/50/90th percentiles of the reward margins."""
    means = {k: v.double().mean().item() for k, v in metrics.items() if k.startswith(("rewards/", "logps/"))}
    acc, n = means["rewards/accuracies"], len(metrics["rewards/margins"])
    p10, p50, p90 = np.percentile(metrics["rewards/margins"].double().numpy(), [10, 50, 90]).tolist()
    return {"n_pairs": n, **means, "rewards/accuracies_se": math.sqrt(acc * (1 - acc) / n), "margins_p10": p10,
            "margins_p50": p50, "margins_p90": p90}


def score(key: str, batch: dict[str, torch.Tensor], hparams: dict) -> tuple[torch.Tensor, dict]:
    """losses.compute on held-out pairs (fresh running statistics); data a loss cannot score is a UserError."""
    try:  # the losses raise ValueError for data they cannot score (NaN or reversed scores, too few pairs)
        return losses.compute(key, batch, hparams, state={})
    except ValueError as e:
        raise UserError(f"--loss {key}: {e}") from None


def loss_report(key: str, batch: dict[str, torch.Tensor], hparams: dict) -> dict:
    """Mean per-pair loss of losses.LOSSES[key] and its extra metrics, such as a hinge loss's active fraction (pairs
    still receiving gradient), on all pairs and on each quartile of the pair length (|y_w| + |y_l|)/2: the
    by-length view that Yao et al. 2025 §5.2 leave to future work. Batch-statistic losses (AMaPO, LMPO, KTO...)
    compute their statistics over the pairs of each group."""
    lens = (batch["chosen_lens"] + batch["rejected_lens"]).double() / 2
    quartile = torch.bucketize(lens, torch.quantile(lens, torch.tensor([0.25, 0.5, 0.75], dtype=lens.dtype)),
                               right=True)
    groups = {"all": lens >= 0} | {f"len_q{q + 1} ({lens[b].min():.0f}-{lens[b].max():.0f} tokens)": b
                                   for q in range(4) if (b := quartile == q).any()}
    out = {}
    for name, sel in groups.items():
        per_pair, metrics = score(key, {k: v[sel] for k, v in batch.items()}, hparams)
        out[name] = {"n": int(sel.sum()), "loss": per_pair.mean().item(),
                     **{k: v.mean().item() for k, v in metrics.items() if k.startswith(key + "/")}}
    return out


def run_reference(args) -> dict:
    """The training run that --model belongs to (a model folder inside a run folder: RUN/final, RUN/ckpt-N), from
    RUN/args.json ({} if none). If that run trained with a reference-based loss and neither --ref-model nor
    --ref-cache is given, its reference (the model it started from) and reference cache become them, and are
    printed: prefs then scores the rewards training reported, β·(S − S_ref), not the reference-free ones."""
    run_dir, args.ref_revision = Path(args.model).expanduser().parent, None
    if not (Path(args.model).expanduser().is_dir() and (run_dir / "args.json").is_file()):
        return {}
    run = read_json(run_dir / "args.json")
    if args.ref_model or args.ref_cache or run.get("loss") not in losses.NEEDS_REF or not run.get("model"):
        return run
    train_defaults = flags.build_parser()  # an args.json written by hand may leave out what train.py defaults
    for key in ("cache_dir", "dtype", "max_length", "max_prompt_length"):
        run.setdefault(key, train_defaults.get_default(key))
    args.ref_model, args.ref_revision = refcache.reference_model(run), run.get("revision")
    args.ref_cache = str(refcache.cache_folder(run["cache_dir"], run["model"], args.data, args.split, run["dtype"],
                                               run["max_length"], run["max_prompt_length"]))
    if run.get("demo") and not Path(args.ref_model).is_dir():
        raise UserError(f"{run_dir / 'args.json'}: the run's reference, the demo's initial model {args.ref_model} "
                        f"(in its --cache-dir, relative to where train.py ran), is not there: run evaluate.py from "
                        "that folder, or pass --ref-model")
    print(f"prefs: {args.model} is a model of the run in {run_dir}, trained with --loss {run['loss']}: its reference "
          f"is {args.ref_model} (the model it started from), its reference cache {args.ref_cache}; pass --ref-model "
          "to use another")
    return run


def cmd_prefs(args) -> dict:
    """`evaluate.py prefs`: the held-out metrics of train.py's eval rows, for any model and data."""
    policy, tok = load_policy(args)
    run, meta = run_reference(args), {}
    if args.ref_cache and (Path(args.ref_cache) / "meta.json").is_file():  # its lengths, dtype, model are defaults
        meta = read_json(Path(args.ref_cache) / "meta.json")
    max_len = args.max_length or meta.get("max_length") or run.get("max_length") or 1024
    max_prompt = args.max_prompt_length or meta.get("max_prompt_length") or run.get("max_prompt_length") or 256
    has_ref = bool(args.ref_model or args.ref_cache)
    if has_ref:
        if not (args.ref_model or meta.get("model")):
            raise UserError(f"--ref-cache {args.ref_cache}: no meta.json there naming the reference; add --ref-model")
        ref_model, revision = ((args.ref_model, args.ref_revision) if args.ref_model
                               else (meta["model"], meta.get("revision")))
        pairs, _, meta = refcache.ref_cache(ref_model, revision, args.data, args.split, max_len, max_prompt,
                                        args.ref_cache or Path(args.out).with_suffix(".ref_cache"),
                                        dtype=meta.get("dtype", args.dtype), batch_size=args.batch_size,
                                        device=next(policy.parameters()).device)
        counts, reference = meta["counts"], ref_model
    else:
        reference = None
        pairs, counts = data.tokenize_pairs(data.load_rows(args.data, args.split)[0], tok, max_len, max_prompt,
                                            source=args.data)
    key = args.loss or ("dpo" if has_ref else "simpo")  # their rewards: β·(S − S_ref), or β·S/|y| without one
    if key in losses.NEEDS_REF and not has_ref:
        raise UserError(f"--loss {key} uses a reference model: add --ref-model or --ref-cache")
    hparams = losses.defaults(key)
    if args.beta is not None:
        if "beta" not in hparams:
            raise UserError(f"--beta: --loss {key} has no beta (its rewards are S/|y|)")
        hparams["beta"] = args.beta
    elif "beta" in hparams and key in losses.NEEDS_REF and "beta" in (run.get("hparams") or {}):
        hparams["beta"] = run["hparams"]["beta"]  # the run's β scales the rewards it reported
    reward = "beta*(S-S_ref)" if key in losses.NEEDS_REF else "beta*S/|y|"
    print(f"prefs: {len(pairs)} pairs (max_length {max_len}, max_prompt_length {max_prompt}), loss {key}, "
          f"reward {reward}, reference {reference or 'none'}, {hparams}")
    scored = batches.score_pairs(policy, pairs, tok.pad_id, args.batch_size,
                                 next(policy.parameters()).device, args.dtype, budget=2 * max_len)
    res = {"reward": reward, "reference": reference, "beta": hparams.get("beta", 1.0),
           **preference_metrics(score(key, scored, hparams)[1]),
           "model": args.model, "data": args.data, "split": args.split, "data_counts": counts, "args": vars(args),
           "provenance": provenance.record(model_dir=policy.source_dir, data_sources=[(args.data, args.split)],
                                           device=next(policy.parameters()).device, dtype=args.dtype)}
    if args.loss:
        res["loss"] = {"key": key, **loss_report(key, scored, hparams)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps({k: v for k, v in res.items() if "/" in k or k == "loss"}, indent=1))
    return res


# ----------------------------------------------------------------------------- generation
def load_prompts(bench: str) -> tuple[str, list[dict]]:
    """('alpaca', rows with 'instruction') or ('mt_bench', rows with 'question_id', 'category', 'turns')."""
    if bench == "alpaca_eval":
        bench = str(hub.hub_file("tatsu-lab/alpaca_eval", "alpaca_eval.json", "dataset",
                                 "download it elsewhere and pass --bench PATH"))
    elif bench == "mt_bench":
        bench = mt_bench.source(bench, "--questions")
    rows, out = data.read_records(bench), []
    if not rows:
        raise UserError(f"{bench}: no prompts in the file")
    first = rows[0] if isinstance(rows[0], dict) else {}
    if isinstance(first.get("turns", first.get("prompt")), list):
        return "mt_bench", mt_bench.check_questions(rows, bench)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"{data.row_name(bench, i)}: expected a JSON object, got {type(r).__name__}")
        text = r.get("instruction", r.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{data.row_name(bench, i)}: needs a non-empty string 'instruction' (or 'prompt'), "
                            f"or a 'turns' list")
        out.append({"instruction": text, **({"dataset": r["dataset"]} if "dataset" in r else {})})
    return "alpaca", out


def decoding(kind: str, rows: list[dict], args, model_dir) -> list[dict]:
    """Each prompt's sampling settings: --greedy, --sampling (the model's generation_config.json), else greedy for
    AlpacaEval and FastChat's per-category temperature for MT-Bench (greedy where it is 0; top_k/top_p as
    transformers' generate would take them, from generation_config.json, default 50 and 1.0)."""
    if args.greedy or (kind == "alpaca" and not args.sampling):
        return [generate.GREEDY] * len(rows)
    if args.sampling:
        return [generate.sampling_config(model_dir)] * len(rows)
    g = generate.generation_config(model_dir)
    temps = [mt_bench.TEMPERATURE.get(r["category"], mt_bench.DEFAULT_TEMPERATURE) for r in rows]
    return [generate.GREEDY if t < 1e-4 else {"temperature": t, "top_k": int(g.get("top_k", 50)),
                                               "top_p": float(g.get("top_p", 1.0))} for t in temps]


def cmd_generate(args) -> dict:
    """`evaluate.py generate`: answers to every prompt of the benchmark, written in its format, and their lengths."""
    kind, rows = load_prompts(args.bench)
    if kind == "mt_bench":  # FastChat's answer files are sorted by question_id
        rows = sorted(rows, key=lambda r: (isinstance(r["question_id"], str), r["question_id"]))
    rows = rows[:args.limit] if args.limit else rows
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    policy, tok = load_policy(args, precision.DTYPES[dtype])
    samplings = decoding(kind, rows, args, policy.source_dir)
    stop_ids, stop_strings = generate.stops(policy, tok)
    name = args.name or "-".join(Path(args.model).parts[-2:])  # runs/dpo/final -> dpo-final
    print(f"generate: {len(rows)} {kind} prompts, generator={name}, {dtype}, sampling="
          f"{sorted({json.dumps(s) for s in samplings})}, stop ids={stop_ids}, stop strings={stop_strings}")
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids,
              stop_strings=stop_strings, seed=args.seed, compile=args.compile)
    turns = [r["turns"] if kind == "mt_bench" else [r["instruction"]] for r in rows]
    convs, answers, ntok, secs, cut = [[] for _ in rows], [[] for _ in rows], [], 0.0, 0
    for t in range(max(map(len, turns), default=0)):  # turn t+1 is conditioned on the model's own turn-t answer
        live = [i for i in range(len(rows)) if t < len(turns[i])]
        for i in live:
            convs[i].append({"role": "user", "content": turns[i][t]})
        for sampling in dict.fromkeys(json.dumps(samplings[i]) for i in live):  # one call per setting
            group = [i for i in live if json.dumps(samplings[i]) == sampling]
            prompts = [tok.render(convs[i], add_generation_prompt=True) for i in group]
            texts, n, s, c = generate.generate_texts(policy, tok, prompts, sampling=json.loads(sampling), **kw)
            for i, a in zip(group, texts):
                convs[i].append({"role": "assistant", "content": a})
                answers[i].append(a)
            ntok, secs, cut = ntok + n, secs + s, cut + c
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
             "tokens_per_s": sum(ntok) / max(secs, 1e-9), "truncated_prompts": cut, "dtype": dtype,
             "sampling": samplings[0] if len({json.dumps(s) for s in samplings}) == 1 else "per category",
             **({"temperatures": {r["category"]: s["temperature"] for r, s in zip(rows, samplings)}}
                if kind == "mt_bench" else {}),
             "stop_ids": stop_ids, "stop_strings": stop_strings, "args": vars(args),
             "provenance": provenance.record(model_dir=policy.source_dir, data_sources=[(args.bench, None)],
                                             device=next(policy.parameters()).device, dtype=dtype)}
    (out / "generation_stats.json").write_text(json.dumps(stats, indent=2))
    print(f"wrote {path}\nanswer tokens {stats['tokens']}\nanswer chars  {stats['chars']}\n{cut} prompts longer than "
          f"the context minus --max-new-tokens kept their end; {stats['hit_max_new_tokens']} answers hit "
          f"--max-new-tokens; {sum(ntok)} tokens in {secs:.1f} s = {stats['tokens_per_s']:.1f} tokens/s")
    return stats


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, about in (("prefs", "held-out preference metrics (TRL names), JSON"),
                        ("generate", "answers for AlpacaEval, MT-Bench or a JSONL of prompts")):
        sp = sub.add_parser(name, help=about, formatter_class=cli.HelpFormatter)
        g = sp.add_argument_group("model")
        g.add_argument("--model", required=True, help="checkpoint folder or Hub model id")
        g.add_argument("--revision", default=None, help="Hub revision of --model")
        g.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")
        g.add_argument("--dtype", choices=list(precision.DTYPES), default="fp32" if name == "prefs" else None,
                       help="prefs: autocast dtype of the forward passes (weights stay fp32, as in training); "
                       "generate: weight and KV-cache dtype (None: bf16 on CUDA, fp32 on CPU)")
        g.add_argument("--batch-size", type=int, default=8, help="prefs: pairs per forward pass; generate: sequences "
                       "decoded at once (a finished one's row goes to the next prompt; KV cache memory grows with it)")
    g = sub.choices["prefs"].add_argument_group("prefs")
    g.add_argument("--data", required=True, help="local .jsonl/.json/.parquet or Hub dataset id (data.load_rows)")
    g.add_argument("--split", default="test", help="dataset split")
    g.add_argument("--max-length", type=int, default=None, help="token cap (None: the ref cache's, else 1024)")
    g.add_argument("--max-prompt-length", type=int, default=None, help="prompt cap (None: ref cache's, else 256)")
    g.add_argument("--ref-model", default=None, help="reference model: reward beta*(S-S_ref) (reference-based losses)")
    g.add_argument("--ref-cache", default=None, help="ref log-prob cache folder (refcache.ref_cache; built if absent)")
    g.add_argument("--loss", default=None, help="losses.py key: its rewards, hyperparameters, loss and extras by "
                   "length quartile (None: dpo with a reference, simpo without)")
    g.add_argument("--beta", type=float, default=None, help="reward scale (None: the loss's paper default)")
    g.add_argument("--out", required=True, help="metrics JSON to write")

    g = sub.choices["generate"].add_argument_group("generate")
    g.add_argument("--bench", required=True, help="alpaca_eval | mt_bench (Hub) | PATH.json[l]: instruction or turns")
    g.add_argument("--out", required=True, help="folder: model_outputs.json or <name>.jsonl, generation_stats.json")
    g.add_argument("--name", default=None, help="generator / model_id in the outputs (None: last 2 path parts)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="answer token cap per turn")
    d = g.add_mutually_exclusive_group()
    d.add_argument("--sampling", action="store_true", help="sample every prompt as the model's generation_config.json "
                   "says (default: greedy; MT-Bench: FastChat's temperature per category, greedy where it is 0)")
    d.add_argument("--greedy", action="store_true", help="greedy for every prompt, MT-Bench included")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i of a turn and setting uses seed + i, "
                   "whatever its batch)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (costs compile time; on "
                   "CUDA the step is replayed as a CUDA graph with or without it)")
    g.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all; MT-Bench: by question_id)")

    sp = sub.add_parser("judge", help="AlpacaEval win rates or MT-Bench grades from an OpenAI-compatible judge",
                        formatter_class=cli.HelpFormatter)
    sp.add_argument("--bench", choices=["alpaca_eval", "mt_bench"], default="alpaca_eval", help="the protocol")
    sp.add_argument("--out", default=None, help="folder for the results (None: the folder of --outputs, --answers or "
                    "--annotations)")
    g = sp.add_argument_group("alpaca_eval (judge.py, winrate.py)")
    g.add_argument("--outputs", default=None, help="model_outputs.json of the model to judge")
    g.add_argument("--reference", default=None, help="reference outputs, same format, or alpaca_eval: AlpacaEval 2's "
                   "baseline (GPT-4 Turbo's outputs, from the Hub)")
    g.add_argument("--annotations", default=None, help="instead of asking a judge: an alpaca_eval annotations file "
                   "(ours or alpaca_eval's annotations.json) to compute the win rates of")
    g.add_argument("--judge-mode", choices=["weighted", "binary"], default="weighted", help="weighted: preference "
                   "from the top log-probabilities of m/M (alpaca_eval 2's standard judge); binary: the reply m or M")
    g.add_argument("--judge-template", default=None, help="an alpaca_eval judge template file, read unchanged (e.g. "
                   "its evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt; None: our own prompt)")
    g.add_argument("--df-gamed", default="hub", help="alpaca_eval's df_gamed.csv for the LC win rate: a path, or hub "
                   "(tatsu-lab/alpaca_eval)")
    g.add_argument("--no-lc", action="store_true", help="skip the length-controlled win rate")
    g.add_argument("--name", default=None, help="generator_2 when the outputs have no 'generator' (None: their folder)")
    g = sp.add_argument_group("mt_bench (mt_bench.py)")
    g.add_argument("--answers", default=None, help="FastChat answer JSONL (evaluate.py generate --bench mt_bench)")
    g.add_argument("--questions", default="mt_bench", help="FastChat question.jsonl, or mt_bench (the Hub)")
    g.add_argument("--references", default="mt_bench", help="FastChat reference answers (gpt-4.jsonl) for math, "
                   "reasoning and coding, or mt_bench (the Hub)")
    g.add_argument("--judge-prompts", default="mt_bench", help="FastChat judge_prompts.jsonl, or mt_bench (the Hub)")
    g = sp.add_argument_group("judge endpoint (judge.py)")
    g.add_argument("--judge-url", default=None, help="base URL (.../v1) or the full .../chat/completions URL")
    g.add_argument("--judge-model", default=None, help="model name sent to the endpoint")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key ('': "
                   "send none)")
    g.add_argument("--cache", default=None, help="verdict cache folder (None: OUT/judge_cache)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    g.add_argument("--max-retries", type=int, default=6, help="retries on timeouts, connection errors, 429 and 5xx")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")
    g.add_argument("--parse-retries", type=int, default=2, help="times a reply without a verdict is asked again")
    g.add_argument("--retry-malformed", action="store_true", help="ask again where the cached reply had no verdict")
    g.add_argument("--allow-partial", action="store_true", help="write a result even if the judge never answered "
                   "some items (failed requests), marked partial with the number missing (default: exit 2; the same "
                   "command asks again only for the missing ones)")
    g.add_argument("--price-input", type=float, default=0.0, help="USD per 1M prompt tokens (0 = unknown)")
    g.add_argument("--price-output", type=float, default=0.0, help="USD per 1M completion tokens (0 = unknown)")

    sp = sub.add_parser("diagnostics", help="log-prob curves, hinge active fraction and margins from metrics.jsonl",
                        formatter_class=cli.HelpFormatter)
    sp.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl) or metrics.jsonl files")
    sp.add_argument("--out", required=True, help="folder for diagnostics.png, .txt and .json")
    sp = sub.add_parser("report", help="one table (markdown, CSV) and plots of several evaluated runs",
                        formatter_class=cli.HelpFormatter)
    sp.add_argument("runs", nargs="+", help="run folders (args.json, metrics.jsonl, prefs.json and the judge results "
                    "evaluate.py wrote into them)")
    sp.add_argument("--out", required=True, help="folder for report.md, report.csv and report.png")
    sp.add_argument("--title", default="", help="a title over the plots (say which judge and data they come from)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    print("evaluate.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()))
    judge_cmd = mt_bench.cmd_judge if getattr(args, "bench", None) == "mt_bench" else judge.cmd_judge
    commands = {"prefs": cmd_prefs, "generate": cmd_generate, "judge": judge_cmd,
                "diagnostics": report.cmd_diagnostics, "report": report.cmd_report}
    return commands[args.cmd](args)


if __name__ == "__main__":
    cli.run_cli(main)
