"""Experiment tracking: the rows train.py writes to metrics.jsonl, sent as well to TensorBoard, Weights & Biases or
Trackio (--report-to). Each is an optional install; a missing one is a one-line error naming the package to install,
found when the arguments are checked, before any work. summarize prints the run in a few lines at its end."""
import importlib.util
import math
from pathlib import Path

from infra.cli import UserError

PACKAGES = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check(kind: str) -> None:
    """UserError (with the pip command) if --report-to names a tracker whose package is not installed."""
    package = PACKAGES[kind]
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--report-to {kind} needs the {package} package: pip install {package} (or --report-to none)")


class Tracker:
    """log(row) sends a metrics.jsonl row's numbers (non-finite ones left out) at row["step"]; close() flushes."""

    def __init__(self, kind: str, out_dir, args):
        check(kind)
        self.kind, self.run = kind, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.run = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            self.run.add_text("args", str(vars(args)))
        elif kind in ("wandb", "trackio"):  # the same calls in both: init, log(metrics, step), finish
            self.run = __import__(kind)
            self.run.init(project="margin-po", name=out_dir.name, config=vars(args))

    def log(self, row: dict) -> None:
        numbers = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self.kind == "tensorboard":
            for k, v in numbers.items():
                self.run.add_scalar(k, v, global_step=row["step"])
        elif self.run is not None:
            self.run.log(numbers, step=row["step"])

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.run.close()
        elif self.run is not None:
            self.run.finish()


def summarize(history: list[dict], out_dir: Path, loss: str) -> None:
    """The run in a few lines at its end: held-out reward accuracy first and last, the last train loss and
    throughput, where the metrics and the final model are."""
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    train = [h for h in history if "loss" in h]
    print(f"\n== {loss}: {train[-1]['step'] if train else 0} steps ==")
    if evals:
        print(f"held-out rewards/accuracies: {evals[0]['eval_rewards/accuracies']:.3f} (step {evals[0]['step']})"
              f" -> {evals[-1]['eval_rewards/accuracies']:.3f} (step {evals[-1]['step']}); "
              f"margin {evals[-1]['eval_rewards/margins']:+.3f}")
    if train:
        print(f"last train loss {train[-1]['loss']:.4f}, {train[-1]['tokens_per_s']:.0f} tokens/s, "
              f"skipped steps {train[-1]['skipped_steps']}")
    print(f"metrics: {out_dir / 'metrics.jsonl'}   final model: {out_dir / 'final'}")
