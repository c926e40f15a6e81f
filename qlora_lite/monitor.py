"""Stage 4, alongside training: measure memory live, enforce the budget, write the memory-budget report.

Sources: NVML (device memory used by this process and in total, utilization, temperature, power), torch.cuda
counters (allocated, reserved, their peaks) and the process RSS. Whatever is missing (no GPU, no NVML) is named
once and left out; nothing here may crash a run. `MemoryMonitor` writes one line per logged step to the run's
memory log and, when the budget is crossed, stops training cleanly (checkpoint + adapter saved) or warns.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from qlora_lite import dist, events
from qlora_lite.memory import CUDA_CONTEXT_GIB
from qlora_lite.rundir import RunDir, append_jsonl, write_json

GIB = 2**30


@dataclass
class Probe:
    """What can be measured on this machine, opened once."""

    device: str
    nvml_handle: object = None
    missing: list[str] = field(default_factory=list)  # figures this machine cannot give, with the reason


def open_probe(device: str) -> Probe:
    probe = Probe(device)
    if device != "cuda":
        probe.missing.append("GPU memory, utilization, temperature, power: training on CPU (RSS recorded instead)")
        return probe
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")  # DDP: this rank's own GPU
        mine = visible[dist.local_rank()].strip() if dist.local_rank() < len(visible) else ""
        index = int(mine) if mine.isdigit() else torch.cuda.current_device()
        probe.nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as e:  # NVMLError_LibraryNotFound, driver mismatch, UUID-style CUDA_VISIBLE_DEVICES...
        probe.missing.append(
            f"device memory used, utilization, temperature, power: NVML unavailable ({type(e).__name__}); "
            f"torch.cuda counters recorded"
        )
    return probe


def reset_peaks(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def rss_gib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    except (OSError, ValueError):
        return None


def sample(probe: Probe) -> dict:
    """One measurement; keys absent when not measurable. All memory in GiB."""
    row = {"time": time.time(), "rss_gib": rss_gib()}
    if probe.device == "cuda":
        row.update(
            cuda_allocated_gib=torch.cuda.memory_allocated() / GIB,
            cuda_reserved_gib=torch.cuda.memory_reserved() / GIB,
            cuda_peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
            cuda_peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
        )
    if probe.nvml_handle is not None:
        row.update(_nvml(probe.nvml_handle))
    return {k: v for k, v in row.items() if v is not None}


def _nvml(handle) -> dict:
    """Each figure on its own: containers, MIG slices and some laptops refuse one (process list, power) and
    answer the others."""
    import pynvml

    def read(query, *args):
        try:
            return query(handle, *args)
        except Exception:  # pynvml.NVMLError_NotSupported, NoPermission, ...
            return None

    out = {}
    if info := read(pynvml.nvmlDeviceGetMemoryInfo):
        out["device_used_gib"], out["device_total_gib"] = info.used / GIB, info.total / GIB
    mine = [p.usedGpuMemory for p in read(pynvml.nvmlDeviceGetComputeRunningProcesses) or ()
            if p.pid == os.getpid() and p.usedGpuMemory]  # none inside a container: its pids are not the host's
    if mine:
        out["process_used_gib"] = mine[0] / GIB
    if util := read(pynvml.nvmlDeviceGetUtilizationRates):
        out["gpu_util_pct"] = util.gpu
    out["temperature_c"] = read(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
    if (milliwatts := read(pynvml.nvmlDeviceGetPowerUsage)) is not None:
        out["power_w"] = milliwatts / 1000
    return out


def footprint_gib(row: dict) -> float | None:
    """This process's GPU memory, as the budget counts it: NVML's per-process figure, else the allocator's peak
    reserve plus the CUDA context the plan counts (containers often hide per-process figures, and the reserve
    alone leaves out the context's ~0.9 GiB, which the device and the budget include)."""
    if "process_used_gib" in row:
        return row["process_used_gib"]
    reserved = row.get("cuda_peak_reserved_gib")
    return None if reserved is None else reserved + CUDA_CONTEXT_GIB


class MemoryMonitor(TrainerCallback):
    """Samples at every logged step into the memory log; on a crossed budget, stops (saving a checkpoint) or
    warns. Each sample is also told to `notify`, so a log file shows memory beside the loss."""

    def __init__(
        self,
        path: Path,
        probe: Probe,
        budget_gib: float | None,
        on_exceed: str = "stop",
        notify: events.Notify = events.ignore,
        measure: Callable[[Probe], dict] | None = None,
    ):
        self.path, self.probe, self.budget_gib, self.on_exceed = path, probe, budget_gib, on_exceed
        self.notify, self.measure = notify, measure or (lambda p: sample(p))
        self.exceeded: dict | None = None  # the first sample over budget

    def record(self, step: int) -> dict:
        """This process's sample (what its budget is checked against); DDP: every rank samples its own GPU at the
        same steps, and rank 0 writes all of them, each with its rank."""
        row = {"step": step, **self.measure(self.probe)}
        rows = dist.gather(row)
        if dist.is_main():
            for r, each in enumerate(rows):
                append_jsonl(self.path, {**each, "rank": r} if len(rows) > 1 else each)
        on_gpu = self.probe.device == "cuda"
        self.notify(events.MemorySampled(step, footprint_gib(row) if on_gpu else row.get("rss_gib"), on_gpu))
        return row

    def on_train_begin(self, args, state, control, **kwargs):
        self.record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % max(args.logging_steps, 1) and state.global_step != state.max_steps:
            return
        row = self.record(state.global_step)
        used = footprint_gib(row)
        if self.budget_gib is None or used is None or used <= self.budget_gib or self.exceeded:
            return
        self.exceeded = row
        self.notify(events.BudgetCrossed(state.global_step, used, self.budget_gib, self.on_exceed == "stop"))
        if self.on_exceed == "stop":
            control.should_save = True  # a resumable checkpoint at this very step
            control.should_training_stop = True


# ---------------------------------------------------------------- the memory-budget report


def _max(samples: list[dict], key: str) -> float | None:
    values = [s[key] for s in samples if key in s]
    return max(values) if values else None


def _error_pct(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or not predicted:
        return None
    return 100 * (predicted - measured) / measured


def memory_report(plan, samples: list[dict], budget_gib: float | None, missing: list[str]) -> dict:
    """Predicted vs measured, per figure that can be measured here, and headroom against the budget."""
    measured = {
        "peak_allocated_gib": _max(samples, "cuda_peak_allocated_gib"),
        "peak_reserved_gib": _max(samples, "cuda_peak_reserved_gib"),
        "process_peak_gib": _max(samples, "process_used_gib"),
        "device_peak_gib": _max(samples, "device_used_gib"),
        "rss_peak_gib": _max(samples, "rss_gib"),
    }
    device_peak = measured["process_peak_gib"] or measured["device_peak_gib"]
    predicted = plan.to_json() if plan else None
    # The budget's own figure where NVML gives none (the allocator's peak reserve plus the CUDA context): the report
    # must not show headroom on a run the budget stopped.
    footprints = [f for f in map(footprint_gib, samples) if f is not None]
    measured_peak = device_peak if device_peak is not None else max(footprints, default=None)
    peak = measured_peak if measured_peak is not None else (plan.peak_gib if plan else None)
    return {
        "predicted": predicted,
        "measured": {k: v for k, v in measured.items() if v is not None},
        "error_pct": {
            "peak_allocated": _error_pct(measured["peak_allocated_gib"], plan.peak_allocated_gib if plan else None),
            "peak_device": _error_pct(device_peak, plan.peak_gib if plan else None),
        },
        "peak_gib": peak,
        "peak_source": "measured" if measured_peak is not None else "predicted",
        "budget_gib": budget_gib,
        "headroom_gib": None if budget_gib is None or peak is None else budget_gib - peak,
        "missing": missing,
        "samples": len(samples),
        **({"per_rank_peak_gib": per_rank_peaks(samples)} if any("rank" in s for s in samples) else {}),
    }


def per_rank_peaks(samples: list[dict]) -> dict[int, float | None]:
    """DDP: each rank's peak as its budget counts it (its GPU; on a CPU, its RSS)."""
    ranks = sorted({s["rank"] for s in samples if "rank" in s})
    figures = [(s["rank"], next((f for f in (footprint_gib(s), s.get("rss_gib")) if f is not None), None))
               for s in samples if "rank" in s]
    return {r: max((f for rank, f in figures if rank == r and f is not None), default=None) for r in ranks}


def write_memory_report(rd: RunDir, plan, budget_gib: float | None, missing: list[str]) -> dict:
    """The memory report (JSON and Markdown) and the memory timeline chart, in the run directory."""
    samples = rd.memory_samples()
    report = memory_report(plan, samples, budget_gib, missing)
    write_json(rd.memory_report, report)
    png = _timeline_png(rd.memory_timeline, samples, budget_gib, plan)
    rd.memory_report_md.write_text(_markdown(report, png))
    return report


def _fmt(value, unit=" GiB") -> str:
    return "not measured" if value is None else f"{value:.2f}{unit}"


def _markdown(report: dict, png: Path | None) -> str:
    lines = ["# Memory budget", ""]
    lines.append(f"- budget: {_fmt(report['budget_gib']) if report['budget_gib'] else 'none set'}")
    lines.append(f"- peak ({report['peak_source']}): {_fmt(report['peak_gib'])}")
    if report["headroom_gib"] is not None:
        lines.append(f"- headroom: {_fmt(report['headroom_gib'])}")
    for rank, peak in report.get("per_rank_peak_gib", {}).items():
        lines.append(f"- peak of rank {rank}: {_fmt(peak)}")
    for note in report["missing"]:
        lines.append(f"- not measured: {note}")
    plan, measured = report["predicted"], report["measured"]
    if plan:
        lines += ["", f"## Predicted (peak phase: {plan['phase']})", "", "| component | GiB |", "|---|---:|"]
        lines += [f"| {name} | {gib:.3f} |" for name, gib in plan["components"].items()]
        lines.append(f"| **total** | **{plan['peak_gib']:.3f}** |")
        lines += [f"\nNote: {note}" for note in plan.get("notes", ())]
    lines += ["", "## Predicted vs measured", "", "| figure | predicted | measured | error |", "|---|---:|---:|---:|"]
    rows = [
        ("peak allocated (torch)", plan and plan["peak_allocated_gib"], measured.get("peak_allocated_gib"),
         report["error_pct"]["peak_allocated"]),
        ("peak on the device", plan and plan["peak_gib"],
         measured.get("process_peak_gib", measured.get("device_peak_gib")), report["error_pct"]["peak_device"]),
        ("process RSS (host)", None, measured.get("rss_peak_gib"), None),
    ]
    for name, pred, meas, err in rows:
        lines.append(f"| {name} | {_fmt(pred)} | {_fmt(meas)} | {'-' if err is None else f'{err:+.1f}%'} |")
    if png:
        lines += ["", f"![memory per step]({png.name})"]
    return "\n".join(lines) + "\n"


def _timeline_png(path: Path, samples: list[dict], budget_gib: float | None, plan) -> Path | None:
    if not samples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    series = {"cuda_allocated_gib": "allocated", "cuda_reserved_gib": "reserved",
              "process_used_gib": "device (this process)", "rss_gib": "host RSS"}
    ranks = sorted({s.get("rank", 0) for s in samples})
    for key, label in series.items():
        for rank in ranks:
            points = [(s["step"], s[key]) for s in samples if key in s and s.get("rank", 0) == rank]
            if points:
                ax.plot(*zip(*points), marker=".", label=label + (f" (rank {rank})" if len(ranks) > 1 else ""))
    if budget_gib:
        ax.axhline(budget_gib, color="red", linestyle="--", label=f"budget {budget_gib:g} GiB")
    if plan:
        ax.axhline(plan.peak_gib, color="gray", linestyle=":", label=f"predicted peak {plan.peak_gib:.2f} GiB")
    ax.set_xlabel("step")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
