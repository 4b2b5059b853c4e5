"""A training run's memory and FLOPs per device from the model's config.json alone (`train.py ... --dry-run`): what
each device holds, whether that fits, and the work of one optimizer step. No weights are loaded: the model is built
on the meta device, so the parameter counts are exact for every family model.py loads.

Per device (P parameters; under --fsdp the sharded states are divided by the world size W, DDP replicates them):
  weights      4P bytes of fp32 masters (/W), and under FSDP2 one decoder layer gathered in the compute dtype
  gradients    4P fp32 (/W)
  AdamW        8P fp32: exp_avg and exp_avg_sq (/W)
  activations  what autograd keeps for the backward of one micro-batch of T tokens: per decoder layer and token,
               4·I values in the compute dtype (the MLP's gate, up, silu and product) plus ACT_D bytes per hidden
               unit (the layer norms' fp32 statistics, RoPE's fp32 q and k, attention's inputs and output: measured
               with torch.autograd.graph.saved_tensors_hooks); with --grad-checkpointing, each layer's fp32 input
               only, plus one layer recomputed in the backward. The LM head adds two [chunk, V] fp32 blocks.
  attention    on the CPU the dense packed mask (rows x L² bools) and the math kernel's fp32 scores (H·L² per row);
               FlexAttention on CUDA keeps neither.
T is the worst case: micro-batch pairs x (the longest prompt + two of the longest answers --max-length allows).
FLOPs per step: forward 2·N·T (N: parameters of the decoder layers' matmuls) + attention 4·H·d per attended
(query, key) pair + the LM head's 2·D·V per scored token; the backward twice the forward; checkpointing adds a
forward of the layers. All over the global batch.
"""
from pathlib import Path

import torch

from infra import hub
from infra.cli import UserError
from model import CausalLM, Config

ACT_D = {4: 37.5, 2: 34.9}  # bytes per hidden unit and token a decoder layer keeps, by compute-dtype size (fp32, 16-bit)
GIB = 2.0 ** 30


def config_of(args) -> Config:
    """The policy's config.json: the demo's, a local folder's, or the Hub's (that one file only)."""
    if args.demo and args.model == "demo":
        return Config.from_json(Path(__file__).resolve().parent.parent / "demo" / "config.json")
    folder = Path(args.model).expanduser()
    if folder.is_dir():
        return Config.from_json(folder / "config.json") if (folder / "config.json").is_file() else \
            hub.load_model(str(folder)).config  # resolve_model_dir names the missing file
    return Config.from_json(hub.hub_file(args.model, "config.json", "model", "--dry-run needs only this file: pass "
                                         "a local folder that holds it", revision=args.revision))


def plan(args, config: Config, world: int) -> dict[str, float]:
    """Bytes per device by item, and the FLOPs of one optimizer step (see the module docstring)."""
    with torch.device("meta"):
        model = CausalLM(config)
    P = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    shard = world if args.fsdp else 1
    b = 4 if args.dtype == "fp32" else 2
    D, I, H, L = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_hidden_layers
    V, hd = config.vocab_size, config.head_dim
    prompt, answer = args.max_prompt_length, args.max_length - args.max_prompt_length
    micro = args.micro_batch_size or args.batch_size // world
    T = micro * (prompt + 2 * answer)  # tokens of one micro-batch, worst case
    if args.grad_checkpointing:
        acts = L * T * 4 * D + T * (4 * I * b + ACT_D[b] * D)
    else:
        acts = L * T * (4 * I * b + ACT_D[b] * D)
    chunk = min(args.logps_chunk_size, 2 * micro * answer)
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    rows, row_len = max(1, T // (args.pack_tokens or 2 * args.max_length)), min(T, args.pack_tokens or 2 * args.max_length)
    attention = rows * row_len ** 2 * (1 + 4 * H) if cpu else 0
    attended = prompt ** 2 / 2 + 2 * answer * (prompt + answer / 2)  # (query, key) pairs of one pair, causal
    pairs, scored = args.batch_size, args.batch_size * 2 * answer
    forward = 2 * L * layer * pairs * (prompt + 2 * answer) + 4 * H * hd * L * attended * pairs + 2 * D * V * scored
    flops = 3 * forward + (2 * L * layer * pairs * (prompt + 2 * answer) if args.grad_checkpointing else 0)
    return {"weights": 4 * P / shard + (2 * b * layer if args.fsdp else 0), "gradients": 4 * P / shard,
            "adamw": 8 * P / shard, "activations": acts + 2 * chunk * V * 4, "attention (CPU mask)": attention,
            "parameters": P, "tokens per micro-batch": T, "flops per step": flops}


def device_memory(args) -> tuple[float, str]:
    """Bytes the device can hold (--device-memory GiB if given), and what was measured."""
    if args.device_memory:
        return args.device_memory * GIB, f"--device-memory {args.device_memory:g} GiB"
    if torch.cuda.is_available() and args.device != "cpu":
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    total = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
    return int(total.split()[1]) * 1024, "this machine's RAM"


def report(args, world: int) -> dict[str, float]:
    """Print the plan as a table (GiB per device, FLOPs per step) and whether it fits."""
    config, (capacity, where) = config_of(args), device_memory(args)
    p = plan(args, config, world)
    items = ("weights", "gradients", "adamw", "activations", "attention (CPU mask)")
    total = sum(p[k] for k in items)
    mode = f"FSDP2 over {world}" if args.fsdp else f"DDP over {world}" if world > 1 else "1 process"
    print(f"dry run: {p['parameters'] / 1e6:,.0f}M parameters, {mode}, {args.dtype}, micro-batch "
          f"{args.micro_batch_size or args.batch_size // world} pairs = {p['tokens per micro-batch']:,} tokens at "
          f"most, grad checkpointing {'on' if args.grad_checkpointing else 'off'}\n\n| per device | GiB |\n|---|---:|")
    for k in items:
        print(f"| {k} | {p[k] / GIB:.2f} |")
    print(f"| **total** | **{total / GIB:.2f}** |\n\n{p['flops per step'] / 1e12:.1f} TFLOPs per optimizer step "
          f"(global batch {args.batch_size}); {where}: {capacity / GIB:.1f} GiB -> "
          f"{'fits' if total < 0.9 * capacity else 'does NOT fit (keep 10% for the allocator and the runtime)'}")
    if not args.device_memory and args.device != "cpu" and not torch.cuda.is_available():
        print("no GPU here: this plan is against this machine's RAM; for a GPU plan name the GPU and its memory, e.g. "
              "--device cuda --device-memory 80 (GiB per GPU; docs/scale-out.md)")
    return p | {"total": total, "capacity": capacity}
