"""A torchrun (or plain python) entry for the tests: train.py, killed part-way at the same step on every rank.

    CRASH_AT_PACK=N   the N-th packed batch raises KeyboardInterrupt on every rank (a run stopped mid-way)
    KILL_AT_STEP=N    the N-th optimizer step (train_step call) SIGKILLs the job: the process, and under torchrun its
                      agent and every rank, die at once, with no handler, flush or clean-up, as a cluster kills a job
"""
import contextlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import packing  # noqa: E402
import train  # noqa: E402


def counting(real, env: str, crash):
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ[env]):
            crash()
        return real(*args, **kwargs)
    return wrapped


def interrupt():
    raise KeyboardInterrupt


def kill_the_job():
    """SIGKILL torchrun's agent and its ranks (each rank runs in a session of its own: found as the agent's children),
    then this process; run without torchrun, only this process."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        agent = os.getppid()
        for pid in [agent, *map(int, Path(f"/proc/{agent}/task/{agent}/children").read_text().split())]:
            with contextlib.suppress(ProcessLookupError):  # a rank may have killed it first
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


if "CRASH_AT_PACK" in os.environ:
    packing.pack = counting(packing.pack, "CRASH_AT_PACK", interrupt)
if "KILL_AT_STEP" in os.environ:
    train.train_step = counting(train.train_step, "KILL_AT_STEP", kill_the_job)
train.main(sys.argv[1:])
