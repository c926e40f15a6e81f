"""The memory plan against a simulated CUDA training step: the plan's peak_allocated_gib beside what
torch.cuda.max_memory_allocated would show, on a machine without a GPU.

    python tools/sim_cuda.py                      # the grid: about 8 minutes on 2 CPU cores
    python tools/sim_cuda.py --smoke              # 2 layers of Llama-3-8B, 4 x 512 tokens: 10-20 s once compiled
    python tools/sim_cuda.py --models mistral-7b --explain      # also what is live at each simulated peak
    python tools/sim_cuda.py --models qwen3-30b-a3b             # about 20 minutes a row (48 layers x 128 experts)
    python tools/sim_cuda.py --build              # only compile the C++ extension (about a minute, once)

The grid: Llama-3-8B, Mistral-7B, Qwen2.5-7B and Mixtral-8x7B at real size, from their configs alone, at 4 x 512 and
1 x 4096 tokens, gradient checkpointing on and off, with the recipe defaults (NF4 + double quant, LoRA r16 on all
linear layers, paged 8-bit AdamW, bf16). Each row runs 2 optimizer steps of 2 micro-batches (gradients and optimizer
state resident for the second), every position labelled, no padding (flash attention). Exits 1, naming the rows,
when a plan is under its simulation or more than 8% over it (issue 17's criterion).

Why a simulation: the plan has never met a GPU (issue 17). Tensors here are torch FakeTensors on a fake cuda:0: they
carry shapes and dtypes but no data, so a 32-layer 8B model costs no memory and no kernel runs. What runs is the
real code: transformers builds the model from its config, bitsandbytes' quantize_4bit (its fake kernel) packs the
linear layers transformers' own rule picks (and qlora_lite.experts4bit the fused experts of MoE models),
qlora_lite's attach_method (freeze_base, wrap_lora) makes it trainable, TRL's fused LM head scores it, autograd and
checkpointing run backward, the Trainer's optimizer steps. A dispatch mode counts each new storage, rounded up to
the caching allocator's 512 bytes, until the storage dies. Which experts a token picks is data, which fake tensors
lack: every expert gets an equal share of the tokens (balanced routing).

A small C++ extension (tools/sim_cuda/fake_cuda_guard.cpp) gives a CPU build of torch the two things it lacks for
cuda tensors: a device guard (Tensor.to, indexing) and CUDA hooks (the autograd engine asks for a stream). It is
compiled once with torch's own headers (a C++ compiler and ninja) and must be loaded before torch is imported. The
other stand-ins, each for a CUDA-only path, are in patch_libraries, cuda_sdpa and fake_cuda_patches; each is tied
to a library version, and an upgrade that breaks one fails loudly (one that adds a CUDA-only path the fake device
does not take shows up in --explain as tensors that should not be there). Not simulated: the CUDA context, cuBLAS
workspaces and the allocator's reserve, which the plan's peak_gib adds as estimates (the footer says so).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tools" / "sim_cuda" / "fake_cuda_guard.cpp"
sys.path.insert(0, str(ROOT / "tools"))
from published_configs import CONFIGS, MOE_CONFIGS  # noqa: E402 (plain data: no torch)
TOLERANCE_PCT = 8.0  # issue 17: the plan within 0 to +8% of the simulation
GIB = 1 << 30


# ---------------------------------------------------------------- the C++ extension, before torch


def build_dir() -> Path:
    """Per user, torch version and source: a torch upgrade or an edited .cpp compiles anew. Under the temp dir, not
    qlora_lite's cache, so that the test suite (which gives every session a cache of its own) compiles it once."""
    key = f"torch-{importlib.metadata.version('torch')}-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}"
    return Path(tempfile.gettempdir()) / f"qlora_lite-sim-cuda-{os.getuid()}" / key


def compile_extension(build: Path) -> Path:
    """Compile in a child process: compiling imports torch, and this process must load the .so before torch."""
    so = build / "fake_cuda.so"
    if so.exists():
        return so
    build.parent.mkdir(exist_ok=True, mode=0o700)
    build.mkdir(exist_ok=True, mode=0o700)
    code = ("import torch.utils.cpp_extension as e; "
            f"e.load(name='fake_cuda', sources=[{str(SOURCE)!r}], build_directory={str(build)!r})")
    if subprocess.run([sys.executable, "-c", code], env={**os.environ, "MAX_JOBS": "1"}).returncode:
        raise SystemExit(f"compiling {SOURCE.name} failed (above): it needs a C++ compiler and ninja")
    return so


def load_fake_cuda(so: Path) -> None:
    """dlopen the extension before torch initializes: at::detail::getCUDAHooks() keeps the first hooks it finds."""
    if "torch" in sys.modules:
        raise SystemExit("tools/sim_cuda.py must load its extension before torch is imported")
    for folder in (so.parent, so.parent.parent):  # a shared temp dir: never load a library another user could write
        if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o022:
            raise SystemExit(f"{folder} is not this user's alone; remove it (tools/sim_cuda.py compiles it again)")
    torch_lib = Path(importlib.util.find_spec("torch").origin).parent / "lib"
    for lib in ("libc10.so", "libtorch_cpu.so", "libtorch.so", "libtorch_python.so"):
        ctypes.CDLL(str(torch_lib / lib), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)


# Everything below imports torch, so only once main() has loaded the extension.

DENSE = {name: CONFIGS[name] for name in ("llama-3-8b", "mistral-7b", "qwen2.5-7b")}
# Fused 3-D experts, simulated in 4-bit through qlora_lite/experts4bit.py (issue 17)
MOE = MOE_CONFIGS
MODELS = {**DENSE, **MOE}
DEFAULT = (*DENSE, "mixtral-8x7b")  # Qwen3-30B-A3B (48 layers of 128 experts) takes about 20 minutes a row
TOKENS = ((4, 512), (1, 4096))  # micro-batch x length
# model, layers, tokens, checkpointing. The plan's one-block backward moment is ~0.17 GiB above the simulation's
# whatever the depth: 3% of a 32-layer model, 10% of a 2-layer Mistral; Llama-3's large vocabulary keeps a 2-layer
# model's share near the full-size rows'.
SMOKE = ("llama-3-8b", 2, (4, 512), True)


def recipe_for(batch: int, length: int, checkpointing: bool, dropout: float = 0.05):
    """The recipe defaults (NF4 + double quant, r16 all-linear LoRA, paged 8-bit AdamW, bf16 on a GPU) at these
    tokens; evaluation off, so the plan's peak is training's."""
    from qlora_lite.recipe import EvalRecipe, LoraRecipe, ModelRecipe, Recipe, TrainRecipe

    train = TrainRecipe(micro_batch_size=batch, max_length=length, gradient_checkpointing=checkpointing,
                        gradient_accumulation_steps=2, device="cuda")
    return Recipe(name="sim", model=ModelRecipe(name="sim"), train=train, lora=LoraRecipe(dropout=dropout),
                  eval=EvalRecipe(enabled=False))


def make_config(values: dict, layers: int = 0):
    from transformers import AutoConfig

    values = dict(values, **({"num_hidden_layers": layers} if layers else {}))
    return AutoConfig.for_model(values.pop("model_type"), **values)


# ---------------------------------------------------------------- counting what the caching allocator holds


class AllocTracker:
    """Live bytes of every storage the step creates, rounded up to 512 bytes per block as the caching allocator
    does (views share their storage: counted once), and the peak. bitsandbytes' paged optimizer state is CUDA
    managed memory, outside the allocator: counted apart, as max_memory_allocated leaves it out."""

    def __init__(self, explain: bool = False):
        self.live: dict[int, tuple[int, str]] = {}
        self.total = self.peak = self.paged = 0
        self.phase, self.peak_at, self.explain = "setup", "", explain
        self.at_peak: dict[str, int] = {}

    def add(self, t, op: str = "", paged: bool = False) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            if paged and self.live[key][0]:  # made by an op, then handed to bitsandbytes as managed memory
                self.total -= self.live[key][0]
                self.live[key] = (0, "paged")
                self.paged += 512 * math.ceil(storage.nbytes() / 512)
            return
        size = 512 * math.ceil(storage.nbytes() / 512)
        if paged:
            self.paged += size
            size = 0
        self.live[key] = (size, self.describe(t, op) if self.explain else self.phase)
        weakref.finalize(storage, self._free, key)
        self.total += size
        if self.total > self.peak:
            self.peak, self.peak_at = self.total, f"{self.phase} {MODULE_STACK[-1] if MODULE_STACK else '-'} {op}"
            if self.explain:
                self.at_peak = self.grouped()

    def _free(self, key: int) -> None:
        self.total -= self.live.pop(key, (0, ""))[0]

    def describe(self, t, op: str) -> str:
        import torch

        node = torch._C._current_autograd_node()
        where = MODULE_STACK[-1] if MODULE_STACK else node.name() if node is not None else "-"
        return f"{self.phase}: {op} {str(t.dtype).removeprefix('torch.')}{list(t.shape)} @ {where}"

    def grouped(self) -> dict[str, int]:
        groups = collections.Counter()
        for size, tag in self.live.values():
            groups[tag] += size
        return groups


def counting_mode(tracker: AllocTracker):
    """A dispatch mode above the fake mode: it sees every op's outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if hasattr(t, "untyped_storage") and t.device.type == "cuda":
                    tracker.add(t, func.__name__)
            return out

    return Counting()


MODULE_STACK: list[str] = []


def track_modules(model) -> None:
    """The innermost module running, to say where a peak happened."""
    for name, module in model.named_modules():
        if name and name.count(".") <= 6:
            module.register_forward_pre_hook(lambda m, a, n=name: MODULE_STACK.append(n))
            module.register_forward_hook(lambda m, a, o: _pop())


def _pop() -> None:  # a forward hook that returns something replaces the module's output
    if MODULE_STACK:
        MODULE_STACK.pop()


# ---------------------------------------------------------------- stand-ins for what only CUDA runs


def flash_attention():
    """aten._scaled_dot_product_flash_attention as CUDA's SDPA calls it (the fake kernel's default is the math
    path, which would materialize b*h*s*s scores), saving what its autograd node saves. Its backward adds FA2's
    fp32 dq accumulator and, for grouped-query attention, the expanded dk/dv it reduces: kernel scratch."""
    import torch

    class FlashAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, is_causal, scale):
            out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention.default(
                q, k, v, 0.0, is_causal, False, scale=scale)
            ctx.save_for_backward(q, k, v, out, lse, seed, offset)
            ctx.args = (cq, ck, mq, mk, is_causal, scale)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse, seed, offset = ctx.saved_tensors
            cq, ck, mq, mk, is_causal, scale = ctx.args
            b, h, s, d = q.shape
            scratch = [torch.empty((b, 128 * math.ceil(s / 128), h, 32 * math.ceil(d / 32)), dtype=torch.float32,
                                   device=q.device)]
            if k.shape[1] != h:
                scratch += [torch.empty((b, k.shape[2], h, d), dtype=k.dtype, device=q.device) for _ in range(2)]
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward.default(
                grad_out, q, k, v, out, lse, cq, ck, mq, mk, 0.0, is_causal, seed, offset, scale=scale)
            del scratch
            return dq, dk, dv, None, None

    return FlashAttention


def cuda_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as CUDA runs an unpadded batch: flash. Autocast's cast of q, k, v happens at
    the aten op this replaces, so here."""
    import torch

    global FLASH
    FLASH = FLASH or flash_attention()
    if attn_mask is not None or dropout_p:
        raise NotImplementedError("padded batches and attention dropout are not simulated (flash path only)")
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = (t.to(dtype) if t.dtype == torch.float32 else t for t in (q, k, v))
    return FLASH.apply(q, k, v, is_causal, scale)


FLASH = None  # the autograd Function above, made once torch is loaded


class GemmScratch:
    """bitsandbytes' CUDA 4-bit matmul over more than 1536 rows dequantizes the weight first (fp32 absmax, then the
    weight in the compute dtype); its fake kernel returns only the output."""

    def __init__(self, original):
        self.original = original

    def __call__(self, ctx, A, B, out=None, bias=None, quant_state=None):
        import torch

        scratch = []
        if A.numel() // A.shape[-1] > 1536 and quant_state is not None:
            if quant_state.nested:
                absmax = torch.empty(quant_state.absmax.shape, dtype=torch.float32, device=A.device)
                scratch += [absmax, absmax + quant_state.offset]
            scratch.append(torch.empty(quant_state.shape, dtype=A.dtype, device=A.device))
        result = self.original(ctx, A, B, out, bias, quant_state)
        del scratch
        return result


def patch_libraries(tracker: AllocTracker) -> None:
    """Stand-ins for the CUDA-only paths of bitsandbytes, TRL and transformers."""
    import bitsandbytes as bnb
    import bitsandbytes.optim.optimizer as bnb_opt
    import torch
    import transformers.masking_utils as masking
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original_map = bnb.functional.create_dynamic_map

    def create_dynamic_map(*a, **k):  # built from real values (.tolist()): outside fake mode
        with unset_fake_temporarily():
            return original_map(*a, **k)

    def get_state_buffer(self, p, dtype=torch.float32):  # paged state: cudaMallocManaged, not the allocator's
        buf = torch.zeros_like(p, dtype=dtype, device=p.device)
        if self.is_paged and p.numel() >= 1e5:
            tracker.add(buf, paged=True)
        return buf

    bnb.functional.create_dynamic_map = bnb_opt.F.create_dynamic_map = create_dynamic_map
    bnb_opt.Optimizer8bit.get_state_buffer = get_state_buffer
    bnb_opt.Optimizer8bit.prefetch_state = lambda self, p: None
    bnb_opt.sync_gpu = bnb.utils.sync_gpu = lambda t: None
    matmul = bnb.autograd._functions.MatMul4Bit
    if not isinstance(matmul.forward, GemmScratch):
        matmul.forward = staticmethod(GemmScratch(matmul.forward))
    # TRL on CUDA folds each vocabulary tile in place with Triton kernels: no fp32 tile temporaries
    chunked._use_triton = trl_utils._use_triton = lambda device: device.type == "cuda"
    chunked._forward_kernel = chunked._backward_kernel = NoOpKernel()
    chunked.triton = FakeTriton
    masking.is_tracing = lambda tensor=None: False  # a FakeTensor looks like tracing: transformers would build a mask


class NoOpKernel:
    def __getitem__(self, grid):
        return lambda *a, **k: None


class FakeTriton:
    @staticmethod
    def cdiv(a, b):
        return -(-a // b)


STUB_LIBRARY = []  # the registrations last as long as their torch.library.Library object


def register_cuda_stubs() -> None:
    """silu_backward (and two more) have a CPU kernel and a composite fallback: on a CPU build a cuda tensor takes
    the fallback, five fp32 temporaries a CUDA build never makes. A CUDA kernel that never runs (the fake mode
    answers first) restores CUDA's dispatch."""
    import torch

    def never(*args, **kwargs):
        raise RuntimeError("a stub CUDA kernel ran: the fake mode should have answered")

    lib = torch.library.Library("aten", "IMPL")
    for name in ("silu_backward", "mish_backward", "native_channel_shuffle"):
        lib.impl(name, never, "CUDA")
    STUB_LIBRARY.append(lib)


def data_dependent_mode(labelled: int, routing: tuple[int, int, int] | None = None):
    """Ops whose result depends on values: "is this mask all ones?" (yes: no padding), a step counter's value (1),
    TRL's selection of the labelled rows (their known count), and, for a mixture of experts (`routing`: experts,
    experts per token, tokens), which experts the router picked: every expert, each for an equal share of the
    tokens (the balanced routing the load-balancing loss aims at; a skewed batch peaks higher in the expert loop)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    def nonzero_rows(shape) -> int:
        if routing is not None:  # the expert loop: experts hit (one-hot has a spare class), then each one's tokens
            experts, top_k, tokens = routing
            if tuple(shape) in ((experts + 1,), (experts,)):
                return experts
            if tuple(shape) == (top_k, tokens):
                return tokens * top_k // experts
        return labelled

    def boolean_index(args):
        return any(i is not None and i.dtype == torch.bool for i in args[1])

    class DataDependent(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten._local_scalar_dense.default:
                return True if args[0].dtype == torch.bool else 1.0 if args[0].dtype.is_floating_point else 1
            if func is aten.index.Tensor and boolean_index(args):
                src = args[0]
                rest = src.shape[sum(i.dim() if i is not None else 1 for i in args[1]):]
                return torch.empty((labelled, *rest), dtype=src.dtype, device=src.device)
            if func is aten.nonzero.default:
                return torch.empty((nonzero_rows(args[0].shape), args[0].dim()), dtype=torch.long,
                                   device=args[0].device)
            if func is aten.masked_select.default:
                return torch.empty((labelled,), dtype=args[0].dtype, device=args[0].device)
            if func is aten.masked_scatter.default:
                return torch.empty_like(args[0])
            if func in (aten.index_put.default, aten._index_put_impl.default) and boolean_index(args):
                return torch.empty_like(args[0])
            if func in (aten.index_put_.default, aten._index_put_impl_.default) and boolean_index(args):
                return args[0]
            return func(*args, **(kwargs or {}))

    return DataDependent()


@contextlib.contextmanager
def fake_cuda_patches():
    """autocast("cuda") refuses without torch.cuda.is_available() (checkpoint recomputation enters it again);
    SDPA takes CUDA's kernel (patched at the attribute transformers calls, so recomputation inside backward takes it
    too); Module._apply's swap of fake parameters fails on their weakrefs, so .data is set instead."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensor

    swap = torch.utils.swap_tensors

    def swap_tensors(t1, t2):
        if isinstance(t1, FakeTensor) or isinstance(t2, FakeTensor):
            t1.data = t2.detach()
            return
        swap(t1, t2)

    amp = torch.cuda.amp.common
    saved = (amp.amp_definitely_not_available, torch.cuda.is_bf16_supported, F.scaled_dot_product_attention)
    amp.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    F.scaled_dot_product_attention = cuda_sdpa
    torch.utils.swap_tensors = swap_tensors
    try:
        yield
    finally:
        amp.amp_definitely_not_available, torch.cuda.is_bf16_supported, F.scaled_dot_product_attention = saved
        torch.utils.swap_tensors = swap


# ---------------------------------------------------------------- the model and the step, as a run builds them


def quantize_linears(model, dtype, quant_type: str, double_quant: bool) -> None:
    """The linear layers transformers' bitsandbytes rule picks (memory_arch._quantized_weights, which the planner
    counts too) -> Linear4bit with the packed weight and quant_state of bitsandbytes' quantize_4bit. Params4bit cannot
    wrap a FakeTensor (_make_subclass refuses), so the packed weight is a frozen Parameter carrying its attributes."""
    import bitsandbytes as bnb
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import AutoModelForCausalLM

    from qlora_lite.memory_arch import _quantized_weights

    with unset_fake_temporarily(), torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [n.removesuffix(".weight") for n in _quantized_weights(AutoModelForCausalLM.from_config(model.config))]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent, old = model.get_submodule(parent_name), model.get_submodule(name)
        with unset_fake_temporarily():
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
                                    compress_statistics=double_quant, quant_type=quant_type, device="meta")
        packed, state = bnb.functional.quantize_4bit(old.weight.detach(), blocksize=64, quant_type=quant_type,
                                                     compress_statistics=double_quant, quant_storage=torch.uint8)
        weight = torch.nn.Parameter(packed, requires_grad=False)
        for key, value in dict(quant_state=state, quant_type=quant_type, compress_statistics=double_quant, blocksize=64,
                               quant_storage=torch.uint8, bnb_quantized=True, module=new).items():
            setattr(weight, key, value)
        new.weight, new.quant_state, new.compute_type_is_set = weight, state, True
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.detach(), requires_grad=False)
        setattr(parent, child, new)


def experts_4bit():
    """qlora_lite.experts4bit.quantize_experts(model, quant_type, double_quant, compute_dtype), once it exists."""
    try:
        from qlora_lite.experts4bit import quantize_experts
    except ImportError:
        return None
    return quantize_experts


def build_model(recipe, config):
    """On the fake GPU: the base in bf16 from its config, its linear layers in 4-bit as a 4-bit load leaves them
    (fused experts too, through experts4bit.quantize_experts), then qlora_lite's attach_method (freeze_base and
    wrap_lora, as run attaches qlora) and TRL's fused LM head, as SFTTrainer adds it."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from qlora_lite.model import LoadedModel, attach_method

    dtype, q = torch.bfloat16, recipe.quantization
    config._attn_implementation = "sdpa"
    with torch.device("cuda"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantize_linears(model, dtype, q.quant_type, q.double_quant)
    quantize_experts = experts_4bit()
    if quantize_experts is not None:  # as model.load_model does after a 4-bit load (a dense model has none)
        quantize_experts(model, q.quant_type, q.double_quant, dtype)
    model.is_loaded_in_4bit, model.quantization_method = True, "bitsandbytes"
    # PEFT moves each new adapter to its base layer's device and dtype and back to fp32 (autocast_adapter_dtype),
    # which swaps fake parameters: build it on the fake GPU in fp32, where PEFT leaves it, instead.
    move = BaseTunerLayer._move_adapter_to_device_of_base_layer
    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *a, **k: None
    try:
        with torch.device("cuda"):
            model = attach_method(LoadedModel(model, None, False, "cuda", dtype, source=None), recipe)
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    return model.train()


def make_optimizer(model, train):
    """The Trainer's optimizer for train.optimizer on CUDA (qlora_lite.train.pick_optimizer): bitsandbytes AdamW
    with nn.Embedding weights kept 32-bit, or torch's foreach AdamW; the Trainer's two decay groups."""
    import torch
    from transformers.trainer_pt_utils import get_parameter_names

    from qlora_lite.train import pick_optimizer

    name = pick_optimizer(train, "cuda")
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], ["bias", "layernorm", "rmsnorm"]))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if (n in decay) == d], "weight_decay": train.weight_decay}
              for d in (True, False)]
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=train.learning_rate, foreach=True)
    if name not in ("paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit"):
        raise SystemExit(f"train.optimizer = {name!r} is not simulated")
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW(groups, lr=train.learning_rate, optim_bits=8, is_paged=name.startswith("paged"))
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def train_steps(model, recipe, tracker: AllocTracker, steps: int = 2) -> None:
    """Trainer.training_step as SFTTrainer runs it: forward under bf16 autocast with TRL's fused head, its loss
    over the labelled positions, backward; per optimizer step: clip, step, zero_grad(set_to_none)."""
    import torch

    t = recipe.train
    optimizer = make_optimizer(model, t)
    for _ in range(steps):
        for _ in range(t.gradient_accumulation_steps):
            batch = {k: torch.empty((t.micro_batch_size, t.max_length), dtype=torch.long, device="cuda")
                     for k in ("input_ids", "labels")}
            tracker.phase = "forward"
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**batch, use_cache=False, fused_lm_head=True)
            loss = (-out.log_probs).sum() / out.label_mask.sum().clamp(min=1) / t.gradient_accumulation_steps
            del out
            tracker.phase = "backward"
            loss.backward()
            del loss, batch
        tracker.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def resident_tensors(model):
    """Parameters, buffers and the 4-bit layers' quant_state tensors (neither parameters nor buffers)."""
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            yield from (x for x in (qs.absmax, qs.code, qs.offset) if x is not None)
            yield from (qs.state2.absmax, qs.state2.code) if qs.nested else ()


def simulate(recipe, config, explain: bool = False) -> dict:
    """One configuration on the fake GPU: the peak of allocated bytes and where it was."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = AllocTracker(explain)
    MODULE_STACK.clear()
    patch_libraries(tracker)
    tokens = recipe.train.micro_batch_size * recipe.train.max_length
    experts = next((getattr(config, k) for k in ("num_local_experts", "num_experts") if getattr(config, k, 0)), 0)
    routing = (experts, config.num_experts_per_tok, tokens) if experts else None
    started = time.monotonic()
    with fake_cuda_patches(), FakeTensorMode(allow_non_fake_inputs=True), \
            data_dependent_mode(tokens - recipe.train.micro_batch_size, routing), counting_mode(tracker):
        model = build_model(recipe, config)
        for x in resident_tensors(model):  # counted as they were made; this adds any made outside the modes
            tracker.add(x)
        resident = tracker.total
        track_modules(model)
        tracker.peak, tracker.peak_at = tracker.total, "loaded"  # the step's peak (loading's is not the plan's)
        tracker.at_peak = tracker.grouped() if explain else {}
        train_steps(model, recipe, tracker)
        del model
    return {"sim_gib": tracker.peak / GIB, "resident_gib": resident / GIB, "paged_gib": tracker.paged / GIB,
            "peak_at": tracker.peak_at, "seconds": time.monotonic() - started,
            "live": sorted(tracker.at_peak.items(), key=lambda kv: -kv[1])}


# ---------------------------------------------------------------- the grid and the table


def row(name: str, layers: int, tokens: tuple[int, int], checkpointing: bool, explain: bool) -> dict:
    """The plan and the simulation of one configuration. MoE rows train without LoRA dropout: PEFT takes none on
    fused experts (target_parameters), and all-linear puts LoRA there."""
    from qlora_lite.memory import plan_memory

    batch, length = tokens
    recipe = recipe_for(batch, length, checkpointing, dropout=0.0 if name in MOE else 0.05)
    plan = plan_memory(recipe, make_config(MODELS[name], layers))
    sim = simulate(recipe, make_config(MODELS[name], layers), explain)
    diff = 100 * (plan.peak_allocated_gib - sim["sim_gib"]) / sim["sim_gib"]
    ok = 0 <= diff <= TOLERANCE_PCT
    return {**point(name, layers, tokens, checkpointing), "plan_alloc_gib": f"{plan.peak_allocated_gib:.3f}",
            "sim_alloc_gib": f"{sim['sim_gib']:.3f}", "plan_vs_sim": f"{diff:+.1f}%",
            "check": "ok" if ok else "UNDER" if diff < 0 else f"OVER {TOLERANCE_PCT:g}%",
            "sim_peak_at": sim["peak_at"].replace("base_model.model.model.", ""), "sim_s": f"{sim['seconds']:.0f}",
            "ok": ok, "live": sim["live"], "plan_components": plan.components, "notes": plan.notes}


def point(name: str, layers: int, tokens: tuple[int, int], checkpointing: bool) -> dict:
    return {"model": name + (f" ({layers} layers)" if layers else ""), "tokens": f"{tokens[0]}x{tokens[1]}",
            "ckpt": "on" if checkpointing else "off"}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def footer() -> str:
    from qlora_lite.memory import CUDA_CONTEXT_GIB, RESERVE_FRACTION

    return (f"Checked: peak_allocated_gib, what torch.cuda.max_memory_allocated shows. Unmeasured until a GPU "
            f"measures them (tools/bench_memory.py --gpu): the CUDA context ({CUDA_CONTEXT_GIB} GiB) and the "
            f"allocator's reserve ({RESERVE_FRACTION:.0%} of transient memory), which the plan's peak_gib adds as "
            f"estimates; cuBLAS workspaces and kernel scratch other than flash attention's and bitsandbytes' "
            f"dequantized weight are not simulated either.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one 2-layer configuration, for CI (under a minute)")
    ap.add_argument("--models", default=",".join(DEFAULT), help=f"among {', '.join(MODELS)}")
    ap.add_argument("--explain", action="store_true", help="print what is live at each simulated peak")
    ap.add_argument("--build", action="store_true", help="only compile the extension")
    args = ap.parse_args(argv)
    started = time.monotonic()
    so = compile_extension(build_dir())
    if args.build:
        print(f"compiled: {so}")
        return 0
    load_fake_cuda(so)
    import torch

    if torch.cuda.is_available():
        raise SystemExit("a CUDA GPU is visible: measure there (tools/bench_memory.py --gpu) instead of simulating")
    register_cuda_stubs()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {', '.join(unknown)}: among {', '.join(MODELS)}")
    points = [SMOKE] if args.smoke else [(m, 0, t, c) for m in names for t in TOKENS for c in (True, False)]
    rows, table = [], []
    for name, layers, tokens, ckpt in points:
        if name in MOE and experts_4bit() is None:
            table.append({**point(name, layers, tokens, ckpt), "check": "pending: experts4bit"})
            continue
        rows.append(row(name, layers, tokens, ckpt, args.explain))
        table.append(rows[-1])
        print(f"  {rows[-1]['model']} {rows[-1]['tokens']} checkpointing {ckpt}: {rows[-1]['sim_s']} s",
              file=sys.stderr, flush=True)
        if args.explain:
            print(f"\n{rows[-1]['model']} {rows[-1]['tokens']} ckpt {rows[-1]['ckpt']}: live at the simulated peak")
            for tag, size in rows[-1]["live"][:20]:
                print(f"  {size / 2**20:9.1f} MiB  {tag}")
            print("  plan:", {k: round(v, 3) for k, v in rows[-1]["plan_components"].items() if v})
    print("\nPlan vs simulated CUDA step (GiB; QLoRA r16 all-linear, NF4, paged 8-bit AdamW, bf16, 2 steps x 2 "
          "micro-batches)\n")
    print_table(table, ["model", "tokens", "ckpt", "plan_alloc_gib", "sim_alloc_gib", "plan_vs_sim", "check",
                        "sim_peak_at", "sim_s"])
    if not args.smoke and args.models == ",".join(DEFAULT):
        print(f"\nNot in the default grid (about 20 minutes a row): {', '.join(m for m in MODELS if m not in DEFAULT)}")
    print("\n" + footer())
    bad = [r for r in rows if not r["ok"]]
    for note in dict.fromkeys(n for r in bad for n in r["notes"]):
        print(f"Plan note ({', '.join(sorted({r['model'] for r in bad if note in r['notes']}))}): {note}")
    print(f"\nsimulated {len(rows)} of {len(table)} rows in {time.monotonic() - started:.0f} s; ", end="")
    if bad:
        print(f"outside 0..+{TOLERANCE_PCT:g}%: " + "; ".join(f"{r['model']} {r['tokens']} ckpt {r['ckpt']} "
                                                          f"({r['plan_vs_sim']})" for r in bad))
        return 1
    print(f"plan within 0..+{TOLERANCE_PCT:g}% of the simulation everywhere")
    return 0


if __name__ == "__main__":
    sys.exit(main())
