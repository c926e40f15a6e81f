"""The command line: parse, call one stage function, render its result with rich. The only module that prints.
Modules that import torch (run, evaluate, export, compare) are imported by the command that needs them, so `plan`
and a recipe error answer in a fraction of a second.

User errors (recipe, data, model name, run directory, budget) print one message and exit with their code
(2, or 3 for budgets); anything else is a bug and keeps its traceback (shown in full with --debug).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import warnings
from urllib.parse import urlparse

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qlora_lite import dist, events, memory
from qlora_lite.errors import Interrupted, UserError
from qlora_lite.methods import METHODS
from qlora_lite.recipe import load_recipe, parse_methods
from qlora_lite.report import write_report
from qlora_lite.rundir import MERGE_CHECK, MODEL_CARD, compare_dir, comparison_files, interrupted_message

console = Console()
err_console = Console(stderr=True)


def quiet_libraries(debug: bool) -> None:
    """Keep library chatter (progress bars, deprecation notes, bitsandbytes' kernel hub notice) off the screen."""
    if debug:
        logging.basicConfig(level=logging.INFO)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # it logs a parser error it then raises: data.py names it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")  # transformers' progress bars follow HF_HUB_DISABLE_PROGRESS_BARS: no import here
    warnings.filterwarnings("default", module="qlora_lite")  # ours, or a library's about how we call it: a bug to see
    for name in ("bitsandbytes", "transformers", "datasets", "peft", "trl", "accelerate", "torch", "huggingface_hub",
                 "kernels"):  # kernels: bitsandbytes' kernel hub, which warns about its trust check when offline
        logging.getLogger(name).setLevel(logging.ERROR)


def work_offline_without_network(timeout: float = 2.0) -> bool:
    """Set HF_HUB_OFFLINE=1 when the hub's host does not even resolve; returns whether it did.

    Without a network, huggingface_hub retries every lookup five times (~23 s) before the cache is asked, so an
    offline user waited half a minute for "model not found". One DNS lookup (milliseconds) decides it up front;
    local folders and the hub cache keep working. Must run before transformers or datasets are imported.
    """
    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return False  # the user decided, or a proxy resolves names for us
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    found: list = []
    lookup = threading.Thread(target=_resolves, args=(host, found), daemon=True)
    lookup.start()
    lookup.join(timeout)
    if found:
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    return True


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _resolves(host: str, found: list) -> None:
    try:
        found.append(socket.getaddrinfo(host, 443))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `run --nproc N` hands them to torchrun
    work_offline_without_network()
    quiet_libraries(args.debug)
    if not dist.launched():
        return command(args)
    if args.command != "run":
        if dist.is_main():
            err_console.print(f"[bold red]error:[/] {args.command} runs in one process; only `run` trains on "
                              f"several (start it without torchrun)", highlight=False, soft_wrap=True)
        return 2
    # One of several processes (torchrun): rank 0 speaks for all; another rank prints only an error that struck
    # it alone. Under `run --nproc` the launcher exits with the outcome's code, so ranks that agreed on it exit 0
    # (torchrun would otherwise print a failure report for an ordinary user error).
    code = 1  # a bug: its traceback is printed, and the ranks waiting for rank 0 leave with 1
    try:
        code = command(args)
    except dist.FollowerExit as e:
        code = e.exit_code
    finally:
        dist.announce(code)
        dist.finish()
    if dist.is_main():
        dist.write_status(code)
    agreed = not args.alone
    return 0 if agreed and os.environ.get(dist.STATUS_FILE) else code


def command(args) -> int:
    """The command's exit status; a user error printed in one message (by rank 0 when several processes run)."""
    args.alone = False
    try:
        return args.func(args)
    except UserError as e:
        alone = getattr(e, "alone", False)
        if dist.is_main() or alone:
            rank = "" if dist.is_main() else f"rank {dist.rank()}: "
            if isinstance(e, Interrupted):
                err_console.print(f"[yellow]interrupted[/] {rank}{escape(str(e))}", highlight=False, soft_wrap=True)
            else:
                err_console.print(f"[bold red]error:[/] {rank}{escape(str(e))}", highlight=False, soft_wrap=True)
        if alone:
            args.alone = True
            dist.write_status(e.exit_code)
        return e.exit_code
    except RuntimeError:  # gloo's "connection closed by peer", NCCL's DistBackendError: another rank left
        code = dist.reported()
        if code is None:  # no rank said why: a bug, with its traceback
            raise
        return code  # that rank said why, once; torchrun ends this process if it is still waiting
    except KeyboardInterrupt:  # run and compare say what was kept (Interrupted); a merge may have written part
        partial = args.command == "merge" and os.path.exists(args.out)
        hint = f": {args.out} may hold part of the export; merge again with --force" if partial else ""
        if dist.is_main():
            err_console.print(f"[yellow]interrupted[/]{hint}")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora_lite",
        description="Fine-tune a language model with QLoRA on one consumer GPU, knowing beforehand that it fits.",
    )
    parser.add_argument("--debug", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train (and evaluate, export) as the recipe says")
    add_recipe_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue an existing run from its last checkpoint")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N GPUs at once (DDP, one process per GPU, started through torchrun); on a CPU, "
                        "N processes that share its cores")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="base vs fine-tuned on held-out data (ROUGE; BLEU and forgetting where asked)")
    p.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    p.add_argument("--split", choices=["test", "eval"], default=None, help="held-out split (default: eval.split)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge the adapter into a full-precision copy of the base and verify it")
    p.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    p.add_argument("--out", required=True, help="folder for the merged model (refused if not empty)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--base", choices=["dequantized", "original"], default="dequantized",
                   help="dequantized: into the NF4-rounded base the adapter trained against; original: untouched")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (other files are kept)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write the merged model as a GGUF file for llama.cpp and Ollama, and verify it")
    p.add_argument("run_dir", help="a run directory, e.g. runs/quickstart (its merged/ must hold a verified merge)")
    p.add_argument("--gguf", required=True, metavar="TYPE", help="f16, bf16 or q8_0 (for Q4_K_M: write f16, then "
                   "llama.cpp's llama-quantize)")
    p.add_argument("--out", default=None, help="folder for the .gguf, its check, Modelfile and README (default: "
                                               "RUN_DIR/gguf-TYPE)")
    p.add_argument("--merged", default=None, metavar="DIR", help="the merged model to convert, when `merge --out` "
                                                                  "wrote it elsewhere (default: RUN_DIR/merged)")
    p.add_argument("--force", action="store_true", help="replace an earlier export's files in --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write the run's report (recipe, loss curve, ROUGE chart, memory, samples)")
    p.add_argument("run_dir", help="a run directory, e.g. runs/quickstart")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plan", help="predict peak GPU memory from the recipe and the model config (no weights)")
    add_recipe_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (memory in GiB)")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="plan each GPU of a run on N GPUs (DDP)")
    p.add_argument("--method", default=None, metavar="METHODS",
                   help=f"plan for these methods instead of [method] kind: {', '.join(METHODS)}, "
                        "comma-separated, or all (side by side)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="train the recipe with several methods and compare memory, speed, ROUGE")
    add_recipe_arguments(p)
    p.add_argument("--methods", default="all", help=f"comma-separated from {', '.join(METHODS)} (default all)")
    p.add_argument("--resume", action="store_true", help="continue a comparison: finished methods are kept")
    p.set_defaults(func=cmd_compare)
    return parser


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a TOML recipe, e.g. recipes/quickstart.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.max_steps=30 (repeatable)")


def cmd_eval(args) -> int:
    from qlora_lite.evaluate import evaluate_run, load_run

    recipe, loaded = load_run(args.run_dir)
    with console.status(f"generating with the base and the tuned model on the {args.split or recipe.eval.split} split"):
        result = evaluate_run(loaded, recipe, args.run_dir, split=args.split)
    console.print(eval_table(result))
    console.print(f"wrote {result.eval_json} and {result.samples_md}")
    return 0


def cmd_merge(args) -> int:
    """Exit 4 when the merged model does not reproduce its reference's logits (the files are kept to inspect)."""
    from qlora_lite.export import merge_run

    with console.status(f"merging into the {args.base} base ({args.dtype})"):
        result = merge_run(args.run_dir, args.out, dtype=args.dtype, base=args.base, force=args.force)
    render_merge(result)
    return 0 if result.check.passed else 4


def cmd_export(args) -> int:
    """Exit 4 when the file does not reproduce the merged model's tokens and logits (it is kept to inspect)."""
    from qlora_lite.gguf_export import export_run

    with console.status(f"writing {args.gguf} GGUF and loading it back to check it"):
        result = export_run(args.run_dir, args.gguf, args.out, merged_dir=args.merged, force=args.force)
    render_gguf(result)
    return 0 if result.check.passed else 4


def cmd_report(args) -> int:
    console.print(f"wrote {write_report(args.run_dir)}")
    return 0


def eval_table(result) -> Table:
    cut = f" ({result.prompts_truncated} prompts cut to fit train.max_length)" if result.prompts_truncated else ""
    cut += "; base outputs from an identical earlier evaluation (cache)" if result.base_from_cache else ""
    shots = {k: scores for k, scores in result.shots.items() if k}  # 0-shot is the base column
    lost = [f"{s['rows_lost_examples']} {k}-shot prompts dropped examples to fit" for k, s in shots.items()
            if s["rows_lost_examples"]]
    table = Table(title=f"{result.split} split, {result.n} examples{cut}, greedy, max_new_tokens "
                        f"{result.max_new_tokens}; scores in % ({result.eval_json.name}: fractions)",
                  title_justify="left", caption_justify="left",
                  caption="base, k-shot: the base model with k training examples before each prompt (no training)"
                          + "".join(f"; {line}" for line in lost) if shots else None)
    for col in ("metric", "base", *(f"base, {k}-shot" for k in shots), "tuned", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    blank = [""] * len(shots)
    for metric, base in result.base.items():
        tuned = result.tuned[metric]
        colour = "green" if tuned > base else "red"
        table.add_row(metric, f"{100 * base:.2f}", *(f"{100 * s[metric]:.2f}" for s in shots.values()),
                      f"{100 * tuned:.2f}", f"[{colour}]{100 * (tuned - base):+.2f}[/]")
    f = result.forgetting
    if f is not None:
        table.add_row("forgetting: perplexity", f"{f.base_perplexity:.2f}", *blank, f"{f.tuned_perplexity:.2f}",
                      f"{f.perplexity_change_pct:+.1f}%")
    if result.knowledge is not None:
        b, t = result.knowledge
        table.add_row(f"knowledge: accuracy, {b.n} questions (chance {100 * b.chance:.0f})",
                      f"{100 * b.accuracy:.1f} ({100 * b.ci_low:.0f}-{100 * b.ci_high:.0f})", *blank,
                      f"{100 * t.accuracy:.1f} ({100 * t.ci_low:.0f}-{100 * t.ci_high:.0f})",
                      f"{100 * (t.accuracy - b.accuracy):+.1f}")
    return table


def render_merge(result) -> None:
    check = result.check
    verdict = "[green]matches[/]" if check.passed else "[bold red]DOES NOT match[/]"
    console.print(
        f"merged ({result.base} base, {result.dtype}) into [bold]{result.out_dir}[/]: {verdict} {check.reference}: "
        f"max |diff| {check.max_abs_diff:.2e} = {check.relative_diff:.2e} of the logit scale "
        f"(tolerance {check.tolerance:g}); details in {result.out_dir / MERGE_CHECK}"
    )


def render_gguf(result) -> None:
    check, written = result.check, result.written
    if check.relative_diff is None:
        verdict = f"[bold red]check FAILED[/]: {escape(check.reason)}"
    else:
        verdict = ("[green]matches[/]" if check.passed else f"[bold red]DOES NOT match[/] ({escape(check.reason)})") + (
            f" the merged model: token ids {'identical' if check.token_ids_match else 'DIFFERENT'}, max |logit diff| "
            f"{check.relative_diff:.2e} of the logit scale (tolerance {check.tolerance:g}), top-1 agreement "
            f"{check.top1_agreement:.0%}")
    console.print(f"wrote [bold]{written.path}[/] ({written.size_bytes / 2**20:,.1f} MiB, {written.qtype}, "
                  f"{result.seconds:.0f} s): {verdict}", highlight=False, soft_wrap=True)
    for warning in written.warnings:
        console.print(f"[yellow]warning[/]: {escape(warning)}", soft_wrap=True)
    console.print(f"run it with llama.cpp or Ollama (Modelfile beside it): {result.out_dir / MODEL_CARD}",
                  highlight=False, soft_wrap=True)


def cmd_plan(args) -> int:
    """Exit 0 when the recipe fits its budget (or has none), 3 when it does not."""
    recipe = load_recipe(args.recipe, args.overrides)
    check_nproc(args.nproc)
    if args.method is not None:
        return plan_methods(recipe, parse_methods(args.method, "--method"), args.json, args.nproc)
    arch = memory.recipe_arch(recipe)  # cached: a repeated plan imports no torch
    plan = memory.plan_from_arch(recipe, arch, world=args.nproc)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        console.print(plan_table(plan, recipe.name))
        if plan.fits is False:
            fitted = memory.fit_to_budget(recipe, arch, world=args.nproc)
            advice = f"cheapest change that fits: {fitted[1]}" if fitted else "no batch or checkpointing change fits"
            console.print(f"[bold red]does not fit[/] the {plan.budget_gib:g} GiB budget; {escape(advice)}")
    return 3 if plan.fits is False else 0


def plan_methods(recipe, methods: list[str], as_json: bool, world: int = 1) -> int:
    """One plan per method (one method: the usual table); exit 3 when none of them fits."""
    recipes = {kind: recipe.with_method(kind) for kind in methods}
    plans = {kind: memory.plan_from_arch(r, memory.recipe_arch(r), world=world) for kind, r in recipes.items()}
    if as_json:
        print(json.dumps({"methods": {k: p.to_json() for k, p in plans.items()}}, indent=2))
    elif len(plans) == 1:
        console.print(plan_table(plans[methods[0]], f"{recipe.name} ({methods[0]})"))
    else:
        console.print(methods_plan_table(plans, recipe.name))
    return 0 if any(p.fits is not False for p in plans.values()) else 3


def methods_plan_table(plans: dict, name: str) -> Table:
    notes = dict.fromkeys(n for p in plans.values() for n in p.notes)  # the same model: the same notes
    world = max(p.world_size for p in plans.values())
    per_gpu = f", per GPU of {world}" if world > 1 else ""
    table = Table(title=f"memory plan by method: {name} (GiB, peak phase of each{per_gpu})", title_justify="left",
                  caption="\n".join(f"note: {escape(n)}" for n in notes) or None, caption_justify="left")
    table.add_column("component")
    for kind in plans:
        table.add_column(kind, justify="right", min_width=len(kind))
    components = list(dict.fromkeys(c for p in plans.values() for c in p.components))
    for component in components:
        table.add_row(component.replace("_", " "), *(f"{p.components.get(component, 0.0):.3f}" for p in plans.values()))
    table.add_row("[bold]peak on the device[/]", *(f"[bold]{p.peak_gib:.3f}[/]" for p in plans.values()))
    table.add_row("trainable parameters",
                  *(f"{count(p.trainable_params)} ({100 * p.trainable_params / p.total_params:.2f}%)"
                    for p in plans.values()))
    budgets = {p.budget_gib for p in plans.values()}
    if budgets != {None}:
        table.add_row(f"fits {budgets.pop():g} GiB?",
                      *("[green]yes[/]" if p.fits else "[red]no[/]" for p in plans.values()))
    return table


def count(n: int) -> str:
    """12,345 / 40.4M / 7.62B: parameter counts that fit a narrow column."""
    if n < 10**6:
        return f"{n:,}"
    return f"{n / 1e6:.1f}M" if n < 10**9 else f"{n / 1e9:.2f}B"


def cmd_compare(args) -> int:
    from qlora_lite.compare import compare, table_rows

    recipe = load_recipe(args.recipe, args.overrides)
    methods = parse_methods(args.methods)
    with TrainingView() as view:
        result = compare(recipe, methods, resume=args.resume, notify=view.notify)
    header, rows = table_rows(result["methods"])
    table = Table(title=f"methods compared: {recipe.name}", title_justify="left")  # a column per method: fits 80
    table.add_column("")
    for row in rows:
        table.add_column(row[0], justify="right")
    for i, what in enumerate(header[1:], 1):
        table.add_row(what, *(row[i] for row in rows))
    console.print(table)
    for kind, reason in result["refused"].items():
        console.print(f"[yellow]{kind} did not run[/]: {escape(reason)}")
    names = [p.name for p in comparison_files(compare_dir(recipe))]
    console.print(f"{', '.join(names[:-1])} and {names[-1]} in [bold]{compare_dir(recipe)}[/]")
    return 0 if result["methods"] else 3


def plan_table(plan, name: str) -> Table:
    per_gpu = f"per GPU of {plan.world_size} ({plan.strategy.upper()}), " if plan.world_size > 1 else ""
    table = Table(title=f"memory plan: {name} ({per_gpu}peak in the {plan.phase} phase)", title_justify="left",
                  caption="\n".join(f"note: {escape(n)}" for n in plan.notes) or None, caption_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for component, gib in plan.components.items():
        table.add_row(component.replace("_", " "), f"{gib:.3f}")
    table.add_row("[bold]peak on the device[/]", f"[bold]{plan.peak_gib:.3f}[/]")
    table.add_row("peak allocated (torch)", f"{plan.peak_allocated_gib:.3f}")
    table.add_row("training / evaluation peak", f"{plan.train_peak_gib:.3f} / {plan.eval_peak_gib:.3f}")
    table.add_row("parameters", f"{plan.trainable_params:,} trainable of {plan.total_params:,}")
    if plan.budget_gib is not None:
        verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
        table.add_row("budget", f"{plan.budget_gib:g} GiB: {verdict}, headroom {plan.budget_gib - plan.peak_gib:+.2f}")
    return table


def cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)  # before the heavy imports: a recipe error answers at once
    check_nproc(args.nproc)
    if args.nproc and args.nproc > 1 and not dist.launched():
        return launch(args.nproc, args.argv, recipe)
    if dist.launched():
        if args.nproc not in (None, dist.world()):
            raise UserError(f"--nproc {args.nproc}, but torchrun started {dist.world()} processes; give one of the "
                            f"two (--nproc starts torchrun itself)")
        from qlora_lite.model import pick_device

        dist.init(pick_device(recipe.train))
    from qlora_lite.run import run

    if not dist.is_main():  # rank 0 shows the run; the others train beside it in silence
        run(recipe, resume=args.resume)  # leaves with rank 0's status (dist.FollowerExit) once training is done
        return 0

    with TrainingView() as view:
        try:
            result = run(recipe, resume=args.resume, notify=view.notify)
        except KeyboardInterrupt:  # a second Ctrl-C in training, or one before or after it
            raise Interrupted(interrupted_message(recipe)) from None
    console.print(
        f"[bold green]done[/] in {result.seconds:.0f} s: trained weights saved to [bold]{result.train.saved_dir}[/], "
        f"report in {result.report}"
    )
    exported = [r.check for r in (result.merged, result.gguf) if r is not None]
    return 0 if all(check.passed for check in exported) else 4


def check_nproc(nproc: int | None) -> None:
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc {nproc}: the number of processes (GPUs) is 1 or more")


def launch(nproc: int, argv: list[str], recipe) -> int:
    """`run --nproc N`: the same command in N processes through torchrun (one per GPU; on a CPU, sharing its cores
    with as many threads each as leave none idle and none oversubscribed). torchrun runs in a session of its own,
    out of the terminal's reach: a Ctrl-C is handed by this process to each training process (which finishes its
    step and saves a checkpoint with the others), not to torchrun, which would print a traceback and kill them
    after 30 s. Exits with the code of the outcome (written by the rank that reported it), else torchrun's."""
    import signal
    import subprocess
    import tempfile

    import torch

    from qlora_lite.model import pick_device

    device = pick_device(recipe.train)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc}, but {torch.cuda.device_count()} CUDA GPUs are visible: one process per "
                        f"GPU; use --nproc {torch.cuda.device_count()} or fewer (CUDA_VISIBLE_DEVICES picks which)")
    if device == "cpu" and nproc > cores:
        raise UserError(f"--nproc {nproc} on a CPU with {cores} cores: each process needs a core of its own; use "
                        f"--nproc {cores} or fewer")
    with tempfile.TemporaryDirectory(prefix="qlora_lite-") as tmp:
        status = os.path.join(tmp, "status")
        env = {**os.environ, dist.STATUS_FILE: status}
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)) if device == "cpu" else "1")
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")  # after a Ctrl-C: time to finish a step and save
        if not any(a.startswith("--debug") for a in argv):
            env.setdefault("LOGLEVEL", "CRITICAL")  # torchrun's notices (its failure report covers a failure)
        # Signals blocked by whatever started us would stay pending, here and in every process torchrun starts: a
        # Ctrl-C unseen until training ended
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        child = subprocess.Popen([sys.executable, "-c", "from qlora_lite.cli import torchrun; torchrun()",
                                  "--standalone", f"--nproc_per_node={nproc}", "-m", "qlora_lite",
                                  *without_nproc(argv)], env=env, start_new_session=True)
        stop = lambda signum, frame: child.send_signal(signal.SIGTERM)  # noqa: E731 (torchrun ends its processes)
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            while True:
                try:  # short waits: a Ctrl-C the kernel hands to another thread of this process (the DNS probe's)
                    rc = child.wait(timeout=0.5)  # would not wake a wait without a timeout until torchrun ended
                    break
                except subprocess.TimeoutExpired:
                    continue
                except KeyboardInterrupt:  # the first: a checkpoint after this step; the second: stop at once
                    dist.signal_ranks(status, signal.SIGINT)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        code = dist.read_status(status)
    if code is None and rc:
        err_console.print(f"[bold red]error:[/] the {nproc} training processes failed (torchrun exit {rc}); "
                          f"see above", highlight=False, soft_wrap=True)
    return rc if code is None else code


def torchrun() -> None:
    """torchrun as `run --nproc` starts it: when a training process has already said what went wrong (it wrote the
    status file: out of memory on one GPU, say), torchrun's own ChildFailedError report, which only repeats the
    exit codes, is left out; a failure no process explained (a crash, a bug) keeps it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    # LOGLEVEL reaches only some of torchrun's loggers; its process manager's ("sending SIGTERM", "failed
    # (exitcode: 3)") inherits torch's WARNING
    logging.getLogger("torch.distributed.elastic").setLevel(os.environ.get("LOGLEVEL", "WARNING"))
    try:
        main()  # its arguments are sys.argv[1:]
    except ChildFailedError:
        if dist.reported() is None:
            raise
        sys.exit(1)


def without_nproc(argv: list[str]) -> list[str]:
    """The command for each process: torchrun tells it the number (and would read --nproc as its own option)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        out += [] if skip else [arg]
    return out


class TrainingView:
    """Renders the events of `run` and `compare` (events.py): the settings and the plan before training, a live bar
    in a terminal or one plain line per logged step elsewhere (nohup, a job scheduler, `| tee`), tables after."""

    def __init__(self):
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.first_step = 0  # a resumed run starts at its checkpoint's step: the ETA counts from there
        self.memory = ""  # the latest memory sample, shown with the next logged step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def say(self, text: str) -> None:
        """A line above the live bar (or a plain line)."""
        self.progress.console.print(text, highlight=False)

    def notify(self, event: events.Event) -> None:
        match event:
            case events.RecipeResolved(run_dir, recipe_file, changed):
                console.rule(f"run directory {run_dir}")
                console.print(f"settings that differ from the defaults (every setting: {recipe_file}):",
                              highlight=False, soft_wrap=True)
                for line in changed:
                    console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
            case events.Planned(plan):
                console.print(plan_table(plan, "predicted for a CUDA GPU"))
            case events.AutoFitted(change):
                console.print(f"[yellow]auto_fit[/]: {escape(change)}")
            case events.ResumedOnOtherProcesses(before, now, batch, keep):
                keep_it = (f" (--set train.gradient_accumulation_steps={keep} keeps the one it had)"
                           if keep else "")
                console.print(f"[yellow]resuming on {now} process{'es' * (now > 1)}[/] a run trained on {before}: "
                              f"the weights, optimizer and schedule go on; the effective batch is now {batch}"
                              f"{keep_it}, and the rest of this epoch is drawn in another order",
                              highlight=False, soft_wrap=True)
            case events.SetUp():
                console.print(setup_table(event))
            case events.ShardedStop(run_dir):
                console.print(f"[yellow]FSDP[/]: evaluation, merge and export need the model whole and are not run "
                              f"here; where it fits one GPU: python -m qlora_lite eval {run_dir} (and merge, export)",
                              highlight=False, soft_wrap=True)
            case events.TrainingStarted(step, max_steps):
                self.first_step = step
                if self.live:
                    self.progress.start()
                    self.task = self.progress.add_task("train", total=max_steps, completed=step, stats="")
            case events.StepDone(step, _) if self.task is not None:
                self.progress.update(self.task, completed=step)
            case events.MemorySampled(_, gib, on_gpu) if gib is not None:
                self.memory = f"{'GPU' if on_gpu else 'RSS'} {gib:.2f} GiB"
            case events.StepLogged():
                self.step_logged(event)
            case events.StopRequested():
                self.say("[yellow]Ctrl-C[/]: stopping after this step with a checkpoint "
                         "(press Ctrl-C again to stop at once)")
            case events.BudgetCrossed(step, used, budget, stopping):
                self.say(f"[bold red]memory budget crossed[/] at step {step}: {used:.2f} GiB > {budget:g} GiB "
                         f"({'stopping' if stopping else 'warning only'})")
            case events.Trained(result):
                self.trained(result)
            case events.Evaluating():
                console.print("evaluating base vs tuned (greedy generation)...")
            case events.Evaluated(result):
                console.print(eval_table(result))
            case events.Merging(dtype, base):
                console.print(f"merging the adapter into the {base} base ({dtype})...")
            case events.Merged(result):
                render_merge(result)
            case events.MergeSkipped(reason):
                console.print(f"[yellow]merge skipped[/]: {escape(reason)}")
            case events.ExportingGGUF(qtype, source):
                console.print(f"writing {source} as {qtype} GGUF and checking it...")
            case events.ExportedGGUF(result):
                render_gguf(result)
            case events.GGUFSkipped(reason):
                console.print(f"[yellow]GGUF export skipped[/]: {escape(reason)}")
            case events.MethodStarted(method, learning_rate, _):
                console.rule(f"[bold]method {method}[/] (learning rate {learning_rate:g})")
            case events.MethodKept(method, run_dir):
                console.print(f"method {method}: finished earlier in {run_dir}, kept")
            case events.TensorBoardWriting(folder):
                console.print(f"live curves: tensorboard --logdir {escape(str(folder))}", highlight=False)
            case events.MethodRefused(method, reason):
                console.print(f"[yellow]method {method} did not run[/]: {escape(reason)}")

    def step_logged(self, e: events.StepLogged) -> None:
        parts = [] if e.loss is None else [f"loss {e.loss:.4f}"]
        parts += [] if e.eval_loss is None else [f"eval loss {e.eval_loss:.4f}"]
        parts += [] if e.learning_rate is None else [f"lr {e.learning_rate:.2e}"]
        parts += [f"{e.tokens_per_s:,.0f} tok/s"] + ([self.memory] if self.memory else [])
        if self.live:
            if self.task is not None:
                self.progress.update(self.task, completed=e.step, stats="  ".join(parts))
            return
        done = e.step - self.first_step
        eta = e.elapsed_s / done * (e.max_steps - e.step) if done > 0 else None
        parts.append(f"ETA {clock(eta)}" if eta is not None else "ETA -")
        console.print(f"step {e.step}/{e.max_steps}  " + "  ".join(parts), highlight=False)

    def trained(self, result) -> None:
        self.progress.stop()
        if self.task is not None:  # compare trains several times: a fresh bar for the next one
            self.progress.remove_task(self.task)
            self.task = None
        stopped = f" (stopped by Ctrl-C: {result.steps} of {result.max_steps} steps)" if result.interrupted else ""
        table = Table(title=f"training{stopped}", title_justify="left")
        for col in ("steps", "first loss", "last loss", "time", "tokens/s"):
            table.add_column(col, justify="right")
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(
            str(result.steps), fmt(result.first_loss), fmt(result.last_loss),
            f"{result.train_seconds:.0f} s", f"{result.tokens_per_s:,.0f}",
        )
        console.print(table)


def clock(seconds: float) -> str:
    """1:02:03 / 4:05: a duration as a person reads it."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def setup_table(p: events.SetUp) -> Table:
    stats = p.data
    table = Table(title="setup", show_header=False, title_justify="left")
    table.add_row("model", f"{p.trainer} on {p.device}, compute {p.compute_dtype}, optimizer {p.optimizer}")
    table.add_row("method", p.method)
    table.add_row("parameters", f"{p.trainable_params:,} trainable of {p.total_params:,} "
                                f"({100 * p.trainable_params / p.total_params:.2f}%)")
    table.add_row(
        "data",
        f"{stats.rows} training rows; dropped {stats.dropped_empty} empty, {stats.dropped_too_long} too long; "
        f"{stats.truncated_prompts} prompts truncated; longest prompt {stats.prompt_tokens_max} tokens, "
        f"target {stats.target_tokens_max}",
    )
    if p.mixed:
        table.add_row("mix", "; ".join(
            f"{m.key}: {m.rows} examples ({100 * m.rows / sum(s.rows for s in p.mixed):.0f}%, asked "
            f"{100 * m.weight:.0f}%{f', of {m.available}: some twice' if m.rows > m.available else ''})"
            for m in p.mixed))
    if p.packed is not None:
        table.add_row("packing", f"{p.packed.examples} examples in {p.packed.rows} rows of up to "
                                 f"{p.packed.max_length:,} tokens, "
                                 f"{100 * p.packed.fill:.0f}% filled (no attention between examples)")
    if p.processes > 1:
        threads = f", {p.threads} CPU thread{'s' * (p.threads > 1)} each" if p.device == "cpu" else ""
        table.add_row("processes", f"{p.processes} x {p.device} ({p.strategy.upper()}"
                                   f"{', experimental' if p.strategy == 'fsdp' else ''}, "
                                   f"{'nccl' if p.device == 'cuda' else 'gloo'}){threads}")
    per_rank = p.effective_batch // p.processes
    batch = f"effective batch {p.effective_batch}" + (
        f" ({per_rank} per process x {p.processes} processes)" if p.processes > 1 else "")
    table.add_row("schedule", f"{p.steps} steps x {batch} = {p.epochs:.2f} epochs, "
                              f"~{p.tokens_per_step:,.0f} tokens per step")
    held = p.held_out
    if held:
        leak = (f"; [bold yellow]{held.in_train} of them also in the training data[/]: their scores measure "
                f"memory, not generalization" if held.in_train else "")
        table.add_row("held out", f"{held.rows} rows of the {held.split} split for base vs tuned{leak}")
    if p.expected_train_s is None:
        table.add_row("expected time", "measured in this first run of this model and method here (the next "
                                       "run's setup says how long; the progress shows an ETA)")
    else:
        evaluation = "" if p.expected_eval_s is None else f", evaluation up to ~{clock(p.expected_eval_s)}"
        table.add_row("expected time", f"training ~{clock(p.expected_train_s)}{evaluation} (from the speed "
                                       f"measured in earlier runs of this model and method here)")
    for note in p.not_measured:
        table.add_row("not measured", note)
    return table


if __name__ == "__main__":
    sys.exit(main())
