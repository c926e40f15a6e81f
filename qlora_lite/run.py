"""The whole job, in order: recipe → memory plan → data → model → adapter (per [method]) → train (watched) →
evaluate → merge → GGUF → report.

`run` is the one place that calls every stage; read it top to bottom. It prints nothing: it reports what it
decided and measured as typed events (events.py) through `notify`, which the CLI renders.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from qlora_lite import data as data_stage
from qlora_lite import dist
from qlora_lite import evaluate, events, export, fewshot, gguf_export, knowledge, memory, monitor, packing, report
from qlora_lite import tracking
from qlora_lite import model as model_stage
from qlora_lite import train as train_stage
from qlora_lite.errors import BudgetError, Interrupted, UserError
from qlora_lite.recipe import SECTIONS, Recipe, changed_settings
from qlora_lite.rundir import (
    RunDir, check_checkpoint, checkpoint_processes, checkpoint_sharded, interrupted_message, write_json,
)
from qlora_lite.source import (
    cache_key, library_versions, model_identity, read_cached, resolve_model_source, write_cached,
)

# Sections whose change makes a checkpoint meaningless: resuming with them changed is refused.
FROZEN_ON_RESUME = ("model", "data", "prompt", "method", "quantization", "lora")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    train: train_stage.TrainResult
    data_stats: data_stage.DataStats
    trainable_params: int
    total_params: int
    plan: memory.MemoryPlan
    evaluation: evaluate.EvalResult | None
    merged: export.MergeResult | None
    gguf: gguf_export.GGUFExport | None
    report: Path
    seconds: float


def run(recipe: Recipe, *, resume: bool = False, notify: events.Notify = events.ignore) -> RunResult:
    started = time.monotonic()
    rd = RunDir(recipe.run_dir)
    # Every rank prepares (DDP: a user error on any rank stops them all, said once); rank 0 alone writes.
    with dist.together():
        if recipe.train.strategy == "fsdp" and dist.world() == 1:
            raise UserError('train.strategy = "fsdp" shards the model across several processes: start them with '
                            'run --nproc N (one per GPU), or use strategy = "ddp" on one GPU')
        check_run_dir(recipe, resume)  # refuse at once, before minutes of loading
        device = model_stage.pick_device(recipe.train)
        monitor.reset_peaks(device)  # a second run in this process (compare) measures its own peak
        optimizer = train_stage.pick_optimizer(recipe.train, device)
        tracking.check_trackers(recipe.train)
        if device == "cpu" and recipe.quantization.compute_dtype in ("bf16", "fp16"):  # no autocast: eval fails
            raise UserError(f"quantization.compute_dtype = {recipe.quantization.compute_dtype!r} needs a CUDA GPU; "
                            f"on a CPU use \"auto\" (fp32: bf16 matmuls there are ~15x slower)")

        # Plan memory from the config alone; refuse, or re-fit, a recipe that cannot fit its budget.
        recipe, plan = plan_within_budget(recipe, notify, dist.world())
        notify(events.RecipeResolved(rd.path, rd.recipe, tuple(changed_settings(recipe))))
        notify(events.Planned(plan))

        # Data, then model: a missing file, column or model fails here, and leaves nothing behind.
        splits = data_stage.load_splits(recipe.data, recipe.prompt)
        mix_splits = data_stage.load_mix(recipe.data, recipe.prompt)  # [[data.mix]]: other tasks drawn in
        held_out_split, held_out = evaluate.held_out_rows(recipe, splits=splits) if recipe.eval.enabled else (None, [])
        if recipe.eval.forgetting:
            evaluate.forgetting_texts(recipe.eval.forgetting)  # a missing or unreadable text fails now, not later
        if recipe.eval.knowledge and held_out:
            knowledge.read_questions(recipe.eval.knowledge)  # a bad question too
        if held_out:
            fewshot.check_shots(recipe.eval.shots, splits["train"], recipe.data)  # more shots than training rows too
        train_stage.seed_run(recipe.train, device)  # before anything draws: every method of compare starts alike
        with dist.main_first():  # a GGUF model is converted once, by rank 0, into the cache the others read
            resolve_model_source(recipe.model)
        loaded = model_stage.load_model(recipe.model, recipe.quantization, recipe.train, recipe.method, recipe.prompt,
                                        conversations=recipe.data.format == "messages")
        if recipe.export.gguf:  # an architecture or tokenizer the GGUF writer cannot convert: said before training
            gguf_export.check_supported(loaded.model.config)
            gguf_export.check_tokenizer(loaded.tokenizer, loaded.model.config.vocab_size, f"of {recipe.model.name}")
        if recipe.train.packing and loaded.is_encoder_decoder:
            raise UserError("train.packing: an encoder-decoder model reads each prompt in its encoder and cannot pack "
                            "examples into one row; set packing = false for this model")
        if held_out:  # prompts that leave no room for eval.max_new_tokens, found before training
            evaluate.encode_prompts(held_out, recipe, loaded.tokenizer, loaded.is_encoder_decoder)
        train_ds, stats = data_stage.build_examples(
            splits["train"], loaded.tokenizer, recipe.data, recipe.prompt, recipe.train, loaded.is_encoder_decoder
        )
        if stats.rows < recipe.train.micro_batch_size:  # it trained on one batch of them all, planned as a bigger one
            raise UserError(
                f"train.micro_batch_size = {recipe.train.micro_batch_size} is more than the {stats.rows} usable rows "
                f"of data.train ({recipe.data.train}); set train.micro_batch_size to {stats.rows} or less, or add data"
            )
        eval_ds = None
        if "eval" in splits:
            eval_ds, _ = data_stage.build_examples(
                splits["eval"], loaded.tokenizer, recipe.data, recipe.prompt, recipe.train, loaded.is_encoder_decoder,
                split="eval",
            )
        mixed, source_evals = (), {}
        if recipe.data.mix:  # one pass over the main task with the other sources drawn in at their weights
            train_ds, mixed, source_evals = data_stage.mix_examples(
                train_ds, mix_splits, loaded.tokenizer, recipe.data, recipe.prompt, recipe.train,
                loaded.is_encoder_decoder, recipe.train.seed)
        tokens_total = sum(map(len, train_ds["input_ids"]))
        packed = None
        if recipe.train.packing:  # several examples per row: steps, epochs and tokens per step count rows, not examples
            train_ds, packed = packing.pack(train_ds, recipe.train.max_length)
            eval_ds = packing.pack(eval_ds, recipe.train.max_length)[0] if eval_ds is not None else None
            source_evals = {k: packing.pack(ds, recipe.train.max_length)[0] for k, ds in source_evals.items()}
        if mixed and eval_ds is not None:  # the main task's eval loss beside the other sources'
            source_evals = {"data": eval_ds, **source_evals}
    rows = packed.rows if packed else len(train_ds)
    fsdp = recipe.train.strategy == "fsdp"
    effective_batch = recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps * dist.world()
    last = rd.last_checkpoint() if resume else None
    if last and (before := checkpoint_processes(last)) != dist.world():
        # weights, optimizer and schedule are the same on every rank: they load; the data order does not carry over
        accumulation = recipe.train.gradient_accumulation_steps * before
        notify(events.ResumedOnOtherProcesses(
            before, dist.world(), effective_batch,
            accumulation // dist.world() if accumulation % dist.world() == 0 else None))
    if dist.is_main():
        create_run_dir(rd, recipe, loaded.device)
    if "tensorboard" in recipe.train.report_to and dist.is_main():
        notify = events.tee(notify, tracking.TensorBoardLog(rd.tensorboard))
        notify(events.TensorBoardWriting(rd.tensorboard))
    model_stage.attach_method(loaded, recipe)
    trainable, total = model_stage.count_parameters(loaded.model)
    sharding = dist.shard(loaded.model) if fsdp else None  # FSDP (experimental): 1/N of the model on each GPU
    steps = train_stage.planned_steps(recipe.train, rows, dist.world())
    probe = monitor.open_probe(loaded.device)
    leaked = data_stage.rows_also_in(held_out, splits["train"], recipe.data) if held_out else 0
    tokens_per_step = tokens_total / rows * effective_batch
    speed_key = measured_speed_key(recipe, loaded)
    speed = (speed_key and read_cached("speed", speed_key)) or {}
    notify(events.SetUp(
        device=loaded.device, compute_dtype=str(loaded.compute_dtype).removeprefix("torch."),
        trainer="encoder-decoder (Seq2SeqTrainer)" if loaded.is_encoder_decoder else "decoder-only (SFTTrainer)",
        method=recipe.method.kind, optimizer=optimizer, trainable_params=trainable, total_params=total, data=stats,
        effective_batch=effective_batch, steps=steps, epochs=steps * effective_batch / rows, packed=packed,
        tokens_per_step=tokens_per_step, not_measured=tuple(probe.missing),
        held_out=events.HeldOut(held_out_split, len(held_out), leaked) if held_out else None,
        expected_train_s=steps * tokens_per_step / speed["train_tokens_per_s"] if speed.get("train_tokens_per_s")
        else None,
        expected_eval_s=expected_eval_seconds(recipe, len(held_out), speed) if held_out else None, mixed=mixed,
        processes=dist.world(), threads=torch.get_num_threads(), strategy=recipe.train.strategy,
    ))

    # Train, watching memory; a crossed budget stops with a checkpoint and the adapter saved. DDP: each rank
    # watches its own GPU, and a rank that crosses the budget stops them all (train.SyncStop).
    watcher = monitor.MemoryMonitor(rd.memory_log, probe, plan.budget_gib, recipe.budget.on_exceed, notify)
    with dist.together():
        try:
            result = train_stage.train(loaded, train_ds, eval_ds, recipe.train, rd, resume=resume, notify=notify,
                                       callbacks=[watcher], source_evals=source_evals, sharded=fsdp)
        finally:
            if dist.is_main():
                monitor.write_memory_report(rd, plan, plan.budget_gib, probe.missing)
        notify(events.Trained(result))
        if watcher.exceeded and recipe.budget.on_exceed == "stop":
            used = monitor.footprint_gib(watcher.exceeded)
            raise BudgetError(
                f"memory budget crossed at step {watcher.exceeded['step']}: {used:.2f} GiB > {plan.budget_gib:g} "
                f"GiB. Trained weights saved to {result.saved_dir} and a checkpoint to {rd.last_checkpoint()}; "
                f"lower train.micro_batch_size or train.max_length and continue with --resume"
            )
        if result.interrupted and result.steps < result.max_steps:
            raise Interrupted(interrupted_message(recipe))
    dist.split()  # several processes: rank 0 goes on alone from here, the others wait for its exit status
    # training is complete: eval and merge may follow
    write_result(rd, recipe, result, trainable, total, loaded.device, mixed, effective_batch, sharding)
    if speed_key and result.steps:
        speed = {**speed, "train_tokens_per_s": result.tokens_per_s}
        write_cached("speed", speed_key, speed)
    if result.interrupted:  # Ctrl-C during the last step
        raise Interrupted(interrupted_message(recipe))

    if fsdp:  # rank 0 holds a shard of the model: evaluation and export need it whole, where it fits
        notify(events.ShardedStop(rd.path))
        return RunResult(rd.path, result, stats, trainable, total, plan, None, None, None,
                         report.write_report(rd.path), time.monotonic() - started)

    # Base vs tuned on held-out data, then the merged export, then the report of it all.
    evaluation = None
    if recipe.eval.enabled:
        notify(events.Evaluating(recipe.eval.max_samples))
        evaluation = evaluate.evaluate_run(loaded, recipe, rd.path, train_rows=splits["train"])
        notify(events.Evaluated(evaluation))
        if speed_key and not evaluation.base_from_cache:  # both models generated: a full evaluation's time
            speed["eval_seconds_per_row"] = evaluation.seconds / evaluation.n
            speed["eval_max_new_tokens"] = recipe.eval.max_new_tokens
            write_cached("speed", speed_key, speed)
    merged = None
    skip = recipe.method.spec.not_merged
    if recipe.export.merge and skip:
        notify(events.MergeSkipped(skip))
    elif recipe.export.merge:
        del loaded  # the 4-bit model is not needed while the full-precision copy is merged
        gc.collect()
        notify(events.Merging(recipe.export.dtype, export.merge_base(recipe, recipe.export.base)))
        merged = export.merge_run(rd.path, rd.merged, dtype=recipe.export.dtype, base=recipe.export.base,
                                  force=resume)  # a resumed run's merged/ is its own export of fewer steps: replaced
        notify(events.Merged(merged))
    gguf = None
    if recipe.export.gguf and merged is not None and not merged.check.passed:
        notify(events.GGUFSkipped("the merge failed its check: a GGUF of it would not be the model that was trained"))
    elif recipe.export.gguf:  # from the merge, or (full fine-tuning: nothing to merge) from what training saved
        source = merged.out_dir if merged is not None else rd.saved_dir(has_adapter=False)
        notify(events.ExportingGGUF(recipe.export.gguf, source))
        gguf = gguf_export.export_run(rd.path, recipe.export.gguf, force=resume)  # a resumed run's: replaced
        notify(events.ExportedGGUF(gguf))
    report_path = report.write_report(rd.path)
    return RunResult(rd.path, result, stats, trainable, total, plan, evaluation, merged, gguf, report_path,
                     time.monotonic() - started)


def write_result(rd: RunDir, recipe: Recipe, result: train_stage.TrainResult, trainable: int, total: int,
                 device: str, mixed: tuple[data_stage.MixedSource, ...] = (), effective_batch: int = 0,
                 sharding: dict | None = None) -> None:
    """result.json: what training did, in one small file (compare and other tools read it). With [[data.mix]]:
    the examples drawn from each source and, where a source has an eval split, its eval loss after training."""
    mix = {"rows_per_source": {m.key: m.rows for m in mixed}} if mixed else {}
    if result.eval_losses:
        mix["eval_loss_per_source"] = result.eval_losses
    write_json(rd.result, {**mix,
        "method": recipe.method.kind, "learning_rate": recipe.train.learning_rate, "steps": result.steps,
        "first_loss": result.first_loss, "last_loss": result.last_loss, "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s, "trainable_params": trainable, "total_params": total,
        "saved_dir": str(result.saved_dir), "seed": recipe.train.seed,
        "reproducible": train_stage.reproducibility(recipe.train, device),
        "processes": dist.world(), "effective_batch": effective_batch, "replicas": result.replicas,
        **({"fsdp": sharding} if sharding else {}),
    })


def measured_speed_key(recipe: Recipe, loaded: model_stage.LoadedModel) -> str | None:
    """Runs of one model and method on this machine's device, at one micro-batch, train and generate at about one
    speed: the key under which a run keeps what it measured, so that the next run's setup says how long its
    training and evaluation will take. None where the model cannot be told apart cheaply."""
    identity = model_identity(recipe.model)
    if identity is None:
        return None
    t = recipe.train
    parts = [identity, recipe.method.kind, recipe.load_in_4bit, loaded.device, str(loaded.compute_dtype),
             t.gradient_checkpointing, t.micro_batch_size, recipe.eval.batch_size, library_versions()]
    parts += [dist.world()] if dist.world() > 1 else []  # tokens/s of all processes together
    return cache_key(parts)


def expected_eval_seconds(recipe: Recipe, rows: int, speed: dict) -> float | None:
    """Base and tuned generation for `rows` held-out rows, at the measured time per row (generation time grows
    with max_new_tokens); None before a first evaluation of this model here."""
    if not speed.get("eval_max_new_tokens"):
        return None
    return rows * speed["eval_seconds_per_row"] * recipe.eval.max_new_tokens / speed["eval_max_new_tokens"]


def plan_within_budget(recipe: Recipe, notify: events.Notify, world: int = 1) -> tuple[Recipe, memory.MemoryPlan]:
    """The memory plan (per GPU, for `world` processes); with a budget it cannot meet, the auto-fitted recipe or a
    BudgetError with the fix."""
    arch = memory.recipe_arch(recipe)
    plan = memory.plan_from_arch(recipe, arch, world=world)
    if plan.fits is not False:
        return recipe, plan
    fitted = memory.fit_to_budget(recipe, arch, world=world)
    over = f"predicted peak {plan.peak_gib:.2f} GiB ({plan.phase}) exceeds the budget of {plan.budget_gib:g} GiB"
    if fitted is None:
        raise BudgetError(
            f"{over}, and no smaller micro-batch, checkpointing or eval batch fits. Use a smaller model, "
            f"a shorter train.max_length, a smaller lora.r, or a larger GPU (see: python -m qlora_lite plan)"
        )
    new_recipe, change = fitted
    if not recipe.budget.auto_fit:
        raise BudgetError(f"{over}. The cheapest change that fits: {change}. Set it in the recipe, or set "
                          f"[budget] auto_fit = true to apply it automatically")
    notify(events.AutoFitted(change))
    return new_recipe, memory.plan_from_arch(new_recipe, arch, world=world)  # same model and method: same skeleton


def check_run_dir(recipe: Recipe, resume: bool) -> None:
    """Never overwrite a run. With resume, the run must exist and match the recipe, and continues from its last
    checkpoint; one stopped before its first checkpoint starts over in place."""
    rd = RunDir(recipe.run_dir)
    existing = next(p for p in [rd.path, *rd.path.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"output.dir = {recipe.output.dir}: cannot make the run directory {rd}: {existing} is "
                        f"{'not writable' if existing.is_dir() else 'a file, not a folder'}; set output.dir to "
                        f"a folder you can write (--set output.dir=DIR)")
    if not resume:
        if rd.path.exists():
            raise UserError(
                f"run directory {rd} already exists; continue it with --resume, or choose a new name "
                f"(--set name=NEW_NAME or --set output.dir=DIR)"
            )
        return
    if not rd.is_run():
        raise UserError(f"--resume: no run at {rd} (no {rd.recipe.name} there); run without --resume to start it")
    last = rd.last_checkpoint()
    if last is None:  # stopped before its first checkpoint: nothing to continue, nothing to lose but its logs
        if rd.has_trained_weights():
            raise UserError(f"--resume: {rd} has trained weights but no checkpoint to continue from; "
                            f"pick a new name to train again (--set name=NEW_NAME)")
        if dist.is_main():
            rd.keep_logged_steps(None)
        return  # trains from step 0 in the same folder
    changed = changed_since(recipe)
    if changed:
        raise UserError(
            f"--resume: the recipe differs from the run in {rd} ({'; '.join(changed)}); a checkpoint only "
            f"continues the same model, data and adapter. Use a new name to start over"
        )
    done = check_checkpoint(last)
    check_resume_strategy(last, recipe.train.strategy == "fsdp")
    if dist.is_main():
        rd.keep_logged_steps(done)  # steps after the checkpoint are trained again: logged again
    if recipe.train.max_steps is not None and done >= recipe.train.max_steps:
        raise UserError(  # the Trainer would run one step past max_steps
            f"--resume: {rd} already trained {done} steps ({last.name}) and train.max_steps is "
            f"{recipe.train.max_steps}; raise train.max_steps to train further, or use eval, merge or report on it"
        )


def check_resume_strategy(checkpoint: Path, fsdp: bool) -> None:
    """An FSDP checkpoint holds one shard of the weights and optimizer per process: it continues under FSDP with
    as many processes; a DDP or one-process checkpoint does not continue under FSDP."""
    if checkpoint_sharded(checkpoint) != fsdp:
        was = "train.strategy = \"fsdp\"" if not fsdp else "one process or DDP"
        raise UserError(f"--resume: {checkpoint.name} was saved by {was}, and its weights and optimizer state are "
                        f"laid out for it; resume with the strategy it was trained with")
    if fsdp and checkpoint_processes(checkpoint) != dist.world():
        raise UserError(f"--resume: {checkpoint.name} holds FSDP shards for {checkpoint_processes(checkpoint)} "
                        f"processes; resume with --nproc {checkpoint_processes(checkpoint)}")


def changed_since(recipe: Recipe, sections=FROZEN_ON_RESUME) -> list[str]:
    """'lora.r: 16 → 8' for each setting of `sections` in which `recipe` differs from its run's saved recipe."""
    before = RunDir(recipe.run_dir).read_recipe()
    changes = []
    for section in sections:
        old, new = dataclasses.asdict(getattr(before, section)), dataclasses.asdict(getattr(recipe, section))
        changes += [f"{section}.{key}: {old[key]!r} → {new[key]!r}" for key in old if old[key] != new[key]]
    return changes


def create_run_dir(rd: RunDir, recipe: Recipe, device: str) -> None:
    """<output.dir>/<name> with the resolved recipe and the environment (checked free by check_run_dir)."""
    rd.write_recipe(recipe)
    rd.result.unlink(missing_ok=True)  # a resumed run trains further: what it said is stale
    write_json(rd.env, environment(device))


def environment(device: str) -> dict:
    """Versions and device, so a result can be reproduced and compared."""
    import torch

    packages = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "qlora_lite"]
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cuda": torch.version.cuda,
        "sections": list(SECTIONS),
    }
