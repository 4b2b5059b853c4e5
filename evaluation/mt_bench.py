"""MT-Bench in FastChat's protocol (fastchat/llm_judge): questions and answers in its formats, the per-category
decoding temperatures of gen_model_answer.py, and single-answer grading as gen_judgment.py --mode single and
show_result.py do it, through judge.py's client and cache.

Grading. Every answered question gets a turn-1 judgment, and a turn-2 one if it has two turns. Categories math,
reasoning and coding are graded against a reference answer. The judge prompts come from FastChat's judge-prompt file
(JSON Lines of {name, type, system_prompt, prompt_template, output_format, ...}): single-v1 (turn 1),
single-math-v1 (turn 1 with reference), single-v1-multi-turn and single-math-v1-multi-turn (turn 2, which sees the
whole conversation). The template is filled with str.format (question, answer, ref_answer_1; question_1/2,
answer_1/2, ref_answer_1/2) and sent as a system and a user message at temperature 0, max_tokens 2048. The rating is
the first [[x]] in the reply, else the first [x]; a reply without one scores -1 (FastChat's failure value), is asked
again up to --parse-retries times and, if still unparsable, is kept with -1 and left out of the means. Outputs, in
FastChat's formats: OUT/<judge>_single.jsonl ({question_id, model, judge: [judge model, prompt name], user_prompt,
judgment, score, turn, tstamp}, one line per judgment of this run) and OUT/mt_bench_results.json: the mean score of
turn 1, of turn 2 and of both (show_result.py's "Average": all valid judgments pooled), and per category.

Files are local paths or, by default ("mt_bench"), FastChat's files in the Hub space lmsys/mt-bench (MT-Bench's
demo): data/mt_bench/question.jsonl, data/mt_bench/reference_answer/gpt-4.jsonl, data/judge_prompts.jsonl; where
the Hub cannot be reached, pass the same files of FastChat's fastchat/llm_judge/data/ as paths.
"""
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

import data
from evaluation import judge
from infra import cli, hub, provenance
from infra.cli import UserError

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")  # graded against a reference answer
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}  # FastChat's temperature_config
DEFAULT_TEMPERATURE = 0.7  # any other category
HUB = {"--questions": ("lmsys/mt-bench", "data/mt_bench/question.jsonl", "space"),
       "--references": ("lmsys/mt-bench", "data/mt_bench/reference_answer/gpt-4.jsonl", "space"),
       "--judge-prompts": ("lmsys/mt-bench", "data/judge_prompts.jsonl", "space")}
PROMPTS = {(False, False): "single-v1", (True, False): "single-math-v1", (False, True): "single-v1-multi-turn",
           (True, True): "single-math-v1-multi-turn"}  # (reference-based, turn 2) -> judge prompt name


def source(spec: str, flag: str) -> str:
    """A local path as is; "mt_bench": the Hub file for that flag."""
    return str(hub.hub_file(*HUB[flag], f"download it elsewhere and pass {flag} PATH")) if spec == "mt_bench" else spec


def check_questions(rows: list, path) -> list[dict]:
    """FastChat question rows (or the Hub copy's: prompt, prompt_id) as {question_id, category, turns}."""
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"{data.row_name(path, i)}: expected a JSON object, got {type(r).__name__}")
        turns = r.get("turns", r.get("prompt"))
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
            raise UserError(f"{data.row_name(path, i)}: 'turns' must be a list of non-empty strings (FastChat format)")
        out.append({"question_id": r.get("question_id", r.get("prompt_id", i + 1)), "category": r.get("category", ""),
                    "turns": turns})
    return out


def read_answers(path: str, questions: dict, unknown_ok: bool = False) -> dict:
    """{question_id: turns} of a FastChat answer file; UserError naming the row for a malformed row, an unknown
    question_id (skipped if unknown_ok: a reference file may cover more questions), a wrong number of turns or a
    question answered twice."""
    rows, out = data.read_records(path), {}
    for i, r in enumerate(rows):
        where = data.row_name(path, i)
        if not isinstance(r, dict) or "question_id" not in r:
            raise UserError(f"{where}: expected a JSON object with question_id, model_id, choices (FastChat format)")
        q = questions.get(r["question_id"])
        if q is None and unknown_ok:
            continue
        if q is None:
            raise UserError(f"{where}: question_id {r['question_id']!r} is not in the questions file")
        try:
            turns = r["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{where}: needs choices[0].turns (FastChat format)") from None
        if not (isinstance(turns, list) and len(turns) == len(q["turns"]) and all(isinstance(t, str) for t in turns)):
            raise UserError(f"{where}: choices[0].turns must be {len(q['turns'])} strings (question "
                            f"{r['question_id']} has {len(q['turns'])} turns)")
        if r["question_id"] in out:
            raise UserError(f"{where}: question_id {r['question_id']!r} is answered twice")
        out[r["question_id"]] = turns
    if not out:
        raise UserError(f"{path}: no answers in the file")
    return out


def read_prompts(path: str) -> dict:
    """The four single-grading prompts of a FastChat judge-prompt file, by name; UserError naming what is wrong."""
    prompts = {r.get("name"): r for r in data.read_records(path) if isinstance(r, dict)}
    for name in PROMPTS.values():
        p = prompts.get(name)
        if p is None:
            raise UserError(f"{path}: no judge prompt named {name} (FastChat's judge_prompts.jsonl has it)")
        if not (isinstance(p.get("system_prompt"), str) and isinstance(p.get("prompt_template"), str)
                and p.get("type") == "single" and p.get("output_format") == "[[rating]]"):
            raise UserError(f"{path}: prompt {name}: needs string system_prompt and prompt_template, type 'single' "
                            f"and output_format '[[rating]]'")
    return prompts


def parse_rating(text: str | None) -> float:
    """FastChat's rating: the first [[x]] in the judgment, else the first [x] (x a number); -1 if there is none."""
    m = re.search(r"\[\[(\d+\.?\d*)\]\]", text or "") or re.search(r"\[(\d+\.?\d*)\]", text or "")
    return -1 if m is None else int(m.group(1)) if m.group(1).isdigit() else float(m.group(1))


def matches(questions: dict, answers: dict, refs: dict, prompts: dict, path_refs: str) -> list[dict]:
    """One judgment to make per (question, turn), with its prompt filled."""
    out = []
    for qid, turns in answers.items():
        q = questions[qid]
        ref_based = q["category"] in NEED_REF_CATS
        if ref_based and qid not in refs:
            raise UserError(f"{path_refs}: no reference answer for question {qid} ({q['category']} is graded "
                            f"against one)")
        for turn in (1, 2) if len(q["turns"]) == 2 else (1,):
            p = prompts[PROMPTS[ref_based, turn == 2]]
            kw = {f"ref_answer_{t + 1}": refs[qid][t] for t in range(turn)} if ref_based else {}
            kw |= ({"question_1": q["turns"][0], "question_2": q["turns"][1], "answer_1": turns[0],
                    "answer_2": turns[1]} if turn == 2 else {"question": q["turns"][0], "answer": turns[0]})
            try:
                user = p["prompt_template"].format(**kw)
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"judge prompt {p['name']}: cannot fill its template ({type(e).__name__}: {e})") \
                    from None
            out.append({"question_id": qid, "turn": turn, "prompt": p, "user_prompt": user})
    return out


def summary(records: list[dict], questions: dict) -> dict:
    """Mean scores of the valid (score != -1) judgments: turn 1, turn 2, both pooled, and per category."""
    valid = [r for r in records if r["score"] != -1]

    def mean(rs):
        return float(np.mean([r["score"] for r in rs])) if rs else None
    cats = sorted({questions[r["question_id"]]["category"] for r in records})
    return {"turn_1": mean([r for r in valid if r["turn"] == 1]), "turn_2": mean([r for r in valid if r["turn"] == 2]),
            "mean": mean(valid), "n_judgments": len(records), "n_valid": len(valid),
            "categories": {c: {"mean": mean([r for r in valid if questions[r["question_id"]]["category"] == c]),
                               **{f"turn_{t}": mean([r for r in valid if r["turn"] == t
                                                     and questions[r["question_id"]]["category"] == c])
                                  for t in (1, 2)}} for c in cats}}


def cmd_judge(args) -> dict:
    """`evaluate.py judge --bench mt_bench`: grade every answer of --answers, write FastChat's judgment JSONL and
    the per-turn, per-category and overall means."""
    if not args.answers:
        raise UserError("judge --bench mt_bench: give --answers (FastChat answer JSONL from evaluate.py generate)")
    qpath = source(args.questions, "--questions")
    questions = {q["question_id"]: q for q in check_questions(data.read_records(qpath), qpath)}
    model, answers = Path(args.answers).stem, read_answers(args.answers, questions)  # FastChat: model = file name
    ppath = source(args.judge_prompts, "--judge-prompts")
    prompts = read_prompts(ppath)
    refs, rpath = {}, args.references
    if any(questions[q]["category"] in NEED_REF_CATS for q in answers):
        rpath = source(args.references, "--references")
        refs = read_answers(rpath, questions, unknown_ok=True)
    todo = matches(questions, answers, refs, prompts, rpath)
    ep = judge.endpoint(args)
    out = Path(args.out or Path(args.answers).parent)
    cache = judge.Cache(Path(args.cache or out / "judge_cache") / "mt_bench_judgments.jsonl")
    print(f"judge: {len(answers)} of {len(questions)} MT-Bench questions answered by {model}, {len(todo)} "
          f"judgments, {ep.url}, judge {ep.model}, {ep.concurrency} at a time, cache {cache.path}")

    def one(m):
        p = m["prompt"]
        messages = ([{"role": "system", "content": p["system_prompt"]}] if p["system_prompt"] else []) + [
            {"role": "user", "content": m["user_prompt"]}]
        key = hashlib.sha256(json.dumps([ep.model, p["name"], messages]).encode()).hexdigest()
        if (rec := cache.get(key, args.retry_malformed, "score")) is not None:
            return dict(rec, model=model, cached=True)
        got = judge.ask(ep, messages, lambda r: None if (s := parse_rating(judge.content(r))) == -1 else s,
                        temperature=0, max_tokens=2048)
        if got is None:
            return None
        rec = {"question_id": m["question_id"], "model": model, "judge": [ep.model, p["name"]],
               "user_prompt": m["user_prompt"], "judgment": got["reply"],
               "score": -1 if got["value"] is None else got["value"], "turn": m["turn"], "tstamp": time.time(),
               "key": key, "prompt_tokens": got["prompt_tokens"], "completion_tokens": got["completion_tokens"]}
        cache.put(rec)
        return rec
    try:
        got = judge.run_pool(one, todo, ep.concurrency, "mt_bench")
    finally:
        cache.close()
    partial = judge.check_answered(sum(r is None for r in got), len(todo), "MT-Bench judgments", cache.path,
                                   args.allow_partial)
    records = [{k: v for k, v in r.items() if k != "cached"} for r in got if r is not None]
    name = ep.model.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(out / f"{name}_single.jsonl", lambda p: p.write_text(
        "".join(json.dumps(r) + "\n" for r in records)))
    res = {"bench": "mt_bench", "answers": args.answers, "model": model, "judge_model": ep.model,
           "n_questions": len(questions), "n_answered": len(answers), **summary(records, questions),
           "failed": sum(r is None for r in got), "unparsable": sum(r["score"] == -1 for r in records),
           "cached": sum(bool(r and r.get("cached")) for r in got), **partial, **ep.usage(records),
           "provenance": provenance.record(judge=provenance.judge_entry(ep.model, args.judge_url),  # no API key
                                           data_sources=[(f, None) for f in (args.answers, qpath, ppath,
                                                                             refs and rpath)])}
    cli.atomic_write(out / "mt_bench_results.json", lambda p: p.write_text(json.dumps(res, indent=2)))
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"MT-Bench {model}: turn 1 {fmt(res['turn_1'])}, turn 2 {fmt(res['turn_2'])}, mean {fmt(res['mean'])} "
          f"({res['n_valid']} valid of {len(todo)}; {res['failed']} failed, {res['unparsable']} unparsable) -> "
          f"{out / 'mt_bench_results.json'}")
    print(judge.usage_line(res))
    if res["failed"] or res["unparsable"]:
        print("judge: rerun to retry failed judgments; add --retry-malformed to re-ask the unparsable ones")
    return res
