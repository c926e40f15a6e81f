"""Compare fine-tuning methods on one recipe: the same data, seed, steps and evaluation, one run per method.

`compare(recipe, methods)` runs `run.run` once per method into its own run directory under
rundir.compare_dir and then summarizes those run directories from their files alone (the training result, the
memory report, the evaluation and the saved weights), so a comparison can be continued (`resume`) or re-rendered
without training again. Outputs: the comparison as JSON, Markdown and a chart beside the runs.

Only the learning rate differs between methods, because one rate cannot suit all: full fine-tuning diverges at a
LoRA rate and prompt tuning barely moves at it. Each method trains at the recipe's rate times its `lr_scale` in
methods.METHODS.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qlora_lite import evaluate, events
from qlora_lite import run as run_stage
from qlora_lite.errors import BudgetError, Interrupted, UserError, error_line
from qlora_lite.methods import METHODS
from qlora_lite.recipe import Recipe
from qlora_lite.rundir import RunDir, compare_dir, comparison_files, read_eval_json, read_json

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def method_recipe(recipe: Recipe, kind: str) -> Recipe:
    """The recipe as `kind` trains it: own run directory, scaled learning rate, no merged export (it is not
    compared, and merging a 7B copy per method would cost minutes and gigabytes)."""
    return dataclasses.replace(
        recipe.with_method(kind),
        name=kind,
        train=dataclasses.replace(recipe.train, learning_rate=recipe.train.learning_rate * METHODS[kind].lr_scale),
        export=dataclasses.replace(recipe.export, merge=False),
        output=dataclasses.replace(recipe.output, dir=str(compare_dir(recipe))),
    )


def compare(recipe: Recipe, methods: list[str], *, resume: bool = False,
            notify: events.Notify = events.ignore) -> dict:
    """Run each method (skipping, with `resume`, those already finished) and write the comparison files."""
    out = compare_dir(recipe)
    if out.exists() and not resume:
        raise UserError(f"{out} already exists; continue that comparison with --resume (finished methods are kept), "
                        f"or choose a new name (--set name=NEW_NAME)")
    if not recipe.eval.enabled:
        raise UserError("compare scores each method with ROUGE: set [eval] enabled = true")
    for kind in methods:  # every method kept or continued must share the data, steps and evaluation
        sub = method_recipe(recipe, kind)
        if RunDir(sub.run_dir).is_run():
            changed = run_stage.changed_since(sub, (*run_stage.FROZEN_ON_RESUME, "train", "eval"))
            if changed:
                raise UserError(f"--resume: the {kind} run in {sub.run_dir} used other settings "
                                f"({'; '.join(changed)}); its results would not compare with the others. Compare "
                                f"under a new name (--set name=NEW_NAME) to run every method again")
    refused = {}
    for kind in methods:
        sub = method_recipe(recipe, kind)
        rd = RunDir(sub.run_dir)
        if rd.training_finished() and rd.eval_json().is_file():
            notify(events.MethodKept(kind, rd.path))
            continue
        notify(events.MethodStarted(kind, sub.train.learning_rate, rd.path))
        try:
            if rd.training_finished():  # stopped (Ctrl-C, a crash) between training and its evaluation
                evaluate_trained(rd.path, notify)
            else:  # a started run continues from its last checkpoint, or starts over in place without one
                run_stage.run(sub, resume=rd.is_run(), notify=notify)
        except BudgetError as e:  # e.g. full fine-tuning over the budget: that is a result, not a failure
            refused[kind] = str(e)
            notify(events.MethodRefused(kind, str(e)))
        except (KeyboardInterrupt, Interrupted):
            raise Interrupted(f"during the {kind} run ({sub.run_dir}); what finished is kept: continue the comparison "
                              f"with the same command and --resume") from None
    comparison = {
        "recipe": recipe.name,
        "methods": {kind: summarize(out / kind) for kind in methods if kind not in refused},
        "refused": refused,
    }
    write_comparison(out, comparison)
    return comparison


def evaluate_trained(run_dir: Path, notify: events.Notify) -> None:
    recipe, loaded = evaluate.load_run(run_dir)
    notify(events.Evaluating(recipe.eval.max_samples))
    notify(events.Evaluated(evaluate.evaluate_run(loaded, recipe, run_dir)))


def summarize(run_dir: Path) -> dict:
    """One method's row, read from its run directory."""
    rd = RunDir(run_dir)
    result = read_run_file(rd.result)
    memory = read_run_file(rd.memory_report)
    evaluation = read_run_file(rd.eval_json(), read_eval_json)
    measured = memory["measured"]
    forgetting = evaluation.get("forgetting") or {}
    return {
        "run_dir": str(run_dir),
        "learning_rate": result["learning_rate"],
        "trainable_params": result["trainable_params"],
        "total_params": result["total_params"],
        "trainable_pct": 100 * result["trainable_params"] / result["total_params"],
        "peak_gib": memory["peak_gib"],  # measured on a GPU, else predicted (peak_source says which)
        "peak_source": memory["peak_source"],
        "predicted_peak_gib": memory["predicted"]["peak_gib"],
        "measured_peak_gib": measured.get("process_peak_gib") or measured.get("device_peak_gib")
        or measured.get("peak_reserved_gib"),
        "cpu_rss_peak_gib": measured.get("rss_peak_gib"),
        "seconds_per_step": result["train_seconds"] / max(result["steps"], 1),
        "tokens_per_s": result["tokens_per_s"],
        "stored": result["saved_dir"],
        "stored_bytes": stored_bytes(Path(result["saved_dir"])),
        "first_loss": result["first_loss"],
        "last_loss": result["last_loss"],
        **{key: evaluation["tuned"][key] for key in ROUGE_KEYS},
        "base": {key: evaluation["base"][key] for key in ROUGE_KEYS},
        "rougeL_gain": evaluation["tuned"]["rougeL"] - evaluation["base"]["rougeL"],
        "shots": {k: {key: scores[key] for key in ROUGE_KEYS} for k, scores in (evaluation.get("shots") or {}).items()
                  if k != "0"},  # the base model prompted with k training examples: no training at all
        "base_model": "4-bit base" if rd.read_recipe().load_in_4bit else "16-bit base",
        "forgetting_loss_change": forgetting.get("loss_change"),
        "forgetting_perplexity_change_pct": forgetting.get("perplexity_change_pct"),
    }


def read_run_file(path: Path, reader=read_json) -> dict:
    """A run's JSON file, or one error that names it and the command that writes it again."""
    try:
        return reader(path)
    except (OSError, ValueError) as e:
        again = (f"evaluate again with python -m qlora_lite eval {path.parent}"
                 if path == RunDir(path.parent).eval_json() else
                 "training writes it: compare under a new name (--set name=NEW_NAME) to train this method again")
        raise UserError(f"{path}: cannot read it ({error_line(e)}); {again}") from None


def stored_bytes(folder: Path) -> int:
    """What must be kept per task: the adapter's weights, or the whole fine-tuned model's."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ---------------------------------------------------------------- files


def write_comparison(out: Path, comparison: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    as_json, as_md, png = comparison_files(out)
    as_json.write_text(json.dumps(comparison, indent=2) + "\n")
    plot_comparison(png, comparison["methods"])
    as_md.write_text(markdown(comparison, png.name))


FAMILY_ORDER = ("selective", "reparameterization", "additive")


def table_rows(methods: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by comparison.md and the CLI's rich table (a column per method there): methods
    grouped by PEFT family (methods.METHODS), in the order they were asked for within a family."""
    header = ["method", "family", "trainable", "peak predicted", "peak measured", "s/step", "tokens/s",
              "stored per task", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "ROUGE-L vs base", "forgetting"]
    rows = []
    for kind in sorted(methods, key=lambda k: FAMILY_ORDER.index(METHODS[k].family)):
        m = methods[kind]
        measured = (f"{m['measured_peak_gib']:.2f} GiB" if m["measured_peak_gib"] is not None
                    else f"CPU RSS {m['cpu_rss_peak_gib']:.2f} GiB" if m["cpu_rss_peak_gib"] is not None else "-")
        forgetting = ("-" if m["forgetting_perplexity_change_pct"] is None
                      else f"{m['forgetting_perplexity_change_pct']:+.1f}% ppl")
        rows.append([
            kind, METHODS[kind].family, f"{m['trainable_params']:,} ({m['trainable_pct']:.2f}%)",
            f"{m['predicted_peak_gib']:.2f} GiB",
            measured, f"{m['seconds_per_step']:.2f}", f"{m['tokens_per_s']:,.0f}", human_bytes(m["stored_bytes"]),
            *(f"{100 * m[k]:.2f}" for k in ROUGE_KEYS), f"{100 * m['rougeL_gain']:+.2f}", forgetting,
        ])
    return header, rows + shot_rows(methods)


def shot_rows(methods: dict) -> list[list[str]]:
    """With [eval] shots: the base model prompted with 0, 1, ... training examples, once per base (methods on one
    base share these scores), as rows that cost no training."""
    rows, seen = [], set()
    for m in methods.values():
        if not m.get("shots") or m["base_model"] in seen:
            continue
        seen.add(m["base_model"])
        for k, scores in {"0": m["base"], **m["shots"]}.items():
            gain = scores["rougeL"] - m["base"]["rougeL"]
            rows.append([f"{m['base_model']}, {k}-shot", "prompting", "0 (no training)", *["-"] * 5,
                         *(f"{100 * scores[key]:.2f}" for key in ROUGE_KEYS), f"{100 * gain:+.2f}", "-"])
    return rows


def markdown(comparison: dict, png: str) -> str:
    header, rows = table_rows(comparison["methods"])
    lines = [
        f"# Method comparison: {comparison['recipe']}", "",
        "Same data, seed, steps and evaluation for every method; learning rate = the recipe's x "
        + ", ".join(f"{k} {METHODS[k].lr_scale:g}" for k in comparison["methods"]) + ". "
        "Peak predicted: the planner's figure for a CUDA GPU. Peak measured: the GPU's, or the process RSS when "
        "trained on CPU (not comparable with a GPU figure). ROUGE in percent on the tuned model; "
        "forgetting: change in perplexity on general text (needs [eval] forgetting). Families: selective trains "
        "original weights (a subset, or all of them), reparameterization a low-rank form of the update (LoRA), "
        "additive new parameters (soft prompts, IA3 vectors).", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows), "",
        *(f"- **{kind}** did not run: {reason}" for kind, reason in comparison["refused"].items()),
        "", f"![comparison]({png})", "",
    ]
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def plot_comparison(path: Path, methods: dict) -> None:
    """Four panels: trainable share, peak memory, time per step, ROUGE-L base vs tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(methods)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    panels = [
        (axes[0][0], "trainable parameters (%)", {"trainable": [methods[k]["trainable_pct"] for k in kinds]}),
        (axes[0][1], "predicted GPU peak (GiB)", {"predicted": [methods[k]["predicted_peak_gib"] for k in kinds]}),
        (axes[1][0], "seconds per step", {"train": [methods[k]["seconds_per_step"] for k in kinds]}),
        (axes[1][1], "ROUGE-L (%)", {"base": [100 * methods[k]["base"]["rougeL"] for k in kinds],
                                     "tuned": [100 * methods[k]["rougeL"] for k in kinds]}),
    ]
    for ax, title, groups in panels:
        width = 0.8 / len(groups)
        for i, (label, values) in enumerate(groups.items()):
            ax.bar([x + (i - (len(groups) - 1) / 2) * width for x in range(len(kinds))], values, width, label=label)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=8)
    axes[0][0].set_yscale("log")  # 0.01% next to 100%
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
