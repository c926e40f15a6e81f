"""The whole job, in order: recipe → memory plan → data → model → adapter (per [method]) → train (watched) →
evaluate → merge → report.

`run` is the one place that calls every stage; read it top to bottom. It prints nothing: it reports what it
decided and measured through `notify(event, payload)`, which the CLI renders.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pickle
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from qlora_lite import data as data_stage
from qlora_lite import evaluate, export, memory, monitor, report
from qlora_lite import model as model_stage
from qlora_lite import train as train_stage
from qlora_lite.errors import BudgetError, Interrupted, UserError, error_line
from qlora_lite.recipe import SECTIONS, Recipe, load_recipe, recipe_to_toml

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
    report: Path
    seconds: float


def run(recipe: Recipe, *, resume: bool = False, notify: Callable[[str, object], None] = lambda e, p: None):
    started = time.monotonic()
    check_run_dir(recipe, resume)  # refuse at once, before minutes of loading
    device = model_stage.pick_device(recipe.train)
    monitor.reset_peaks(device)  # a second run in this process (compare) measures its own peak
    optimizer = train_stage.pick_optimizer(recipe.train, device)
    if device == "cpu" and recipe.quantization.compute_dtype in ("bf16", "fp16"):  # no autocast: eval would fail
        raise UserError(f"quantization.compute_dtype = {recipe.quantization.compute_dtype!r} needs a CUDA GPU; on a "
                        f"CPU use \"auto\" (fp32: bf16 matmuls there are ~15x slower)")

    # Plan memory from the config alone; refuse, or re-fit, a recipe that cannot fit its budget.
    recipe, plan = plan_within_budget(recipe, notify)
    notify("recipe", {"run_dir": recipe.run_dir, "toml": recipe_to_toml(recipe)})
    notify("plan", plan)

    # Data, then model: a missing file, column or model fails here, and leaves nothing behind.
    splits = data_stage.load_splits(recipe.data, recipe.prompt)
    held_out_split, held_out = evaluate.held_out_rows(recipe, splits=splits) if recipe.eval.enabled else (None, [])
    if recipe.eval.forgetting:
        evaluate.forgetting_texts(recipe.eval.forgetting)  # a missing or unreadable text fails now, not after training
    loaded = model_stage.load_model(recipe.model, recipe.quantization, recipe.train, recipe.method, recipe.prompt)
    if held_out:  # prompts that leave no room for eval.max_new_tokens, found before training
        evaluate.encode_prompts(held_out, recipe, loaded.tokenizer, loaded.is_encoder_decoder)
    train_ds, stats = data_stage.build_examples(
        splits["train"], loaded.tokenizer, recipe.data, recipe.prompt, recipe.train, loaded.is_encoder_decoder
    )
    if stats.rows < recipe.train.micro_batch_size:  # it trained on one batch of them all, planned as a bigger one
        raise UserError(
            f"train.micro_batch_size = {recipe.train.micro_batch_size} is more than the {stats.rows} usable rows of "
            f"data.train ({recipe.data.train}); set train.micro_batch_size to {stats.rows} or less, or add data"
        )
    eval_ds = None
    if "eval" in splits:
        eval_ds, _ = data_stage.build_examples(
            splits["eval"], loaded.tokenizer, recipe.data, recipe.prompt, recipe.train, loaded.is_encoder_decoder,
            split="eval",
        )
    run_dir = create_run_dir(recipe, loaded.device)
    model_stage.attach_method(loaded, recipe)
    trainable, total = model_stage.count_parameters(loaded.model)
    steps = train_stage.planned_steps(recipe.train, stats.rows)
    effective_batch = recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps
    probe = monitor.open_probe(loaded.device)
    notify(
        "setup",
        {
            "device": loaded.device,
            "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."),
            "kind": "encoder-decoder (Seq2SeqTrainer)" if loaded.is_encoder_decoder else "decoder-only (SFTTrainer)",
            "method": recipe.method.kind,
            "optimizer": optimizer,
            "trainable_params": trainable,
            "total_params": total,
            "data": stats,
            "effective_batch": effective_batch,
            "steps": steps,
            "epochs": steps * effective_batch / stats.rows,
            "tokens_per_step": stats.tokens_total / stats.rows * effective_batch,
            "not_measured": probe.missing,
            "held_out": held_out_split and {
                "split": held_out_split, "rows": len(held_out),
                "in_train": data_stage.rows_also_in(held_out, splits["train"], recipe.data.input_column),
            },
        },
    )

    # Train, watching memory; a crossed budget stops with a checkpoint and the adapter saved.
    watcher = monitor.MemoryMonitor(
        run_dir / "memory.jsonl", probe, plan.budget_gib, recipe.budget.on_exceed, notify
    )
    try:
        result = train_stage.train(
            loaded, train_ds, eval_ds, recipe.train, run_dir, resume=resume,
            on_progress=lambda row: notify("progress", row), callbacks=[watcher],
        )
    finally:
        monitor.write_memory_report(run_dir, plan, plan.budget_gib, probe.missing)
    notify("trained", result)
    if watcher.exceeded and recipe.budget.on_exceed == "stop":
        used = monitor.footprint_gib(watcher.exceeded)
        raise BudgetError(
            f"memory budget crossed at step {watcher.exceeded['step']}: {used:.2f} GiB > {plan.budget_gib:g} GiB. "
            f"Trained weights saved to {result.saved_dir} and a checkpoint to {train_stage.last_checkpoint(run_dir)}; "
            f"lower train.micro_batch_size or train.max_length and continue with --resume"
        )
    if result.interrupted and result.steps < result.max_steps:
        raise Interrupted(interrupted_message(recipe))
    write_result(run_dir, recipe, result, trainable, total)  # training is complete: eval and merge may follow
    if result.interrupted:  # Ctrl-C during the last step
        raise Interrupted(interrupted_message(recipe))

    # Base vs tuned on held-out data, then the merged export, then the report of it all.
    evaluation = None
    if recipe.eval.enabled:
        notify("evaluating", {"max_samples": recipe.eval.max_samples})
        evaluation = evaluate.evaluate_run(loaded, recipe, run_dir, train_rows=splits["train"])
        notify("evaluated", evaluation)
    merged = None
    skip = export.nothing_to_merge(recipe)
    if recipe.export.merge and skip:
        notify("merge_skipped", skip)
    elif recipe.export.merge:
        del loaded  # the 4-bit model is not needed while the full-precision copy is merged
        gc.collect()
        notify("merging", {"dtype": recipe.export.dtype, "base": export.merge_base(recipe, recipe.export.base)})
        merged = export.merge_run(run_dir, run_dir / "merged", dtype=recipe.export.dtype, base=recipe.export.base,
                                  force=resume)  # a resumed run's merged/ is its own export of fewer steps: replaced
        notify("merged", merged)
    report_path = report.write_report(run_dir)
    return RunResult(run_dir, result, stats, trainable, total, plan, evaluation, merged, report_path,
                     time.monotonic() - started)


def write_result(run_dir: Path, recipe: Recipe, result: train_stage.TrainResult, trainable: int, total: int) -> None:
    """result.json: what training did, in one small file (compare and other tools read it)."""
    summary = {
        "method": recipe.method.kind, "learning_rate": recipe.train.learning_rate, "steps": result.steps,
        "first_loss": result.first_loss, "last_loss": result.last_loss, "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s, "trainable_params": trainable, "total_params": total,
        "saved_dir": str(result.saved_dir),
    }
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")


def plan_within_budget(recipe: Recipe, notify) -> tuple[Recipe, memory.MemoryPlan]:
    """The memory plan; with a budget it cannot meet, the auto-fitted recipe or a BudgetError with the fix."""
    arch = memory.recipe_arch(recipe)
    plan = memory.plan_from_arch(recipe, arch)
    if plan.fits is not False:
        return recipe, plan
    fitted = memory.fit_to_budget(recipe, arch)
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
    notify("auto_fit", change)
    return new_recipe, memory.plan_from_arch(new_recipe, arch)  # same model and method: same skeleton


def check_run_dir(recipe: Recipe, resume: bool) -> None:
    """Never overwrite a run. With resume, the run must exist and match the recipe, and continues from its last
    checkpoint; one stopped before its first checkpoint starts over in place."""
    run_dir = recipe.run_dir
    saved = run_dir / "recipe.toml"
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"output.dir = {recipe.output.dir}: cannot make the run directory {run_dir}: {existing} is "
                        f"{'not writable' if existing.is_dir() else 'a file, not a folder'}; set output.dir to "
                        f"a folder you can write (--set output.dir=DIR)")
    if not resume:
        if run_dir.exists():
            raise UserError(
                f"run directory {run_dir} already exists; continue it with --resume, or choose a new name "
                f"(--set name=NEW_NAME or --set output.dir=DIR)"
            )
        return
    if not saved.is_file():
        raise UserError(f"--resume: no run at {run_dir} (no recipe.toml there); run without --resume to start it")
    last = train_stage.last_checkpoint(run_dir)
    if last is None:  # stopped before its first checkpoint: nothing to continue, nothing to lose but its logs
        if any((run_dir / d).exists() for d in ("adapter", "model")):
            raise UserError(f"--resume: {run_dir} has trained weights but no checkpoint to continue from; "
                            f"pick a new name to train again (--set name=NEW_NAME)")
        for log in ("metrics.jsonl", "memory.jsonl"):
            (run_dir / log).unlink(missing_ok=True)
        return  # trains from step 0 in the same folder
    changed = changed_settings(recipe)
    if changed:
        raise UserError(
            f"--resume: the recipe differs from the run in {run_dir} ({'; '.join(changed)}); a checkpoint only "
            f"continues the same model, data and adapter. Use a new name to start over"
        )
    done = check_checkpoint(last)
    for log in ("metrics.jsonl", "memory.jsonl"):  # steps after the checkpoint are trained again: logged again
        report.keep_jsonl_rows(run_dir / log, lambda row: row.get("step", 0) <= done)
    if recipe.train.max_steps is not None and done >= recipe.train.max_steps:
        raise UserError(  # the Trainer would run one step past max_steps
            f"--resume: {run_dir} already trained {done} steps ({last.name}) and train.max_steps is "
            f"{recipe.train.max_steps}; raise train.max_steps to train further, or use eval, merge or report on it"
        )


def check_checkpoint(checkpoint: Path) -> int:
    """The step of a checkpoint --resume can load (a crash or a full disk during its save leaves one that is not):
    the trainer state, the weights and, as the Trainer loads them, the optimizer and scheduler states; else an
    error with the command that removes it so the one before it is used."""
    import torch

    path = checkpoint / "trainer_state.json"
    try:
        step = json.loads(path.read_bytes())["global_step"]
        for path in sorted(checkpoint.glob("*.json")) + sorted(checkpoint.glob("*.safetensors")):
            evaluate.read_saved_file(path)
        for path in (checkpoint / "optimizer.pt", checkpoint / "scheduler.pt"):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError):  # torch's errors on a bad file
                raise ValueError("not a PyTorch file that loads") from None  # (theirs suggest weights_only=False)
        return step
    except Exception as e:  # noqa: BLE001 -- OSError, JSON, safetensors and unpickling errors alike
        earlier = [p for p in train_stage.checkpoints(checkpoint.parent.parent) if p != checkpoint]
        fix = (f"remove it to continue from {earlier[-1].name}: rm -r {checkpoint}" if earlier else
               "it is the only checkpoint: start again under a new name (--set name=NEW_NAME)")
        raise UserError(f"--resume: the last checkpoint {checkpoint} cannot be loaded ({path.name}: "
                        f"{error_line(e)}); {fix}") from None


def interrupted_message(recipe: Recipe) -> str:
    """What a Ctrl-C left in the run directory, read from its files, and the command that goes on from there."""
    run_dir = recipe.run_dir
    if not (run_dir / "recipe.toml").is_file():
        return "before training began: nothing was written; run the same command again"
    result = run_dir / "result.json"
    if result.is_file():  # training finished (it is removed when a resumed run trains further)
        done = lambda name: (run_dir / name).is_file() and (run_dir / name).stat().st_mtime >= result.stat().st_mtime
        steps = []
        if recipe.eval.enabled and not done("eval.json"):
            steps.append(f"python -m qlora_lite eval {run_dir}")
        if recipe.export.merge and not export.nothing_to_merge(recipe) and not done("merged/merge_check.json"):
            force = " --force" if (run_dir / "merged").exists() else ""
            steps.append(f"python -m qlora_lite merge {run_dir} --out {run_dir / 'merged'} --dtype {recipe.export.dtype} "
                         f"--base {recipe.export.base}{force}")
        steps.append(f"python -m qlora_lite report {run_dir}")
        saved = next((run_dir / d for d in ("adapter", "model") if (run_dir / d).is_dir()), run_dir)
        return f"after training, which is complete and saved in {saved}; finish with: " + " && ".join(steps)
    last = train_stage.last_checkpoint(run_dir)
    if last is None:
        return (f"before the first checkpoint (train.save_steps = {recipe.train.save_steps}): nothing to keep; "
                f"the same command with --resume starts {run_dir} over")
    return f"during training: {last.name} is kept in {last.parent}; continue from it with the same command and --resume"


def changed_settings(recipe: Recipe, sections=FROZEN_ON_RESUME) -> list[str]:
    """'lora.r: 16 → 8' for each setting of `sections` in which `recipe` differs from its run's saved recipe."""
    before = load_recipe(recipe.run_dir / "recipe.toml", files_must_exist=False)
    changes = []
    for section in sections:
        old, new = dataclasses.asdict(getattr(before, section)), dataclasses.asdict(getattr(recipe, section))
        changes += [f"{section}.{key}: {old[key]!r} → {new[key]!r}" for key in old if old[key] != new[key]]
    return changes


def create_run_dir(recipe: Recipe, device: str) -> Path:
    """<output.dir>/<name> with the resolved recipe and the environment (checked free by check_run_dir)."""
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    (run_dir / "result.json").unlink(missing_ok=True)  # a resumed run trains further: what it said is stale
    write_env(run_dir, device)
    return run_dir


def write_env(run_dir: Path, device: str) -> None:
    """Versions and device, so a result can be reproduced and compared."""
    import torch

    packages = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "qlora_lite"]
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cuda": torch.version.cuda,
        "sections": list(SECTIONS),
    }
    (run_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
