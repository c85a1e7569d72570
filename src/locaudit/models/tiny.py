"""Tiny random models built in code (no hub, no network), for tests and examples.

`tiny_model("llama")` returns a LoadedModel with a byte-level tokenizer and a few layers of the family.
"""

from __future__ import annotations

import torch

from locaudit.models.loading import LoadedModel, wrap_model
from locaudit.models.sites import SITES

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_families() -> tuple[str, ...]:
    """Every registered family with a tiny configuration (models/sites.py SITES), registry order."""
    return tuple(name for name, spec in SITES.items() if spec.tiny)


FAMILIES = tiny_families()  # the registry's families, each built tiny in tests


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <pad>, <bos>, <eos>) with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, n_layers: int = 3, n_heads: int = 4, head_dim: int = 8, vocab: int = 259):
    """The family's config from its registry card (`SiteSpec.tiny`), at the given tiny geometry."""
    from transformers import AutoConfig

    spec = SITES.get(family)
    if spec is None or not spec.tiny:
        raise ValueError(f"no tiny config for family {family!r}; choose from {tiny_families()}")
    d = n_heads * head_dim
    geometry = {"L": n_layers, "H": n_heads, "D": head_dim, "HD": d, "2HD": 2 * d, "HD+8": d + 8,
                "KV": max(1, n_heads // 2), "1": 1}
    kw = {key: geometry[v] if isinstance(v, str) and v in geometry else v for key, v in spec.tiny}
    return AutoConfig.for_model(family, **kw, vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_model(family: str = "llama", seed: int = 0, n_layers: int = 3, n_heads: int = 4, head_dim: int = 8,
               dtype: torch.dtype = torch.float32, with_bias: bool = False) -> LoadedModel:
    """A randomly initialised model of `family` (seeded), wrapped with its tiny tokenizer.

    `with_bias` gives o_proj a random bias (families whose o_proj has none get one added), so that
    tests exercise the bias path too.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, n_layers, n_heads, head_dim)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    with torch.no_grad():  # larger-than-default init so that edits and probes see real signal
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    lm = wrap_model(model, tiny_tokenizer(), name=f"tiny-{family}", owned=True)
    if with_bias:
        g = torch.Generator().manual_seed(seed + 1)
        for l in range(lm.sites.n_layers):
            op = lm.sites.o_proj(l)
            if getattr(op, "bias", None) is None:
                op.bias = torch.nn.Parameter(torch.zeros(lm.sites.d_model, dtype=dtype), requires_grad=False)
            with torch.no_grad():
                op.bias.copy_(torch.randn(lm.sites.d_model, generator=g).to(dtype) * 0.1)
        from locaudit.models.loading import model_fingerprint

        lm.fingerprint = model_fingerprint(model, lm.name)
    return lm
