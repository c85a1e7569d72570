"""Edit kinds own their export (merged_state, peft_config, adds_o_bias) and edit/export.py does the rest for any
kind: a kind defined here, outside the package, exports as a merged model and as a PEFT adapter whose logits are
the live edit's (PEFT's own LoRA forward is the independent implementation)."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from locaudit.edit.base import EDIT_KINDS, ExportMixin, check_outside, check_tensor, register_edit
from locaudit.errors import ConfigError
from locaudit.heads import HeadSet
from locaudit.models.interventions import site_hooks
from locaudit.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class HeadScale(ExportMixin):
    """Scales head h's o_proj input at layer l by (1 + s[l, h]): o_proj's weight columns of that head, merged."""

    def __init__(self, s: torch.Tensor, heads: HeadSet) -> None:
        self.s, self.heads = s, heads

    def _scale(self, lm, l: int) -> torch.Tensor:
        D = lm.sites.head_dim
        return (1 + self.s[l]).repeat_interleave(D)  # [H*D]

    @contextmanager
    def applied(self, lm):
        fns = {("heads", l): (lambda x, v=self._scale(lm, l): x * v.to(x.dtype)) for l in self.heads.layers}
        with site_hooks(lm.sites, fns):
            yield

    def describe(self) -> dict:
        return {"kind": self.kind, "heads": self.heads.to_dict()}

    def verify(self, lm=None) -> None:
        L, H = self.s.shape
        check_tensor("headscale s", self.s)
        mask = torch.zeros(L, H, dtype=torch.bool)
        for l, h in self.heads.heads:
            mask[l, h] = True
        check_outside("headscale s", self.s, mask, f"head set {self.heads.name!r}")

    def save(self, path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.s, path / "s.pt")
        (path / "meta.json").write_text(json.dumps({"kind": self.kind, "heads": self.heads.to_dict()}))
        return path

    @classmethod
    def load(cls, path, **overrides):
        path = Path(path)
        return cls(torch.load(path / "s.pt"), HeadSet.from_dict(json.loads((path / "meta.json").read_text())["heads"]))

    # its export
    def _delta(self, lm, l: int) -> torch.Tensor:
        """Float[Tensor, "d_model head*head_dim"]: W diag(scale - 1), the change of o_proj's weight."""
        return lm.sites.weight(l).detach().double().cpu() * (self._scale(lm, l).double() - 1)

    def merged_state(self, lm) -> dict:
        from locaudit.edit.export import o_proj_names

        names, sd = o_proj_names(lm), dict(lm.model.state_dict())
        for l in self.heads.layers:
            w = sd[f"{names[l]}.weight"]
            delta = self._delta(lm, l)
            sd[f"{names[l]}.weight"] = (w.detach().double().cpu() + (delta.t() if lm.sites.spec.conv1d else delta)).to(w.dtype)
        return sd

    def peft_config(self, lm):
        """delta W = B A with A the one-hot rows of the edited heads' columns, B those columns of delta W."""
        from locaudit.edit.export import PeftAdapter

        D, HD = lm.sites.head_dim, lm.sites.n_heads * lm.sites.head_dim
        layers = sorted(self.heads.layers)
        cols = {l: torch.cat([torch.arange(h * D, (h + 1) * D) for ll, h in self.heads.heads if ll == l]) for l in layers}
        rank = max(len(c) for c in cols.values())
        tensors = {}
        for l in layers:
            A, B = torch.zeros(rank, HD), torch.zeros(lm.sites.d_model, rank)
            A[torch.arange(len(cols[l])), cols[l]] = 1.0
            B[:, : len(cols[l])] = self._delta(lm, l)[:, cols[l]].float()
            tensors[l] = {"lora_A.weight": A, "lora_B.weight": B}
        return PeftAdapter(layers, rank, False, tensors)


@pytest.fixture
def kind():
    register_edit("headscale_test")(HeadScale)
    yield HeadScale
    EDIT_KINDS.pop("headscale_test", None)


def _edit(lm) -> HeadScale:
    heads = HeadSet.parse("L0H1,L2H0,L2H3")
    s = torch.zeros(lm.sites.n_layers, lm.sites.n_heads)
    for i, (l, h) in enumerate(heads.heads):
        s[l, h] = 0.5 + 0.4 * i
    return HeadScale(s, heads)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_kind_defined_outside_exports_merged_and_peft(kind, family, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from locaudit.edit.export import export_merged, export_peft

    lm = tiny_model(family, with_bias=family == "gpt2")  # a saved folder holds only biases its config knows
    edit = _edit(lm)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with edit.applied(lm):
            live = lm.model(input_ids=ids).logits
    assert (live - base).abs().max() > 1e-3
    merged = AutoModelForCausalLM.from_pretrained(str(export_merged(edit, lm, tmp_path / "m")), attn_implementation="eager")
    peft = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(export_peft(edit, lm, tmp_path / "p")))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, live, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(peft(input_ids=ids).logits, live, rtol=1e-4, atol=1e-4)


def test_a_kind_without_export_methods_is_refused_naming_them(tmp_path: Path) -> None:
    from locaudit.edit.export import export_merged

    class Bare:
        kind = "bare"

        def verify(self, lm=None) -> None: ...

    with pytest.raises(ConfigError, match=r"'bare'.*merged_state"):
        export_merged(Bare(), tiny_model("llama"), tmp_path / "m")


def test_a_kind_without_an_adapter_form_refuses_peft(kind, tmp_path: Path) -> None:
    from locaudit.edit.export import export_peft

    class MergedOnly(HeadScale):
        def peft_config(self, lm):
            return None

    lm = tiny_model("llama")
    e = _edit(lm)
    with pytest.raises(ConfigError, match="no adapter form"):
        export_peft(MergedOnly(e.s, e.heads), lm, tmp_path / "p")
    assert not (tmp_path / "p").exists()
