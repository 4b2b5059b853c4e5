"""Several processes (torchrun): the process group, the scorer wrapped for DDP or FSDP2, gathering across ranks, and
the sharded model's state for checkpoints and the final export.

    torchrun --nproc_per_node N train.py ...          # DDP: every rank holds the whole model; gradients all-reduced
    torchrun --nproc_per_node N train.py --fsdp ...   # FSDP2: weights, gradients and AdamW state sharded N ways

FSDP2 (torch.distributed.fsdp.fully_shard) shards each decoder layer and, as the root, the scorer (embedding, final
norm, LM head); a layer's full weights exist only during its forward and backward. Its mixed-precision policy keeps
the fp32 master weights and computes in --dtype (fp16/bf16), reducing gradients in fp32. Both wrappers average
gradients over the ranks, so train.train_step scales each rank's loss sum by the world size over the global batch.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from infra.cli import UserError


def setup(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun this joins the process group (NCCL on GPUs, gloo on CPUs)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if args.batch_size % dist.get_world_size():
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the world size {dist.get_world_size()}")
    return dist.get_rank(), dist.get_world_size(), device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(scorer, args, device):
    """The scorer as the training loop calls it: itself on one process, else DDP- or (--fsdp) FSDP2-wrapped."""
    if world() == 1:
        return scorer
    if not args.fsdp:
        return DistributedDataParallel(scorer, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    compute = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)  # fp32: no casts
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in scorer.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    return fully_shard(scorer, mp_policy=policy)  # the root: embedding, norm and LM head (tied or not)


def reshard(scorer) -> None:
    """After forwards without a backward (evaluation, the step-0 check): free FSDP2's gathered root weights. The root
    keeps its parameters (embedding, final norm, tied head) gathered after a forward, for the backward that usually
    follows; until it reshards, the model holds whole plain tensors in place of its shards, and a checkpoint or the
    final export taken then would see a model that is not sharded. A no-op unless the scorer is FSDP2-wrapped."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(scorer, FSDPModule):
        scorer.reshard()


def sharded(model) -> bool:
    """Whether model's parameters are FSDP2 shards (DTensors) rather than whole tensors."""
    return isinstance(next(model.parameters()), DTensor)


def gradient_sync(scorer, sync: bool):
    """A context for one micro-batch's backward: gradients are reduced across ranks only when sync (the last)."""
    if isinstance(scorer, DistributedDataParallel) and not sync:
        return scorer.no_sync()
    if hasattr(scorer, "set_requires_gradient_sync"):  # FSDP2
        scorer.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_gather(values: torch.Tensor) -> torch.Tensor:
    """The concatenation of a 1-D tensor over all ranks; sizes may differ (the shards of a partial last batch)."""
    n = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.empty_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    most = int(max(sizes))
    out = [values.new_empty(most) for _ in range(world())]
    dist.all_gather(out, torch.cat([values, values.new_zeros(most - values.numel())]))
    return torch.cat([o[:int(k)] for o, k in zip(out, sizes)])


def mean_over_ranks(sums: dict, count: float, device) -> dict:
    """{key: sum over all ranks / count over all ranks} in one all-reduce (no-op on one process)."""
    keys = sorted(sums)
    totals = torch.tensor([float(sums[k]) for k in keys] + [count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return {k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}


def all_finite(model) -> bool:
    """Every weight of the model is finite, on every rank (each checks its own shards; the answer is agreed)."""
    local = all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in model.parameters())
    flag = torch.tensor([float(local)], device=next(model.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU, gathered from the shards: on rank 0 (the others get {}); every rank
    must call it. Unsharded: the model's own state dict."""
    if not sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_shards(folder, model, opt) -> None:
    """Every rank writes its shards of the model and of AdamW's state (torch.distributed.checkpoint) into folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_shards(folder, model, opt) -> None:
    """The model's and AdamW's shards of this rank from folder (written by save_shards, any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
