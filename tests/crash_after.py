"""A torchrun entry for tests/test_train.py: train.py whose CRASH_AT_PACK-th packed batch raises KeyboardInterrupt on
every rank, i.e. a run killed mid-way at the same step everywhere."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import packing  # noqa: E402
import train  # noqa: E402

real, calls = packing.pack, [0]


def crashing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["CRASH_AT_PACK"]):
        raise KeyboardInterrupt
    return real(*args, **kwargs)


packing.pack = crashing
train.main(sys.argv[1:])
