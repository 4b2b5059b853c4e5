"""The papers' experiments as named settings: `python train.py --recipe NAME` sets every value of one setting
(explicit flags still override), `python train.py --list-recipes` prints them all, each value with its source.

A recipe is {"source": the paper and release it reproduces; "args": train.py argument names -> values, loss
hyperparameters included; "sources": {argument: where its value comes from}}, one entry per argument. A source is
a table, section or equation of the paper; where the paper is silent, the file of the authors' release that sets
it (or, for a value the release leaves unset, the library default it runs with); "ours:" marks the few values
that neither gives, with the reason. LOSSES.md ("The papers' experiments") lists the same values and the paper
ablation rows each flag reproduces.
"""
SEVEN_B = ("a 7-8B model: its weights, gradients and AdamW state (~16 bytes a parameter) need sharding, so run it "
           "under torchrun with --fsdp (docs/scale-out.md); --dry-run prints the memory plan first")
TRAINER = ("transformers' Trainer, which every release runs: pairs shuffled every epoch, the partial last batch "
           "trained")

# ---- Yao et al. 2025 (arXiv 2508.08466) and its release, Oaynerad/11711---Alignment-on-small-LLM, train_dpo.py
YAO_SOURCE = ("Yao et al. 2025 (arXiv 2508.08466) §3-§4 and Table 1; where the paper is silent its release's "
              "train_dpo.py (TRL DPOTrainer; values it leaves unset are TRL's DPOConfig defaults)")
PY, UNSET = "release train_dpo.py", "release train_dpo.py leaves it unset: TRL DPOConfig / TrainingArguments default"
YAO = {  # argument: (value, source)
    "model": ("Qwen/Qwen2.5-0.5B-Instruct", "§3, §4 (and " + PY + ")"),
    "data": ("trl-lib/ultrafeedback_binarized", PY + " (the paper names no training set)"),
    "split": ("train", PY),
    "eval_split": ("test", "ours: the release evaluates no held-out pairs while training; the same dataset's test "
                           "split (evaluation does not change the training)"),
    "batch_size": (8, "§3, §4 ('a batch size of 8'); " + PY + ": 8 per device, gradient_accumulation_steps=1"),
    "epochs": (3, "§3, §4"),
    "lr": (1e-6, UNSET),
    "schedule": ("linear", UNSET),
    "warmup_ratio": (0.0, UNSET),
    "weight_decay": (0.0, UNSET),
    "grad_clip": (1.0, UNSET + " (max_grad_norm)"),
    "seed": (42, UNSET),
    "max_length": (1024, "§3, §4; " + PY),
    "max_prompt_length": (256, PY),
    "dtype": ("fp16", "§3, §4 ('fp16 mixed-precision'); " + PY + " fp16=True"),
    "grad_checkpointing": (True, PY),
    "log_every": (50, PY + " logging_steps"),
    "save_every": (20000, PY + " save_steps"),
    "order": ("random", TRAINER),
}
TRL_BETA = (0.1, UNSET + " (beta)")
YAO_LOSSES = {  # Table 1's trained rows (the "Instruct (baseline)" row is the untrained model)
    "apo_hinge_zero": {"beta": (0.1, "§3.2 ('β = 0.1')"), "margin": (1.0, "§3.2 ('we use m = 1')")},
    "aot": {"beta": TRL_BETA, "label_smoothing": (0.0, UNSET)},
    "hinge": {"beta": TRL_BETA},
    "dpo": {"beta": TRL_BETA, "label_smoothing": (0.0, "§2.1: TRL's default ε = 0")},
    "apo_hinge_softplus": {"beta": (0.1, "ours: §5.1 says the β used 'was set too high' and gives no value; the "
                                         "release holds no APO-hinge code; TRL's default"),
                           "margin": (1.0, "Eq. 12 with §3.2's m = 1")},
    "apo_zero": {"beta": TRL_BETA},
    "exo": {"beta": TRL_BETA, "label_smoothing": (0.001, "TRL's exo_pair, which the release runs: ε = 1e-3 when "
                                                         "label_smoothing is its default 0")},
    "margin_sigmoid": {"beta": TRL_BETA, "truncation": ("relu", "§3.1 (the hard ReLU of the reported row)"),
                       "delta": (0.1, "ours: §3.1 says only 'a small margin value δ'; the release holds no "
                                      "margin-sigmoid code"),
                       "label_smoothing": (0.1, "ours: §3.1 says only 'a small label smoothing coefficient ε'")},
}

# ---- LMPO (arXiv 2502.14643) App. D / Table 5 and AMaPO (arXiv 2511.09385) release; both on SimPO's four settings
LMPO_SOURCE = ("LMPO (Li, Xia, Chang, Wu 2025, arXiv 2502.14643): Table 5 and App. D; where they are silent the "
               "release gengxuli/LMPO, training_configs/{}-lmpo.yaml and scripts/lmpo_trainer.py")
AMAPO_SOURCE = ("AMaPO (Deng, Feng, Lei 2025, arXiv 2511.09385): its release Shiroha-Offical/AMaPO, README table (β, "
                "learning rate), training_configs/{}-AMaPO.yaml (the rest), scripts/amapo_trainer.py (the margin); "
                "the paper text we hold gives no hyperparameter table")
SETTINGS = {  # model, data, (train split, eval split), (max length, max prompt length): both releases' configs agree
    "mistral-7b-base": ("alignment-handbook/zephyr-7b-sft-full", "HuggingFaceH4/ultrafeedback_binarized",
                        ("train_prefs", "test_prefs"), (1024, 512)),
    "mistral-7b-instruct": ("mistralai/Mistral-7B-Instruct-v0.2", "princeton-nlp/mistral-instruct-ultrafeedback",
                            ("train", "test"), (2048, 1800)),
    "llama-3-8b-base": ("princeton-nlp/Llama-3-Base-8B-SFT", "HuggingFaceH4/ultrafeedback_binarized",
                        ("train_prefs", "test_prefs"), (2048, 1800)),
    "llama-3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "princeton-nlp/llama3-ultrafeedback",
                            ("train", "test"), (2048, 1800)),
}
# Table 5: β, home advantage h = e^{β·γ_r} (so γ_r = ln h / β), λ, learning rate
LMPO = {"mistral-7b-base": (2.0, 1.6, 1.0, 3e-7), "mistral-7b-instruct": (2.5, 0.25, 0.2, 5e-7),
        "llama-3-8b-base": (2.0, 1.0, 0.2, 6e-7), "llama-3-8b-instruct": (2.5, 1.4, 0.2, 1e-6)}
LMPO_RELEASE_RATIO = {"mistral-7b-base": 0.8, "mistral-7b-instruct": 0.1, "llama-3-8b-base": 0.5,
                      "llama-3-8b-instruct": 0.55}  # the configs' gamma_beta_ratio
AMAPO = {  # README table: β, learning rate; configs: gradient accumulation x per-device batch (4 GPUs), eval_steps
    "mistral-7b-base": (2.0, 4e-7, 1000), "mistral-7b-instruct": (2.0, 6e-7, 1000),
    "llama-3-8b-base": (2.5, 6e-7, 100), "llama-3-8b-instruct": (3.0, 1e-6, 1000),
}


def _setting(name: str, cfg: str) -> dict:
    model, data, (split, eval_split), (length, prompt) = SETTINGS[name]
    return {"model": (model, f"{cfg} (the paper's base model; {SEVEN_B})"), "data": (data, cfg), "split": (split, cfg),
            "eval_split": (eval_split, cfg), "max_length": (length, cfg), "max_prompt_length": (prompt, cfg),
            "dtype": ("bf16", cfg + " bf16: true"), "grad_checkpointing": (True, cfg), "seed": (42, cfg),
            "weight_decay": (0.0, cfg + ": unset, TrainingArguments' default"),
            "grad_clip": (1.0, cfg + ": unset, TrainingArguments' max_grad_norm"), "order": ("random", TRAINER)}


def _lmpo(name: str) -> dict:
    beta, ln_h, lam, lr = LMPO[name]
    cfg, ratio = f"training_configs/{name}-lmpo.yaml", round(ln_h / beta, 6)
    odd = ratio != LMPO_RELEASE_RATIO[name]
    return {**_setting(name, cfg), "batch_size": (128, "App. D; " + cfg + ": 4 GPUs x 2 x 16"),
            "epochs": (1, "App. D"), "schedule": ("cosine", "App. D"), "warmup_ratio": (0.1, "App. D; " + cfg),
            "lr": (lr, "Table 5, App. D"), "eval_every": (400, cfg + " eval_steps"),
            "log_every": (5, cfg + " logging_steps"), "loss": ("lmpo", "the paper's method"),
            "beta": (beta, "Table 5"),
            "gamma_beta_ratio": (ratio, f"Table 5: h = e^{ln_h} with β = {beta}, γ_r = {ln_h}/β" + (
                f" (the config's {LMPO_RELEASE_RATIO[name]} gives e^{LMPO_RELEASE_RATIO[name] * beta:g}, which "
                "Table 5 may round)" if odd else "")),
            "margin_weight": (lam, "Table 5, App. D" + (" (Table 3's λ = 1.0 row; the release hard-codes λ = 0.2 "
                                                        "in scripts/lmpo_trainer.py: --margin-weight 0.2)"
                                                        if lam != 0.2 else "; scripts/lmpo_trainer.py")),
            "margin_power": (5, "§3 ('power of 5'), Table 2's pow5"),
            "decay": (0.9, "scripts/lmpo_trainer.py (update_c = 0.9); App. A Eq. 21-22 give no value"),
            "lmpo_stats_order": ("release", "scripts/lmpo_trainer.py (update, then normalise; App. A's order is "
                                            "--lmpo-stats-order paper)"),
            "lmpo_margin_grad": (False, "scripts/lmpo_trainer.py (margin detached; App. A's gradient: "
                                        "--lmpo-margin-grad)")}


def _amapo(name: str) -> dict:
    beta, lr, eval_steps = AMAPO[name]
    cfg = f"training_configs/{name}-AMaPO.yaml"
    per = "4 GPUs x 1 x 32" if name == "llama-3-8b-base" else "4 GPUs x 2 x 16"
    return {**_setting(name, cfg), "batch_size": (128, f"README ('total batch size fixed at 128'); {cfg}: {per}"),
            "epochs": (1, cfg), "schedule": ("cosine", cfg), "warmup_ratio": (0.1, cfg), "lr": (lr, "README table"),
            "eval_every": (eval_steps, cfg + " eval_steps"), "log_every": (10, cfg + " logging_steps"),
            "loss": ("amapo", "the paper's method"),
            "beta": (beta, "README table" + ("; the config says 3.0 (a run named ..._OOD_4)"
                                             if name == "llama-3-8b-base" else "")),
            "amapo_form": ("release", "scripts/amapo_trainer.py (the paper's form: --amapo-form paper)")}


# ---- MixDPO (Pang et al. 2026, arXiv 2602.00954) on the Alignment Handbook's Zephyr DPO recipe
HB = "Alignment Handbook recipes/zephyr-7b-beta/dpo/config_full.yaml"
MIXDPO_SOURCE = ("MixDPO (Pang et al. 2026, arXiv 2602.00954): τ and the two-stage easy -> hard order from the paper; "
                 "no release found, the rest from the " + HB + ", the DPO setup it builds on")
MIXDPO = {"data": ("HuggingFaceH4/ultrafeedback_binarized", "the paper's UltraFeedback; Hub copy of " + HB),
          "split": ("train_prefs", HB), "eval_split": ("test_prefs", HB), "batch_size": (128, HB + ": 8 GPUs x 8 x 2"),
          "epochs": (1, HB), "schedule": ("cosine", HB), "warmup_ratio": (0.1, HB), "lr": (5e-7, HB),
          "max_length": (1024, HB), "max_prompt_length": (512, HB), "dtype": ("bf16", HB),
          "grad_checkpointing": (True, HB), "seed": (42, HB), "weight_decay": (0.0, HB + ": unset"),
          "grad_clip": (1.0, HB + ": unset, max_grad_norm"), "eval_every": (100, HB + " eval_steps"),
          "log_every": (10, HB + " logging_steps"), "order": ("two-stage", "the paper: easy pairs easy -> hard (DPO), "
                                                                          "then the difficult ones (SFT)"),
          "loss": ("mixdpo", "the paper's method"),
          "beta": (0.01, HB + " (beta: 0.01); the paper text we hold gives no β"),
          "difficulty_threshold": (0.5, "the paper: τ = 0.5 on UltraFeedback"),
          "difficulty": ("score", "the paper: the rating margin s_w - s_l"),
          "sft_ref": (False, "the paper: plain SFT on y_w")}
MIXDPO_MODELS = {  # the paper's base models for which a checkpoint is known
    "mistral-7b-base": ("alignment-handbook/zephyr-7b-sft-full", HB + " (the Mistral-7B SFT model it starts from; "
                                                                 + SEVEN_B + ")"),
    "llama-3-8b-base": ("princeton-nlp/Llama-3-Base-8B-SFT", "ours: the paper trains LLaMA-3-8B but its SFT "
                        "checkpoint is not in the text we hold; SimPO's Llama-3-Base SFT, the closest documented one "
                        "(the learning rate stays the handbook's 5e-7). " + SEVEN_B),
}


def _recipes() -> dict[str, dict]:
    out = {}
    for loss, hp in YAO_LOSSES.items():
        out[f"yao-{loss}"] = (YAO_SOURCE, {**YAO, "loss": (loss, "Table 1's row"), **hp})
    for name in SETTINGS:
        out[f"lmpo-{name}"] = (LMPO_SOURCE.format(name), _lmpo(name))
    for name in SETTINGS:
        out[f"amapo-{name}"] = (AMAPO_SOURCE.format(name), _amapo(name))
    for name, model in MIXDPO_MODELS.items():
        out[f"mixdpo-{name}"] = (MIXDPO_SOURCE, {"model": model, **MIXDPO})
    return {name: {"source": source, "args": {k: v for k, (v, _) in values.items()},
                   "sources": {k: s for k, (_, s) in values.items()}} for name, (source, values) in out.items()}


RECIPES = _recipes()


def describe(name: str) -> str:
    """A recipe as printed by --list-recipes and at the start of a run: name, source, then each value and where it
    comes from."""
    recipe = RECIPES[name]
    return "\n".join([f"{name}: {recipe['source']}"] + [f"    {key} = {value}   # {recipe['sources'][key]}"
                                                        for key, value in recipe["args"].items()])
