"""Stage 7: render a finished run directory as a Markdown report with two charts. It reads files, it probes nothing.

Inputs: the run's recipe, metrics log, evaluation, samples and memory report (each optional but the recipe).
Outputs: the report, a training-loss chart and a base-vs-tuned chart (file names: rundir.py). A missing or
unreadable piece becomes one line saying so, never an error: a run killed mid-write leaves half a line at the end
of the metrics log, or a truncated JSON file, and the rest is still worth reporting.
"""

from __future__ import annotations

from pathlib import Path

from qlora_lite.errors import UserError, error_line
from qlora_lite.recipe import DataRecipe, Recipe
from qlora_lite.rundir import RunDir, not_a_run, read_eval_json, read_json, read_jsonl

SAMPLES_SHOWN = 3
METRICS_SHOWN = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")


def write_report(run_dir: str | Path) -> Path:
    """Write the run's report (and its charts); returns its path."""
    rd = RunDir(Path(run_dir))
    if not rd.is_run():
        raise UserError(not_a_run(rd))
    recipe = rd.read_recipe()
    lines = [f"# Run report: {recipe.name}", "", "## Recipe", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in recipe_summary(recipe)]
    lines += ["", "## Training", "", *training_section(rd), "", "## Evaluation", "", *evaluation_section(rd)]
    lines += ["", "## Memory", "", *memory_section(rd), "", "## Samples", "", *samples_section(rd), ""]
    rd.report.write_text("\n".join(lines))
    return rd.report


def recipe_summary(recipe: Recipe) -> list[tuple[str, str]]:
    """(what, value) rows describing a run's recipe; the report and the model card show them."""
    q, lora, train, data = recipe.quantization, recipe.lora, recipe.train, recipe.data
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    length = (f"decoder-only: {train.max_length} tokens; encoder-decoder: source {train.max_source_length}, "
              f"target {train.max_target_length}")
    schedule = f"{train.max_steps} steps" if train.max_steps is not None else f"{train.epochs or 1.0} epochs"
    splits = ", ".join(f"{s}: {Path(v).name if '/' in v else v}" for s in ("train", "eval", "test")
                       if (v := getattr(data, s)) is not None)
    return [
        ("base model", f"`{recipe.model.name}`" + (f" ({recipe.model.gguf_file})" if recipe.model.gguf_file else "")),
        ("method", method_summary(recipe)),
        ("quantization", f"4-bit {q.quant_type}, double quant {'on' if q.double_quant else 'off'}, compute "
                         f"{q.compute_dtype}" if recipe.load_in_4bit
                         else f"none (16/32-bit base, compute {q.compute_dtype})"),
        ("LoRA", f"r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, targets {targets}"
                 + "".join(f", {v}" for v in lora_variants(recipe)) if recipe.method.spec.uses_lora else "not used"),
        ("training", f"{schedule}, micro-batch {train.micro_batch_size} x {train.gradient_accumulation_steps} "
                     f"accumulation, lr {train.learning_rate:g} {train.lr_scheduler}, seed {train.seed}"),
        ("lengths", length),
        ("data", f"{data.source + ': ' if data.source else ''}{splits}; {data_columns(data)}"
                 + "".join(f"; mixed in: {Path(m.train).name} ({m.weight:.0%})" for m in data.mix)),
        ("prompt", "`" + recipe.prompt.template.replace("\n", "\\n").replace("|", "\\|") + "`"
                   + (" in the chat template" if recipe.prompt.chat_template else "")),
    ]


def data_columns(data: DataRecipe) -> str:
    """How rows become examples, in a few words: "dialogue -> summary", or a conversation's trained turns."""
    if data.format == "messages":
        return f"conversations in {data.messages_column}, loss on {data.train_on} assistant turns"
    return f"{data.input_column} -> {data.target_column}"


def lora_variants(recipe: Recipe) -> list[str]:
    """The LoRA variants a recipe turns on, as the report names them."""
    lora, ratio = recipe.lora, recipe.train.loraplus_lr_ratio
    return ([name for name, on in (("rsLoRA", lora.use_rslora), ("DoRA", lora.use_dora)) if on]
            + ([f"init {lora.init}"] if lora.init != "default" else [])
            + ([f"LoRA+ (lora_B at {ratio:g}x the rate)"] if ratio is not None else []))


def method_summary(recipe: Recipe) -> str:
    spec = recipe.method.spec
    if spec.trains == "soft prompt":
        return f"{spec.summary}, {recipe.method.num_virtual_tokens} virtual tokens"
    return spec.summary


def metrics_table(report: dict) -> list[str]:
    """Markdown rows of eval.json's base, few-shot base and tuned metrics, in percent."""
    keys = shown_metrics(report)
    lines = [f"{report.get('n', '?')} examples of the {report.get('split', '?')} split.", "",
             "| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    rows = {"base": report["base"], **shot_rows(report, keys), "tuned": report["tuned"]}
    for model, scores in rows.items():
        lines.append(f"| {model} | " + " | ".join(f"{100 * scores[k]:.2f}" for k in keys) + " |")
    return lines


def shot_rows(report: dict, keys: list[str]) -> dict[str, dict]:
    """{"base, 3-shot": scores} for eval.json's few-shot baselines but 0-shot (the base row), those with every
    metric in `keys`."""
    shots = report.get("shots") if isinstance(report.get("shots"), dict) else {}
    return {f"base, {k}-shot": scores for k, scores in shots.items() if k != "0" and isinstance(scores, dict)
            and all(isinstance(scores.get(key), (int, float)) for key in keys)}


def shown_metrics(report: dict) -> list[str]:
    """The metrics of METRICS_SHOWN both models have a number for: a damaged eval.json must not break the table."""
    return [k for k in METRICS_SHOWN if all(isinstance(report[m].get(k), (int, float)) for m in ("base", "tuned"))]


# ---------------------------------------------------------------- sections


def training_section(rd: RunDir) -> list[str]:
    name = rd.metrics.name
    if not rd.metrics.is_file():
        return [f"No {name}: training has not logged a step."]
    rows, skipped = read_jsonl(rd.metrics)
    rows = [r for r in rows if "step" in r]
    note = [f"Skipped {skipped} unreadable line(s) of {name} (not a JSON object: a run stopped while "
            f"writing leaves half a line).", ""] if skipped else []
    # A resumed run logs some steps again: the later line wins.
    steps = sorted({r["step"]: r["loss"] for r in rows if "loss" in r and r.get("event") != "end"}.items())
    if not steps:
        return [*note, f"{name} has no training loss yet."]
    evals = sorted({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}.items())
    plot_lines(rd.loss_png, {"train loss": steps, **({"eval loss": evals} if evals else {})},
               xlabel="step", ylabel="loss")
    if not rd.training_finished():
        note += [f"**Training has not finished**: the last logged step is {steps[-1][0]}; the recipe's schedule "
                 f"above is what it was meant to train (continue it with `run RECIPE --resume`).", ""]
    return [*note, f"Loss {steps[0][1]:.4f} at step {steps[0][0]}, {steps[-1][1]:.4f} at step {steps[-1][0]}.", "",
            f"![training loss]({rd.loss_png.name})", *repeatability(rd)]


def repeatability(rd: RunDir) -> list[str]:
    """What a second run with the same seed gives, as result.json recorded it for the run's device."""
    try:
        result = read_json(rd.result)
    except (OSError, ValueError):
        return []
    said = result.get("reproducible")
    if not isinstance(said, dict):
        return []
    same = "the same losses, weights and scores bit for bit" if said.get("bitwise") else "close, not identical numbers"
    return ["", f"Repeatability: seed {result.get('seed')}; a repeat of this run gives {same} ({said.get('why')})."]


def evaluation_section(rd: RunDir) -> list[str]:
    path = rd.eval_json()
    if not path.is_file():
        return [f"No {path.name}: the run has not been evaluated (`python -m qlora_lite eval RUN_DIR`)."]
    try:
        report = read_eval_json(path)
    except (OSError, ValueError) as e:
        return [f"{path.name} cannot be read ({error_line(e)}): re-run `python -m qlora_lite eval {rd}`."]
    keys = shown_metrics(report)
    groups = {"base": report["base"], **shot_rows(report, keys), "tuned": report["tuned"]}
    plot_bars(rd.rouge_png, keys, {m: [100 * scores[k] for k in keys] for m, scores in groups.items()})
    lines = metrics_table(report) + ["", f"![base vs tuned]({rd.rouge_png.name})"]
    lines += fewshot_lines(report)
    if report.get("in_train"):
        lines += ["", f"**{report['in_train']} of the {report.get('n')} held-out examples also appear in the training "
                      f"data** (the same input text): their scores measure memory, not generalization."]
    generation = report.get("generation")
    if generation:
        lines += ["", "Generation: " + ", ".join(f"{k} {v}" for k, v in generation.items()) + "."]
    if report.get("forgetting"):
        f = report["forgetting"]
        lines += ["", f"Forgetting on `{f['source']}` ({f['tokens']} tokens): loss {f['base_loss']:.4f} -> "
                      f"{f['tuned_loss']:.4f}, perplexity {f['base_perplexity']:.2f} -> {f['tuned_perplexity']:.2f} "
                      f"({f['perplexity_change_pct']:+.1f}%)."]
    lines += knowledge_lines(report.get("knowledge"))
    return lines


def fewshot_lines(report: dict) -> list[str]:
    """What the base, k-shot rows are, and how many prompts dropped examples to fit."""
    shots = report.get("shots")
    if not isinstance(shots, dict) or not any(k != "0" for k in shots):
        return []
    seed = (report.get("fewshot") or {}).get("seed")
    lost = [f"{s['rows_lost_examples']} {k}-shot prompts dropped examples to fit train.max_length"
            for k, s in shots.items() if isinstance(s, dict) and s.get("rows_lost_examples")]
    return ["", f"base, k-shot: the base model with k training examples (drawn once with seed {seed}, the same for "
                f"every row, never the row itself) before each prompt: what prompting alone gives, no training."
                + "".join(f" {line}." for line in lost)]


def knowledge_lines(found) -> list[str]:
    """Base -> tuned accuracy on the knowledge probe with its 95% interval, and what chance is."""
    from qlora_lite.knowledge import KnowledgeScore, compare_text

    try:
        base, tuned = KnowledgeScore.from_json(found["base"]), KnowledgeScore.from_json(found["tuned"])
    except (KeyError, TypeError):
        return [] if found is None else ["", "The knowledge probe's scores in eval.json cannot be read."]
    text = compare_text(base, tuned)
    near_chance = all(s.ci_low <= s.chance <= s.ci_high for s in (base, tuned))
    note = ("Near-chance accuracy is expected of a small model, not a fault; on a larger one a drop beyond the "
            "intervals is general knowledge the tuning cost." if near_chance else
            "A drop beyond the intervals is general knowledge the tuning cost.")
    return ["", f"{text[0].upper()}{text[1:]}. Questions from `{Path(str(found.get('file'))).name}`; chance is "
                f"1 / the number of choices. {note}"]


def memory_section(rd: RunDir) -> list[str]:
    name = rd.memory_report.name
    if not rd.memory_report.is_file():
        return [f"No {name} in the run directory."]
    try:
        memory = read_json(rd.memory_report)
    except (OSError, ValueError) as e:
        return [f"{name} cannot be read ({error_line(e)}); only training writes it, so this run's "
                f"memory summary is lost ({rd.memory_log.name} keeps the measurements of each logged step)."]
    found = []
    if isinstance(memory.get("peak_gib"), (int, float)):
        found.append(f"peak {memory['peak_gib']:.2f} GiB ({memory.get('peak_source', 'measured')})")
    if isinstance(rss := memory.get("measured", {}).get("rss_peak_gib"), (int, float)):
        found.append(f"process RSS {rss:.2f} GiB (host memory)")
    if isinstance(memory.get("budget_gib"), (int, float)):
        found.append(f"budget {memory['budget_gib']:.2f} GiB, headroom {memory.get('headroom_gib') or 0:.2f} GiB")
    if not found:
        return [f"{name} has no peak_gib or budget_gib."]
    return [", ".join(found) + ".", "", *[f"Not measured: {m}." for m in memory.get("missing", [])],
            "", f"Per component, predicted vs measured: {rd.memory_report_md.name}."]


def samples_section(rd: RunDir) -> list[str]:
    path = rd.samples()
    if not path.is_file():
        return [f"No {path.name}: the run has not been evaluated."]
    try:
        examples = path.read_text(encoding="utf-8").split("\n## ")[1 : SAMPLES_SHOWN + 1]
    except (OSError, ValueError) as e:
        return [f"{path.name} cannot be read ({error_line(e)}): re-run `python -m qlora_lite eval {rd}`."]
    if not examples:
        return [f"{path.name} has no examples."]
    return [f"The first {len(examples)} (all in {path.name}).", ""] + [
        "### " + example.strip() + "\n" for example in examples
    ]


# ---------------------------------------------------------------- charts


def plot_lines(path: Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bars(path: Path, keys: list[str], groups: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(groups)
    for i, (label, values) in enumerate(groups.items()):
        ax.bar([k + (i - (len(groups) - 1) / 2) * width for k in range(len(keys))], values, width, label=label)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("score (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
