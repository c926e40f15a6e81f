"""More than one process (DDP, or FSDP2 with train.strategy = "fsdp"): who this process is, how the processes
agree, and how FSDP shards the model (shard) and gathers the adapter back whole (full_trainable_state).

torchrun (or `accelerate launch --multi_gpu`) starts one process per GPU and tells each its rank in the environment;
`run --nproc N` starts torchrun itself (cli.py). Every rank runs the same preparation and the same training (the
Trainer wraps the model in DistributedDataParallel); rank 0 alone writes the run directory and, after training,
evaluates, merges and reports while the others wait for its exit status. Two rules keep the processes from
hanging on each other:
- a stage that may fail with a user error runs inside `together()`: whichever rank fails, every rank leaves with
  that one error (printed once, by rank 0 or the rank it struck);
- anything that stops training (Ctrl-C, a crossed budget) is agreed at the end of each step (train.SyncStop), so
  every rank stops at the same step and saves the same checkpoint.
Nothing here imports torch at module level: `plan` and recipe errors stay fast.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import time

from qlora_lite.errors import UserError

STATUS_FILE = "QLORA_LITE_STATUS"  # set by `run --nproc`: where the rank that reports the outcome writes its code
_control = None  # a gloo group for agreements and waits: CPU tensors, no NCCL watchdog, a week's timeout
_split = False  # rank 0 went on alone after training: the others wait for its announce()


class AgreedError(UserError):
    """Another rank's user error, raised on this one too so every rank leaves at the same point; not printed here
    (the rank it struck prints it)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class FollowerExit(Exception):
    """A rank other than 0 is done: rank 0 finished the run alone and ended with `exit_code`."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


def alone(error: UserError) -> UserError:
    """Mark an error that struck this rank while the others cannot listen (they wait in a gradient exchange, as
    after an out-of-memory): it is not agreed; this rank prints it and exits, and torchrun stops the others."""
    error.alone = True
    return error


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun or accelerate with more than one process."""
    return world() > 1


def init(device: str) -> None:
    """Join the process group before anything touches a GPU: each rank on its own device (GPU k for local rank k),
    gloo on CPU, NCCL on CUDA. The Trainer finds the group and uses it."""
    global _control
    if world() == 1 or _control is not None:
        return
    import torch
    import torch.distributed as dist

    if int(os.environ.get("LOCAL_WORLD_SIZE", world())) != world():
        raise UserError(f"{world()} processes on more than one machine: qlora_lite runs on one machine with "
                        f"several GPUs; start it on one node (torchrun --standalone --nproc_per_node N)")
    if device == "cuda":
        if world() > torch.cuda.device_count():
            raise UserError(f"{world()} processes but {torch.cuda.device_count()} CUDA GPUs visible: one process "
                            f"per GPU; use --nproc {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    register_pid()
    _control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


def finish() -> None:
    global _control
    if _control is None:
        return
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # a peer already gone: nothing left to tear down together
        dist.destroy_process_group()
    _control = None


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (one process: [obj])."""
    if _control is None:
        return [obj]
    import torch.distributed as dist

    out = [None] * world()
    dist.all_gather_object(out, obj, group=_control)
    return out


@contextlib.contextmanager
def together():
    """Run a stage on every rank; if a user error strikes any rank, every rank raises it (this rank's own error as
    it is, another's as an AgreedError with its message and exit code). One process: just the block."""
    if _control is None:
        yield
        return
    outcome, error = None, None
    try:
        yield
    except UserError as e:
        if getattr(e, "alone", False):
            raise
        error = e
        outcome = (str(e), e.exit_code, isinstance(e, AgreedError))
    outcomes = gather(outcome)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None and not o[2]] or \
             [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if error is not None and failed[0][0] == rank():
        raise error
    r, (message, code, _) = failed[0]
    raise AgreedError(message if r == 0 else f"rank {r}: {message}", code)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (a conversion or download that fills a shared cache), then the others, who find
    it done. A failure on rank 0 stops every rank."""
    if _control is None:
        yield
        return
    if is_main():
        with together():
            yield
    else:
        with together():
            pass
        yield


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over the ranks (stop requests at the end of a step)."""
    if _control is None:
        return flags
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return [bool(v) for v in t.tolist()]


def split() -> None:
    """After training: rank 0 goes on alone (evaluation, merge, export, report); every other rank waits here for
    rank 0's exit status and leaves with it (FollowerExit)."""
    global _split
    if _control is None:
        return
    _split = True
    if not is_main():
        raise FollowerExit(_wait_for_main())


def _wait_for_main() -> int:
    """Rank 0's exit status, waited for in short sleeps so a Ctrl-C (which torchrun forwards) still ends the wait.
    A peer that died instead of announcing: 1."""
    import torch
    import torch.distributed as dist

    status = torch.zeros(1, dtype=torch.int32)
    try:
        work = dist.broadcast(status, src=0, group=_control, async_op=True)
        while not work.is_completed():
            time.sleep(0.2)
        work.wait()
    except KeyboardInterrupt:
        return 130
    except Exception:  # rank 0 is gone without a word (killed, crashed): torchrun reports it
        return 1
    return int(status.item())


def announce(exit_code: int) -> None:
    """Rank 0, once it is done with everything: tell the waiting ranks its exit status (see split)."""
    if _control is None or not _split or not is_main():
        return
    import torch
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.broadcast(torch.tensor([exit_code], dtype=torch.int32), src=0, group=_control)


def write_status(exit_code: int) -> None:
    """For `run --nproc`: the outcome's exit code, which the launching process exits with."""
    path = os.environ.get(STATUS_FILE)
    if path:
        with contextlib.suppress(OSError), open(path, "x") as f:  # the first rank to report wins
            f.write(str(exit_code))


def register_pid() -> None:
    """For `run --nproc`: where the launcher finds this process to hand it a Ctrl-C (see cli.launch)."""
    path = os.environ.get(STATUS_FILE)
    if path:
        with contextlib.suppress(OSError), open(f"{path}.pid.{rank()}", "w") as f:
            f.write(str(os.getpid()))


def signal_ranks(status_path: str, signum: int) -> None:
    """Send `signum` to every process that registered beside the launcher's status file."""
    import glob
    import signal

    for pid_file in glob.glob(f"{glob.escape(status_path)}.pid.*"):
        with contextlib.suppress(OSError, ValueError), open(pid_file) as f:
            os.kill(int(f.read().strip()), signal.Signals(signum))


def reported() -> int | None:
    """The exit code another rank reported (write_status) under `run --nproc`, else None: a rank whose collective
    broke because that rank left (out of memory alone, say) leaves with it instead of a traceback."""
    path = os.environ.get(STATUS_FILE)
    return read_status(path) if path else None


def read_status(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def check_replicas(trained: dict) -> dict:
    """Every rank's trained weights (full_trainable_state), hashed and compared: a difference is a bug."""
    digest = hashlib.sha256()
    for name, p in trained.items():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    hashes = gather(digest.hexdigest())
    return {"world_size": len(hashes), "identical": len(set(hashes)) == 1}


def shard(model) -> dict:
    """FSDP2 (train.strategy = "fsdp"): shard every transformer block, then the rest, across the processes, each
    keeping 1/N of every parameter (4-bit weights too, packed in a float dtype: quantization.quant_storage).
    Returns the parameter bytes of the whole model and of each rank's shards."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    if not blocks:
        raise UserError(f'train.strategy = "fsdp": {type(base).__name__} does not name its transformer blocks '
                        f'(_no_split_modules), so there is nothing to shard it by; use strategy = "ddp"')
    whole = _local_bytes(model)
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return {"bytes_whole": whole, "bytes_per_rank": gather(_local_bytes(model))}


def _local_bytes(model) -> int:
    local = (getattr(p, "_local_tensor", p) for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in local)


def full_trainable_state(model) -> dict:
    """The trainable weights whole, on every rank: FSDP's shards gathered (a collective: every rank calls it)."""
    return {name: p.full_tensor() if hasattr(p, "full_tensor") else p
            for name, p in model.named_parameters() if p.requires_grad}
