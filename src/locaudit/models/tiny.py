"""Tiny random models built in code (no hub, no network), for tests and examples.

`tiny_model("llama")` returns a LoadedModel with a byte-level tokenizer and a few layers of the family.
"""

from __future__ import annotations

import torch

from locaudit.models.loading import LoadedModel, wrap_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox", "opt")


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
    from transformers import AutoConfig

    d = n_heads * head_dim
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        kw = dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=max(1, n_heads // 2), head_dim=head_dim, max_position_embeddings=256,
                  tie_word_embeddings=False)
        if family == "qwen2":
            kw["use_sliding_window"] = False
        return AutoConfig.for_model(family, **kw, **common)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=d, n_layer=n_layers, n_head=n_heads, n_positions=256, **common)
    if family == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                                    num_attention_heads=n_heads, max_position_embeddings=256, rotary_pct=0.5,
                                    **common)
    if family == "opt":
        return AutoConfig.for_model("opt", hidden_size=d, ffn_dim=2 * d, num_hidden_layers=n_layers,
                                    num_attention_heads=n_heads, max_position_embeddings=256, word_embed_proj_dim=d,
                                    **common)
    raise ValueError(f"no tiny config for family {family!r}; choose from {FAMILIES}")


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
    lm = wrap_model(model, tiny_tokenizer(), name=f"tiny-{family}")
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
