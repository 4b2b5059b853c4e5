"""judge.py: the judge client against a real local HTTP server speaking the OpenAI chat format (through
`evaluate.py judge`), its verdict cache and failure handling, and the win rate and length-controlled win rate on
synthetic data with a known length effect."""
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import evaluate
import judge
from model import UserError


class FakeJudge(BaseHTTPRequestHandler):
    """OpenAI /v1/chat/completions stand-in: prefers the output containing 'GOOD', except for scripted faults
    keyed by the instruction (each fault fires once, on the first request for that instruction)."""
    faults = {"slow": "sleep", "busy": "429", "flaky": "500", "garbled": "prose", "broken": "not-json"}

    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Authorization"), body))
        user = body["messages"][-1]["content"]
        instruction = re.search(r"# Instruction\n(.*?)\n\n# Output \(a\)", user, re.S).group(1)
        a = re.search(r"# Output \(a\)\n(.*?)\n\n# Output \(b\)", user, re.S).group(1)
        fault = self.faults.get(instruction) if instruction not in srv.seen else None
        srv.seen.add(instruction)
        if fault == "sleep":
            time.sleep(1.0)  # longer than the client's timeout
        if fault in ("401", "429", "500"):
            self.send_response(int(fault))
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        content = {"prose": "Both answers have merit.", None: "a" if "GOOD" in a else "(b)"}.get(fault, "a")
        message = {"role": "assistant", "content": content}
        reply = b"<html>oops</html>" if fault == "not-json" else json.dumps(
            {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        try:
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out on the slow request
            pass


@pytest.fixture
def judge_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    srv.requests, srv.seen = [], set()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _outputs(tmp_path):
    """Model vs reference outputs: which one the fake judge prefers is known per instruction."""
    names = ["q0", "q1", "q2", "q3", "slow", "busy", "flaky", "garbled", "broken", "same"]
    model = {"q0": "GOOD long answer", "q1": "bad", "q2": "GOOD", "q3": "bad bad", "slow": "GOOD answer",
             "busy": "plain", "flaky": "GOOD x", "garbled": "GOOD y", "broken": "GOOD z", "same": "identical"}
    ref = {n: "identical" if n == "same" else "meh" if "GOOD" in model[n] else "GOOD ref" for n in names}
    expected = {n: 0.5 if n == "same" else float("GOOD" in model[n]) for n in names if n not in ("garbled", "broken")}
    outs, refs = tmp_path / "model_outputs.json", tmp_path / "ref.json"
    outs.write_text(json.dumps([{"instruction": n, "output": model[n], "generator": "m"} for n in names] +
                               [{"instruction": "no reference", "output": "x", "generator": "m"}]))
    refs.write_text(json.dumps([{"instruction": n, "output": ref[n], "generator": "r"} for n in names]))
    return outs, refs, expected


def test_judge_against_local_server(tmp_path, judge_server, monkeypatch):
    outs, refs, expected = _outputs(tmp_path)
    url = f"http://127.0.0.1:{judge_server.server_address[1]}/v1"
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    argv = ["judge", "--outputs", str(outs), "--reference", str(refs), "--judge-url", url, "--judge-model",
            "fake-judge", "--api-key-env", "TEST_JUDGE_KEY", "--cache", str(tmp_path / "cache"), "--timeout", "0.5",
            "--backoff", "0.01"]
    res = evaluate.main(argv)
    reqs = judge_server.requests
    assert all(path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "fake-judge"
               for path, auth, body in reqs)
    # 9 judged items ('same' is identical: no request) + 1 timeout retry + 1 429 retry + 1 500 retry
    assert len(reqs) == 9 + 3
    v = list(expected.values())
    assert res["n_total"] == len(v) == 8 and res["malformed"] == 2 and res["failed"] == 0 and res["identical"] == 1
    assert res["missing_reference"] == 1 and res["judged"] == 7 and res["cached"] == 0
    assert res["win_rate"] == pytest.approx(100 * sum(v) / len(v))
    assert res["standard_error"] == pytest.approx(100 * np.std(v, ddof=1) / math.sqrt(len(v)))
    # position bias cancels: the model's answer was shown first on half of the judged items
    model = {r["instruction"]: r["output"] for r in json.loads(outs.read_text())}
    pattern = re.compile(r"# Instruction\n(.*?)\n\n# Output \(a\)\n(.*?)\n\n", re.S)
    shown = [pattern.search(b["messages"][-1]["content"]).groups() for _, _, b in reqs]
    firsts = {instr: a == model[instr] for instr, a in shown}
    assert sorted(firsts.values()) == [False] * 4 + [True] * 5  # items 0, 2, 4, 6, 8 model first; 'same' not sent
    lines = (tmp_path / "cache" / "verdicts.jsonl").read_text().splitlines()
    assert len(lines) == 10 and sum(json.loads(x)["verdict"] is None for x in lines) == 2

    # rerun: every verdict (malformed ones included: they were paid for) comes from the cache
    res2 = evaluate.main(argv)
    assert len(judge_server.requests) == 12 and res2["cached"] == 10 and res2["win_rate"] == res["win_rate"]
    # --retry-malformed re-asks exactly the two malformed items; the server now answers them properly
    res3 = evaluate.main(argv + ["--retry-malformed"])
    assert len(judge_server.requests) == 14 and res3["malformed"] == 0 and res3["n_total"] == 10
    assert res3["win_rate"] == pytest.approx(100 * (sum(v) + 2) / 10)


def test_a_killed_judge_run_resumes_from_its_cache(tmp_path, judge_server, monkeypatch):
    """The run dies (KeyboardInterrupt, as a kill) while waiting for the 4th reply: the 3 verdicts paid for are whole
    lines on disk, and the next run asks only for the other items."""
    items = [{"instruction": f"q{i}", "output": "GOOD" if i % 2 else "bad", "reference": "meh"} for i in range(6)]
    url = f"http://127.0.0.1:{judge_server.server_address[1]}/v1/chat/completions"
    cache, real = tmp_path / "verdicts.jsonl", judge.chat_completion

    def dies_on_the_fourth(*a, **k):
        if len(judge_server.requests) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(judge, "chat_completion", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        judge.judge_pairs(items, url=url, judge_model="j", cache_path=cache, backoff=0.01)
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert [r["instruction"] for r in lines] == ["q0", "q1", "q2"] and cache.read_text().endswith("\n")
    monkeypatch.setattr(judge, "chat_completion", real)
    records, counts = judge.judge_pairs(items, url=url, judge_model="j", cache_path=cache, backoff=0.01)
    asked = [re.search(r"# Instruction\n(.*?)\n", b["messages"][-1]["content"]).group(1)
             for _, _, b in judge_server.requests]
    assert asked == ["q0", "q1", "q2", "q3", "q4", "q5"] and counts["cached"] == 3 and counts["judged"] == 3
    assert [r["verdict"] for r in records] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_judge_failures_keep_paid_verdicts(tmp_path, judge_server):
    """Retries exhausted -> counted as failed and not cached; a 401 stops the run with the verdicts already on disk."""
    outs, refs, _ = _outputs(tmp_path)
    url = f"http://127.0.0.1:{judge_server.server_address[1]}/v1/chat/completions"
    cache = tmp_path / "c" / "verdicts.jsonl"
    cache.parent.mkdir()
    items = [{"instruction": q, "output": "GOOD", "reference": "r"} for q in ("q0", "busy")]
    recs, counts = judge.judge_pairs(items, url=url, judge_model="j", cache_path=cache, max_retries=0, backoff=0.01)
    assert counts["failed"] == 1 and counts["judged"] == 1 and len(cache.read_text().splitlines()) == 1
    FakeJudge.faults = {**FakeJudge.faults, "q2": "401"}
    try:
        with pytest.raises(UserError, match="HTTP 401"):
            judge.judge_pairs(items + [{"instruction": "q2", "output": "GOOD", "reference": "r"}], url=url,
                                 judge_model="j", cache_path=cache, backoff=0.01)
    finally:
        FakeJudge.faults = {k: f for k, f in FakeJudge.faults.items() if k != "q2"}
    assert [json.loads(x)["instruction"] for x in cache.read_text().splitlines()] == ["q0", "busy"]


def test_parse_verdict():
    replies = ["a", " B.", "(b)", "Output (a)", "**a**", "ab", "a or b", "", None]
    assert [judge.parse_verdict(s) for s in replies] == ["a", "b", "b", "a", "a", None, None, None, None]


# ----------------------------------------------------------------------------- win rates
def test_win_rate_by_hand():
    """v = 1, 0, 1, ½: mean 0.625; squared deviations .140625 + .390625 + .140625 + .015625 = .6875, /3 = .229167,
    sqrt = .478714, /√4 = .239357 -> 62.5 ± 23.9357."""
    r = judge.win_rate([1, 0, 1, 0.5])
    assert r["win_rate"] == pytest.approx(62.5) and r["standard_error"] == pytest.approx(23.9357, abs=1e-3)
    assert (r["n_wins"], r["n_draws"], r["n_total"]) == (2, 1, 4)


@pytest.mark.parametrize("theta0", [0.0, 1.0])
def test_lc_win_rate_removes_a_known_length_effect(theta0):
    """Verdicts drawn from logit P(win) = θ0 + 2·tanh(Δ/σ_Δ) with the model's answers mostly longer: the raw win
    rate is inflated by length, the LC win rate recovers σ(θ0) (0.5 when length explains everything)."""
    rng = np.random.default_rng(0)
    n = 4000
    len_ref = rng.integers(200, 1200, n)
    delta = rng.normal(400, 300, n)
    len_out = np.maximum(1, len_ref + delta)
    d = len_out - len_ref
    p = 1 / (1 + np.exp(-(theta0 + 2.0 * np.tanh(d / d.std()))))
    v = (rng.random(n) < p).astype(float)
    raw = judge.win_rate(v)["win_rate"]
    lc = judge.lc_win_rate(v, len_out, len_ref)
    target = 100 / (1 + math.exp(-theta0))
    assert raw > target + 15
    assert lc["lc_win_rate"] == pytest.approx(target, abs=3.0)
    assert lc["lc_theta"][1] == pytest.approx(2.0, abs=0.3)
    # no length difference at all: LC = raw
    same = judge.lc_win_rate(v, len_ref, len_ref)["lc_win_rate"]
    assert same == pytest.approx(100 * v.mean(), abs=1e-4)
