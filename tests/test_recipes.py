"""Every value of every recipe, pinned against the papers and their releases, each with the source it must name.

The table below is written out by hand from the papers and the released files (LOSSES.md, "The papers'
experiments"); nothing in it is computed from recipes.py, so changing any recipe value (say LMPO's λ) fails here.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra import recipes  # noqa: E402

PY = "train_dpo.py"  # Yao et al.'s release: Oaynerad/11711---Alignment-on-small-LLM
YAO = {"model": ("Qwen/Qwen2.5-0.5B-Instruct", "§3"), "data": ("trl-lib/ultrafeedback_binarized", PY),
       "split": ("train", PY), "eval_split": ("test", "ours"), "batch_size": (8, "§3"), "epochs": (3, "§3"),
       "lr": (1e-6, "TRL DPOConfig"), "schedule": ("linear", "TrainingArguments"),
       "warmup_ratio": (0.0, "TrainingArguments"), "weight_decay": (0.0, "TrainingArguments"),
       "grad_clip": (1.0, "max_grad_norm"), "seed": (42, "TrainingArguments"), "max_length": (1024, "§3"),
       "max_prompt_length": (256, PY), "dtype": ("fp16", "§3"), "grad_checkpointing": (True, PY),
       "log_every": (50, "logging_steps"), "save_every": (20000, "save_steps"), "order": ("random", "Trainer")}
TRL_BETA = {"beta": (0.1, "TRL")}
YAO_ROWS = {  # Yao Table 1's trained rows
    "apo_hinge_zero": {"beta": (0.1, "§3.2"), "margin": (1.0, "§3.2")},
    "aot": {**TRL_BETA, "label_smoothing": (0.0, "TRL")},
    "hinge": TRL_BETA,
    "dpo": {**TRL_BETA, "label_smoothing": (0.0, "§2.1")},
    "apo_hinge_softplus": {"beta": (0.1, "ours"), "margin": (1.0, "§3.2")},
    "apo_zero": TRL_BETA,
    "exo": {**TRL_BETA, "label_smoothing": (0.001, "exo_pair")},
    "margin_sigmoid": {**TRL_BETA, "truncation": ("relu", "§3.1"), "delta": (0.1, "ours"),
                       "label_smoothing": (0.1, "ours")},
}
BASE = {"mistral-7b-base": {"model": "alignment-handbook/zephyr-7b-sft-full",
                            "data": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs",
                            "eval_split": "test_prefs", "max_length": 1024, "max_prompt_length": 512},
        "mistral-7b-instruct": {"model": "mistralai/Mistral-7B-Instruct-v0.2",
                                "data": "princeton-nlp/mistral-instruct-ultrafeedback", "split": "train",
                                "eval_split": "test", "max_length": 2048, "max_prompt_length": 1800},
        "llama-3-8b-base": {"model": "princeton-nlp/Llama-3-Base-8B-SFT",
                            "data": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs",
                            "eval_split": "test_prefs", "max_length": 2048, "max_prompt_length": 1800},
        "llama-3-8b-instruct": {"model": "meta-llama/Meta-Llama-3-8B-Instruct",
                                "data": "princeton-nlp/llama3-ultrafeedback", "split": "train", "eval_split": "test",
                                "max_length": 2048, "max_prompt_length": 1800}}
# LMPO Table 5 (β, h = e^{β·γ_r}, λ, learning rate) -> β, γ_r, λ, lr
LMPO = {"mistral-7b-base": (2.0, 0.8, 1.0, 3e-7), "mistral-7b-instruct": (2.5, 0.1, 0.2, 5e-7),
        "llama-3-8b-base": (2.0, 0.5, 0.2, 6e-7), "llama-3-8b-instruct": (2.5, 0.56, 0.2, 1e-6)}
AMAPO = {"mistral-7b-base": (2.0, 4e-7, 1000), "mistral-7b-instruct": (2.0, 6e-7, 1000),  # README: β, lr; eval_steps
         "llama-3-8b-base": (2.5, 6e-7, 100), "llama-3-8b-instruct": (3.0, 1e-6, 1000)}
HB = "zephyr-7b-beta/dpo/config_full.yaml"  # the Alignment Handbook's DPO recipe MixDPO builds on
MIXDPO = {"data": ("HuggingFaceH4/ultrafeedback_binarized", "UltraFeedback"), "split": ("train_prefs", HB),
          "eval_split": ("test_prefs", HB), "batch_size": (128, HB), "epochs": (1, HB), "schedule": ("cosine", HB),
          "warmup_ratio": (0.1, HB), "lr": (5e-7, HB), "max_length": (1024, HB), "max_prompt_length": (512, HB),
          "dtype": ("bf16", HB), "grad_checkpointing": (True, HB), "seed": (42, HB), "weight_decay": (0.0, HB),
          "grad_clip": (1.0, HB), "eval_every": (100, "eval_steps"), "log_every": (10, "logging_steps"),
          "order": ("two-stage", "the paper"), "loss": ("mixdpo", "the paper"), "beta": (0.01, HB),
          "difficulty_threshold": (0.5, "τ = 0.5"), "difficulty": ("score", "the paper"),
          "sft_ref": (False, "the paper")}


def release_setting(name: str, cfg: str) -> dict:
    return {**{k: (v, cfg) for k, v in BASE[name].items()}, "dtype": ("bf16", "bf16: true"),
            "grad_checkpointing": (True, cfg), "seed": (42, cfg), "weight_decay": (0.0, "TrainingArguments"),
            "grad_clip": (1.0, "max_grad_norm"), "order": ("random", "Trainer")}


def expected() -> dict[str, dict]:
    out = {f"yao-{loss}": {**YAO, "loss": (loss, "Table 1"), **row} for loss, row in YAO_ROWS.items()}
    for name, (beta, ratio, lam, lr) in LMPO.items():
        cfg = f"{name}-lmpo.yaml"
        out[f"lmpo-{name}"] = {**release_setting(name, cfg), "batch_size": (128, "App. D"), "epochs": (1, "App. D"),
                               "schedule": ("cosine", "App. D"), "warmup_ratio": (0.1, "App. D"),
                               "lr": (lr, "Table 5"), "eval_every": (400, "eval_steps"),
                               "log_every": (5, "logging_steps"), "loss": ("lmpo", "method"),
                               "beta": (beta, "Table 5"), "gamma_beta_ratio": (ratio, "Table 5"),
                               "margin_weight": (lam, "Table 5"), "margin_power": (5, "power of 5"),
                               "decay": (0.9, "lmpo_trainer.py"), "lmpo_stats_order": ("release", "lmpo_trainer.py"),
                               "lmpo_margin_grad": (False, "lmpo_trainer.py")}
    for name, (beta, lr, eval_steps) in AMAPO.items():
        cfg = f"{name}-AMaPO.yaml"
        out[f"amapo-{name}"] = {**release_setting(name, cfg), "batch_size": (128, "README"), "epochs": (1, cfg),
                                "schedule": ("cosine", cfg), "warmup_ratio": (0.1, cfg), "lr": (lr, "README"),
                                "eval_every": (eval_steps, "eval_steps"), "log_every": (10, "logging_steps"),
                                "loss": ("amapo", "method"), "beta": (beta, "README"),
                                "amapo_form": ("release", "amapo_trainer.py")}
    out["mixdpo-mistral-7b-base"] = {"model": ("alignment-handbook/zephyr-7b-sft-full", HB), **MIXDPO}
    out["mixdpo-llama-3-8b-base"] = {"model": ("princeton-nlp/Llama-3-Base-8B-SFT", "ours"), **MIXDPO}
    return out


def test_every_recipe_value_and_its_source():
    """Each recipe holds exactly the values above (no more, no fewer) and names, for each, the table, section or
    release file it comes from; --list-recipes prints each value with that source."""
    want = expected()
    assert sorted(recipes.RECIPES) == sorted(want)
    for name, table in want.items():
        recipe = recipes.RECIPES[name]
        assert recipe["args"] == {k: v for k, (v, _) in table.items()}, name
        for key, (_, source) in table.items():
            assert source in recipe["sources"][key], (name, key, recipe["sources"][key])
    out = subprocess.run([sys.executable, "train.py", "--list-recipes"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for name, recipe in recipes.RECIPES.items():
        for key, value in recipe["args"].items():
            assert f"    {key} = {value}   # {recipe['sources'][key]}" in out.stdout, (name, key)
