"""evaluate.py: preference metrics by hand through the model, benchmark output formats, and training diagnostics
on a recorded metrics.jsonl (with and without matplotlib). The judge subcommand's client: test_judge.py."""
import json
import math
import sys

import numpy as np
import pytest

import chat
import evaluate
import generate
from infra.cli import UserError
from test_judge import server  # noqa: F401  (fixture: the fake OpenAI endpoint on 127.0.0.1)


# ----------------------------------------------------------------------------- diagnostics
def _write_runs(tmp_path, names="new"):
    """Run 'hinge': chosen log-probs fall (-40 -> -70) while rejected fall faster (likelihood displacement);
    active fraction 1 -> 0.2 overall, by length bucket. Run 'dpo': chosen rises. Plus eval rows and a torn line.
    names: "new" = TRL's (learning_rate, eval_...), "old" = what train.py wrote before (lr, eval/...)."""
    runs = {}
    lr, ev = ("learning_rate", "eval_") if names == "new" else ("lr", "eval/")
    for name, c0, c1 in (("hinge", -40.0, -70.0), ("dpo", -40.0, -30.0)):
        rows = []
        for s in range(1, 51):
            f = s / 50
            row = {"step": s, "loss": 1 - 0.5 * f, "logps/chosen": c0 + (c1 - c0) * f, "logps/rejected": -40 - 60 * f,
                   "rewards/margins": 2 * f, "rewards/accuracies": 0.5 + 0.4 * f, "rewards/chosen": 0.1, lr: 1e-6}
            if name == "hinge":
                row.update({"hinge/active_fraction": 1 - 0.8 * f, "hinge/active_fraction/len_0-128": 1 - 0.9 * f,
                            "hinge/active_fraction/len_128+": 1 - 0.5 * f})
            rows.append(row)
            if s % 10 == 0:
                rows.append({"step": s, ev + "logps/chosen": c0 + (c1 - c0) * f, ev + "rewards/margins": 1.5 * f,
                             ev + "rewards/accuracies": 0.5 + 0.3 * f})
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 51, "logps/cho')
        (d / "args.json").write_text(json.dumps({"loss": name, "lr": 1e-6, "hparams": {"beta": 0.1}}))
        runs[name] = d
    return runs


@pytest.mark.parametrize("names", ["new", "old"])
def test_diagnostics_plots_and_table(tmp_path, capsys, names):
    """The same summary (in TRL's names) whether metrics.jsonl uses TRL's names or the old ones."""
    runs = _write_runs(tmp_path, names)
    out = tmp_path / "diag"
    summary = evaluate.main(["diagnostics", str(runs["hinge"]), str(runs["dpo"]), "--out", str(out)])
    h, d = summary[str(runs["hinge"])], summary[str(runs["dpo"])]
    # first/last 10% of the 50 train points: steps 1-5 and 46-50
    assert h["logps/chosen"]["start"] == pytest.approx(np.mean([-40 - 30 * s / 50 for s in range(1, 6)]))
    assert h["logps/chosen"]["end"] == pytest.approx(np.mean([-40 - 30 * s / 50 for s in range(46, 51)]))
    assert h["likelihood_displacement"] is True and d["likelihood_displacement"] is False
    assert h["eval_likelihood_displacement"] is True and h["bad_lines"] == 1
    assert h["eval_rewards/accuracies"]["end"] == pytest.approx(0.8) and "eval/rewards/accuracies" not in h
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


def test_metric_names_old_and_new():
    """lr -> learning_rate, eval/x -> eval_x; TRL's names and every other key unchanged."""
    from evaluation import report
    old = {"step": 3, "lr": 1e-6, "eval/rewards/margins": 0.5, "eval/loss": 0.6, "rewards/margins": 0.1}
    new = {"step": 3, "learning_rate": 1e-6, "eval_rewards/margins": 0.5, "eval_loss": 0.6, "rewards/margins": 0.1}
    assert report.normalise(old) == new and report.normalise(new) == new


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

    from model import CausalLM
    m = CausalLM.from_pretrained(str(model_dir)).eval()
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
    pairs, _ = data.tokenize_pairs(data.load_rows(str(pref_jsonl))[0], chat.load_tokenizer(tiny_model_dir), 1024, 256)
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
    pairs, _ = data.tokenize_pairs(data.load_rows(str(pref_jsonl))[0], chat.load_tokenizer(tiny_model_dir), 1024, 256)
    s, s_ref = _hand_logps(tiny_model_dir, pairs), _hand_logps(ref_dir, pairs)
    argv = ["prefs", "--model", str(tiny_model_dir), "--data", str(pref_jsonl), "--out", str(tmp_path / "m.json")]
    res = evaluate.main(argv + ["--ref-model", str(ref_dir), "--ref-cache", str(tmp_path / "cache")])
    assert res["reward"] == "beta*(S-S_ref)" and res["beta"] == 0.1
    _check_metrics(res, 0.1 * (s[:, 0] - s_ref[:, 0]), 0.1 * (s[:, 1] - s_ref[:, 1]), s)
    res2 = evaluate.main(argv + ["--ref-cache", str(tmp_path / "cache")])
    assert res2["rewards/margins"] == pytest.approx(res["rewards/margins"], abs=1e-6)


def test_prefs_on_a_run_uses_its_reference(tmp_path, capsys):
    """A demo DPO run's final/ scored without --ref-model: prefs takes the run's reference (the demo's initial model)
    and reference cache from RUN/args.json, says so, and reports what training's final evaluation reported (on the
    same held-out file); an explicit --ref-model still wins; `evaluate.py report` shows the same number. Before,
    prefs scored it reference-free (SimPO's β·S/|y|)."""
    import train
    from pathlib import Path
    demo_test = str(Path(__file__).resolve().parents[1] / "demo" / "test.jsonl")
    run, cache = tmp_path / "run", tmp_path / "cache"
    train.main(["--demo", "--loss", "dpo", "--beta", "0.2", "--max-steps", "6", "--eval-every", "0", "--out-dir",
                str(run), "--cache-dir", str(cache), "--dtype", "fp32"])
    final_eval = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    res = evaluate.main(["prefs", "--model", str(run / "final"), "--data", demo_test, "--out", str(run / "prefs.json")])
    said = capsys.readouterr().out
    reference = str(cache / "demo_init-seed42")
    assert f"its reference is {reference}" in said and "ref cache: reusing" in said  # training's cache
    assert res["reward"] == "beta*(S-S_ref)" and res["reference"] == reference and res["beta"] == 0.2
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected"):
        assert res[key] == pytest.approx(final_eval["eval_" + key], rel=1e-4, abs=1e-5), key
    explicit = evaluate.main(["prefs", "--model", str(run / "final"), "--data", demo_test, "--out",
                              str(tmp_path / "explicit.json"), "--ref-model", reference, "--beta", "0.2"])
    assert explicit["rewards/margins"] == pytest.approx(res["rewards/margins"], rel=1e-5)
    itself = evaluate.main(["prefs", "--model", str(run / "final"), "--data", demo_test, "--out",
                            str(tmp_path / "itself.json"), "--ref-model", str(run / "final")])
    assert itself["reference"] == str(run / "final") and itself["rewards/margins"] == pytest.approx(0, abs=1e-6)
    rows = evaluate.main(["report", str(run), "--out", str(tmp_path / "report")])
    assert rows[0]["heldout_reward_accuracy"] == pytest.approx(final_eval["eval_rewards/accuracies"], abs=1e-9)


def test_prefs_on_a_reference_free_run_stays_reference_free(tmp_path):
    import train
    from pathlib import Path
    demo_test = str(Path(__file__).resolve().parents[1] / "demo" / "test.jsonl")
    run = tmp_path / "run"
    train.main(["--demo", "--loss", "simpo", "--max-steps", "2", "--eval-split", "", "--out-dir", str(run),
                "--cache-dir", str(tmp_path / "cache"), "--dtype", "fp32"])
    res = evaluate.main(["prefs", "--model", str(run / "final"), "--data", demo_test, "--out",
                         str(tmp_path / "p.json")])
    assert res["reward"] == "beta*S/|y|" and res["reference"] is None


def test_prefs_hinge_loss_active_fraction_by_length(tiny_model_dir, tokenizer_dir, tmp_path):
    """--loss hinge --beta 3: per-pair loss max(0, 1 − β·z), z = Δ_w − Δ_l; active = loss > 0 (gradient flows),
    overall and per length quartile; the quartiles partition the pairs."""
    import data
    from conftest import make_model_dir, make_pref_rows, write_jsonl
    ref_dir = make_model_dir(tmp_path / "ref", tokenizer_dir=tokenizer_dir, seed=2)
    prefs = write_jsonl(tmp_path / "p.jsonl", make_pref_rows(24, "standard", seed=3))
    pairs, _ = data.tokenize_pairs(data.load_rows(str(prefs))[0], chat.load_tokenizer(tiny_model_dir), 1024, 256)
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
    with pytest.raises(UserError, match="--loss dpo uses a reference model"):
        evaluate.main(["prefs", "--model", str(tiny_model_dir), "--data", str(prefs), "--out", str(tmp_path / "x.json"),
                       "--loss", "dpo"])


# ----------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def chatty_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with every non-norm weight redrawn from N(0, 0.3²): the default init greedily repeats one
    whitespace token (an empty answer after strip), this one emits varied text."""
    import torch

    from model import CausalLM
    m = CausalLM.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("chatty")
    m.save_pretrained(out)
    return out


def test_generate_alpaca_format_and_batching(chatty_model_dir, tmp_path):
    """model_outputs.json is AlpacaEval's format, in input order, and continuous batching (3 rows for 5 prompts) gives
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
    assert saved["dtype"] == "fp32" and saved["truncated_prompts"] == 0  # --dtype None on a CPU: fp32


def test_generate_mt_bench_second_turn_sees_first_answer(chatty_model_dir, tmp_path, monkeypatch):
    """FastChat answer JSONL; the turn-2 prompt the model receives contains its own turn-1 answer."""
    questions = [{"question_id": 81 + i, "category": c, "turns": [f"First question {c}?", f"Now rewrite it {c}."]}
                 for i, c in enumerate(["writing", "math", "coding"])]
    bench = tmp_path / "question.jsonl"
    bench.write_text("".join(json.dumps(q) + "\n" for q in questions))
    tok, seen, original = chat.load_tokenizer(chatty_model_dir), [], generate.generate_ids

    def spy(model, prompts, *args, **kw):
        seen.extend(tok.decode(p, skip_special_tokens=False) for p in prompts)
        return original(model, prompts, *args, **kw)
    monkeypatch.setattr(generate, "generate_ids", spy)
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


def test_generate_bad_input(chatty_model_dir, tmp_path):
    """Each mistake is one UserError naming the file and row, or the flag."""
    cases = {"bad.jsonl": ('{"instruction": "ok"}\n{"text": "no instruction"}\n',
                           r"bad.jsonl: line 2: needs a non-empty string 'instruction'"),
             "empty.jsonl": ("", r"empty.jsonl: no prompts in the file"),
             "list.json": ('[{"instruction": "ok"}, "just a string"]', r"list.json: row 2: expected a JSON object"),
             "mt.jsonl": ('{"turns": ["a", "b"]}\n{"turns": ["a", " "]}\n', r"mt.jsonl: line 2: 'turns' must be")}
    for name, (text, error) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=error):
            evaluate.load_prompts(str(tmp_path / name))
    (tmp_path / "ok.jsonl").write_text('{"instruction": "ok"}\n')
    argv = ["generate", "--model", str(chatty_model_dir), "--bench", str(tmp_path / "ok.jsonl"), "--out",
            str(tmp_path / "o"), "--max-new-tokens"]
    with pytest.raises(UserError, match=r"--max-new-tokens 2048: must be 1 to 2047, .* context of 2048 tokens"):
        evaluate.main(argv + ["2048"])  # the tiny model's max_position_embeddings is 2048
    with pytest.raises(UserError, match=r"--batch-size 0: must be at least 1"):
        evaluate.main(argv + ["4", "--batch-size", "0"])


def test_generate_long_prompt_keeps_its_end(chatty_model_dir, tmp_path):
    """With a context of 128 tokens and --max-new-tokens 8, a rendered prompt of more than 120 tokens keeps its last
    120 (counted); the answer is the one to those 120 tokens, not to the first 120. The short one (72) is untouched."""
    import shutil

    from model import CausalLM
    model_dir = tmp_path / "m"
    shutil.copytree(chatty_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    long = "Tell me " + "about the sea and the sky " * 12
    bench = tmp_path / "p.jsonl"
    bench.write_text(json.dumps({"instruction": long}) + "\n" + json.dumps({"instruction": "Hi"}) + "\n")
    stats = evaluate.main(["generate", "--model", str(model_dir), "--bench", str(bench), "--out", str(tmp_path / "o"),
                           "--max-new-tokens", "8"])
    assert stats["truncated_prompts"] == 1
    tok, model = chat.load_tokenizer(model_dir), CausalLM.from_pretrained(model_dir)
    ids = tok.encode(tok.render([{"role": "user", "content": long}], add_generation_prompt=True),
                     add_special_tokens=False).ids
    assert len(ids) > 120
    stop_ids = generate.stops(model, tok)[0]
    end, start = (generate.generate_ids(model, [x], 8, stop_ids=stop_ids)[0] for x in (ids[-120:], ids[:120]))
    assert end != start
    output = json.loads((tmp_path / "o" / "model_outputs.json").read_text())[0]["output"]
    assert output == tok.decode(end, skip_special_tokens=True).strip()


def test_generate_stop_strings_and_eos_from_generation_config(chatty_model_dir, tmp_path):
    """generation_config.json's eos_token_id and stop_strings end answers; the text ends before the stop string."""
    import shutil

    from model import CausalLM
    model_dir = tmp_path / "m"
    shutil.copytree(chatty_model_dir, model_dir)
    bench = tmp_path / "p.jsonl"
    bench.write_text("".join(json.dumps({"instruction": f"Say something {i}."}) + "\n" for i in range(3)))
    argv = ["generate", "--model", str(model_dir), "--bench", str(bench), "--max-new-tokens", "24", "--out"]
    before = evaluate.main(argv + [str(tmp_path / "a")])
    first = json.loads((tmp_path / "a" / "model_outputs.json").read_text())[0]["output"]
    stop = first[len(first) // 2:len(first) // 2 + 3]
    assert len(stop) == 3 and stop.strip() == stop  # the check is not vacuous
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7], "stop_strings": stop}))
    tok = chat.load_tokenizer(model_dir)
    im_end = tok.token_to_id("<|im_end|>")  # Qwen2.5-Instruct's eos_token and the template's end of turn
    assert generate.stops(CausalLM.from_pretrained(model_dir), tok) == ((7, im_end), (stop,))
    after = evaluate.main(argv + [str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "model_outputs.json").read_text())[0]["output"] == first.split(stop)[0].strip()
    assert list(after["stop_strings"]) == [stop] and after["generated_tokens"] < before["generated_tokens"]


def test_generate_sampling_from_generation_config(chatty_model_dir, tmp_path, capsys):
    """--sampling reads temperature/top_k/top_p from generation_config.json (unsupported keys reported); the seed
    makes it reproducible, whatever the batch size."""
    import shutil
    model_dir = tmp_path / "m"
    shutil.copytree(chatty_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}))
    assert generate.sampling_config(model_dir) == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert "repetition_penalty" in capsys.readouterr().out
    bench = tmp_path / "p.jsonl"
    bench.write_text("".join(json.dumps({"instruction": f"Say something {i}."}) + "\n" for i in range(3)))
    outs = []
    for seed, bs in (("0", "8"), ("0", "1"), ("1", "8")):  # batch size 1: the same answers (a seed per prompt)
        argv = ["generate", "--model", str(model_dir), "--bench", str(bench), "--out", str(tmp_path / "o"),
                "--max-new-tokens", "16", "--sampling", "--seed", seed, "--batch-size", bs]
        assert evaluate.main(argv)["sampling"] == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
        outs.append([r["output"] for r in json.loads((tmp_path / "o" / "model_outputs.json").read_text())])
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_generate_mt_bench_fastchat_temperatures(chatty_model_dir, tmp_path, monkeypatch):
    """MT-Bench answers: rows sorted by question_id; FastChat's temperature per category (math 0 -> greedy, stem 0.1,
    writing 0.7, an unknown category 0.7), top_k/top_p from generation_config.json as transformers would take them
    (50 and 1.0 without one); both turns of a question decode alike. --greedy and --sampling override it."""
    import shutil
    model_dir = tmp_path / "m"
    shutil.copytree(chatty_model_dir, model_dir)
    questions = [{"question_id": 103, "category": "writing", "turns": ["Write 103.", "Again 103."]},
                 {"question_id": 81, "category": "math", "turns": ["Add 81.", "Again 81."]},
                 {"question_id": 120, "category": "stem", "turns": ["Explain 120."]},
                 {"question_id": 99, "category": "weird", "turns": ["Do 99.", "Again 99."]}]
    bench = tmp_path / "question.jsonl"
    bench.write_text("".join(json.dumps(q) + "\n" for q in questions))
    seen, real = [], generate.generate_texts

    def spy(model, tok, prompts, *, sampling, **kw):
        seen.extend((p, sampling) for p in prompts)
        return real(model, tok, prompts, sampling=sampling, **kw)
    monkeypatch.setattr(generate, "generate_texts", spy)

    def run(*flags):
        seen.clear()
        stats = evaluate.main(["generate", "--model", str(model_dir), "--bench", str(bench), "--out",
                               str(tmp_path / "mt"), "--max-new-tokens", "4", "--name", "t", *flags])
        by_q = {}
        for prompt, sampling in seen:
            by_q.setdefault(int(next(w for w in prompt.replace(".", " ").split() if w.isdigit())), []).append(sampling)
        return stats, by_q
    stats, by_q = run()
    rows = [json.loads(x) for x in (tmp_path / "mt" / "t.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 99, 103, 120]
    assert [len(r["choices"][0]["turns"]) for r in rows] == [2, 2, 2, 1]
    hot = {"temperature": 0.7, "top_k": 50, "top_p": 1.0}
    assert by_q == {81: [generate.GREEDY] * 2, 99: [hot] * 2, 103: [hot] * 2,
                    120: [{"temperature": 0.1, "top_k": 50, "top_p": 1.0}]}
    assert stats["temperatures"] == {"math": 0.0, "weird": 0.7, "writing": 0.7, "stem": 0.1}
    (model_dir / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.9, "top_k": 20,
                                                                  "top_p": 0.8}))
    assert run()[1][103] == [{"temperature": 0.7, "top_k": 20, "top_p": 0.8}] * 2
    assert all(s == [generate.GREEDY] * len(s) for s in run("--greedy")[1].values())
    assert all(s == [{"temperature": 0.9, "top_k": 20, "top_p": 0.8}] * len(s) for s in run("--sampling")[1].values())


# ----------------------------------------------------------------------------- from runs to the report
def _run_folder(path, loss, args_lr_key, rows, prefs=None):
    path.mkdir(parents=True)
    (path / "args.json").write_text(json.dumps({"loss": loss, args_lr_key: 1e-6 if loss == "dpo" else 5e-7,
                                                "epochs": 3, "batch_size": 8,
                                                "hparams": {"beta": 0.1} if loss == "dpo" else
                                                {"beta": 2.0, "gamma_beta_ratio": 0.5}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if prefs:
        (path / "prefs.json").write_text(json.dumps(prefs))
    return path


def test_from_runs_to_the_report(chatty_model_dir, tmp_path, server):
    """The README's path: two runs (dpo: old metric names and a prefs.json; simpo: TRL's names, held-out metrics from
    its last eval_ row) -> generate -> judge (fake judge on 127.0.0.1) -> report. AlpacaEval, by hand: run dpo's
    preferences 1.75, 1.75, 1.25, 1.25 (the model wins 'easy' instructions with P = .75, loses the others with .25):
    WR 50, SE 100·std(.75, .75, .25, .25)/2 = 14.4338; run simpo: 1.75 everywhere, WR 75 ± 0. MT-Bench (dpo only):
    writing 8 then 4, math 6 then 2: turn 1 7.0, turn 2 3.0, mean 5.0."""
    from test_judge import PROMPTS, completion, gamed_file, jsonl, shown
    rows_old = [{"step": s, "lr": 1e-6, "logps/chosen": -40 - s, "logps/rejected": -40 - 2 * s,
                 "rewards/margins": 0.01 * s} for s in range(1, 11)] + [
                {"step": 10, "eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.2}]
    rows_new = [{"step": s, "learning_rate": 5e-7, "logps/chosen": -40 + s, "logps/rejected": -40 - s,
                 "rewards/margins": 0.1 * s} for s in range(1, 11)] + [
                {"step": 5, "eval_rewards/accuracies": 0.7, "eval_rewards/margins": 0.9},
                {"step": 10, "eval_rewards/accuracies": 0.8, "eval_rewards/margins": 1.5}]
    dpo = _run_folder(tmp_path / "runs" / "dpo", "dpo", "lr", rows_old, {"rewards/accuracies": 0.625,
                                                                         "rewards/margins": 0.25})
    simpo = _run_folder(tmp_path / "runs" / "simpo", "simpo", "learning_rate", rows_new)
    instructions = ["An easy one?", "Another easy one?", "A hard one?", "Another hard one?"]
    bench = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": i} for i in instructions])
    refs = (tmp_path / "ref.json")
    refs.write_text(json.dumps([{"instruction": i, "output": f"REFERENCE {k}", "generator": "base"}
                                for k, i in enumerate(instructions)]))
    gamed, _ = gamed_file(tmp_path, 4)
    common = ["--judge-url", server.url, "--judge-model", "fake", "--api-key-env", ""]
    for run, p_easy, p_hard in ((dpo, 0.75, 0.25), (simpo, 0.75, 0.75)):
        evaluate.main(["generate", "--model", str(chatty_model_dir), "--bench", str(bench), "--out",
                       str(run / "alpaca_eval"), "--max-new-tokens", "6", "--name", run.name])

        def respond(body, p_easy=p_easy, p_hard=p_hard):
            instruction, m, _ = shown(body)
            p_model = p_easy if "easy" in instruction else p_hard
            pm = 1 - p_model if m.startswith("REFERENCE") else p_model
            return 200, completion("m", {"m": math.log(pm), "M": math.log(1 - pm)})
        server.respond = respond
        evaluate.main(["judge", "--outputs", str(run / "alpaca_eval" / "model_outputs.json"), "--reference",
                       str(refs), "--df-gamed", str(gamed), *common])
    questions = jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "writing", "turns": ["Write.", "More."]},
                                            {"question_id": 2, "category": "math", "turns": ["Add.", "More."]}])
    evaluate.main(["generate", "--model", str(chatty_model_dir), "--bench", str(questions), "--out",
                   str(dpo / "mt_bench"), "--max-new-tokens", "6", "--name", "dpo"])
    server.respond = lambda body: (200, completion("[[%d]]" % {(False, False): 8, (False, True): 4, (True, False): 6,
                                                               (True, True): 2}[
        "Add." in body["messages"][-1]["content"], "[Q2]" in body["messages"][-1]["content"]]))
    mt = evaluate.main(["judge", "--bench", "mt_bench", "--answers", str(dpo / "mt_bench" / "dpo.jsonl"),
                        "--questions", str(questions), "--references", str(jsonl(tmp_path / "r.jsonl", [
                            {"question_id": 2, "choices": [{"turns": ["3", "4"]}]}])),
                        "--judge-prompts", str(jsonl(tmp_path / "p.jsonl", PROMPTS)), *common])
    assert (mt["turn_1"], mt["turn_2"], mt["mean"]) == (7.0, 3.0, 5.0)

    rows = evaluate.main(["report", str(dpo), str(simpo), "--out", str(tmp_path / "report")])
    a = json.loads((dpo / "alpaca_eval" / "judge_results.json").read_text())
    got = {r["run"]: r for r in rows}
    assert got["dpo"]["alpaca_wr"] == pytest.approx(50.0) and got["dpo"]["alpaca_wr_se"] == pytest.approx(14.4338,
                                                                                                        abs=1e-4)
    assert got["dpo"]["alpaca_lc"] == a["length_controlled_winrate"] and got["dpo"]["alpaca_lc_se"] is not None
    assert got["simpo"]["alpaca_wr"] == pytest.approx(75.0) and got["simpo"]["alpaca_wr_se"] == pytest.approx(0.0)
    assert (got["dpo"]["mt_bench_turn_1"], got["dpo"]["mt_bench_turn_2"], got["dpo"]["mt_bench_mean"]) == (7, 3, 5)
    assert got["simpo"]["mt_bench_mean"] is None
    assert (got["dpo"]["heldout_reward_accuracy"], got["dpo"]["heldout_reward_margin"]) == (0.625, 0.25)
    assert (got["simpo"]["heldout_reward_accuracy"], got["simpo"]["heldout_reward_margin"]) == (0.8, 1.5)
    assert got["dpo"]["hyperparameters"] == "lr=1e-06 epochs=3 batch=8 beta=0.1"
    assert got["simpo"]["hyperparameters"] == "lr=5e-07 epochs=3 batch=8 beta=2 gamma_beta_ratio=0.5"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| dpo | dpo | lr=1e-06 epochs=3 batch=8 beta=0.1 | 50.0 ± 14.4 |" in md
    assert "| 7.00 | 3.00 | 5.00 | 0.625 | 0.250 |" in md and "| – | – | – | 0.800 | 1.500 |" in md
    with open(tmp_path / "report" / "report.csv", newline="") as f:
        table = list(__import__("csv").DictReader(f))
    assert [r["run"] for r in table] == ["dpo", "simpo"] and float(table[1]["alpaca_wr"]) == pytest.approx(75.0)
    assert table[1]["mt_bench_mean"] == "" and table[0]["heldout_from"] == "prefs.json"
    png = (tmp_path / "report" / "report.png").read_bytes()
    assert png[:4] == b"\x89PNG" and 20_000 < len(png) < 300_000


def test_report_plots_keep_margin_kinds_apart(tmp_path):
    """report.png: every axis labelled with its unit; the dpo run's margins (reference-based) and simpo's
    (reference-free) never share an axis; the radar holds the MT-Bench categories."""
    from evaluation import report
    dpo = _run_folder(tmp_path / "dpo", "dpo", "lr", [{"step": s, "rewards/margins": 0.1 * s} for s in range(5)])
    simpo = _run_folder(tmp_path / "simpo", "simpo", "learning_rate",
                        [{"step": s, "rewards/margins": 0.5 * s, "logps/chosen": -s} for s in range(5)])
    (dpo / "mt_bench_results.json").write_text(json.dumps({"turn_1": 7, "turn_2": 5, "mean": 6, "categories": {
        "writing": {"mean": 7}, "math": {"mean": 5}, "stem": {"mean": 6}}}))
    info = report.plot_report([report.read_run(str(dpo)), report.read_run(str(simpo))], tmp_path / "r.png")
    margins = {t: v for t, v in info.items() if t.startswith("reward margin")}
    assert set(margins) == {"reward margin, reference-based losses", "reward margin, reference-free losses"}
    assert all(label.startswith("dpo") for label in margins["reward margin, reference-based losses"]["lines"])
    assert all(label.startswith("simpo") for label in margins["reward margin, reference-free losses"]["lines"])
    assert "nats" in margins["reward margin, reference-based losses"]["y"]
    assert all(v["x"] and v["y"] for t, v in info.items() if not t.startswith("MT-Bench"))
    assert info["MT-Bench score by category (1–10, both turns)"]["x"] == ["math", "stem", "writing"]
    assert "%" in info["AlpacaEval vs the reference outputs"]["y"]


def test_make_report_figure_runs_end_to_end_offline(tmp_path):
    """docs/make_report_figure.py, the README's way to rebuild docs/report.png, on one short demo run with small
    settings: generate, judge (its local test judge), report, picture. It used to stop at its own alpaca.jsonl row 1
    (the demo's prompts are message lists, not strings)."""
    import importlib.util
    import train
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "docs" / "make_report_figure.py"
    spec = importlib.util.spec_from_file_location("make_report_figure", script)
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    assert "three demo runs" in fig.__doc__ and fig.__doc__.count("--loss $loss") == 1
    run = tmp_path / "demo-rpo"
    train.main(["--demo", "--loss", "rpo", "--max-steps", "2", "--eval-split", "", "--out-dir", str(run),
                "--cache-dir", str(tmp_path / "cache"), "--dtype", "fp32"])
    png = fig.main([str(run)], work=tmp_path / "work", png=tmp_path / "report.png", n_alpaca=4, max_new_tokens=4)
    assert png.read_bytes()[:4] == b"\x89PNG"
    results = json.loads((run / "alpaca_eval" / "judge_results.json").read_text())
    assert results["n_total"] == 4 and results["failed"] == 0 and 0 <= results["win_rate"] <= 100
    mt = json.loads((run / "mt_bench" / "mt_bench_results.json").read_text())
    assert mt["n_judgments"] == 16 and mt["failed"] == 0 and 1 <= mt["mean"] <= 10
    assert "| demo-rpo | rpo |" in (tmp_path / "work" / "report" / "report.md").read_text()


def test_model_folder_json_files_go_through_one_reader(tiny_model_dir, tmp_path):
    """generation_config.json cut in half, config.json holding a list: one UserError naming the file (cli.read_json,
    the one reader of the JSON files of model folders and runs), never a JSONDecodeError or AttributeError."""
    import shutil
    from model import CausalLM
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text('{"do_sample": true, "temperat')
    with pytest.raises(UserError, match=r"generation_config.json: not valid JSON \(line 1 column 21"):
        generate.generation_config(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"config.json: expected a JSON object, got list"):
        CausalLM.from_pretrained(folder)
