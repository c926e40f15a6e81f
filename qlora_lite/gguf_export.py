"""Stage 7: a merged model as one GGUF file that llama.cpp and Ollama run, checked, with an Ollama Modelfile.

Inputs: a run directory whose merged/ (what `merge` writes: safetensors weights, config.json, tokenizer files)
passed its merge check, or whose model/ a full fine-tune saved. Outputs, in RUN_DIR/gguf-<type>/ or another folder:
the .gguf file in f16, bf16 or q8_0, gguf_check.json (the file loaded back with transformers and compared with the
merged model), an Ollama Modelfile and a README (ollama.py); a `GGUFExport`. `export_run` does it all;
`write_gguf` and `check_gguf` are its two halves, for any merged folder.

The writer does what llama.cpp's convert_hf_to_gguf.py does for these architectures, with llama.cpp's own Python
library `gguf` (the file writer, the tensor names, the merges and special-token reader, numpy quantization that is
bit-exact with llama.cpp's): the same keys, Q/K rows permuted for llama's rotary order, norms and 1-D tensors in F32,
Q8_0 falling back to F16 for a row length not a multiple of 32, no output.weight when the embeddings are tied. Tensors
are converted and written one at a time: the peak is one tensor, not the model. Byte-level BPE tokenizers only
(SmolLM2, Qwen, Llama 3); SentencePiece ones (Llama 2, Mistral 7B) are refused: llama.cpp's converter handles those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np

from qlora_lite import ollama
from qlora_lite.errors import UserError, error_line
from qlora_lite.rundir import GGUF_CHECK, MERGE_CHECK, MODEL_CARD, MODELFILE, RunDir, export_clash, gguf_files, \
    read_json, read_run, write_json
from qlora_lite.source import CONFIG_FILE

log = logging.getLogger(__name__)

# Hugging Face architecture -> llama.cpp architecture; llama.cpp converts Mistral as "llama".
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}  # a config read from a GGUF file names no architecture
PERMUTED = {"llama"}  # llama.cpp's llama graph wants Q/K rows in its rotary order; qwen2 and qwen3 take them as stored
QTYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
# Largest accepted max |logit diff| / max |reference logit| and smallest share of positions whose top-1 token
# agrees, GGUF loaded by transformers vs the merged model, both fp32, on CHECK_TEXTS. Measured on SmolLM2-135M
# (30 layers, 91 positions): f16 1.1e-3, bf16 5.7e-3, q8_0 3.1e-2, top-1 1.00, 0.98, 0.96; on the tests' 2-layer
# random models at most 1.4e-3, 9.5e-3, 4.3e-2, top-1 at least 0.95. Q/K rows left unpermuted: 0.64 and top-1 0.51
# on SmolLM2.
TOLERANCE = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 8e-2}
MIN_TOP1 = {"f16": 0.95, "bf16": 0.9, "q8_0": 0.85}
CHECK_TEXTS = (
    "Amy: are we still on for lunch?\nTom: yes, at noon by the station.",
    "The committee approved the 2025 budget (3.5% more) after a long debate about the new library.",
    "Ravi: my train is late, start without me!\nLea: ok, we'll save you a seat",
    "<|im_start|>user\nSummarize: the cat sat on the mat.<|im_end|>\n<|im_start|>assistant\n",
)
# llama.cpp names the pre-tokenizer (how text is split before the merges) by the sha256 of the ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the hashes below are those of the tokenizers SUPPORTED models use.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told "
    "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 to Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# A vocabulary not in that table that splits text by one of these regexes (then byte-level) is split the same way;
# the regexes of llama.cpp's llama-vocab.cpp, as transformers writes them (Qwen2Tokenizer rebuilds Qwen's on load).
SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


@dataclass(frozen=True)
class GGUFWritten:
    path: Path
    size_bytes: int
    qtype: str
    tensor_count: int
    tokenizer_pre: str  # tokenizer.ggml.pre: how llama.cpp splits text before the merges
    seconds: float
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class GGUFCheck:
    gguf_path: Path
    qtype: str
    passed: bool
    reason: str | None  # why it failed; None when it passed
    token_ids_match: bool | None  # None: the file did not load
    relative_diff: float | None  # max |logit diff| / max |reference logit|
    max_abs_diff: float | None
    logit_scale: float | None
    top1_agreement: float | None  # share of positions whose most likely next token is the same
    tolerance: float
    min_top1: float

    def to_json(self) -> dict:
        return {**asdict(self), "gguf_path": str(self.gguf_path)}


@dataclass(frozen=True)
class Planned:
    """One tensor of the file: its GGUF name, shape (PyTorch order), type, and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    source: str | None  # the safetensors name; None for a tensor computed here (llama3 rope factors)
    permute_heads: int | None  # the head count of a Q/K weight to permute, else None


def check_supported(config) -> None:
    """Refuse, before any work, a model whose architecture this writer does not convert."""
    architectures = getattr(config, "architectures", None) or [
        MODEL_TYPES.get(getattr(config, "model_type", None), f"model_type {getattr(config, 'model_type', '?')}")]
    if architectures[0] not in SUPPORTED:
        raise UserError(f"GGUF export supports {', '.join(SUPPORTED)}; this model is {architectures[0]}: "
                        f"convert it with llama.cpp's convert_hf_to_gguf.py")


def check_tokenizer(tokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer this writer cannot put in the file (only byte-level BPE), or one that does not fit the
    model's embeddings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"the tokenizer {where} is not byte-level BPE (SmolLM2, Qwen, Llama 3 are); a "
                        f"SentencePiece one (Llama 2, Mistral 7B) needs llama.cpp's convert_hf_to_gguf.py")
    if (largest := max(tokenizer.get_vocab().values())) >= vocab_size:
        raise UserError(f"the tokenizer {where} has ids up to {largest}, past the model's vocab_size "
                        f"{vocab_size}: save the tokenizer the model was trained with beside it")


def write_gguf(model_dir: Path, out_path: Path, qtype: str) -> GGUFWritten:
    """Write the merged model in model_dir to out_path as GGUF (replacing a file there), atomically: the file is
    written under a temporary name and renamed, so a failure never leaves part of a file under out_path."""
    from safetensors import safe_open

    started = time.monotonic()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if qtype not in QTYPES:
        raise UserError(f"GGUF type must be one of {', '.join(QTYPES)}, got {qtype!r} (Q4_K_M and smaller: "
                        f"write f16 and run llama.cpp's llama-quantize on it)")
    if out_path.is_dir():
        raise UserError(f"{out_path} is a folder; give the path of the .gguf file to write")
    config, tokenizer, weights = read_merged(model_dir)
    arch, rope = SUPPORTED[config.architectures[0]], rope_parameters(config)
    pre = pre_tokenizer_name(tokenizer)
    warnings = () if pre else (
        "tokenizer.ggml.pre = default: llama.cpp knows no name for how this tokenizer splits text, so it may split "
        "it differently than transformers does (add the tokenizer to llama.cpp's convert_hf_to_gguf_update.py)",)
    for warning in warnings:
        log.warning(warning)
    file_qtype, file_type = QTYPES[qtype]
    with contextlib.ExitStack() as stack:
        files = {}  # tensor name -> its open safetensors file
        for path in weights:
            handle = stack.enter_context(safe_open(path, framework="pt"))
            files.update(dict.fromkeys(handle.keys(), handle))
        plan = plan_tensors(files, config, arch, rope, file_qtype)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        partial = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
        writer = gguf.GGUFWriter(partial, arch)
        try:
            for t in plan:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, t.qtype), t.qtype)
            write_metadata(writer, model_dir, config, arch, rope, file_type, plan)
            write_tokenizer(writer, model_dir, tokenizer, config, arch, pre or "default")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in plan:
                writer.write_tensor_data(tensor_data(t, files, config, rope))
            writer.close()
            os.replace(partial, out_path)
        finally:
            writer.close()  # a no-op once closed; after a failure the file must be closed before it is removed
            partial.unlink(missing_ok=True)
    kept = sum(t.qtype == gguf.GGMLQuantizationType.F16 for t in plan) if qtype == "q8_0" else 0
    log.info("wrote %s: %d tensors (%d kept in F16: rows not a multiple of 32)", out_path, len(plan), kept)
    return GGUFWritten(out_path, out_path.stat().st_size, qtype, len(plan), pre or "default",
                       time.monotonic() - started, warnings)


def read_merged(model_dir: Path):
    """The config, tokenizer and weight files of a merged model folder, refused when this writer cannot convert
    them: before anything is written."""
    from transformers import AutoConfig, AutoTokenizer

    if not (model_dir / CONFIG_FILE).is_file():
        raise UserError(f"{model_dir} has no {CONFIG_FILE}: give the folder `qlora-lite merge` wrote")
    config = AutoConfig.from_pretrained(model_dir)
    check_supported(config)
    weights = sorted(model_dir.glob("model*.safetensors"))
    if not weights:
        raise UserError(f"{model_dir} has no model*.safetensors weights: give the folder `qlora-lite merge` wrote")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_tokenizer(tokenizer, config.vocab_size, f"in {model_dir}")
    return config, tokenizer, weights


# ---------------------------------------------------------------- tensors


def plan_tensors(files: dict, config, arch: str, rope: dict, file_qtype) -> list[Planned]:
    """Every tensor the file holds, in llama.cpp's order: computed ones first, then the checkpoint's."""
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    plan = []
    if rope["rope_type"] == "llama3":
        plan.append(Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", (head_dim(config) // 2,),
                            gguf.GGMLQuantizationType.F32, None, None))
    for source, handle in files.items():
        if source.endswith(".rotary_emb.inv_freq"):  # a buffer older checkpoints saved; llama.cpp skips it too
            continue
        if source == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {source} of this {arch} model has no GGUF name; convert it with llama.cpp's "
                            f"convert_hf_to_gguf.py")
        shape = tuple(handle.get_slice(source).get_shape())
        heads = None
        if arch in PERMUTED and source.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config.num_attention_heads
        elif arch in PERMUTED and source.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config.num_key_value_heads
        plan.append(Planned(name, shape, tensor_qtype(name, shape, file_qtype), source, heads))
    return plan


def tensor_qtype(name: str, shape: tuple[int, ...], file_qtype):
    """As llama.cpp's prepare_tensors: norms, 1-D tensors and biases in F32; Q8_0 needs whole 32-value blocks per
    row, and llama.cpp writes F16 where they are not."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[file_qtype]
    return gguf.GGMLQuantizationType.F16 if shape[-1] % block else file_qtype


def nbytes(shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def tensor_data(t: Planned, files: dict, config, rope: dict) -> np.ndarray:
    """The tensor's bytes as the file stores them."""
    import torch

    if t.source is None:
        data = llama3_rope_factors(rope, head_dim(config))
    else:
        tensor = files[t.source].get_tensor(t.source)
        if tensor.dtype not in (torch.float16, torch.float32):
            tensor = tensor.float()  # as llama.cpp: bf16 goes through fp32
        if t.permute_heads is not None:
            tensor = permute(tensor, t.permute_heads)
        data = tensor.numpy()
    return gguf.quants.quantize(data, t.qtype)


def permute(weights, n_head: int):
    """llama.cpp's LlamaModel.permute: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...) of HF's rotate-half
    layout become GGML's interleaved pairs."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp stores it: one divisor per frequency."""
    base, factor = rope["rope_theta"], rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# ---------------------------------------------------------------- metadata and tokenizer


def rope_parameters(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    if rope["rope_type"] not in ROPE_TYPES:
        raise UserError(f"rope_type {rope['rope_type']!r} has no GGUF export here (supported: "
                        f"{', '.join(ROPE_TYPES)}); convert with llama.cpp's convert_hf_to_gguf.py")
    return rope


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_metadata(writer, model_dir: Path, config, arch: str, rope: dict, file_type, plan: list[Planned]) -> None:
    """general.* (name, license, base model, sampling defaults: gguf's own reader of the model card and
    generation_config.json, as llama.cpp uses it) and the hyper-parameters, in llama.cpp's order."""
    total = sum(math.prod(t.shape) for t in plan)
    meta = gguf.Metadata.load(None, model_dir, None, total)
    meta.name = meta.name or model_dir.name
    meta.size_label = meta.size_label or gguf.size_label(total, total, 0, 0)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's name for how this tokenizer splits text before the merges, or None when it has none: by the
    hash llama.cpp uses, else by the split itself (GPT-2's byte-level regex, or one of SPLITS), whatever the
    vocabulary."""
    known = PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest())
    if known:
        return known
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", [])
    if pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split" \
            and steps[0].get("behavior") == "Isolated" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        return SPLITS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def write_tokenizer(writer, model_dir: Path, tokenizer, config, arch: str, pre: str) -> None:
    """llama.cpp's get_vocab_base and _set_vocab_gpt2: every id below vocab_size with its type (added tokens
    CONTROL when special, USER_DEFINED otherwise; holes as [PAD<id>]), then merges, special ids, add_bos and the chat
    template, read by gguf.SpecialVocab exactly as llama.cpp reads them."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            if not decoder[i].normalized:  # llama.cpp matches added tokens as normalized text
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[i].special or looks_special(token)
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    tokenizer_config = model_dir / "tokenizer_config.json"
    if arch == "llama" and tokenizer_config.is_file():
        prefix_space = json.loads(tokenizer_config.read_text()).get("add_prefix_space")
        if prefix_space is not None:
            writer.add_add_space_prefix(prefix_space)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    # transformers 5 no longer saves add_bos_token, and llama.cpp's default then depends on tokenizer.ggml.pre:
    # state what this tokenizer does.
    ids, bos, eos = tokenizer("a")["input_ids"], tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token.setdefault("bos", bos is not None and ids[0] == bos)
    special.add_special_token.setdefault("eos", eos is not None and ids[-1] == eos)
    special.add_to_gguf(writer, quiet=True)


def looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens some tokenizers leave unmarked though they are control."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or token.startswith("<|") and token.endswith("|>")
            or token.startswith("<\uff5c") and token.endswith("\uff5c>")
            or token.startswith("<unused") and token.endswith(">"))


# ---------------------------------------------------------------- the check


def check_gguf(model_dir: Path, gguf_path: Path, qtype: str) -> GGUFCheck:
    """Load the GGUF back with transformers (its own GGUF reader: dequantize, undo the Q/K permutation, rebuild the
    tokenizer from tokenizer.ggml.*) and compare it with the merged model on CHECK_TEXTS: token ids identical,
    logits within TOLERANCE[qtype] of the logit scale, top-1 next tokens agreeing on MIN_TOP1[qtype] of positions.
    A file that does not load (truncated, damaged) fails the check with the reader's reason.

    What it cannot prove: that llama.cpp runs the file the same way. transformers rebuilds the tokenizer from the
    file's vocabulary, merges and special ids, but splits text by its own rule for tokenizer.ggml.pre (GPT-2's for
    "smollm", "gpt-2" and "default"), not by llama.cpp's C++ pre-tokenizer; and its reader ignores rope scaling
    (linear, yarn, llama3's rope_freqs tensor), so a model with scaled rope is loaded with the merged model's scaling
    and the file's keys for it go unchecked. The tensors, the other hyper-parameters and the vocabulary are checked;
    llama.cpp's tokenization, graph and kernels are not. Memory: one fp32 copy of the model at a time (about 32 GB
    for an 8B model).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tolerance, min_top1 = TOLERANCE[qtype], MIN_TOP1[qtype]
    gguf_path, name = Path(gguf_path), Path(gguf_path).name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer(text)["input_ids"] for text in CHECK_TEXTS]
    rope = rope_parameters(AutoConfig.from_pretrained(model_dir))
    reference = logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), ids)
    try:
        with tempfile.TemporaryDirectory() as folder, open(os.devnull, "w") as quiet, \
                contextlib.redirect_stderr(quiet):  # transformers' tqdm bar
            # A folder holding only the file: transformers would otherwise also read tokenizer_config.json and
            # config.json lying beside it, and check those instead of the file.
            (Path(folder) / name).symlink_to(gguf_path.resolve())
            loaded_ids = [AutoTokenizer.from_pretrained(folder, gguf_file=name)(text)["input_ids"]
                          for text in CHECK_TEXTS]
            config = None
            if rope["rope_type"] != "default":  # transformers' GGUF reader reads no rope scaling: give it the model's
                config = AutoConfig.from_pretrained(folder, gguf_file=name)
                config.rope_parameters = {**rope, "rope_theta": config.rope_parameters["rope_theta"]}
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
        got = logits(model, ids)
    except Exception as e:  # whatever a damaged file makes the reader raise is a failed check, not a crash
        return GGUFCheck(gguf_path, qtype, False, f"transformers cannot load it: {error_line(e)}", None, None, None,
                         None, None, tolerance, min_top1)
    return compare(gguf_path, qtype, ids, loaded_ids, reference, got)


def logits(model, ids: list[list[int]]) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([x])).logits[0].float() for x in ids]


def compare(gguf_path: Path, qtype: str, ids: list, loaded_ids: list, reference: list, got: list) -> GGUFCheck:
    tolerance, min_top1 = TOLERANCE[qtype], MIN_TOP1[qtype]
    mismatch = next((i for i, (a, b) in enumerate(zip(ids, loaded_ids)) if a != b), None)
    shapes = [(tuple(r.shape), tuple(g.shape)) for r, g in zip(reference, got) if r.shape != g.shape]
    if shapes:
        return GGUFCheck(gguf_path, qtype, False, f"logits of shape {shapes[0][1]}, the merged model's "
                         f"{shapes[0][0]}", mismatch is None, None, None, None, None, tolerance, min_top1)
    diff = max((r - g).abs().max().item() for r, g in zip(reference, got))
    scale = max(r.abs().max().item() for r in reference)
    relative = diff / scale if scale else float("inf")
    agree = sum((r.argmax(-1) == g.argmax(-1)).sum().item() for r, g in zip(reference, got))
    top1 = agree / sum(len(r) for r in reference)
    reasons = []
    if mismatch is not None:
        a, b = ids[mismatch], loaded_ids[mismatch]
        at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        reasons.append(f"token ids differ on check text {mismatch + 1} from position {at} "
                       f"({a[at:at + 3]} vs {b[at:at + 3]})")
    if not relative <= tolerance:  # NaN fails too
        reasons.append(f"logits differ by {relative:.2e} of the logit scale (tolerance {tolerance:.0e})")
    if top1 < min_top1:
        reasons.append(f"top-1 tokens agree on {top1:.1%} of positions (needs {min_top1:.0%})")
    log.info("GGUF check %s: %.2e of the logit scale, top-1 agreement %.1f%%", gguf_path.name, relative, 100 * top1)
    return GGUFCheck(gguf_path, qtype, not reasons, "; ".join(reasons) or None, mismatch is None, relative, diff,
                     scale, top1, tolerance, min_top1)


# ---------------------------------------------------------------- a run's export


@dataclass(frozen=True)
class GGUFExport:
    out_dir: Path
    source: Path  # the merged (or fully fine-tuned) model the file was made from
    written: GGUFWritten
    check: GGUFCheck
    seconds: float


def export_run(run_dir: str | Path, qtype: str, out_dir: str | Path | None = None, *,
               merged_dir: str | Path | None = None, force: bool = False) -> GGUFExport:
    """The run's merged model (merged_dir, default RUN_DIR/merged; a full fine-tune's model/) as <name>-<qtype>.gguf
    in out_dir (default RUN_DIR/gguf-<qtype>), checked, with gguf_check.json, a Modelfile and README.md.

    Refused before anything is written: a type this writer does not make, a run with nothing merged or a merge
    that failed its check, an architecture or tokenizer it cannot convert, an out_dir inside what training saved or
    inside the merged model, and (without `force`) an out_dir already holding any of the four files. A file that
    fails the check is kept to inspect: the caller decides (the CLI exits 4).
    """
    started = time.monotonic()
    rd = RunDir(Path(run_dir))
    recipe = read_run(rd.path)
    if qtype not in QTYPES:
        raise UserError(f"GGUF type must be one of {', '.join(QTYPES)}, got {qtype!r} (Q4_K_M and smaller: "
                        f"write f16 and run llama.cpp's llama-quantize on it)")
    source = gguf_source(rd, recipe, merged_dir)
    _, tokenizer, _ = read_merged(source)  # architecture, weights, tokenizer: refused before the folder is touched
    out = Path(out_dir) if out_dir is not None else rd.gguf(qtype)
    clash = export_clash(out.resolve(), rd.path.resolve())
    if clash or out.resolve().is_relative_to(source.resolve()):
        raise UserError(f"--out {out} is {clash or f'inside the model it exports ({source})'}: choose another "
                        f"folder (default: {rd.gguf(qtype)})")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the GGUF export")
    names = gguf_files(recipe.name, qtype)
    there = [n for n in names if (out / n).exists()]
    if there and not force:
        raise UserError(f"{out} already holds {', '.join(there)}; add --force to replace them (other files there "
                        f"are kept), or give another folder with --out")
    written = write_gguf(source, out / names[0], qtype)
    check = check_gguf(source, written.path, qtype)
    write_json(out / GGUF_CHECK, {**check.to_json(), "source": str(source), "size_bytes": written.size_bytes,
                                  "tokenizer_pre": written.tokenizer_pre, "warnings": list(written.warnings),
                                  "not_checked": NOT_CHECKED})
    (out / MODELFILE).write_text(ollama.modelfile(tokenizer, names[0], recipe.prompt))
    (out / MODEL_CARD).write_text(ollama.readme(names[0], recipe.name, recipe.prompt, checked_text(check),
                                                conversations=recipe.data.format == "messages"))
    return GGUFExport(out, source, written, check, time.monotonic() - started)


NOT_CHECKED = ("how llama.cpp itself splits text into tokens (its C++ pre-tokenizer), runs the graph and its "
               "kernels; rope scaling keys (transformers' GGUF reader ignores them)")


def gguf_source(rd: RunDir, recipe, merged_dir: str | Path | None) -> Path:
    """The model folder to convert: a verified merge of the adapter, or what a full fine-tune saved."""
    if merged_dir is None and not recipe.has_adapter:
        return rd.saved_dir(has_adapter=False)  # the whole model, as trained: nothing to merge or verify
    if merged_dir is None and (skip := recipe.method.spec.not_merged):
        raise UserError(f"{rd}: {skip}; GGUF export needs a model with the training merged into its weights")
    merged = Path(merged_dir) if merged_dir is not None else rd.merged
    merge_command = f"python -m qlora_lite merge {rd} --out {merged}"
    if not (merged / CONFIG_FILE).is_file():
        raise UserError(f"no merged model in {merged}: merge first ({merge_command}, or [export] merge = true in "
                        f"the recipe), or give the folder a merge wrote with --merged")
    check_file = merged / MERGE_CHECK
    if not check_file.is_file():
        raise UserError(f"{merged} has no {MERGE_CHECK}: it is not a merge qlora_lite verified; merge with "
                        f"{merge_command}")
    check = read_json(check_file)
    if check.get("passed") is not True:
        raise UserError(f"the merge in {merged} failed its check ({check_file}: {check.get('relative_diff')} of the "
                        f"logit scale, tolerance {check.get('tolerance')}): a GGUF of it would not be the model that "
                        f"was trained; merge again ({merge_command} --force)")
    return merged


def checked_text(check: GGUFCheck) -> str:
    """One paragraph for the README: what the export check compared and found."""
    if check.relative_diff is None:
        return f"**The export check failed**: {check.reason}."
    verdict = "passed" if check.passed else f"**failed** ({check.reason})"
    return (f"Export check {verdict}: transformers loaded the file back with "
            f"{'identical' if check.token_ids_match else 'DIFFERENT'} token ids; its logits differ from the merged "
            f"model's by at most {check.relative_diff:.1e} of the logit scale (tolerance {check.tolerance:.0e}) and "
            f"the most likely next token agrees at {check.top1_agreement:.0%} of positions ({GGUF_CHECK}). Not "
            f"checked: {NOT_CHECKED}.")

