"""judge.py, mt_bench.py and winrate.py: the judge client against a real local HTTP server speaking OpenAI's
chat-completions format (log-probabilities, usage, 429s, 5xx, timeouts, malformed replies), AlpacaEval's annotation
and statistics (alpaca_eval itself is the oracle: it reads our annotations file, and its own functions compute the
win rate and LC win rate on the same annotations), and MT-Bench grading in FastChat's protocol. Nothing touches the
network: Hub downloads are monkeypatched, files are built here."""
import csv
import json
import math
import re
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import evaluate
from evaluation import judge, mt_bench, winrate
from infra.cli import UserError


# ----------------------------------------------------------------------------- a fake OpenAI endpoint
def completion(text: str | None, top: dict | None = None, usage=(100, 1)) -> dict:
    """An OpenAI chat.completion object: the reply text, optionally the first token's top log-probabilities."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if top is not None:
        choice["logprobs"] = {"content": [{"token": text, "logprob": max(top.values(), default=0.0), "bytes": [],
                                           "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                                            for t, lp in top.items()]}]}
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "fake", "choices": [choice],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}


class FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: the server's respond(body) gives (status, payload): a dict is sent as JSON, bytes
    as they are, ("sleep", s) sleeps s seconds first (longer than the client's timeout) then answers "m"."""

    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, self.headers.get("Authorization"), body))
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            status, payload = srv.respond(body)
            if status == "sleep":
                time.sleep(payload)
                status, payload = 200, completion("m")
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow reply
            pass
        finally:
            with srv.lock:
                srv.inflight -= 1


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    srv.requests, srv.lock, srv.inflight, srv.max_inflight = [], threading.Lock(), 0, 0
    srv.respond = lambda body: (200, completion("m"))
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def shown(body) -> tuple[str, str, str]:
    """(instruction, output shown as m, output shown as M) of a request made with judge.BUILTIN_TEMPLATE."""
    user = body["messages"][-1]["content"]
    return re.search(r"Instruction:\n(.*?)\n\nAnswer m:\n(.*?)\n\nAnswer M:\n(.*?)\n\nReply", user, re.S).groups()


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------- AlpacaEval through the CLI
def _alpaca_files(tmp_path):
    names = ["q0", "q1", "q2", "q3", "q4", "busy", "flaky", "garbled", "hopeless", "broken", "same"]
    model = {n: "bad answer" if n in ("q1", "q3", "q4", "busy") else "identical" if n == "same" else f"GOOD {n}"
             for n in names}
    ref = {n: "identical" if n == "same" else "meh" if "GOOD" in model[n] else "GOOD ref" for n in names}
    (tmp_path / "out").mkdir()
    outs = write_json(tmp_path / "out" / "model_outputs.json",
                      [{"instruction": n, "output": model[n], "generator": "tiny"} for n in names] +
                      [{"instruction": "no reference", "output": "x", "generator": "tiny"}])
    refs = write_json(tmp_path / "ref.json", [{"instruction": n, "output": ref[n], "generator": "base"}
                                              for n in names])
    return names, model, outs, refs


def weighted_judge(srv, faults, barrier=None):
    """P(the label of the output containing GOOD) = 0.8 from top_logprobs; scripted faults by instruction, each
    consumed in order, one per request."""
    faults = {k: list(v) for k, v in faults.items()}

    def respond(body):
        if barrier is not None and len(srv.requests) <= barrier.parties:
            barrier.wait()  # the first requests meet here: they must be in flight together
        instruction, m, big = shown(body)
        fault = faults.get(instruction, []).pop(0) if faults.get(instruction) else None
        if fault in (429, 500):
            return fault, {"error": {"message": "try later"}}
        if fault == "not-json":
            return 200, b"<html>oops</html>"
        if fault == "no-m":
            return 200, completion("The", {"The": -0.1, "Both": -2.0})
        good = "m" if "GOOD" in m else "M"
        return 200, completion(good, {good: math.log(0.8), {"m": "M", "M": "m"}[good]: math.log(0.2), "The": -9.0})
    srv.respond = respond


def test_alpaca_weighted_judge_against_local_server(tmp_path, server, monkeypatch):
    """Weighted preferences: the model's GOOD output -> 1 + 0.8 = 1.8, a bad one -> 1.2, identical outputs 1.5 without
    a request, 'hopeless' (no m/M among the top log-probs, 3 times) -> null. Valid x = p - 1: 0.8 x5 (q0, q2, flaky,
    garbled, broken), 0.2 x4 (q1, q3, q4, busy), 0.5 (same): WR = 100·5.3/10 = 53.0; squared deviations from 0.53:
    5·0.27² + 4·0.33² + 0.03² = 0.801 -> SE = 100·sqrt(0.801/9/10) = 9.43398; n_wins 5, n_wins_base 4, n_draws 1;
    discrete: (5 + 0.5)/10 = 55.0. Requests: 10 asked (not 'same') + busy's 429 + flaky's 500 + broken's non-JSON
    reply re-asked + garbled's unusable reply re-asked + hopeless asked 2 more times = 16; 13 of them JSON replies with
    usage 100 + 1 tokens: 1300 prompt and 13 completion tokens, at $2 and $8 per 1M: $0.002704."""
    names, model, outs, refs = _alpaca_files(tmp_path)
    weighted_judge(server, {"busy": [429], "flaky": [500], "broken": ["not-json"], "garbled": ["no-m"],
                            "hopeless": ["no-m"] * 3}, barrier=threading.Barrier(3, timeout=20))
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    argv = ["judge", "--outputs", str(outs), "--reference", str(refs), "--judge-url", server.url, "--judge-model",
            "fake-judge", "--api-key-env", "TEST_JUDGE_KEY", "--backoff", "0.01", "--concurrency", "3", "--no-lc",
            "--price-input", "2", "--price-output", "8"]
    res = evaluate.main(argv)
    reqs = server.requests
    assert len(reqs) == 16 and server.max_inflight == 3  # the first 3 met at the barrier: 3 in flight, never more
    assert all(path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "fake-judge"
               and body["max_tokens"] == 1 and body["temperature"] == 1 and body["logprobs"] is True
               and body["top_logprobs"] == 5 and [m["role"] for m in body["messages"]] == ["system", "user"]
               for path, auth, body in reqs)
    assert res["win_rate"] == pytest.approx(53.0) and res["standard_error"] == pytest.approx(9.43398, abs=1e-5)
    assert (res["n_wins"], res["n_wins_base"], res["n_draws"], res["n_total"]) == (5, 4, 1, 10)
    assert res["discrete_win_rate"] == pytest.approx(55.0)
    assert (res["judged"], res["malformed"], res["identical"], res["failed"], res["cached"]) == (9, 1, 1, 0, 0)
    assert res["missing_reference"] == 1
    assert res["usage"] == {"prompt_tokens": 1300, "completion_tokens": 13, "cost_usd": pytest.approx(0.002704)}
    assert res["usage_this_run"]["requests"] == 16 and res["usage_this_run"]["retries"] == 2
    # the reference is shown first (as m) on even items, the model's output on odd ones
    first = {}
    for _, _, body in reqs:
        instruction, m, _ = shown(body)
        first.setdefault(instruction, m == model[instruction])
    assert first == {n: i % 2 == 1 for i, n in enumerate(names) if n != "same"}
    ann = json.loads((tmp_path / "out" / "annotations.json").read_text())
    expected = {n: None if n == "hopeless" else 1.5 if n == "same" else 1.8 if "GOOD" in model[n] else 1.2
                for n in names}
    assert [a["instruction"] for a in ann] == names
    assert all(a["preference"] == pytest.approx(expected[a["instruction"]]) if expected[a["instruction"]] else
               a["preference"] is None for a in ann)
    assert all(a["output_1"] != model[a["instruction"]] or a["instruction"] == "same" for a in ann)
    assert {(a["generator_1"], a["generator_2"]) for a in ann} == {("base", "tiny")}

    # rerun: every verdict comes from the cache, the malformed one too (it was paid for)
    res2 = evaluate.main(argv)
    assert len(server.requests) == 16 and res2["cached"] == 10 and res2["win_rate"] == res["win_rate"]
    assert res2["usage_this_run"]["requests"] == 0 and res2["usage"] == res["usage"]
    # --retry-malformed asks again for 'hopeless' only; it now answers: 1.8, WR = 100·(5.3 + 0.8)/11
    res3 = evaluate.main(argv + ["--retry-malformed"])
    assert len(server.requests) == 17 and shown(server.requests[-1][2])[0] == "hopeless"
    assert res3["n_total"] == 11 and res3["win_rate"] == pytest.approx(100 * 6.1 / 11)


def test_alpaca_binary_mode_with_an_alpaca_eval_template(tmp_path, server):
    """--judge-template reads an alpaca_eval-format template unchanged: the messages sent are alpaca_eval's own
    make_prompts + prompt_to_chatml of it (the oracle), placeholders filled once each, in order (an instruction that
    contains '{output_1}' shows alpaca_eval's sequential replacement). Binary replies: 'M' (second shown wins), '**m**',
    prose (unparsable, re-asked once with --parse-retries 1, then null)."""
    import pandas as pd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from alpaca_eval.utils import make_prompts, prompt_to_chatml
    template = ("<|im_start|>system\nYou rank outputs.\n<|im_end|>\n<|im_start|>system name=example_user\nA demo."
                "\n<|im_end|>\n<|im_start|>user\nTask: {instruction}\nm says: {output_1}\nM says: {output_2}\n"
                "Answer m or M.\n<|im_end|>")
    tpath = tmp_path / "clf.txt"
    tpath.write_text(template)
    items = [("a", "long good", "short"), ("b {output_1}", "x", "y"), ("c", "p", "q")]
    outs = write_json(tmp_path / "o.json", [{"instruction": i, "output": o, "generator": "g"} for i, o, _ in items])
    refs = write_json(tmp_path / "r.json", [{"instruction": i, "output": r} for i, _, r in items])
    replies = {"a": ["M"], "b": ["**m**"], "c": ["I like both.", "Neither."]}
    server.respond = lambda body: (200, completion(replies[body["messages"][-1]["content"][6]].pop(0)))
    res = evaluate.main(["judge", "--outputs", str(outs), "--reference", str(refs), "--judge-url", server.url,
                         "--judge-model", "j", "--api-key-env", "", "--judge-mode", "binary", "--judge-template",
                         str(tpath), "--no-lc", "--parse-retries", "1", "--concurrency", "1"])
    sent = [b for _, _, b in server.requests]
    assert all(b["temperature"] == 0 and "logprobs" not in b for b in sent)
    assert all(auth is None for _, auth, _ in server.requests)  # --api-key-env '': no Authorization header
    for (instruction, out, ref), body in zip(items, sent):
        first, second = (out, ref) if items.index((instruction, out, ref)) % 2 else (ref, out)
        df = pd.DataFrame([{"instruction": instruction, "output_1": first, "output_2": second}])
        assert body["messages"] == prompt_to_chatml(make_prompts(df, template)[0][0])
    assert sent[1]["messages"][-1]["content"].startswith("Task: b x\n")  # '{output_1}' in the instruction replaced
    # a: reference first (m), reply M = the model's output -> 2; b: model first, reply m -> 2; c: null
    ann = json.loads((tmp_path / "annotations.json").read_text())
    assert [a["preference"] for a in ann] == [2.0, 2.0, None] and len(sent) == 4
    assert res["win_rate"] == pytest.approx(100.0) and res["annotator"] == "j:binary:clf.txt"


def test_judge_timeouts_retries_and_failures(tmp_path, server):
    """A reply slower than --timeout is retried; retries exhausted -> failed and not cached; a 401 stops the run with
    the verdicts already on disk."""
    cache = judge.Cache(tmp_path / "c" / "verdicts.jsonl")
    ep = judge.Endpoint(server.url + "/chat/completions", "j", timeout=0.3, max_retries=1, backoff=0.01,
                        concurrency=1)
    plan = {"slow": [("sleep", 1.0)], "busy": [(429, {})] * 4, "denied": [(401, {"error": "bad key"})]}

    def respond(body):
        instruction = shown(body)[0]
        return plan[instruction].pop(0) if plan.get(instruction) else (200, completion("M", {"M": -0.01}))
    server.respond = respond
    items = [{"instruction": q, "output": "o", "reference": "r"} for q in ("slow", "busy", "fine")]
    recs, counts = judge.annotate(items, ep, cache, judge.BUILTIN_TEMPLATE, "weighted")
    assert counts["failed"] == 1 and counts["judged"] == 2 and recs[1] is None
    assert [shown(b)[0] for _, _, b in server.requests] == ["slow", "slow", "busy", "busy", "fine"]
    assert recs[0]["preference"] == 2.0  # reference shown first, so M is the model's output: P(M) = 1
    with pytest.raises(UserError, match="HTTP 401"):
        judge.annotate(items + [{"instruction": "denied", "output": "o", "reference": "r"}], ep, cache,
                       judge.BUILTIN_TEMPLATE, "weighted")
    cache.close()
    lines = [json.loads(x)["instruction"] for x in (tmp_path / "c" / "verdicts.jsonl").read_text().splitlines()]
    assert sorted(lines) == ["fine", "slow"]  # busy failed twice more (not cached); nothing paid for was lost


def test_a_killed_judge_run_resumes_from_its_cache(tmp_path, server, monkeypatch):
    """The run dies (KeyboardInterrupt, as a kill) while waiting for the 4th reply: the 3 verdicts paid for are whole
    lines on disk, and the next run asks only for the other items. A torn last line (a kill mid-write) is skipped,
    counted, and the records after it start on their own line."""
    weighted_judge(server, {})
    items = [{"instruction": f"q{i}", "output": "GOOD" if i % 2 else "bad", "reference": "meh" if i % 2 else "GOOD r"}
             for i in range(6)]
    path, real = tmp_path / "verdicts.jsonl", judge.post

    def dies_on_the_fourth(*a, **k):
        if len(server.requests) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(judge, "post", dies_on_the_fourth)
    ep = judge.Endpoint(server.url + "/chat/completions", "j", backoff=0.01, concurrency=1)
    cache = judge.Cache(path)
    with pytest.raises(KeyboardInterrupt):
        judge.annotate(items, ep, cache, judge.BUILTIN_TEMPLATE, "weighted")
    cache.close()
    assert [json.loads(x)["instruction"] for x in path.read_text().splitlines()] == ["q0", "q1", "q2"]
    with open(path, "a") as f:
        f.write('{"key": "torn", "instr')
    monkeypatch.setattr(judge, "post", real)
    cache = judge.Cache(path)
    records, counts = judge.annotate(items, ep, cache, judge.BUILTIN_TEMPLATE, "weighted")
    cache.close()
    assert [shown(b)[0] for _, _, b in server.requests] == ["q0", "q1", "q2", "q3", "q4", "q5"]
    assert counts["cached"] == 3 and counts["judged"] == 3 and counts["cache_bad_lines"] == 1
    assert [r["preference"] for r in records] == pytest.approx([1.2, 1.8, 1.2, 1.8, 1.2, 1.8])
    assert judge.Cache(path).bad_lines == 1 and len(judge.Cache(path).records) == 6


def test_alpaca_bad_input_is_one_line(tmp_path, server, monkeypatch):
    """A malformed outputs or annotations file, a missing API key, an unreachable judge or Hub: one UserError naming
    the file, entry, variable or flag, before any request where it can be found before."""
    _, _, outs, refs = _alpaca_files(tmp_path)
    base = ["judge", "--outputs", str(outs), "--reference", str(refs), "--judge-model", "j", "--no-lc"]
    bad = write_json(tmp_path / "bad.json", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(UserError, match=r"bad.json: row 2: needs string 'instruction' and 'output'"):
        evaluate.main(base[:1] + ["--outputs", str(bad)] + base[3:] + ["--judge-url", server.url])
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match=r"\$NO_SUCH_KEY is not set"):
        evaluate.main(base + ["--judge-url", server.url, "--api-key-env", "NO_SUCH_KEY"])
    with pytest.raises(UserError, match=r"--judge-url is required"):
        evaluate.main(base + ["--api-key-env", ""])
    closed = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there any more: connection refused
    with pytest.raises(UserError, match=rf"judge endpoint http://127.0.0.1:{port}/v1/chat/completions is "
                                        r"unreachable .* after 2 attempts; check --judge-url"):
        evaluate.main(base + ["--judge-url", f"http://127.0.0.1:{port}/v1", "--api-key-env", "", "--max-retries",
                              "1", "--backoff", "0.01"])
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match=r"cannot download df_gamed.csv of the Hub dataset tatsu-lab/alpaca_eval "
                                        r"\(OSError\).*--df-gamed PATH"):
        evaluate.main(base[:-1] + ["--judge-url", server.url, "--api-key-env", ""])
    with pytest.raises(UserError, match=r"cannot download alpaca_eval_gpt4_baseline.json of the Hub dataset "
                                        r"tatsu-lab/alpaca_eval \(OSError\).*--reference PATH"):
        evaluate.main(base[:3] + ["--reference", "alpaca_eval"] + base[5:] + ["--judge-url", server.url])
    assert server.requests == []  # found before the first paid request
    good = write_json(tmp_path / "good.json", [{"output_1": "a", "output_2": "bb", "generator_1": "x",
                                                "generator_2": "y", "preference": 2}] * 2)
    (tmp_path / "gamed.csv").write_text("model,index,preference,std_delta_len,instruction_difficulty,"
                                        "not_gamed_baseline\nv,0,0.5,0.1,0.2,False\nv,1,0.5,0.1,high,False\n")
    with pytest.raises(UserError, match=r"gamed.csv: line 3: a field that should be a number is not"):
        evaluate.main(["judge", "--annotations", str(good), "--df-gamed", str(tmp_path / "gamed.csv")])
    for rows, msg in (([{"output_1": "a", "output_2": "b", "generator_1": "x", "generator_2": "y", "preference": 3}],
                       "row 1"), ([{"output_1": "a", "generator_1": "x", "generator_2": "y", "preference": 1}],
                                  "row 1")):
        with pytest.raises(UserError, match=rf"ann.json: {msg}: needs strings output_1, output_2"):
            evaluate.main(["judge", "--annotations", str(write_json(tmp_path / "ann.json", rows)), "--no-lc"])


# ----------------------------------------------------------------------------- win rates: by hand and alpaca_eval
def test_win_rate_by_hand():
    """Preferences 2, 1, 2, 1.5, 0 (legacy draw), null: x = 1, 0, 1, .5, .5 (null dropped): mean .6; squared
    deviations .16 + .36 + .16 + .01 + .01 = .7, /4 = .175, sqrt = .41833, /√5 = .187083 -> 60.0 ± 18.7083;
    2 wins, 1 base win, 2 draws; discrete: the same (all are 0, 1 or draws)."""
    r = winrate.win_rate([2, 1, 2, 1.5, 0, None])
    assert r["win_rate"] == pytest.approx(60.0) and r["standard_error"] == pytest.approx(18.7083, abs=1e-4)
    assert (r["n_wins"], r["n_wins_base"], r["n_draws"], r["n_total"]) == (2, 1, 2, 5)
    assert winrate.win_rate([1.7, 1.2])["discrete_win_rate"] == pytest.approx(50.0)  # rounded to 1 and 0


def test_l1_logistic_by_hand():
    """One constant feature, n = 10 rows of weight 1, labels with mean p̄, L1 weight 1: the optimum solves
    C·n·(σ(θ) - p̄) + sign(θ) = 0. C = 1, p̄ = .75: σ(θ) = .75 - 1/10 = .65, θ = ln(.65/.35). p̄ = .55: |10·(.5 - .55)|
    = .5 ≤ 1, so θ = 0 exactly. C = 2, p̄ = .2 (hard labels): σ(θ) = .2 + 1/20 = .25, θ = -ln 3."""
    x, w = np.ones((10, 1)), np.ones(10)
    y = np.array([1.0] * 7 + [0.5] * 1 + [0.0] * 2)  # mean .75
    assert winrate.l1_logistic(x, y, w, 1.0)[0] == pytest.approx(math.log(0.65 / 0.35), abs=1e-9)
    assert winrate.l1_logistic(x, np.full(10, 0.55), w, 1.0)[0] == 0.0
    assert winrate.l1_logistic(x, np.array([1.0] * 2 + [0.0] * 8), w, 2.0)[0] == pytest.approx(-math.log(3), abs=1e-9)


def weighted_pref(m: float, big: float) -> float:
    return judge.weighted_preference(completion("m", {"m": m, "M": big, "The": -5.0}))


def test_weighted_preference_by_hand():
    """P(m) = e^lm / (e^lm + e^lM): ln .3 vs ln .1 -> .75 -> 2 - .75 = 1.25; only M listed -> P(m) = 0 -> 2; only m
    -> 1; neither -> None; a reply without logprobs -> None."""
    assert weighted_pref(math.log(0.3), math.log(0.1)) == pytest.approx(1.25)
    assert judge.weighted_preference(completion("M", {"M": -0.1, "x": -1.0})) == 2.0
    assert judge.weighted_preference(completion("m", {"m": -3.0})) == 1.0
    assert judge.weighted_preference(completion("The", {"The": -0.1})) is None
    assert judge.weighted_preference(completion("m")) is None


def gamed_file(tmp_path, n: int, seed: int = 0):
    """A df_gamed.csv like alpaca_eval's: two gamed baselines (verbose, concise), rows of the first one first (row
    label i = instruction i), soft preferences in [0, 1] with a few missing, standardised length differences."""
    rng = np.random.default_rng(seed)
    difficulty, rows = rng.normal(0, 1, n), []
    for model, sign in (("verbose", -1), ("concise", 1)):
        s = rng.normal(sign, 0.5, n)
        p = 1 / (1 + np.exp(-(-1.2 * np.tanh(s) + 0.7 * difficulty + rng.normal(0, 0.5, n))))
        rows += [{"model": model, "index": i, "preference": "" if rng.random() < 0.05 else round(p[i], 6),
                  "std_delta_len": s[i], "instruction_difficulty": difficulty[i], "not_gamed_baseline": False}
                 for i in range(n)]
    path = tmp_path / f"df_gamed{seed}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path, difficulty


def alpaca_eval_metrics(annotations, gamed_path, monkeypatch, tol=None) -> dict:
    """alpaca_eval's own get_length_controlled_winrate (it includes get_winrate) on the annotations, its Hub
    download pointed at the local df_gamed file; tol: liblinear's tolerance instead of its default 1e-4."""
    import pandas as pd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from alpaca_eval.metrics import glm_winrate
        monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda *a, **k: str(gamed_path))
        info = dict(glm_winrate.GLM_INFO["length_controlled_v1"])
        if tol:
            info["kwargs"] = {**info["kwargs"], "tol": tol, "max_iter": 100000}
        return glm_winrate.get_length_controlled_winrate(pd.DataFrame(annotations), save_weights_dir=None,
                                                          glm_info=info)


@pytest.mark.parametrize("seed, weighted", [(0, True), (1, False), (3, True)])
def test_length_controlled_matches_alpaca_eval(tmp_path, monkeypatch, seed, weighted):
    """Strongly length-biased synthetic judgments (model answers ~500 characters longer; logit P(model wins) = 0.2 -
    2·tanh(std_delta_len) + 0.5·difficulty), weighted or binary, with draws and missing verdicts: win rate, its SE and
    counts equal alpaca_eval's exactly; LC and its SE within 0.01 points of alpaca_eval's default fit (liblinear stops
    at tol 1e-4) and within 1e-6 of it run to tol 1e-13. LC moves the win rate by more than 10 points here."""
    n = 100
    path, difficulty = gamed_file(tmp_path, n, seed)
    rng = np.random.default_rng(100 + seed)
    len1 = rng.integers(200, 1500, n)
    len2 = np.maximum(1, len1 + rng.normal(500, 400, n)).astype(int)
    z = (len1 - len2) / np.std(len1 - len2, ddof=1)
    p = 1 / (1 + np.exp(-(0.2 - 2.0 * np.tanh(z) + 0.5 * difficulty)))
    pref = 1 + (p if weighted else (rng.random(n) < p))
    ann = [{"instruction": f"q{i}", "output_1": "a" * len1[i], "output_2": "b" * len2[i], "generator_1": "ref",
            "generator_2": "m", "preference": None if rng.random() < 0.05 else float(pref[i])} for i in range(n)]
    ann[3]["preference"], ann[4]["preference"] = 1.5, 0
    ours = winrate.win_rate([a["preference"] for a in ann]) | winrate.length_controlled(
        ann, winrate.read_df_gamed(path))
    theirs = alpaca_eval_metrics(ann, path, monkeypatch)
    for k in ("win_rate", "standard_error", "discrete_win_rate"):
        assert ours[k] == pytest.approx(theirs[k], rel=1e-12)
    assert all(ours[k] == theirs[k] for k in ("n_wins", "n_wins_base", "n_draws", "n_total"))
    assert ours["length_controlled_winrate"] == pytest.approx(theirs["length_controlled_winrate"], abs=0.01)
    assert ours["lc_standard_error"] == pytest.approx(theirs["lc_standard_error"], abs=0.01)
    assert abs(ours["length_controlled_winrate"] - ours["win_rate"]) > 10  # the GLM has something to correct
    tight = alpaca_eval_metrics(ann, path, monkeypatch, tol=1e-13)
    assert ours["length_controlled_winrate"] == pytest.approx(tight["length_controlled_winrate"], abs=1e-6)
    assert ours["lc_standard_error"] == pytest.approx(tight["lc_standard_error"], abs=1e-6)
    # the cross-validation itself (folds, weights, score): each C's summed fold score, as LogisticRegressionCV has it
    import pandas as pd
    from alpaca_eval.metrics import glm_winrate
    info = glm_winrate.GLM_INFO["length_controlled_v1"]
    xy, _, sw = glm_winrate._get_featurized_data(pd.DataFrame(ann), info["formula"],
                                                 info["regularize_to_baseline_lambda"])
    keep = xy["preference"].notna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cv = glm_winrate.fit_LogisticRegressionCV(xy[keep], "preference", sample_weight=sw[keep], n_splits=5,
                                                  tol=1e-13, max_iter=100000)
    assert ours["lc_cv_scores"] == pytest.approx(cv.scores_[1].sum(axis=0).ravel().tolist(), abs=1e-7)


def test_alpaca_eval_reads_our_annotations_file(tmp_path, server, monkeypatch):
    """The full path: 40 instructions judged by a length-biased weighted judge (P(longer shown wins) =
    σ((len - len_other)/300)); alpaca_eval loads our annotations.json with its own loader and its functions give our
    judge_results.json's win rate (exactly) and LC win rate (within 0.01)."""
    n = 40
    path, _ = gamed_file(tmp_path, n, seed=5)
    rng = np.random.default_rng(7)
    lens = rng.integers(50, 1200, (n, 2))
    lens[:, 0] += 300  # the model is wordier
    outs = write_json(tmp_path / "model_outputs.json", [{"instruction": f"Instruction {i}?", "output": "w" * lens[i, 0],
                                                         "generator": "wordy"} for i in range(n)])
    refs = write_json(tmp_path / "ref.json", [{"instruction": f"Instruction {i}?", "output": "r" * lens[i, 1],
                                               "generator": "base"} for i in range(n)])

    def respond(body):
        _, m, big = shown(body)
        pm = 1 / (1 + math.exp(-(len(m) - len(big)) / 300))
        return 200, completion("m", {"m": math.log(pm), "M": math.log(1 - pm)})
    server.respond = respond
    res = evaluate.main(["judge", "--outputs", str(outs), "--reference", str(refs), "--judge-url", server.url,
                         "--judge-model", "j", "--api-key-env", "", "--df-gamed", str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from alpaca_eval.utils import load_or_convert_to_dataframe
        df = load_or_convert_to_dataframe(tmp_path / "annotations.json")
    theirs = alpaca_eval_metrics(df, path, monkeypatch)
    assert res["win_rate"] == pytest.approx(theirs["win_rate"], rel=1e-12) and res["win_rate"] > 60
    assert res["standard_error"] == pytest.approx(theirs["standard_error"], rel=1e-12)
    assert res["length_controlled_winrate"] == pytest.approx(theirs["length_controlled_winrate"], abs=0.01)
    assert res["avg_length"] == pytest.approx(lens[:, 0].mean())
    again = evaluate.main(["judge", "--annotations", str(tmp_path / "annotations.json"), "--df-gamed", str(path),
                           "--out", str(tmp_path / "re")])
    assert again["length_controlled_winrate"] == pytest.approx(res["length_controlled_winrate"], abs=1e-12)


def test_alpaca_eval_template_helpers_match_alpaca_eval():
    """fill and chatml against alpaca_eval's make_prompts and prompt_to_chatml on a template with a named system
    message and placeholders out of order."""
    import pandas as pd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from alpaca_eval.utils import make_prompts, prompt_to_chatml
    template = ("<|im_start|>system\nBe fair.\n<|im_end|>\n<|im_start|>system name=example_assistant\nm\n<|im_end|>"
                "\n<|im_start|>user\n{output_2} / {instruction} / {output_1}\n<|im_end|>")
    values = {"instruction": "say {output_2}", "output_1": "one", "output_2": "two {instruction}"}
    text = judge.fill(template, values)
    assert text == make_prompts(pd.DataFrame([values]), template)[0][0]
    assert judge.chatml(text) == prompt_to_chatml(text)
    assert judge.chatml(judge.BUILTIN_TEMPLATE)[0]["role"] == "system"


# ----------------------------------------------------------------------------- MT-Bench
QUESTIONS = [{"question_id": 90, "category": "writing", "turns": ["Write about rain.", "Now shorter."]},
             {"question_id": 101, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
             {"question_id": 121, "category": "coding", "turns": ["Reverse a list.", "Now in place."]},
             {"question_id": 131, "category": "stem", "turns": ["Why is ice slippery?"]},
             {"question_id": 141, "category": "humanities", "turns": ["Who was Hypatia?", "Why is she known?"]}]
QUALITY = {90: ("8", "6"), 101: ("3", "backup7"), 121: ("8.5", "retry6"), 131: ("9",), 141: ("never", "5")}
PROMPTS = [  # our own judge prompts in FastChat's format; a pairwise one to be ignored
    {"name": "pair-v2", "type": "pairwise", "system_prompt": "P", "prompt_template": "{question}{answer_a}",
     "output_format": "[[A]]"},
    {"name": "single-v1", "type": "single", "system_prompt": "S-general", "output_format": "[[rating]]",
     "prompt_template": "[Q] {question}\n[A] {answer}\nRate it in [[x]]."},
    {"name": "single-math-v1", "type": "single", "system_prompt": "S-math", "output_format": "[[rating]]",
     "prompt_template": "[Q] {question}\n[REF] {ref_answer_1}\n[A] {answer}\nRate it."},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "S-mt", "output_format": "[[rating]]",
     "prompt_template": "[Q1] {question_1}\n[A1] {answer_1}\n[Q2] {question_2}\n[A2] {answer_2}\nRate turn 2."},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "S-math-mt", "output_format": "[[rating]]",
     "prompt_template": "[Q1] {question_1}\n[REF1] {ref_answer_1}\n[A1] {answer_1}\n[Q2] {question_2}\n"
                        "[REF2] {ref_answer_2}\n[A2] {answer_2}\nRate turn 2."}]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mt_files(tmp_path):
    q = jsonl(tmp_path / "question.jsonl", QUESTIONS)
    answers = jsonl(tmp_path / "tiny-mt.jsonl", [
        {"question_id": x["question_id"], "answer_id": "a", "model_id": "tiny-mt", "tstamp": 0.0,
         "choices": [{"index": 0, "turns": [f"answer {t + 1} quality={v}" for t, v in
                                            enumerate(QUALITY[x["question_id"]])]}]} for x in QUESTIONS[::-1]])
    refs = jsonl(tmp_path / "gpt-4.jsonl", [
        {"question_id": i, "model_id": "gpt-4", "choices": [{"index": 0, "turns": [f"ref {i} one", f"ref {i} two"]}]}
        for i in (101, 121, 999)])  # 999: a question not in the file, skipped
    prompts = jsonl(tmp_path / "judge_prompts.jsonl", PROMPTS)
    return q, answers, refs, prompts


def mt_judge(srv):
    """Grades the last answer in the prompt by its 'quality=' tag: a number -> [[n]]; backup7 -> [7]; retry6 -> prose,
    then [[6]]; never -> prose every time."""
    retried = set()

    def respond(body):
        tag = re.findall(r"quality=(\S+)", body["messages"][-1]["content"])[-1]
        if tag == "never" or (tag == "retry6" and tag not in retried):
            retried.add(tag)
            return 200, completion("A fine answer overall, I would say.", usage=(50, 20))
        text = "Rating: [7]" if tag == "backup7" else f"Rating: [[{'6' if tag == 'retry6' else tag}]]"
        return 200, completion(f"Explanation. {text}", usage=(50, 20))
    srv.respond = respond


def test_mt_bench_grading_against_local_server(tmp_path, server):
    """FastChat's single grading, by hand. Valid scores: turn 1: 8 (90), 3 (101), 8.5 (121), 9 (131) -> 28.5/4 =
    7.125; turn 2: 6, 7 (from [7]), 6 (after one retry), 5 -> 6.0; question 141 turn 1 never parses -> -1, left out;
    all 8 valid pooled: 52.5/8 = 6.5625. Categories: writing (8+6)/2 = 7, math (3+7)/2 = 5, coding 7.25, stem 9,
    humanities 5. 9 judgments (131 has one turn); requests 9 + 1 retry + 2 re-asks of 'never' = 12, each 50 + 20
    tokens: 600 and 240."""
    q, answers, refs, prompts = _mt_files(tmp_path)
    mt_judge(server)
    argv = ["judge", "--bench", "mt_bench", "--answers", str(answers), "--questions", str(q), "--references",
            str(refs), "--judge-prompts", str(prompts), "--judge-url", server.url, "--judge-model", "gpt-4",
            "--api-key-env", "", "--concurrency", "2"]
    res = evaluate.main(argv)
    assert res["turn_1"] == pytest.approx(7.125) and res["turn_2"] == pytest.approx(6.0)
    assert res["mean"] == pytest.approx(6.5625) and (res["n_judgments"], res["n_valid"]) == (9, 8)
    assert {c: v["mean"] for c, v in res["categories"].items()} == pytest.approx(
        {"writing": 7.0, "math": 5.0, "coding": 7.25, "stem": 9.0, "humanities": 5.0})
    assert res["categories"]["humanities"]["turn_1"] is None and res["unparsable"] == 1 and res["failed"] == 0
    assert len(server.requests) == 12 and res["usage"]["prompt_tokens"] == 600
    assert res["usage"]["completion_tokens"] == 240 and res["usage"]["cost_usd"] is None and res["model"] == "tiny-mt"
    bodies = [b for _, _, b in server.requests]
    assert all(b["temperature"] == 0 and b["max_tokens"] == 2048 and b["model"] == "gpt-4" for b in bodies)
    for b in bodies:
        system, user = b["messages"][0]["content"], b["messages"][1]["content"]
        math_q = "[Q] What is 2+2?" in user or "[Q1] What is 2+2?" in user or "Reverse a list." in user
        assert ("[REF" in user) == math_q and system == {(False, False): "S-general", (True, False): "S-math",
                                                         (False, True): "S-mt", (True, True): "S-math-mt"}[
            math_q, "[Q2]" in user]
        if "[Q2] And 3+3?" in user:  # turn 2 sees the whole conversation and both references
            assert "[REF1] ref 101 one" in user and "[REF2] ref 101 two" in user and "quality=3" in user
    rows = [json.loads(x) for x in (tmp_path / "gpt-4_single.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(set(r) >= {"question_id", "model", "judge", "user_prompt", "judgment", "score",
                                             "turn", "tstamp"} for r in rows)
    got = {(r["question_id"], r["turn"]): (r["score"], r["judge"][1]) for r in rows}
    assert got == {(90, 1): (8, "single-v1"), (90, 2): (6, "single-v1-multi-turn"), (101, 1): (3, "single-math-v1"),
                   (101, 2): (7, "single-math-v1-multi-turn"), (121, 1): (8.5, "single-math-v1"),
                   (121, 2): (6, "single-math-v1-multi-turn"), (131, 1): (9, "single-v1"),
                   (141, 1): (-1, "single-v1"), (141, 2): (5, "single-v1-multi-turn")}
    assert all(r["model"] == "tiny-mt" and r["judge"][0] == "gpt-4" for r in rows)
    # rerun: all from the cache; --retry-malformed re-asks only 141 turn 1 (3 more asks, still unparsable)
    assert evaluate.main(argv)["cached"] == 9 and len(server.requests) == 12
    again = evaluate.main(argv + ["--retry-malformed"])
    assert len(server.requests) == 15 and again["mean"] == pytest.approx(6.5625)


def test_parse_rating_fastchat_rules():
    """[[x]] first, else [x]; integers stay integers; no match -> -1."""
    cases = {"Rating: [[7]]": 7, "[[8.5]] and [[2]]": 8.5, "score [6]": 6, "[3] then [[9]]": 9, "none": -1,
             "[[ten]]": -1, None: -1, "[[10.]]": 10.0}
    assert {k: mt_bench.parse_rating(k) for k in cases} == cases
    assert isinstance(mt_bench.parse_rating("[[7]]"), int)


def test_mt_bench_bad_input_is_one_line(tmp_path, server, monkeypatch):
    q, answers, refs, prompts = _mt_files(tmp_path)
    base = ["judge", "--bench", "mt_bench", "--questions", str(q), "--references", str(refs), "--judge-prompts",
            str(prompts), "--judge-url", server.url, "--judge-model", "j", "--api-key-env", ""]
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    cases = [(rows[:1] + [dict(rows[1], question_id=999)], r"a.jsonl: line 2: question_id 999 is not in the questions"),
             (rows[:1] + [dict(rows[2], choices=[{"turns": ["only one"]}])], r"a.jsonl: line 2: choices\[0\].turns "
                                                                               r"must be 2 strings \(question 121"),
             (rows + rows[:1], r"a.jsonl: line 6: question_id 141 is answered twice"),
             ([{"question_id": 90, "turns": []}], r"a.jsonl: line 1: needs choices\[0\].turns")]
    for bad, msg in cases:
        with pytest.raises(UserError, match=msg):
            evaluate.main(base + ["--answers", str(jsonl(tmp_path / "a.jsonl", bad))])
    bad_q = jsonl(tmp_path / "bad_q.jsonl", QUESTIONS[:1] + [{"question_id": 5, "category": "x", "turns": "one"}])
    with pytest.raises(UserError, match=r"bad_q.jsonl: line 2: 'turns' must be a list of non-empty strings"):
        evaluate.main(base[:3] + ["--questions", str(bad_q)] + base[5:] + ["--answers", str(answers)])
    with pytest.raises(UserError, match=r"--concurrency 0: must be at least 1"):
        evaluate.main(base + ["--answers", str(answers), "--concurrency", "0"])
    (tmp_path / "torn.jsonl").write_text(answers.read_text() + '{"question_id": 9')
    with pytest.raises(UserError, match=r"torn.jsonl: line 6: invalid JSON"):
        evaluate.main(base + ["--answers", str(tmp_path / "torn.jsonl")])
    jsonl(refs, [{"question_id": 101, "choices": [{"turns": ["r1", "r2"]}]}])
    with pytest.raises(UserError, match=r"gpt-4.jsonl: no reference answer for question 121"):
        evaluate.main(base + ["--answers", str(answers)])
    jsonl(prompts, [p for p in PROMPTS if p["name"] != "single-math-v1"])
    with pytest.raises(UserError, match=r"judge_prompts.jsonl: no judge prompt named single-math-v1"):
        evaluate.main(base + ["--answers", str(answers)])
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match=r"cannot download data/judge_prompts.jsonl of the Hub space lmsys/mt-bench "
                                        r"\(OSError\).*--judge-prompts PATH"):
        evaluate.main(base[:7] + base[9:] + ["--answers", str(answers)])
    assert server.requests == []


def test_items_the_judge_never_answered_are_not_a_result(tmp_path, server, monkeypatch):
    """AlpacaEval: 'busy' gets 429s past --max-retries: no win rate over 9 of 10 items with exit 0. The run stops
    (exit 2, one line) naming how many verdicts are missing and that the same command asks only for them; it then
    does (one request) and writes the whole result. --allow-partial writes a result marked partial instead."""
    names, model, outs, refs = _alpaca_files(tmp_path)
    weighted_judge(server, {"busy": [429, 429]})
    argv = ["judge", "--outputs", str(outs), "--reference", str(refs), "--judge-url", server.url, "--judge-model",
            "fake-judge", "--api-key-env", "", "--backoff", "0.01", "--max-retries", "1", "--no-lc",
            "--parse-retries", "0"]
    with pytest.raises(UserError, match=r"never answered 1 of 11 items .* asks only for those 1"):
        evaluate.main(argv)
    assert not (tmp_path / "out" / "judge_results.json").exists()
    asked = len(server.requests)
    res = evaluate.main(argv)
    assert len(server.requests) == asked + 1 and shown(server.requests[-1][2])[0] == "busy"
    assert res["failed"] == 0 and res["partial"] is False and res["missing_verdicts"] == 0

    weighted_judge(server, {"q0": [429, 429]})
    partial = evaluate.main(argv + ["--allow-partial", "--cache", str(tmp_path / "fresh_cache")])
    saved = json.loads((tmp_path / "out" / "judge_results.json").read_text())
    assert partial["partial"] is True and saved["partial"] is True and saved["missing_verdicts"] == 1


def test_mt_bench_judgments_never_answered_are_not_a_result(tmp_path, server):
    """MT-Bench: a judgment whose requests all fail stops the run (exit 2) unless --allow-partial, which records it."""
    q, answers, refs, prompts = _mt_files(tmp_path)
    mt_judge(server)
    grade = server.respond
    server.respond = lambda body: (503, {"error": "down"}) if "[Q] Reverse a list." in body["messages"][-1][
        "content"] else grade(body)
    argv = ["judge", "--bench", "mt_bench", "--answers", str(answers), "--questions", str(q), "--references",
            str(refs), "--judge-prompts", str(prompts), "--judge-url", server.url, "--judge-model", "gpt-4",
            "--api-key-env", "", "--backoff", "0.01", "--max-retries", "1"]
    with pytest.raises(UserError, match=r"never answered 1 of 9 MT-Bench judgments .* asks only for those 1"):
        evaluate.main(argv)
    assert not (tmp_path / "mt_bench_results.json").exists()
    res = evaluate.main(argv + ["--allow-partial"])
    saved = json.loads((tmp_path / "mt_bench_results.json").read_text())
    assert res["failed"] == 1 and saved["partial"] is True and saved["missing_verdicts"] == 1
