"""Where per-head outputs live: one registry entry per model family.

A head's output o_h^l is a slice of the INPUT of layer l's attention output projection (o_proj):
o^l = concat_h o_h^l has num_attention_heads * head_dim entries, also under grouped-query attention.
Collecting after o_proj is a known pitfall (ITI's history): everything here reads the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from locaudit.errors import ConfigError, UnsupportedModelError


# a tiny random model's geometry, by name, for `SiteSpec.tiny` (values of the family's config keys)
TINY_GEOMETRY_KEYS = ("L", "H", "D", "HD", "2HD", "HD+8", "KV", "1")

_LLAMA_TINY = (("hidden_size", "HD"), ("intermediate_size", "2HD"), ("num_hidden_layers", "L"),
               ("num_attention_heads", "H"), ("num_key_value_heads", "KV"), ("head_dim", "D"),
               ("max_position_embeddings", 256), ("tie_word_embeddings", False))


@dataclass(frozen=True)
class SiteSpec:
    """One family's card: module paths, capabilities and a tiny test configuration.

    Paths: `layers` from the model root; `o_proj`, `mlp`, `mlp_down`, `q_proj`, `k_proj` from one layer
    (the attention module is o_proj's parent). `q_proj` / `k_proj`: the modules whose OUTPUT holds the
    queries / keys before any RoPE or q/k norm; `qkv` their column layout: "separate" (head h's query at
    columns h*D.., KV head g's key at g*D.. of k_proj), "fused" (one module, [q | k | v] concatenated:
    Phi-3's qkv_proj, GPT-2's c_attn), "neox" (one module, per head [q k v] of D each: GPT-NeoX). Capabilities:
    `prefix` (the frozen-prefix training path, edit/prefix.py, equals the full forward for this family).
    `tiny`: (config key, value) pairs for `models.tiny.tiny_model`; a value named in TINY_GEOMETRY_KEYS
    is replaced by the tiny geometry (L layers, H heads, D head_dim, HD = H*D, KV = max(1, H//2)).
    """

    layers: str
    o_proj: str
    conv1d: bool = False  # GPT-2's Conv1D stores the weight as [in, out]
    mlp: str | None = None  # the MLP block inside a layer (its output is added to the residual stream)
    mlp_down: str | None = None  # the MLP's output projection (input: MLP hidden; output: MLP output)
    prefix: bool = False  # frozen-prefix training (run_from_layer) is tested equal to the full forward
    tiny: tuple = ()  # ((config key, value or geometry name), ...); empty: no tiny model for tests
    q_proj: str | None = None  # the query projection (output: queries before RoPE / q_norm); None: unknown
    k_proj: str | None = None  # the key projection (the same module as q_proj where fused)
    qkv: str = "separate"  # column layout of the q_proj / k_proj outputs: separate, fused or neox


def _llama_like(*extra: tuple, mlp: str | None = "mlp", mlp_down: str | None = "mlp.down_proj",
                prefix: bool = True, q_proj: str = "self_attn.q_proj", k_proj: str = "self_attn.k_proj",
                qkv: str = "separate") -> SiteSpec:
    return SiteSpec("model.layers", "self_attn.o_proj", mlp=mlp, mlp_down=mlp_down, prefix=prefix,
                    tiny=_LLAMA_TINY + tuple(extra), q_proj=q_proj, k_proj=k_proj, qkv=qkv)


SITES: dict[str, SiteSpec] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    # sparse MoE: no single MLP down-projection
    "mixtral": _llama_like(("num_local_experts", 2), ("num_experts_per_tok", 1), mlp_down=None),
    "qwen2": _llama_like(("use_sliding_window", False)),
    "qwen3": _llama_like(),
    "gemma": _llama_like(),
    "gemma2": _llama_like(),
    # grouped-query attention with one KV head; head_dim is not hidden_size / heads
    "gemma3_text": _llama_like(("num_key_value_heads", "1"), ("hidden_size", "HD+8")),
    "olmo": _llama_like(),
    "olmo2": _llama_like(),
    "phi3": _llama_like(q_proj="self_attn.qkv_proj", k_proj="self_attn.qkv_proj", qkv="fused"),
    "gpt2": SiteSpec("transformer.h", "attn.c_proj", conv1d=True, mlp="mlp", mlp_down="mlp.c_proj", prefix=True,
                     tiny=(("n_embd", "HD"), ("n_layer", "L"), ("n_head", "H"), ("n_positions", 256)),
                     q_proj="attn.c_attn", k_proj="attn.c_attn", qkv="fused"),
    "gpt_neox": SiteSpec("gpt_neox.layers", "attention.dense", mlp="mlp", mlp_down="mlp.dense_4h_to_h", prefix=True,
                         tiny=(("hidden_size", "HD"), ("intermediate_size", "2HD"), ("num_hidden_layers", "L"),
                               ("num_attention_heads", "H"), ("max_position_embeddings", 256),
                               ("rotary_pct", 0.5)),
                         q_proj="attention.query_key_value", k_proj="attention.query_key_value", qkv="neox"),
    # GPT-J: attention and MLP in parallel from one LayerNorm (ln_1), rotary on the first rotary_dim
    # dims of each head (partial: 4 of the tiny head_dim 8; 64 of 256 in GPT-J-6B); out_proj has no bias
    "gptj": SiteSpec("transformer.h", "attn.out_proj", mlp="mlp", mlp_down="mlp.fc_out", prefix=True,
                     tiny=(("n_embd", "HD"), ("n_inner", "2HD"), ("n_layer", "L"), ("n_head", "H"),
                           ("n_positions", 256), ("rotary_dim", 4)),
                     q_proj="attn.q_proj", k_proj="attn.k_proj"),
    "opt": SiteSpec("model.decoder.layers", "self_attn.out_proj", mlp_down="fc2", prefix=True,
                    tiny=(("hidden_size", "HD"), ("ffn_dim", "2HD"), ("num_hidden_layers", "L"),
                          ("num_attention_heads", "H"), ("max_position_embeddings", 256),
                          ("word_embed_proj_dim", "HD")),
                    q_proj="self_attn.q_proj", k_proj="self_attn.k_proj"),
}


def register_site(model_type: str, layers: str, o_proj: str, conv1d: bool = False, **fields) -> SiteSpec:
    """Declare a family not in the registry (config.model_type): its paths, and optionally the other
    SiteSpec fields (mlp, mlp_down, prefix, tiny, q_proj, k_proj, qkv)."""
    spec = SiteSpec(layers, o_proj, conv1d, **fields)
    SITES[model_type] = spec
    return spec


def site_spec(model_type: str) -> SiteSpec:
    """The registered card of a family; UnsupportedModelError naming the registered ones otherwise."""
    if model_type not in SITES:
        raise UnsupportedModelError(f"model family {model_type!r} is not registered; registered: {', '.join(sorted(SITES))}")
    return SITES[model_type]


def parse_site(text: str) -> SiteSpec:
    """Parse ``layers=model.layers,o_proj=self_attn.o_proj[,conv1d=1]`` (the CLI's --site)."""
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    if "layers" not in fields or "o_proj" not in fields:
        raise UnsupportedModelError(
            f"--site {text!r}: expected 'layers=<path to the layer list>,o_proj=<path inside a layer>', "
            "e.g. 'layers=model.layers,o_proj=self_attn.o_proj'"
        )
    return SiteSpec(fields["layers"], fields["o_proj"], fields.get("conv1d", "0") in ("1", "true", "True"))


def output_head(model: nn.Module) -> nn.Module:
    """The model's LM head (output embedding): its input is the final normed hidden state."""
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output embedding (lm_head): its final hidden state "
                          "cannot be read, nor logits computed from it (e.g. for KL/CE)")
    return head


def module_at(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class ModelSites:
    """A model's head sites: layers, o_proj modules, and the shapes L, H, D."""

    def __init__(self, model: nn.Module, spec: SiteSpec | None = None) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        if spec is None:
            spec = SITES.get(model_type)
        if spec is None:
            raise UnsupportedModelError(
                f"model family {model_type!r} has no head site. Supported families: {', '.join(sorted(SITES))}. "
                "Declare one with locaudit.models.sites.register_site(model_type, layers='model.layers', "
                "o_proj='self_attn.o_proj') or on the command line with "
                "--site 'layers=model.layers,o_proj=self_attn.o_proj'."
            )
        self.model = model
        self.spec = spec
        self.model_type = model_type
        try:
            self.layer_list: nn.ModuleList = module_at(model, spec.layers)  # type: ignore[assignment]
            self._o_projs = [module_at(layer, spec.o_proj) for layer in self.layer_list]
        except (AttributeError, IndexError) as e:
            raise UnsupportedModelError(
                f"model {model_type!r}: site paths layers={spec.layers!r}, o_proj={spec.o_proj!r} do not exist ({e})"
            ) from e
        self.n_layers = len(self.layer_list)
        n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        if n_heads is None:
            raise UnsupportedModelError(f"model {model_type!r}: config has no num_attention_heads")
        self.n_heads = int(n_heads)
        in_features = self._in_features(self._o_projs[0])
        if in_features % self.n_heads:
            raise UnsupportedModelError(
                f"model {model_type!r}: o_proj input size {in_features} is not a multiple of {self.n_heads} heads"
            )
        self.head_dim = in_features // self.n_heads
        self.d_model = self._out_features(self._o_projs[0])
        n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads  # grouped-query attention: fewer
        self.n_kv_heads = int(n_kv)

    def _in_features(self, m: nn.Module) -> int:
        w = m.weight
        return int(w.shape[0] if self.spec.conv1d else w.shape[1])

    def _out_features(self, m: nn.Module) -> int:
        w = m.weight
        return int(w.shape[1] if self.spec.conv1d else w.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_layers, n_heads, head_dim)."""
        return self.n_layers, self.n_heads, self.head_dim

    def layer(self, l: int) -> nn.Module:
        return self.layer_list[l]

    def embed(self) -> nn.Module:
        """The token embedding module (its output is the residual stream entering layer 0)."""
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Module:
        """The LM head (output embedding); its input is the final normed hidden state."""
        return output_head(self.model)

    def mlp_down(self, l: int) -> nn.Module:
        """Layer l's MLP output projection (input: the MLP hidden activation; output: the MLP output)."""
        if self.spec.mlp_down is None:
            raise UnsupportedModelError(f"model {self.model_type!r}: no MLP down-projection site is registered")
        return module_at(self.layer_list[l], self.spec.mlp_down)

    def mlp(self, l: int) -> nn.Module:
        """Layer l's MLP block; for families without a separate block, its down-projection."""
        if self.spec.mlp is None:
            return self.mlp_down(l)
        return module_at(self.layer_list[l], self.spec.mlp)

    def o_proj(self, l: int) -> nn.Module:
        """Layer l's attention output projection; its input is the concatenated head outputs."""
        return self._o_projs[l]

    def attention(self, l: int) -> nn.Module:
        """Layer l's attention module (o_proj's parent): one call computes every head's output."""
        path = self.spec.o_proj.rpartition(".")[0]
        if not path:
            raise UnsupportedModelError(f"model {self.model_type!r}: o_proj {self.spec.o_proj!r} has no parent "
                                        "module, so the attention module is unknown")
        return module_at(self.layer_list[l], path)

    def _qk_module(self, path: str | None, what: str, l: int) -> nn.Module:
        if path is None:
            raise UnsupportedModelError(f"model {self.model_type!r}: no {what} site is registered (SiteSpec.{what})")
        return module_at(self.layer_list[l], path)

    def q_proj(self, l: int) -> nn.Module:
        """Layer l's query projection: its output holds every head's query before RoPE and any q_norm
        (a fused q/k/v projection where the family has one: `qk_columns` says where)."""
        return self._qk_module(self.spec.q_proj, "q_proj", l)

    def k_proj(self, l: int) -> nn.Module:
        """Layer l's key projection (output: every KV head's key before RoPE and any k_norm)."""
        return self._qk_module(self.spec.k_proj, "k_proj", l)

    def qk_columns(self, kind: str, head: int) -> slice:
        """The columns of q_proj's output (kind "q", a query head) or k_proj's (kind "k", a KV head) that
        hold that head's query or key, by the family's layout (SiteSpec.qkv)."""
        D, layout = self.head_dim, self.spec.qkv
        if kind not in ("q", "k"):
            raise ConfigError(f"qk_columns: kind {kind!r}: expected 'q' or 'k'")
        n = self.n_heads if kind == "q" else self.n_kv_heads
        if not 0 <= int(head) < n:
            raise ConfigError(f"qk_columns: {kind} head {head} outside 0..{n - 1}")
        if layout == "neox":  # per head [q k v], D columns each
            start = int(head) * 3 * D + (0 if kind == "q" else D)
        elif layout == "fused":  # [q of every head | k of every KV head | v]
            start = int(head) * D + (0 if kind == "q" else self.n_heads * D)
        elif layout == "separate":
            start = int(head) * D
        else:
            raise UnsupportedModelError(f"model {self.model_type!r}: unknown qkv layout {layout!r}")
        return slice(start, start + D)

    def kv_head(self, h: int) -> int:
        """The KV head that query head h reads (grouped-query attention: H / n_kv query heads per KV head)."""
        return int(h) // (self.n_heads // self.n_kv_heads)

    def weight(self, l: int) -> Float[Tensor, "d_model hd"]:
        """Float[Tensor, "d_model head*head_dim"]: W^l such that o_proj(o) = W^l o (+ bias)."""
        w = self._o_projs[l].weight
        return w.t() if self.spec.conv1d else w

    def bias(self, l: int) -> Float[Tensor, "d_model"] | None:
        """Float[Tensor, "d_model"] or None."""
        return getattr(self._o_projs[l], "bias", None)

    def split_heads(self, o: Float[Tensor, "*batch hd"]) -> Float[Tensor, "*batch head head_dim"]:
        """Float[Tensor, "... head*head_dim"] -> Float[Tensor, "... head head_dim"]."""
        return o.unflatten(-1, (self.n_heads, self.head_dim))

    def head_slice(self, h: int) -> slice:
        """The o_proj input coordinates of head h."""
        return slice(h * self.head_dim, (h + 1) * self.head_dim)
