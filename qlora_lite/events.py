"""What `run` and `compare` tell the person watching, as small frozen records passed to `notify(event)`.

Library code never prints: it emits these, and the CLI renders them (a live bar in a terminal, one plain line per
logged step in a log file). A misspelled event or field is an error here, not a message that silently vanishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:  # the records carry the stages' own results
    from qlora_lite.data import DataStats, MixedSource
    from qlora_lite.evaluate import EvalResult
    from qlora_lite.export import MergeResult
    from qlora_lite.gguf_export import GGUFExport
    from qlora_lite.memory import MemoryPlan
    from qlora_lite.packing import PackStats
    from qlora_lite.train import TrainResult


@dataclass(frozen=True)
class RecipeResolved:
    run_dir: Path
    recipe_file: Path  # where the whole resolved recipe is saved
    changed: tuple[str, ...]  # "section.key = value" for each setting that differs from recipe.py's defaults


@dataclass(frozen=True)
class Planned:
    plan: MemoryPlan


@dataclass(frozen=True)
class AutoFitted:
    change: str  # what [budget] auto_fit changed so the plan fits


@dataclass(frozen=True)
class HeldOut:
    split: str
    rows: int
    in_train: int  # of them, rows whose input text is also in the training data


@dataclass(frozen=True)
class SetUp:
    device: str
    compute_dtype: str
    trainer: str  # "decoder-only (SFTTrainer)" or "encoder-decoder (Seq2SeqTrainer)"
    method: str
    optimizer: str
    trainable_params: int
    total_params: int
    data: DataStats
    effective_batch: int
    steps: int
    epochs: float
    tokens_per_step: float
    not_measured: tuple[str, ...]  # figures this machine cannot give, with the reason
    held_out: HeldOut | None
    expected_train_s: float | None = None  # from this machine's earlier runs of the model and method; None: first
    expected_eval_s: float | None = None
    packed: PackStats | None = None  # with [train] packing: how the examples filled the rows
    mixed: tuple[MixedSource, ...] = ()  # with [[data.mix]]: the examples drawn from each source
    processes: int = 1  # DDP: processes training together (one per GPU); effective_batch counts them all
    threads: int = 1  # torch's CPU threads in each process
    strategy: str = "ddp"  # with several processes: "ddp" or "fsdp"


@dataclass(frozen=True)
class TrainingStarted:
    step: int  # > 0 when resumed from a checkpoint
    max_steps: int


@dataclass(frozen=True)
class StepDone:
    step: int
    max_steps: int


@dataclass(frozen=True)
class StepLogged:
    step: int
    max_steps: int
    loss: float | None
    learning_rate: float | None
    tokens_per_s: float  # this session's tokens over this session's time (a resumed run: its own only)
    elapsed_s: float  # since training (or its resumption) began
    eval_loss: float | None = None
    grad_norm: float | None = None


@dataclass(frozen=True)
class MemorySampled:
    step: int
    gib: float | None  # the GPU footprint the budget counts; on a CPU the process RSS
    on_gpu: bool


@dataclass(frozen=True)
class ResumedOnOtherProcesses:
    """--resume with another number of processes than the checkpoint was trained on (DDP)."""

    before: int
    now: int
    effective_batch: int  # now
    keep_batch_accumulation: int | None  # the gradient_accumulation_steps that keeps the old effective batch


@dataclass(frozen=True)
class ShardedStop:
    """FSDP: the run ends once the adapter is saved; evaluation, merge and export need the model whole."""

    run_dir: Path


@dataclass(frozen=True)
class StopRequested:
    """The first Ctrl-C: training stops after this step with a checkpoint."""


@dataclass(frozen=True)
class BudgetCrossed:
    step: int
    used_gib: float
    budget_gib: float
    stopping: bool  # budget.on_exceed = "stop"; else a warning only


@dataclass(frozen=True)
class Trained:
    result: TrainResult


@dataclass(frozen=True)
class Evaluating:
    max_samples: int | None


@dataclass(frozen=True)
class Evaluated:
    result: EvalResult


@dataclass(frozen=True)
class Merging:
    dtype: str
    base: str  # "dequantized" or "original"


@dataclass(frozen=True)
class Merged:
    result: MergeResult


@dataclass(frozen=True)
class MergeSkipped:
    reason: str


@dataclass(frozen=True)
class ExportingGGUF:
    qtype: str
    source: Path  # the merged model it is made from


@dataclass(frozen=True)
class ExportedGGUF:
    result: GGUFExport


@dataclass(frozen=True)
class GGUFSkipped:
    reason: str


@dataclass(frozen=True)
class MethodStarted:
    method: str
    learning_rate: float
    run_dir: Path


@dataclass(frozen=True)
class MethodKept:
    method: str
    run_dir: Path


@dataclass(frozen=True)
class TensorBoardWriting:
    folder: Path  # live curves there: tensorboard --logdir <folder>


@dataclass(frozen=True)
class MethodRefused:
    method: str
    reason: str


Event = Union[RecipeResolved, Planned, AutoFitted, SetUp, ResumedOnOtherProcesses, ShardedStop, TrainingStarted,
              StepDone, StepLogged, MemorySampled,
              StopRequested, BudgetCrossed, Trained, Evaluating, Evaluated, Merging, Merged, MergeSkipped,
              ExportingGGUF, ExportedGGUF, GGUFSkipped,
              MethodStarted, MethodKept, MethodRefused, TensorBoardWriting]
Notify = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default listener: a library call nobody watches."""


def tee(*listeners: Notify) -> Notify:
    """One listener that passes each event to every one of `listeners`, in order."""
    def notify(event: Event) -> None:
        for listener in listeners:
            listener(event)
    return notify
