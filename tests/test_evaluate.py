"""evaluate.py: preference metrics by hand through the model, benchmark output formats, the judge client against a
real local HTTP server speaking the OpenAI chat format, the length-controlled win rate on synthetic data with a
known length effect, and training diagnostics on a recorded metrics.jsonl (with and without matplotlib)."""
import json
import math
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import evaluate


# ----------------------------------------------------------------------------- judge client
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


def test_judge_failures_keep_paid_verdicts(tmp_path, judge_server):
    """Retries exhausted -> counted as failed and not cached; a 401 stops the run with the verdicts already on disk."""
    outs, refs, _ = _outputs(tmp_path)
    url = f"http://127.0.0.1:{judge_server.server_address[1]}/v1/chat/completions"
    cache = tmp_path / "c" / "verdicts.jsonl"
    cache.parent.mkdir()
    items = [{"instruction": q, "output": "GOOD", "reference": "r"} for q in ("q0", "busy")]
    recs, counts = evaluate.judge_pairs(items, url=url, judge_model="j", cache_path=cache, max_retries=0, backoff=0.01)
    assert counts["failed"] == 1 and counts["judged"] == 1 and len(cache.read_text().splitlines()) == 1
    FakeJudge.faults = {**FakeJudge.faults, "q2": "401"}
    try:
        with pytest.raises(SystemExit, match="HTTP 401"):
            evaluate.judge_pairs(items + [{"instruction": "q2", "output": "GOOD", "reference": "r"}], url=url,
                                 judge_model="j", cache_path=cache, backoff=0.01)
    finally:
        FakeJudge.faults = {k: f for k, f in FakeJudge.faults.items() if k != "q2"}
    assert [json.loads(x)["instruction"] for x in cache.read_text().splitlines()] == ["q0", "busy"]


def test_parse_verdict():
    replies = ["a", " B.", "(b)", "Output (a)", "**a**", "ab", "a or b", "", None]
    assert [evaluate.parse_verdict(s) for s in replies] == ["a", "b", "b", "a", "a", None, None, None, None]


# ----------------------------------------------------------------------------- win rates
def test_win_rate_by_hand():
    """v = 1, 0, 1, ½: mean 0.625; squared deviations .140625 + .390625 + .140625 + .015625 = .6875, /3 = .229167,
    sqrt = .478714, /√4 = .239357 -> 62.5 ± 23.9357."""
    r = evaluate.win_rate([1, 0, 1, 0.5])
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
    raw = evaluate.win_rate(v)["win_rate"]
    lc = evaluate.lc_win_rate(v, len_out, len_ref)
    target = 100 / (1 + math.exp(-theta0))
    assert raw > target + 15
    assert lc["lc_win_rate"] == pytest.approx(target, abs=3.0)
    assert lc["lc_theta"][1] == pytest.approx(2.0, abs=0.3)
    # no length difference at all: LC = raw
    same = evaluate.lc_win_rate(v, len_ref, len_ref)["lc_win_rate"]
    assert same == pytest.approx(100 * v.mean(), abs=1e-4)


# ----------------------------------------------------------------------------- diagnostics
def _write_runs(tmp_path):
    """Run 'hinge': chosen log-probs fall (-40 -> -70) while rejected fall faster (likelihood displacement);
    active fraction 1 -> 0.2 overall, by length bucket. Run 'dpo': chosen rises. Plus eval rows and a torn line."""
    runs = {}
    for name, c0, c1 in (("hinge", -40.0, -70.0), ("dpo", -40.0, -30.0)):
        rows = []
        for s in range(1, 51):
            f = s / 50
            row = {"step": s, "loss": 1 - 0.5 * f, "logps/chosen": c0 + (c1 - c0) * f, "logps/rejected": -40 - 60 * f,
                   "rewards/margins": 2 * f, "rewards/accuracies": 0.5 + 0.4 * f, "rewards/chosen": 0.1}
            if name == "hinge":
                row.update({"hinge/active_fraction": 1 - 0.8 * f, "hinge/active_fraction/len_0-128": 1 - 0.9 * f,
                            "hinge/active_fraction/len_128+": 1 - 0.5 * f})
            rows.append(row)
            if s % 10 == 0:
                rows.append({"step": s, "eval/logps/chosen": c0 + (c1 - c0) * f, "eval/rewards/margins": 1.5 * f,
                             "eval/rewards/accuracies": 0.5 + 0.3 * f})
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 51, "logps/cho')
        runs[name] = d
    return runs


def test_diagnostics_plots_and_table(tmp_path, capsys):
    runs = _write_runs(tmp_path)
    out = tmp_path / "diag"
    summary = evaluate.main(["diagnostics", str(runs["hinge"]), str(runs["dpo"]), "--out", str(out)])
    h, d = summary[str(runs["hinge"])], summary[str(runs["dpo"])]
    # first/last 10% of the 50 train points: steps 1-5 and 46-50
    assert h["logps/chosen"]["start"] == pytest.approx(np.mean([-40 - 30 * s / 50 for s in range(1, 6)]))
    assert h["logps/chosen"]["end"] == pytest.approx(np.mean([-40 - 30 * s / 50 for s in range(46, 51)]))
    assert h["likelihood_displacement"] is True and d["likelihood_displacement"] is False
    assert h["eval/likelihood_displacement"] is True and h["bad_lines"] == 1
    assert h["hinge/active_fraction"]["mean"] == pytest.approx(np.mean([1 - 0.8 * s / 50 for s in range(1, 51)]))
    assert h["hinge/active_fraction/len_0-128"]["end"] < h["hinge/active_fraction/len_128+"]["end"]
    assert "hinge/active_fraction" not in d
    assert h["margins_quantiles"]["p50"] == pytest.approx(np.median([1.5 * s / 50 for s in range(10, 51, 10)]))
    png = (out / "diagnostics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "diagnostics.txt").read_text()
    assert "YES: logps/chosen fell" in table and "no: logps/chosen did not fall" in table
    assert "hinge/active_fraction/len_128+" in table
    assert json.loads((out / "diagnostics.json").read_text())[str(runs["dpo"])]["logps/chosen"]["n"] == 50


def test_diagnostics_without_matplotlib(tmp_path, monkeypatch, capsys):
    runs = _write_runs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "diag"
    evaluate.main(["diagnostics", str(runs["hinge"]), "--out", str(out)])
    assert not (out / "diagnostics.png").exists()
    assert "YES: logps/chosen fell" in (out / "diagnostics.txt").read_text()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_length_stats():
    s = evaluate.length_stats([1, 2, 3, 4, 10])
    # p90 by linear interpolation: position 0.9·4 = 3.6 -> 4 + 0.6·(10 − 4) = 7.6
    assert s == {"n": 5, "mean": 4.0, "median": 3.0, "p90": pytest.approx(7.6)}


# ----------------------------------------------------------------------------- preference metrics
def _hand_logps(model_dir, pairs):
    """S(y) of each pair's chosen and rejected answer, one unpadded sequence at a time through the model."""
    import torch

    from model import Qwen2
    m = Qwen2.from_pretrained(str(model_dir)).eval()
    out = []
    with torch.no_grad():
        for p in pairs:
            s = []
            for y in (p.chosen_ids, p.rejected_ids):
                ids = torch.tensor([p.prompt_ids + y])
                mask = torch.tensor([[False] * len(p.prompt_ids) + [True] * len(y)])
                s.append(m.sequence_logps(ids, torch.ones_like(ids), mask).item())
            out.append(s)
    return np.array(out)


def _check_metrics(res, r_w, r_l, s):
    m = r_w - r_l
    assert res["n_pairs"] == len(m)
    assert res["rewards/accuracies"] == pytest.approx(np.mean(m > 0) + 0.5 * np.mean(m == 0))
    assert res["rewards/margins"] == pytest.approx(m.mean(), abs=1e-4)
    assert res["rewards/chosen"] == pytest.approx(r_w.mean(), abs=1e-4)
    assert res["rewards/rejected"] == pytest.approx(r_l.mean(), abs=1e-4)
    assert res["logps/chosen"] == pytest.approx(s[:, 0].mean(), abs=1e-3)
    assert res["logps/rejected"] == pytest.approx(s[:, 1].mean(), abs=1e-3)


def test_prefs_reference_free_by_hand(tiny_model_dir, pref_jsonl, tmp_path):
    """No reference: r(y) = β·S(y)/|y| with β = 2.0 (SimPO's default), S computed by hand per sequence."""
    import data
    pairs, _ = data.tokenize_pairs(data.load_rows(str(pref_jsonl))[0], data.load_tokenizer(tiny_model_dir), 1024, 256)
    s = _hand_logps(tiny_model_dir, pairs)
    lens = np.array([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs])
    res = evaluate.main(["prefs", "--model", str(tiny_model_dir), "--data", str(pref_jsonl),
                         "--out", str(tmp_path / "m.json"), "--batch-size", "3"])
    assert res["reward"] == "beta*S/|y|" and res["beta"] == 2.0
    _check_metrics(res, 2.0 * s[:, 0] / lens[:, 0], 2.0 * s[:, 1] / lens[:, 1], s)
    assert json.loads((tmp_path / "m.json").read_text())["rewards/margins"] == pytest.approx(res["rewards/margins"])


def test_prefs_with_reference_by_hand(tiny_model_dir, tokenizer_dir, pref_jsonl, tmp_path):
    """Reference model = another random init: r(y) = β·(S(y) − S_ref(y)), β = 0.1; the cache is built, then reused
    through --ref-cache alone (its meta.json names the reference model)."""
    import data
    from conftest import make_model_dir
    ref_dir = make_model_dir(tmp_path / "ref", tokenizer_dir=tokenizer_dir, seed=1)
    pairs, _ = data.tokenize_pairs(data.load_rows(str(pref_jsonl))[0], data.load_tokenizer(tiny_model_dir), 1024, 256)
    s, s_ref = _hand_logps(tiny_model_dir, pairs), _hand_logps(ref_dir, pairs)
    argv = ["prefs", "--model", str(tiny_model_dir), "--data", str(pref_jsonl), "--out", str(tmp_path / "m.json")]
    res = evaluate.main(argv + ["--ref-model", str(ref_dir), "--ref-cache", str(tmp_path / "cache")])
    assert res["reward"] == "beta*(S-S_ref)" and res["beta"] == 0.1
    _check_metrics(res, 0.1 * (s[:, 0] - s_ref[:, 0]), 0.1 * (s[:, 1] - s_ref[:, 1]), s)
    res2 = evaluate.main(argv + ["--ref-cache", str(tmp_path / "cache")])
    assert res2["rewards/margins"] == pytest.approx(res["rewards/margins"], abs=1e-6)


def test_prefs_hinge_loss_active_fraction_by_length(tiny_model_dir, tokenizer_dir, tmp_path):
    """--loss hinge --beta 3: per-pair loss max(0, 1 − β·z), z = Δ_w − Δ_l; active = loss > 0 (gradient flows),
    overall and per length quartile; the quartiles partition the pairs."""
    import data
    from conftest import make_model_dir, make_pref_rows, write_jsonl
    ref_dir = make_model_dir(tmp_path / "ref", tokenizer_dir=tokenizer_dir, seed=2)
    prefs = write_jsonl(tmp_path / "p.jsonl", make_pref_rows(24, "standard", seed=3))
    pairs, _ = data.tokenize_pairs(data.load_rows(str(prefs))[0], data.load_tokenizer(tiny_model_dir), 1024, 256)
    s, s_ref = _hand_logps(tiny_model_dir, pairs), _hand_logps(ref_dir, pairs)
    z = (s[:, 0] - s_ref[:, 0]) - (s[:, 1] - s_ref[:, 1])
    hinge = np.maximum(0, 1 - 3 * z)
    res = evaluate.main(["prefs", "--model", str(tiny_model_dir), "--data", str(prefs), "--out",
                         str(tmp_path / "m.json"), "--ref-model", str(ref_dir), "--ref-cache", str(tmp_path / "c"),
                         "--loss", "hinge", "--beta", "3"])
    assert res["beta"] == 3 and res["reward"] == "beta*(S-S_ref)"
    overall = res["loss"]["all"]
    assert overall["n"] == len(pairs) and overall["loss"] == pytest.approx(hinge.mean(), abs=1e-4)
    assert overall["hinge/active_fraction"] == pytest.approx(np.mean(hinge > 0))
    assert 0 < np.mean(hinge > 0) < 1  # the check is not vacuous
    buckets = [v for k, v in res["loss"].items() if k.startswith("len_q")]
    assert len(buckets) >= 3 and sum(b["n"] for b in buckets) == len(pairs)
    assert sum(b["n"] * b["hinge/active_fraction"] for b in buckets) == pytest.approx(np.sum(hinge > 0))
    with pytest.raises(SystemExit, match="--loss dpo uses a reference model"):
        evaluate.main(["prefs", "--model", str(tiny_model_dir), "--data", str(prefs), "--out", str(tmp_path / "x.json"),
                       "--loss", "dpo"])


# ----------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def chatty_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with every non-norm weight redrawn from N(0, 0.3²): the default init greedily repeats one
    whitespace token (an empty answer after strip), this one emits varied text."""
    import torch

    from model import Qwen2
    m = Qwen2.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("chatty")
    m.save_pretrained(out)
    return out


def test_generate_alpaca_format_and_batching(chatty_model_dir, tmp_path):
    """model_outputs.json is AlpacaEval's format, in input order, and batching (length-sorted, left-padded) gives
    the same greedy answers as one prompt at a time."""
    prompts = [{"instruction": "Hello, how are you?", "dataset": "helpful_base"},
               {"instruction": "Why is the sky blue"}, {"prompt": "Explain " + "the water cycle " * 6},
               {"instruction": "Name two colours.", "dataset": "koala"},
               {"instruction": "Tell me a story about a boy and his house."}]
    bench = tmp_path / "prompts.jsonl"
    bench.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    outs = {}
    for bs in (1, 3):
        evaluate.main(["generate", "--model", str(chatty_model_dir), "--bench", str(bench),
                       "--out", str(tmp_path / f"b{bs}"), "--max-new-tokens", "12", "--batch-size", str(bs),
                       "--name", "tiny"])
        outs[bs] = json.loads((tmp_path / f"b{bs}" / "model_outputs.json").read_text())
    rows = outs[3]
    assert [r["instruction"] for r in rows] == [p.get("instruction", p.get("prompt")) for p in prompts]
    assert all(set(r) <= {"instruction", "output", "generator", "dataset"} and isinstance(r["output"], str)
               and r["generator"] == "tiny" for r in rows)
    assert [r.get("dataset") for r in rows] == ["helpful_base", None, None, "koala", None]
    assert [r["output"] for r in rows] == [r["output"] for r in outs[1]]
    assert all(len(r["output"]) > 0 for r in rows)
    saved = json.loads((tmp_path / "b3" / "generation_stats.json").read_text())
    assert saved["n_answers"] == 5 and saved["tokens"]["n"] == 5 and 0 < saved["tokens"]["mean"] <= 12
    assert saved["chars"]["mean"] == pytest.approx(np.mean([len(r["output"]) for r in rows]))
    assert saved["tokens_per_s"] > 0 and saved["generated_tokens"] == pytest.approx(5 * saved["tokens"]["mean"])


def test_generate_mt_bench_second_turn_sees_first_answer(chatty_model_dir, tmp_path, monkeypatch):
    """FastChat answer JSONL; the turn-2 prompt the model receives contains its own turn-1 answer."""
    import data
    from model import Qwen2
    questions = [{"question_id": 81 + i, "category": c, "turns": [f"First question {c}?", f"Now rewrite it {c}."]}
                 for i, c in enumerate(["writing", "math", "coding"])]
    bench = tmp_path / "question.jsonl"
    bench.write_text("".join(json.dumps(q) + "\n" for q in questions))
    tok, seen, original = data.load_tokenizer(chatty_model_dir), [], Qwen2.generate

    def spy(self, input_ids, attention_mask=None, **kw):
        seen.extend(tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
                    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()))
        return original(self, input_ids, attention_mask, **kw)
    monkeypatch.setattr(Qwen2, "generate", spy)
    evaluate.main(["generate", "--model", str(chatty_model_dir), "--bench", str(bench), "--out", str(tmp_path / "mt"),
                   "--max-new-tokens", "10", "--batch-size", "2", "--name", "tiny-mt"])
    answers = [json.loads(x) for x in (tmp_path / "mt" / "tiny-mt.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82, 83]
    for a, q in zip(answers, questions):
        assert a["model_id"] == "tiny-mt" and isinstance(a["answer_id"], str) and isinstance(a["tstamp"], float)
        assert len(a["choices"]) == 1 and a["choices"][0]["index"] == 0
        t1, t2 = a["choices"][0]["turns"]
        assert isinstance(t1, str) and isinstance(t2, str) and t1 and t2
        turn2 = [p for p in seen if q["turns"][1] in p]
        assert len(turn2) == 1 and q["turns"][0] in turn2[0]
        assert f"<|im_start|>assistant\n{t1}<|im_end|>\n<|im_start|>user\n{q['turns'][1]}<|im_end|>" in turn2[0]
    assert len(seen) == 6


def test_generate_bad_bench_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"text": "no instruction"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl: row 2: needs a non-empty string 'instruction'"):
        evaluate.load_prompts(str(bad))


def test_generate_sampling_from_generation_config(chatty_model_dir, tmp_path, capsys):
    """--sampling reads temperature/top_k/top_p from generation_config.json (unsupported keys reported); the seed
    makes it reproducible."""
    import shutil
    model_dir = tmp_path / "m"
    shutil.copytree(chatty_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}))
    assert evaluate.sampling_config(model_dir) == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert "repetition_penalty" in capsys.readouterr().out
    bench = tmp_path / "p.jsonl"
    bench.write_text("".join(json.dumps({"instruction": f"Say something {i}."}) + "\n" for i in range(3)))
    outs = []
    for seed in ("0", "0", "1"):
        argv = ["generate", "--model", str(model_dir), "--bench", str(bench), "--out", str(tmp_path / "o"),
                "--max-new-tokens", "16", "--sampling", "--seed", seed]
        assert evaluate.main(argv)["sampling"] == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
        outs.append([r["output"] for r in json.loads((tmp_path / "o" / "model_outputs.json").read_text())])
    assert outs[0] == outs[1] and outs[0] != outs[2]
