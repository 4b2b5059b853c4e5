"""Make docs/report.png, the picture of `evaluate.py report`, from three demo runs, offline (shown in docs/evaluation.md).

    for loss in dpo simpo rpo; do python train.py --demo --loss $loss; done
    python docs/make_report_figure.py runs/demo-dpo runs/demo-simpo runs/demo-rpo

(without arguments it takes those three folders). It writes into each run folder (alpaca_eval/, mt_bench/), keeps
its inputs, the judge cache and the report in runs/docs-report/, and copies the report's picture to docs/report.png.

Everything but the judge is the real path: each demo model answers 24 held-out "Sort these numbers" prompts
(AlpacaEval-style, against the shuffled answers of demo/test.jsonl as the reference outputs) and 8 two-turn
questions (MT-Bench-style, one per FastChat category), `evaluate.py judge` grades them, `evaluate.py report` draws
the table and plots. The judge is a test judge on 127.0.0.1 that scores how well an answer sorts its question's
numbers, and the length-controlled win rate uses a synthetic df_gamed.csv: the numbers say nothing about any
benchmark, the picture shows the report's layout. (The demo trains a model from scratch on preference pairs only:
dpo and simpo learn to rank the pairs but not to write answers; rpo's NLL term on the chosen answers teaches it to
write ascending numbers.)
"""
import csv
import json
import math
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402

CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


def sortedness(question: str, answer: str) -> float:
    """0 to 1: half for the answer's numbers being in ascending order (the fraction of adjacent pairs that are), half
    for them being the question's numbers (the multiset overlap over the longer list)."""
    want = [int(x) for x in re.findall(r"\d+", question)]
    got = [int(x) for x in re.findall(r"\d+", answer)]
    ascending = sum(a < b for a, b in zip(got, got[1:])) / (len(got) - 1) if len(got) > 1 else 0.0
    overlap = sum(min(want.count(x), got.count(x)) for x in set(got)) / max(len(want), len(got), 1)
    return 0.5 * ascending + 0.5 * overlap


class TestJudge(BaseHTTPRequestHandler):
    """OpenAI chat completions: AlpacaEval prompts (judge.BUILTIN_TEMPLATE) get top log-probs with P(m) =
    σ(4·(s_m - s_M)); MT-Bench prompts (ours, below) get [[1 + 9·s]] for the last answer shown."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        if m := re.search(r"Instruction:\n(.*?)\n\nAnswer m:\n(.*?)\n\nAnswer M:\n(.*?)\n\nReply", user, re.S):
            q, a, b = m.groups()
            pm = 1 / (1 + math.exp(-4 * (sortedness(q, a) - sortedness(q, b))))
            top = [{"token": "m", "logprob": math.log(pm)}, {"token": "M", "logprob": math.log(1 - pm)}]
            choice = {"message": {"role": "assistant", "content": "m" if pm >= 0.5 else "M"},
                      "logprobs": {"content": [{"token": "m", "logprob": 0.0, "top_logprobs": top}]}}
        else:
            q = re.findall(r"\[Q\d?\] (.*)", user)[-1]
            a = re.findall(r"\[A\d?\] (.*)", user)[-1]
            choice = {"message": {"role": "assistant", "content": f"Rating: [[{round(1 + 9 * sortedness(q, a))}]]"}}
        raw = json.dumps({"choices": [choice], "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": 1}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(raw.encode())


def text(messages) -> str:
    """The text of a demo row's field: its (one) message's content; demo/ rows are conversational."""
    return messages[-1]["content"] if isinstance(messages, list) else messages


def write_inputs(d: Path, n_alpaca: int = 24) -> None:
    """AlpacaEval prompts and reference outputs, MT-Bench questions, references and judge prompts, df_gamed.csv."""
    rows = [json.loads(x) for x in (ROOT / "demo" / "test.jsonl").read_text().splitlines()]
    alpaca, mt = rows[:n_alpaca], rows[n_alpaca:n_alpaca + 2 * len(CATEGORIES)]
    (d / "alpaca.jsonl").write_text("".join(json.dumps({"instruction": text(r["prompt"])}) + "\n" for r in alpaca))
    (d / "reference.json").write_text(json.dumps([{"instruction": text(r["prompt"]), "output": text(r["rejected"]),
                                                   "generator": "shuffled"} for r in alpaca]))
    qs = [{"question_id": 81 + 10 * i, "category": c, "turns": [text(mt[2 * i]["prompt"]),
                                                               text(mt[2 * i + 1]["prompt"])]}
          for i, c in enumerate(CATEGORIES)]
    (d / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (d / "gpt-4.jsonl").write_text("".join(json.dumps({"question_id": q["question_id"], "choices": [{"turns": [
        text(mt[2 * i]["chosen"]), text(mt[2 * i + 1]["chosen"])]}]}) + "\n" for i, q in enumerate(qs)))
    single = "[Q] {question}\n[A] {answer}\nRate the answer from 1 to 10 as [[rating]]."
    multi = "[Q1] {question_1}\n[A1] {answer_1}\n[Q2] {question_2}\n[A2] {answer_2}\nRate the second answer."
    prompts = {"single-v1": single, "single-math-v1": single + " Reference: {ref_answer_1}",
               "single-v1-multi-turn": multi, "single-math-v1-multi-turn": multi + " Reference: {ref_answer_2}"}
    (d / "judge_prompts.jsonl").write_text("".join(json.dumps({
        "name": n, "type": "single", "system_prompt": "You grade answers.", "prompt_template": t,
        "output_format": "[[rating]]"}) + "\n" for n, t in prompts.items()))
    rng = np.random.default_rng(0)
    with open(d / "df_gamed.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline"])
        for model, sign in (("verbose", -1), ("concise", 1)):
            for i in range(len(alpaca)):
                w.writerow([model, i, rng.uniform(0.2, 0.8), rng.normal(sign, 0.5), 0.1 * (i % 5), False])


def main(runs: list[str], work: Path = ROOT / "runs" / "docs-report", png: Path = ROOT / "docs" / "report.png",
         n_alpaca: int = 24, max_new_tokens: int = 32) -> Path:
    """Generate, judge and report the runs; the report's picture is copied to png (tests pass small settings)."""
    work.mkdir(parents=True, exist_ok=True)
    write_inputs(work, n_alpaca)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), TestJudge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    judge = ["--judge-url", f"http://127.0.0.1:{srv.server_address[1]}/v1", "--judge-model", "test-judge",
             "--api-key-env", "", "--cache", str(work / "cache")]
    for run in map(Path, runs):
        name = run.name
        evaluate.main(["generate", "--model", str(run / "final"), "--bench", str(work / "alpaca.jsonl"), "--out",
                       str(run / "alpaca_eval"), "--max-new-tokens", str(max_new_tokens), "--name", name])
        evaluate.main(["judge", "--outputs", str(run / "alpaca_eval" / "model_outputs.json"), "--reference",
                       str(work / "reference.json"), "--df-gamed", str(work / "df_gamed.csv"), *judge])
        evaluate.main(["generate", "--model", str(run / "final"), "--bench", str(work / "question.jsonl"), "--out",
                       str(run / "mt_bench"), "--max-new-tokens", str(max_new_tokens), "--name", name])
        evaluate.main(["judge", "--bench", "mt_bench", "--answers", str(run / "mt_bench" / f"{name}.jsonl"),
                       "--questions", str(work / "question.jsonl"), "--references", str(work / "gpt-4.jsonl"),
                       "--judge-prompts", str(work / "judge_prompts.jsonl"), *judge])
    evaluate.main(["report", *runs, "--out", str(work / "report"), "--title",
                   "Toy demo (tiny model, 'sort these numbers'), graded by a local test judge with a synthetic "
                   "df_gamed.csv: the layout of evaluate.py report, not benchmark numbers"])
    srv.shutdown()
    png.write_bytes((work / "report" / "report.png").read_bytes())
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    main(sys.argv[1:] or [str(ROOT / "runs" / f"demo-{loss}") for loss in ("dpo", "simpo", "rpo")])
