"""Live training curves: TensorBoard scalars under RUN_DIR/tensorboard/ while training runs, and W&B through the
Trainer's own callback for users who have it installed and logged in.

Inputs: `[train] report_to`, the run directory, and the events `run` emits. Output: TensorBoard event files (one
scalar per logged step: loss, learning rate, grad norm, tokens/s, memory, eval loss). The TensorBoard writer is
one more reader of the events the CLI renders, so the curves show what the terminal shows, as it happens.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qlora_lite import events
from qlora_lite.errors import UserError
from qlora_lite.recipe import TrainRecipe


def check_trackers(train: TrainRecipe) -> None:
    """Refuse, before any loading, a tracker whose package is missing or (W&B) not logged in."""
    if "tensorboard" in train.report_to and importlib.util.find_spec("tensorboard") is None:
        raise UserError('train.report_to = ["tensorboard"] needs the tensorboard package: '
                        'pip install "qlora_lite[tensorboard]" (or pip install tensorboard), or remove it')
    if "wandb" in train.report_to:
        if importlib.util.find_spec("wandb") is None:
            raise UserError('train.report_to = ["wandb"] needs the wandb package: pip install wandb, then '
                            "wandb login; or remove it (TensorBoard needs no account)")
        if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb_logged_in():
            raise UserError('train.report_to = ["wandb"]: wandb is not logged in; run wandb login (or set '
                            "WANDB_API_KEY, or WANDB_MODE=offline to keep the run on this machine)")


def wandb_logged_in() -> bool:
    import wandb

    return bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)


def trainer_report_to(train: TrainRecipe) -> list[str] | str:
    """What the Trainer reports to itself: W&B only; TensorBoard is written from our events (tokens/s, memory)."""
    return ["wandb"] if "wandb" in train.report_to else "none"


class TensorBoardLog:
    """A `Notify` that writes the training events as TensorBoard scalars, flushed at every logged step so that a
    TensorBoard open beside the run draws the curves live."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: check_trackers

        self.writer = SummaryWriter(log_dir=str(folder))

    def __call__(self, event: events.Event) -> None:
        match event:
            case events.StepLogged(step=step):
                scalars = {"train/loss": event.loss, "train/learning_rate": event.learning_rate,
                           "train/grad_norm": event.grad_norm, "train/tokens_per_s": event.tokens_per_s,
                           "eval/loss": event.eval_loss}
                for tag, value in scalars.items():
                    if value is not None:
                        self.writer.add_scalar(tag, value, step)
                self.writer.flush()
            case events.MemorySampled(step, gib, on_gpu) if gib is not None:
                self.writer.add_scalar("memory/gpu_gib" if on_gpu else "memory/process_rss_gib", gib, step)
            case events.Trained():
                self.writer.close()

