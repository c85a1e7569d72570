"""Shapes where tensors cross module boundaries: the jaxtyping annotations are there, say what the docstrings
say, and hold when the functions run.

`shape_checked(fn)` runs a function under jaxtyping's runtime check: every argument and the return value whose
annotation is a jaxtyping type (also inside ``X | None`` and ``tuple[...]``) is checked with ``isinstance``
inside one `jaxtyping.jaxtyped` call, so a dimension name binds to one size across all of them. The boundary
functions run on a tiny random model built in code; tensors of the wrong shape or dtype are refused by the
same check, so it can fail."""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing

import jaxtyping
import pytest
import torch
from jaxtyping import Float
from torch import Tensor

from locaudit.edit.train import TrainLog, divergence
from locaudit.evaluate.ab import normalised_match_prob
from locaudit.evaluate.klce import cluster_se, head_logits
from locaudit.localize.agreement import ranking_scores
from locaudit.localize.activations import collect_activations
from locaudit.localize.probe import train_probes
from locaudit.models.batching import pad_id
from locaudit.models.interventions import as_3d, head_columns, head_mask, position_index
from locaudit.models.precision import resolve_precision
from locaudit.models.scoring import collate_completions, completion_logprobs, encode_completions
from locaudit.models.sites import ModelSites
from locaudit.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _is_shape(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, jaxtyping.AbstractArray)


def _check(hint, value, where: str) -> None:
    if _is_shape(hint):
        if not isinstance(value, hint):
            got = f"{type(value).__name__} {getattr(value, 'dtype', '')} {tuple(getattr(value, 'shape', ()))}"
            raise TypeError(f"{where}: {got} is not {hint.__name__}")
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        shapes = [a for a in args if _is_shape(a)]
        if shapes and isinstance(value, torch.Tensor) and not any(isinstance(value, a) for a in shapes):
            raise TypeError(f"{where}: {value.dtype} {tuple(value.shape)} is none of "
                            f"{', '.join(a.__name__ for a in shapes)}")
    elif origin is tuple and isinstance(value, tuple):
        for i, (a, v) in enumerate(zip(args, value)):
            _check(a, v, f"{where}[{i}]")


def _shape_hints(fn) -> dict:
    """{name: hint} of the parameters and return whose annotation holds a jaxtyping type."""

    def has_shape(h) -> bool:
        return _is_shape(h) or any(has_shape(a) for a in typing.get_args(h))

    return {k: h for k, h in typing.get_type_hints(fn, include_extras=True).items() if has_shape(h)}


def shape_checked(fn):
    hints, sig = _shape_hints(fn), inspect.signature(fn)

    @functools.wraps(fn)
    @jaxtyping.jaxtyped(typechecker=None)
    def run(*args, **kwargs):
        for name, value in sig.bind(*args, **kwargs).arguments.items():
            if name in hints:
                _check(hints[name], value, f"{fn.__qualname__}({name})")
        out = fn(*args, **kwargs)
        if "return" in hints:
            _check(hints["return"], out, f"{fn.__qualname__} -> return")
        return out

    return run


# the public boundaries: (function, the annotated names)
BOUNDARIES = [
    (position_index, {"attention_mask", "return"}),
    (as_3d, {"x", "return"}),
    (head_columns, {"return"}),
    (head_mask, {"return"}),
    (ModelSites.weight, {"return"}),
    (ModelSites.bias, {"return"}),
    (ModelSites.split_heads, {"o", "return"}),
    (completion_logprobs, {"return"}),
    (collect_activations, {"return"}),
    (train_probes, {"X", "y"}),
    (cluster_se, {"sums", "counts"}),
    (head_logits, {"h", "return"}),
    (normalised_match_prob, {"logp_match", "logp_other", "return"}),
    (ranking_scores, {"return"}),
    (divergence, {"a", "b"}),
]


@pytest.mark.parametrize("fn, names", BOUNDARIES, ids=[f.__qualname__ for f, _ in BOUNDARIES])
def test_boundaries_carry_shape_annotations_that_match_their_docstrings(fn, names):
    hints = _shape_hints(fn)
    assert set(hints) == names, f"{fn.__qualname__}: shape annotations on {sorted(hints)}, expected {sorted(names)}"
    # every shape the docstring writes as Float[Tensor, "..."] (Long, Bool, Int) is one of the annotations'
    written = {_dims(s) for s in re.findall(r'(?:Float|Long|Bool|Int)\[Tensor, "([^"]+)"\]', inspect.getdoc(fn) or "")}

    def dims_of(h) -> set[str]:
        return {_dims(h.dim_str)} if _is_shape(h) else set().union(*(dims_of(a) for a in typing.get_args(h)))

    annotated = set().union(*(dims_of(h) for h in hints.values()))
    assert written <= annotated, (fn.__qualname__, sorted(written - annotated), sorted(annotated))


def _dims(s: str) -> str:
    """A shape string in one spelling: head*head_dim is hd, a leading ... is *batch."""
    return " ".join(s.replace("head*head_dim", "hd").replace("...", "*batch").split())


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def test_model_boundaries_hold_on_a_tiny_model(lm):
    sites = lm.sites
    L, H, D = sites.shape
    w = shape_checked(sites.weight)(1)
    assert w.shape == (sites.d_model, H * D)
    b = shape_checked(sites.bias)(1)
    assert b is None or b.shape == (sites.d_model,)
    assert shape_checked(sites.split_heads)(torch.randn(2, 5, H * D)).shape == (2, 5, H, D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert shape_checked(position_index)("last", mask, 2, "cpu").tolist() == [2, 3]
    assert shape_checked(position_index)("all", mask, 2, "cpu") is None
    assert shape_checked(as_3d)(torch.randn(6, 4), 2).shape == (2, 3, 4)
    assert shape_checked(head_columns)(sites, [1]).tolist() == list(range(D, 2 * D))
    assert shape_checked(head_mask)(sites, [[0], [1, 2]]).sum(1).tolist() == [D, 2 * D]
    enc = encode_completions(lm.tokenizer, ["Paris is in", "Rome is in"], [" France", " Italy"])
    logp, n = shape_checked(completion_logprobs)(lm.model, collate_completions(enc, pad_id(lm.tokenizer)))
    assert logp.shape == n.shape == (2,) and (logp < 0).all() and (n > 0).all()


def test_localize_and_evaluate_boundaries_hold(lm):
    L, H, D = lm.sites.shape
    acts = shape_checked(collect_activations)(lm, ["a b c", "d e", "f"], batch_size=2, progress=False,
                                               precision=resolve_precision("fp32"))
    assert acts.shape == (3, L, H, D)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, L, H, D, generator=g), torch.tensor([0, 1] * 6)
    res = shape_checked(train_probes)(X, y, list(range(8)), list(range(8, 12)))
    assert tuple(res.val_acc.shape) == (L, H)
    se = shape_checked(cluster_se)(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2, 2, 3]))
    assert se is not None and se > 0
    logits = shape_checked(head_logits)(lm.model, torch.randn(2, 5, lm.sites.d_model))
    assert logits.shape == (2, 5, lm.model.config.vocab_size)
    p = shape_checked(normalised_match_prob)(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0]))
    assert p[0] > 0.5 and p[1] == 0.5
    every = [(l, h) for l in range(L) for h in range(H)][::-1]
    assert shape_checked(ranking_scores)(every, (L, H)).shape == (L, H)
    a, b = torch.zeros(L, 2, H * D), torch.zeros(L, 2, lm.sites.d_model)
    assert shape_checked(divergence)(a, b, TrainLog(heads="L0H0", lr=1e-3)) is None
    with pytest.raises(TypeError, match="layer rank out"):  # b from another model's depth
        shape_checked(divergence)(a, torch.zeros(L + 1, 2, lm.sites.d_model), TrainLog(heads="L0H0", lr=1e-3))


def test_the_check_refuses_wrong_shapes_and_dtypes(lm):
    with pytest.raises(TypeError, match="clusters"):  # two lengths for one dimension name
        shape_checked(cluster_se)(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="Float"):  # integer activations
        shape_checked(as_3d)(torch.ones(6, 4, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="N layer head head_dim"):  # a 3-D feature tensor
        shape_checked(train_probes)(torch.randn(12, 3, 4), torch.tensor([0, 1] * 6), [0, 1], [2])

    def transposed(x: Float[Tensor, "a b"]) -> Float[Tensor, "b a"]:
        return x  # the annotation promises the transpose

    with pytest.raises(TypeError, match="return"):
        shape_checked(transposed)(torch.randn(2, 3))
    assert shape_checked(transposed)(torch.randn(3, 3)).shape == (3, 3)  # square: both readings hold
