"""Stage 4: train what the method trains (a LoRA or prompt-tuning adapter, or every weight) and save it.

Two explicit, parallel branches: decoder-only models train with TRL's `SFTTrainer` on examples we tokenized
ourselves (labels already mask the prompt); encoder-decoder models (T5, BART) train with transformers'
`Seq2SeqTrainer`, whose encoder sees only the prompt. Both log through the same callbacks: one JSON line per
logged step in the run's metrics log, and typed progress events (events.py) the CLI renders.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from qlora_lite import dist, events, packing
from qlora_lite.errors import BudgetError, UserError
from qlora_lite.model import LoadedModel
from qlora_lite.recipe import TrainRecipe
from qlora_lite.rundir import RunDir, append_jsonl
from qlora_lite.tracking import trainer_report_to

CUDA_ONLY_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit")
# transformers 5.2x renamed TrainingArguments.gradient_checkpointing (the old name warns, and goes in 6); the oldest
# transformers the pins allow has only the old name.
CHECKPOINTING_ARGUMENT = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                              if name in TrainingArguments.__dataclass_fields__)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    first_loss: float | None
    last_loss: float | None
    train_seconds: float
    tokens_per_s: float
    saved_dir: Path  # the run's adapter (PEFT format), or its whole model for full fine-tuning
    max_steps: int = 0  # the steps the trainer planned (epochs counted as it counts them)
    interrupted: bool = False  # Ctrl-C: stopped after `steps` with a checkpoint
    eval_losses: dict[str, float] | None = None  # [[data.mix]]: the eval loss of each source with an eval split
    replicas: dict | None = None  # DDP: whether every rank ended with the same trained weights (dist.check_replicas)


def seed_run(train: TrainRecipe, device: str) -> None:
    """Seed Python, numpy and torch from train.seed before the run's first random draw. The Trainer seeds only when
    it is built, after the adapter's initial weights (LoRA's A matrices, a soft prompt) were drawn from whatever
    state the process was in: two runs of one seed trained from different starting points (issue 21)."""
    random.seed(train.seed)
    numpy.random.seed(train.seed)
    torch.manual_seed(train.seed)  # also seeds every CUDA device
    if train.deterministic and device == "cuda":
        # cuBLAS reorders its sums unless given a fixed workspace (read when it starts: before the first matmul).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # a kernel without a deterministic twin warns
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def reproducibility(train: TrainRecipe, device: str) -> dict:
    """What a repeat of this run with the same seed is expected to give, for result.json (beside its seed) and the
    report."""
    if device != "cuda":
        return {"bitwise": True, "why": (
            f"CPU kernels are deterministic: the same seed, data, versions and thread count "
            f"({torch.get_num_threads()}) give the same losses, weights and scores")}
    if train.deterministic:
        return {"bitwise": True, "why": (
            "train.deterministic: deterministic torch algorithms and a fixed cuBLAS workspace; a kernel that has no "
            "deterministic version warns (not yet measured on a GPU here)")}
    return {"bitwise": False, "why": (
        "CUDA's cuBLAS and attention backward kernels may sum in a different order on each run: losses agree to "
        "a few decimals, not bit for bit; set train.deterministic = true for bit-identical runs (slower)")}


def pick_optimizer(train: TrainRecipe, device: str) -> str:
    """The recipe's optimizer on this device; bitsandbytes optimizers refuse a CPU run with the fix."""
    if device != "cuda" and train.optimizer in CUDA_ONLY_OPTIMIZERS:
        raise UserError(f"train.optimizer = {train.optimizer!r} needs a CUDA GPU; use \"auto\" or \"adamw_torch\"")
    return train.optimizer_on(device)


def planned_steps(train: TrainRecipe, train_rows: int, world: int = 1) -> int:
    """Optimizer steps the run will take: max_steps, or epochs over the training rows (`world` processes each take
    a micro-batch per accumulation step)."""
    if train.max_steps is not None:
        return train.max_steps
    per_epoch = math.ceil(train_rows / (train.micro_batch_size * train.gradient_accumulation_steps * world))
    return max(1, math.ceil(per_epoch * (train.epochs or 1.0)))


def _common_args(train: TrainRecipe, loaded: LoadedModel, checkpoints: Path, has_eval: bool) -> dict:
    """TrainingArguments shared by both branches. Checkpointing is already set up on the model (model.py)."""
    return dict(
        output_dir=str(checkpoints),
        max_steps=train.max_steps if train.max_steps is not None else -1,
        num_train_epochs=train.epochs if train.epochs is not None else 1.0,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5 reads a float < 1 as a ratio
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=pick_optimizer(train, loaded.device),
        seed=train.seed,
        data_seed=train.seed,
        # Random batches of mixed lengths are padded to their longest: a third more compute on the quickstart's data
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        bf16=loaded.compute_dtype == torch.bfloat16 and loaded.device == "cuda",
        fp16=loaded.compute_dtype == torch.float16 and loaded.device == "cuda",
        use_cpu=loaded.device == "cpu",
        **{CHECKPOINTING_ARGUMENT: False},  # set up on the model already (model.py); TRL's default is on
        report_to=trainer_report_to(train),
        disable_tqdm=True,
        include_num_input_tokens_seen="all",
        remove_unused_columns=False,
        dataloader_pin_memory=loaded.device == "cuda",
        # DDP (ignored in one process). A PeftModel is no PreTrainedModel, so the Trainer would search for unused
        # parameters, which reentrant gradient checkpointing breaks ("mark a variable ready only once",
        # accelerate#2017, peft#313); every trainable weight takes part in each forward pass anyway.
        ddp_find_unused_parameters=False,
        # Buffers never change in training here (rotary frequencies; experts4bit's packed 4-bit experts, which every
        # rank quantized alike): DDP would otherwise broadcast them all from rank 0 before every forward pass.
        ddp_broadcast_buffers=False,
        ddp_backend="gloo" if loaded.device == "cpu" and dist.world() > 1 else None,
    )


class MetricsLog(TrainerCallback):
    """Appends one JSON object per logged step to the metrics log and tells `notify` of each step."""

    def __init__(self, path: Path, notify: events.Notify):
        self.path, self.notify = path, notify
        self.start = time.monotonic()
        self.start_tokens = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_tokens = time.monotonic(), state.num_input_tokens_seen
        self.notify(events.TrainingStarted(state.global_step, state.max_steps))

    def on_step_end(self, args, state, control, **kwargs):
        self.notify(events.StepDone(state.global_step, state.max_steps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # DDP: the logged figures are already averaged over the ranks
            return
        logs = dict(logs or {})
        elapsed = time.monotonic() - self.start
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        row["tokens_per_s"] = (state.num_input_tokens_seen - (self.start_tokens or 0)) / max(elapsed, 1e-9)
        row["elapsed_s"] = elapsed
        if "train_loss" in logs:  # the closing summary, not a step
            row["event"] = "end"
        append_jsonl(self.path, row)
        if "loss" in row or "eval_loss" in row:
            self.notify(events.StepLogged(
                step=row["step"], max_steps=state.max_steps, loss=row.get("loss"),
                learning_rate=row.get("learning_rate"), tokens_per_s=row["tokens_per_s"], elapsed_s=elapsed,
                eval_loss=row.get("eval_loss"), grad_norm=row.get("grad_norm"),
            ))


class RateOnResume(TrainerCallback):
    """A resumed run trains on the schedule of its recipe from its first resumed step: the new total of steps and
    the new peak learning rate.

    The checkpoint's optimizer holds the old schedule's next rate (0 where a decay ended) and its scheduler the old
    peak (base_lrs), while the rebuilt scheduler already spans the new max_steps: without this, the first resumed
    step trained at the old rate, and a changed train.learning_rate was recorded but never applied."""

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if state.global_step and isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            groups = lr_scheduler.optimizer.param_groups
            lr_scheduler.base_lrs = [args.learning_rate * g.get("lr_ratio", 1.0) for g in groups]  # LoRA+: per group
            for group, rate in zip(groups, lr_scheduler.base_lrs):
                group["initial_lr"] = rate
            lr_scheduler.last_epoch -= 1
            lr_scheduler.step()  # writes the new schedule's rate for this step into the optimizer


class StopOnCtrlC(TrainerCallback):
    """The first Ctrl-C ends training after the current optimizer step, with a checkpoint to resume from (a step
    on a consumer GPU takes seconds; an hour since the last save_steps is not lost). A second one stops at once."""

    def __init__(self, notify: events.Notify):
        self.notify = notify
        self.requested = False

    def request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C raises KeyboardInterrupt
        self.notify(events.StopRequested())

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = signal.signal(signal.SIGINT, self.request)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class SyncStop(TrainerCallback):
    """DDP: a stop that one rank decided (Ctrl-C, a crossed budget) made by every rank at the end of the same step,
    each saving its part of the same checkpoint; a rank that stopped alone would leave the others waiting in the
    next gradient exchange. Added after every callback that may stop training."""

    def __init__(self, ctrl_c: StopOnCtrlC):
        self.ctrl_c = ctrl_c

    def on_step_end(self, args, state, control, **kwargs):
        stop, save, ctrl_c = dist.any_rank([control.should_training_stop, control.should_save, self.ctrl_c.requested])
        control.should_training_stop, control.should_save, self.ctrl_c.requested = stop, save, ctrl_c


def build_trainer(loaded: LoadedModel, train_ds, eval_ds, train: TrainRecipe, rd: RunDir, callbacks: list):
    """The decoder-only (SFTTrainer) or encoder-decoder (Seq2SeqTrainer) trainer for this model."""
    common = _common_args(train, loaded, rd.checkpoints_dir, eval_ds is not None)
    if loaded.is_encoder_decoder:
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

        args = Seq2SeqTrainingArguments(**common)
        return Seq2SeqTrainer(
            model=loaded.model,
            args=args,
            optimizers=(loraplus_optimizer(loaded.model, train, args), None),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=DataCollatorForSeq2Seq(loaded.tokenizer, model=loaded.model, label_pad_token_id=-100),
            processing_class=loaded.tokenizer,
            callbacks=callbacks,
        )
    from trl import SFTConfig, SFTTrainer

    adapter = {name: p.data for name, p in loaded.model.named_parameters() if p.requires_grad}  # PEFT's own tensors
    # Examples arrive tokenized with labels; TRL must not re-tokenize, truncate or re-mask them.
    args = SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, packing=False)
    collator = None  # TRL's: pads each batch to its longest example
    if train.packing:  # rows the data stage packed (packing.py); a KV cache hides the packed sequences from masking
        loaded.model.config.use_cache = False
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None \
            else loaded.tokenizer.eos_token_id
        collator = functools.partial(packing.collate, pad_id=pad_id)
    trainer = SFTTrainer(
        model=loaded.model,
        args=args,
        data_collator=collator,
        optimizers=(loraplus_optimizer(loaded.model, train, args), None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=loaded.tokenizer,
        callbacks=callbacks,
    )
    # TRL casts the adapter of any 4-bit model to bf16, whatever the device: bf16 matmuls on CPU (~15x slower),
    # bf16 weights on fp16-only GPUs, and updates rounded to 8 bits of mantissa. Keep PEFT's fp32 adapter, the
    # dtype the LoRA path trains in and the planner counts; autocast still computes in the compute dtype. Put back
    # PEFT's own tensors, not a cast of TRL's: fp32 -> bf16 -> fp32 would round the initial weights to bf16 (and
    # under FSDP2 the cast changes only the DTensor's dtype, not its shard, so FSDP would train other weights).
    for name, param in loaded.model.named_parameters():
        if name in adapter and param.dtype != adapter[name].dtype:
            param.data = adapter[name]
    return trainer


def use_fsdp(trainer) -> None:
    """The model is sharded already (dist.shard): tell accelerate it runs FSDP2, so it neither wraps the model in
    DDP nor shards it again, and saves and loads sharded checkpoints. accelerate's own FSDP plugin exists only for
    GPU-type devices and shards by itself; sharding here and flipping this one switch runs the same code on a CPU,
    where it is tested, as on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    trainer.is_fsdp_enabled = True


def loraplus_optimizer(model, train: TrainRecipe, args):
    """LoRA+ (train.loraplus_lr_ratio): the Trainer's own optimizer class, with lora_B (and DoRA's magnitudes) at
    learning_rate x the ratio; None (the Trainer builds its optimizer) when the ratio is unset. Each group keeps its
    ratio to the peak rate, which RateOnResume scales when a resumed run changes the rate."""
    if train.loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs.pop("lr", None)
    optimizer = create_loraplus_optimizer(model, cls, lr=train.learning_rate, loraplus_lr_ratio=train.loraplus_lr_ratio,
                                          loraplus_weight_decay=train.weight_decay, **kwargs)
    for group in optimizer.param_groups:
        group["lr_ratio"] = group["lr"] / train.learning_rate if train.learning_rate else 1.0
    return optimizer


def train(
    loaded: LoadedModel,
    train_ds,
    eval_ds,
    train: TrainRecipe,
    rd: RunDir,
    *,
    resume: bool = False,
    notify: events.Notify = events.ignore,
    callbacks: list = (),
    source_evals: dict | None = None,
    sharded: bool = False,
) -> TrainResult:
    """Train, save the adapter (PEFT format) or the full model, with the tokenizer, return what happened.
    `source_evals`: eval examples by source ("data", "data.mix[1]"), each scored once training is done."""
    metrics = MetricsLog(rd.metrics, notify)
    ctrl_c = StopOnCtrlC(notify)
    trainer = build_trainer(loaded, train_ds, eval_ds, train, rd,
                            [metrics, RateOnResume(), ctrl_c, *callbacks, SyncStop(ctrl_c)])
    if sharded:  # the model was sharded by dist.shard (FSDP)
        use_fsdp(trainer)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the events replace it
    checkpoint = rd.last_checkpoint() if resume else None
    started = time.monotonic()
    saved_dir = rd.saved_dir(hasattr(loaded.model, "peft_config"))
    out_of_memory = False
    try:
        with ctrl_c.installed():
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, once the exception's frames (and the activations they hold) are gone
    if out_of_memory:
        # FSDP: each rank holds a shard and the others cannot join a gather: the last periodic checkpoint it is
        last = rd.last_checkpoint() if sharded else save_after_out_of_memory(trainer, loaded, rd, saved_dir)
        raise dist.alone(BudgetError(
            f"CUDA out of memory during step {trainer.state.global_step + 1}"
            + ("" if sharded else f"; weights saved to {saved_dir}")
            + (f"; a checkpoint in {last}" if last else " (no step had finished: nothing to resume)")
            + ". Lower train.micro_batch_size (raise gradient_accumulation_steps to keep the effective batch) "
            "or train.max_length, then " + ("continue with --resume" if last else "run again")
        ))
    seconds = time.monotonic() - started
    eval_losses = {key: trainer.evaluate(eval_dataset=ds, metric_key_prefix="source")["source_loss"]
                   for key, ds in (source_evals or {}).items()} if not ctrl_c.requested else None
    # the trained weights whole (FSDP: gathered by every rank), compared across the ranks
    trained = dist.full_trainable_state(loaded.model) if dist.world() > 1 else None
    replicas = dist.check_replicas(trained) if trained is not None else None
    if dist.is_main():
        save_trained(loaded, saved_dir, trained if sharded else None)
    losses = [loss for _, loss in rd.losses()]
    tokens = trainer.state.num_input_tokens_seen - (metrics.start_tokens or 0)  # this session's (resumed: not before)
    return TrainResult(
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else output.training_loss,
        train_seconds=seconds,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        saved_dir=saved_dir,
        max_steps=trainer.state.max_steps,
        interrupted=ctrl_c.requested,
        eval_losses=eval_losses or None,
        replicas=replicas,
    )


def save_after_out_of_memory(trainer, loaded: LoadedModel, rd: RunDir, saved_dir: Path) -> Path | None:
    """Free what the failed step held, save the weights, and checkpoint the last finished step to resume from.

    Out of memory strikes in a step's forward or backward pass, before its optimizer update, so the weights,
    optimizer and scheduler are still those of the last finished step: a checkpoint of them resumes there."""
    loaded.model.zero_grad(set_to_none=True)  # the failed step's partly accumulated gradients
    gc.collect()
    torch.cuda.empty_cache()
    save_trained(loaded, saved_dir)  # DDP: every rank holds the same weights
    step = trainer.state.global_step
    # DDP: the other ranks wait in the gradient exchange and cannot join the checkpoint's collectives: the last
    # periodic checkpoint is the one to resume from
    if step and not rd.checkpoint(step).is_dir() and dist.world() == 1:
        trainer._save_checkpoint(trainer.model, trial=None)  # what Trainer writes every save_steps
    return rd.last_checkpoint()


def save_trained(loaded: LoadedModel, out_dir: Path, state: dict | None = None) -> None:
    """`state`: the trainable weights whole (FSDP: the model holds shards), saved as the adapter in PEFT format."""
    loaded.model.save_pretrained(out_dir, **({"state_dict": state} if state is not None else {}))
    loaded.tokenizer.save_pretrained(out_dir)
