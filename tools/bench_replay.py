"""Does replaying general data guard against forgetting? The same run with and without [[data.mix]], side by side
in one process: the main task's ROUGE-L (base and tuned), the forgetting probe (loss and perplexity on general text,
base and tuned), and each source's eval loss after training.

    python tools/bench_replay.py                              # about 12 minutes on 2 CPU cores
    python tools/bench_replay.py --recipe recipes/chatsum_replay.toml --set train.max_steps=30

The recipe must have [[data.mix]] tables and eval.forgetting; the run "without" is the same recipe with the mix
removed, so both take the same optimizer steps of the same batch size (the replay run sees fewer examples of the
main task: that is the price of replay). Merge and export are off. Ratios matter, not seconds: this machine is
shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_lite.cli import quiet_libraries, work_offline_without_network  # noqa: E402
from qlora_lite.recipe import UserError, load_recipe  # noqa: E402
from qlora_lite.rundir import read_json  # noqa: E402


def one_run(recipe, out: Path, name: str) -> dict:
    from qlora_lite.run import run

    recipe = dataclasses.replace(recipe, name=name, output=dataclasses.replace(recipe.output, dir=str(out)))
    result = run(recipe)
    evaluation, saved = result.evaluation, read_json(result.run_dir / "result.json")
    return {"rouge_base": 100 * evaluation.base["rougeL"], "rouge_tuned": 100 * evaluation.tuned["rougeL"],
            "forgetting": evaluation.forgetting, "rows": saved.get("rows_per_source", {}),
            "eval_loss": saved.get("eval_loss_per_source", {}), "seconds": result.train.train_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/chatsum_replay.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value")
    args = parser.parse_args()
    work_offline_without_network()
    quiet_libraries(False)
    recipe = load_recipe(args.recipe, [*args.overrides, "export.merge=false"])
    if not recipe.data.mix or not recipe.eval.forgetting or not recipe.eval.enabled:
        raise UserError(f"{args.recipe}: needs [[data.mix]] tables, eval.enabled and eval.forgetting")
    without = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, mix=()))
    with tempfile.TemporaryDirectory() as folder:
        runs = {"without replay": one_run(without, Path(folder), "without"),
                "with replay": one_run(recipe, Path(folder), "with")}
    t = recipe.train
    mix = ", ".join(f"{Path(m.train).parent.name}/{Path(m.train).name} {100 * m.weight:.0f}%" for m in recipe.data.mix)
    print(f"{args.recipe}: {t.max_steps or t.epochs} {'steps' if t.max_steps else 'epochs'}, micro-batch "
          f"{t.micro_batch_size} x accumulation {t.gradient_accumulation_steps}, seed {t.seed}; mixed in: {mix}")
    print(f"forgetting probe: {Path(recipe.eval.forgetting).name}; ROUGE-L on {recipe.eval.max_samples or 'all'} "
          f"held-out rows of the main task")
    keys = sorted({k for r in runs.values() for k in r["eval_loss"]})
    header = (f"{'':15} {'train s':>8} {'ROUGE-L base':>13} {'tuned':>6} {'gain':>6} {'general loss base':>18} "
              f"{'tuned':>7} {'perplexity':>11}" + "".join(f" {'eval loss ' + k:>22}" for k in keys))
    print(header)
    for name, r in runs.items():
        f = r["forgetting"]
        losses = "".join(f" {r['eval_loss'][k]:>22.4f}" if k in r["eval_loss"] else f" {'-':>22}" for k in keys)
        print(f"{name:15} {r['seconds']:>8.1f} {r['rouge_base']:>13.2f} {r['rouge_tuned']:>6.2f} "
              f"{r['rouge_tuned'] - r['rouge_base']:>+6.2f} {f.base_loss:>18.4f} {f.tuned_loss:>7.4f} "
              f"{f.perplexity_change_pct:>+10.1f}%" + losses)
    rows = runs["with replay"]["rows"]
    print("examples drawn with replay: " + ", ".join(f"{k} {v}" for k, v in rows.items()))
    a, b = runs["without replay"]["forgetting"], runs["with replay"]["forgetting"]
    if a.loss_change <= 0 and b.loss_change <= 0:
        verdict = "neither run lost general modelling (the loss fell in both): nothing for replay to prevent here"
    else:
        verdict = f"replay forgot {'less' if b.loss_change < a.loss_change else 'no less'} at this scale"
    print(f"general-text loss change: {a.loss_change:+.4f} without, {b.loss_change:+.4f} with replay: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
