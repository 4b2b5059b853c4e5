"""Compute dtypes by flag name, and mixed precision: autocast in one of them, weights left as they are."""
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: str):
    """Mixed precision in `dtype` ("fp16", "bf16"; "fp32" = off) on the device; weights stay as they are."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
