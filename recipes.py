"""The papers' experiments as named settings: `python train.py --recipe NAME` sets every value of one setting
(explicit flags still override), `python train.py --list-recipes` prints them all with their sources.

A recipe is {"source": the paper table, section or released config its values come from; "args": train.py
argument names -> values, loss hyperparameters included; "notes": {argument: why} for each value that is NOT in
the source (the closest documented value, or our choice, with the reason)}. Values we could not find anywhere are
said so in the notes and in LOSSES.md.

Where the values come from: Yao et al. 2025 ran TRL's DPOTrainer with its defaults (TRL 0.19/0.20 DPOConfig and
transformers TrainingArguments: lr 1e-6, 8 pairs per device, 3 epochs, linear decay, no warmup, max lengths
1024/512, β 0.1). LMPO and AMaPO publish one config per base model (4 GPUs x 2 per device x 16 accumulation =
128 pairs, 1 epoch, cosine, 10% warmup, bf16); we could not read the papers' own hyperparameter tables, so the
released configs are the source. MixDPO follows the Alignment Handbook's Zephyr DPO recipe (its authors'
rebuttal: β = 0.01 for MixDPO and every baseline, the handbook's value). All of them sample pairs as
transformers' Trainer does: shuffled every epoch, the last partial batch trained (--order random; MixDPO's own
order is --order two-stage).
"""
SEVEN_B = ("a 7-8B model: its weights, gradients and AdamW state (~16 bytes a parameter) need sharding, so run it "
           "under torchrun with --fsdp (docs/scale-out.md); --dry-run prints the memory plan first")

YAO_SOURCE = ("Yao et al. 2025 (arXiv 2508.08466), experimental setup: TRL DPOTrainer defaults (DPOConfig lr 1e-6, "
              "max_length 1024, max_prompt_length 512, beta 0.1; TrainingArguments batch 8, 3 epochs, linear, no "
              "warmup), Qwen2.5-0.5B-Instruct on UltraFeedback")
YAO = dict(model="Qwen/Qwen2.5-0.5B-Instruct", data="trl-lib/ultrafeedback_binarized", split="train",
           eval_split="test", batch_size=8, epochs=3, lr=1e-6, schedule="linear", warmup_ratio=0.0, max_length=1024,
           max_prompt_length=512, dtype="fp16", order="random")
YAO_NOTES = {"data": "the report names UltraFeedback; trl-lib/ultrafeedback_binarized is TRL's binarized copy "
                     "(our choice)",
             "dtype": "not stated in what we could read (TRL's default is fp32); fp16 fits a 16 GB GPU, our choice"}
YAO_LOSSES = {
    "dpo": dict(beta=0.1),
    "hinge": dict(beta=0.1),
    "aot": dict(beta=0.1, label_smoothing=0.0),
    "apo_zero": dict(beta=0.1),
    "apo_hinge_zero": dict(beta=0.1, margin=1.0),
    "apo_hinge_softplus": dict(beta=0.1, margin=1.0),
    "margin_sigmoid": dict(beta=0.1, delta=0.1, label_smoothing=0.1),
}
YAO_LOSS_NOTES = {
    "margin": "Eq. 11-12's margin m: no value found in what we could read; 1.0, the catalogue default",
    "delta": "not reported; 0.1 is our choice (< ln 2, so step 0 has a gradient)",
    "label_smoothing": "margin-sigmoid's ε is not reported; 0.1 is our choice (aot: TRL's default 0)",
}

LMPO_SOURCE = ("LMPO (Li, Xia, Chang, Wu 2025, arXiv 2502.14643), released training_configs/{}-lmpo.yaml and "
               "scripts/lmpo_trainer.py (λ = 0.2, k = 5, decay 0.9)")
AMAPO_SOURCE = ("AMaPO (Deng, Feng, Lei 2025, arXiv 2511.09385), released README table (β, learning rate), "
                "training_configs/{}-AMaPO.yaml (the rest) and scripts/amapo_trainer.py (the margin's form)")
BIG = dict(batch_size=128, epochs=1, schedule="cosine", warmup_ratio=0.1, dtype="bf16", order="random")
UF_BASE = dict(data="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", eval_split="test_prefs")
SETTINGS = {  # the four base models LMPO and AMaPO report, with their data and lengths (both releases agree)
    "mistral-7b-base": dict(model="alignment-handbook/zephyr-7b-sft-full", **UF_BASE, max_length=1024,
                            max_prompt_length=512),
    "mistral-7b-instruct": dict(model="mistralai/Mistral-7B-Instruct-v0.2",
                                data="princeton-nlp/mistral-instruct-ultrafeedback", split="train", eval_split="test",
                                max_length=2048, max_prompt_length=1800),
    "llama-3-8b-base": dict(model="princeton-nlp/Llama-3-Base-8B-SFT", **UF_BASE, max_length=2048,
                            max_prompt_length=1800),
    "llama-3-8b-instruct": dict(model="meta-llama/Meta-Llama-3-8B-Instruct", data="princeton-nlp/llama3-ultrafeedback",
                                split="train", eval_split="test", max_length=2048, max_prompt_length=1800),
}
LMPO = {  # (lr, β, γ/β) per setting; λ = 0.2, k = 5 and the 0.9 decay are hard-coded in the release's loss
    "mistral-7b-base": (3e-7, 2.0, 0.8), "mistral-7b-instruct": (5e-7, 2.5, 0.1),
    "llama-3-8b-base": (6e-7, 2.0, 0.5), "llama-3-8b-instruct": (1e-6, 2.5, 0.55),
}
AMAPO = {  # (lr, β) per setting, the README's table
    "mistral-7b-base": (4e-7, 2.0), "mistral-7b-instruct": (6e-7, 2.0),
    "llama-3-8b-base": (6e-7, 2.5), "llama-3-8b-instruct": (1e-6, 3.0),
}

MIXDPO_SOURCE = ("MixDPO (Pang et al. 2026, arXiv 2602.00954) on the Alignment Handbook's Zephyr DPO recipe "
                 "(recipes/zephyr-7b-beta/dpo/config_full.yaml: 8 GPUs x 8 x 2 = 128 pairs, lr 5e-7, 1 epoch, "
                 "cosine, 10% warmup, 1024/512, bf16), β = 0.01 per the authors' rebuttal")
MIXDPO = {**BIG, **UF_BASE, "order": "two-stage", "lr": 5e-7, "max_length": 1024, "max_prompt_length": 512,
          "loss": "mixdpo", "beta": 0.01, "difficulty_threshold": 0.5, "difficulty": "score", "sft_ref": False}
MIXDPO_NOTES = {"difficulty_threshold": "τ could not be found in what we could read; 0.5 (half a rating point) is "
                                        "the catalogue default", "model": SEVEN_B}


def _recipes() -> dict[str, dict]:
    out = {f"yao-{loss}": {"source": YAO_SOURCE, "args": {**YAO, "loss": loss, **hp},
                           "notes": {**YAO_NOTES, **{k: v for k, v in YAO_LOSS_NOTES.items() if k in hp}}}
           for loss, hp in YAO_LOSSES.items()}
    for name, setting in SETTINGS.items():
        lr, beta, ratio = LMPO[name]
        out[f"lmpo-{name}"] = {"source": LMPO_SOURCE.format(name), "notes": {"model": SEVEN_B}, "args": {
            **setting, **BIG, "lr": lr, "loss": "lmpo", "beta": beta, "gamma_beta_ratio": ratio, "margin_weight": 0.2,
            "margin_power": 5, "decay": 0.9}}
    for name, setting in SETTINGS.items():
        lr, beta = AMAPO[name]
        out[f"amapo-{name}"] = {"source": AMAPO_SOURCE.format(name), "args": {
            **setting, **BIG, "lr": lr, "loss": "amapo", "beta": beta, "amapo_form": "release"}, "notes": {
            "model": SEVEN_B, **({"beta": "the README's table; the config file says 3.0 (a run named "
                                            "..._OOD_4)"} if name == "llama-3-8b-base" else {})}}
    out["mixdpo-mistral-7b-base"] = {"source": MIXDPO_SOURCE, "notes": MIXDPO_NOTES,
                                     "args": {"model": "alignment-handbook/zephyr-7b-sft-full", **MIXDPO}}
    out["mixdpo-llama-3-8b-base"] = {"source": MIXDPO_SOURCE, "args": {
        "model": "princeton-nlp/Llama-3-Base-8B-SFT", **MIXDPO}, "notes": {**MIXDPO_NOTES, "model": (
            "the paper's LLaMA-3-8B SFT checkpoint was not found; the UltraChat-SFT Llama-3 of the SimPO pipeline the "
            "authors cite is the closest documented one. " + SEVEN_B), "lr": (
            "the paper's Llama learning rate was not found; the handbook's 5e-7")}}
    return out


RECIPES = _recipes()


def describe(name: str) -> str:
    """A recipe as printed by --list-recipes and at the start of a run: name, source, then each value (and why,
    for the values that are not in the source)."""
    recipe = RECIPES[name]
    lines = [f"{name}: {recipe['source']}"]
    for key, value in recipe["args"].items():
        note = recipe["notes"].get(key)
        lines.append(f"    {key} = {value}" + (f"   # {note}" if note else ""))
    return "\n".join(lines)
