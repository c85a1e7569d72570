"""Issue 28: models a user already holds, `tiny:` everywhere through one parser, unknown names failing at
once with close names, and exports a user can reload (PEFT merge, base_model_name_or_path)."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from typer.testing import CliRunner

from locaudit.errors import ConfigError
from locaudit.models.tiny import tiny_model

runner = CliRunner()


def _hand_loaded(tmp_path, family="llama"):
    """A PreTrainedModel and tokenizer loaded by hand with transformers, as a user holds them (train mode,
    gradients on, as after fine-tuning)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = tiny_model(family)
    folder = tmp_path / f"my-{family}"
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, AutoTokenizer.from_pretrained(str(folder)), folder


def _toy_data():
    import pandas as pd

    from locaudit import load_behaviour

    df = pd.DataFrame({"prompt": [f"Is {i} an even number?" for i in range(30)],
                       "chosen": ["Yes." if i % 2 == 0 else "No." for i in range(30)],
                       "rejected": ["No." if i % 2 == 0 else "Yes." for i in range(30)]})
    return load_behaviour(df, name="even")


def test_a_hand_loaded_model_goes_through_collect_iti_export_and_is_given_back(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from locaudit import collect, fit_iti, load_model, probe
    from locaudit.edit.export import export_merged, export_peft

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    model, tok, folder = _hand_loaded(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match=r"eval\(\) on \d+ module.*requires_grad=False on \d+ param.*restore"):
        lm = load_model(model, tokenizer=tok)
    assert lm.model is model and not model.training and not any(p.requires_grad for p in model.parameters())
    assert lm.name == str(folder) and lm.info["source"] == str(folder)
    with lm:
        acts = collect(lm, _toy_data(), progress=False)
        iti = fit_iti(acts, "top4", probe=probe(acts), alpha=5)
        ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), iti.applied(lm):
            live = model(input_ids=ids).logits
        merged = export_merged(iti, lm, tmp_path / "merged")
        adapter = export_peft(iti, lm, tmp_path / "peft")
    # given back: training mode and gradients as the user had them, weights untouched
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    # the merged route reloads edited with plain transformers
    m = AutoModelForCausalLM.from_pretrained(str(merged), attn_implementation="eager")
    with torch.no_grad():
        assert float((m(input_ids=ids).logits - live).abs().max()) <= 1e-4
    # the adapter names the model as the user gave it (their folder), and merges by the route it records
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(folder)
    meta = json.loads((adapter / "locaudit_edit.json").read_text())
    assert "attention_bias=True" in meta["merge"] and "merge_and_unload" in meta["merge"]
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], attn_implementation="eager",
                                                attention_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    with torch.no_grad():
        assert float((merged_peft(input_ids=ids).logits - live).abs().max()) <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_iti_adapter_merges_with_merge_and_unload_where_o_proj_has_a_bias(tmp_path, family):
    import copy

    from peft import PeftModel

    from locaudit.edit.export import export_peft
    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet

    lm = tiny_model(family)
    L, H, D = lm.sites.shape
    theta = torch.zeros(L, H * D)
    theta[1, 2 * D:3 * D] = torch.randn(D, generator=torch.Generator().manual_seed(0))
    edit = ITIEdit(theta, 3.0, HeadSet.parse("L1H2"))
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), edit.applied(lm):
        live = lm.model(input_ids=ids).logits
    out = export_peft(edit, lm, tmp_path / "peft")
    assert json.loads((out / "locaudit_edit.json").read_text())["merge"].endswith("merge_and_unload()")
    merged = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(out)).merge_and_unload()
    with torch.no_grad():
        assert float((merged(input_ids=ids).logits - live).abs().max()) <= 1e-4


def test_restore_gives_back_a_pad_token_it_set_and_a_model_locaudit_loaded_has_nothing_to_restore(tmp_path):
    from locaudit import load_model

    model, tok, _ = _hand_loaded(tmp_path)
    tok.pad_token = None
    with pytest.warns(UserWarning, match="pad token"):
        lm = load_model(model, tokenizer=tok)
    assert tok.pad_token == tok.eos_token
    lm.restore()
    assert tok.pad_token is None and model.training
    lm.restore()  # idempotent
    assert load_model("tiny:llama").saved_state is None


def test_a_model_object_needs_its_tokenizer_and_is_neither_moved_nor_cast(tmp_path):
    from locaudit import load_model

    model, tok, _ = _hand_loaded(tmp_path)
    with pytest.raises(ConfigError, match="needs its tokenizer.*AutoTokenizer"):
        load_model(model)
    with pytest.raises(ConfigError, match="bf16.*is in float32.*does not cast"):
        load_model(model, tokenizer=tok, dtype="bf16")
    with pytest.raises(ConfigError, match="tokenizer goes with a model object"):
        load_model("tiny:llama", tokenizer=tok)
    with pytest.raises(ConfigError, match="got int"):
        load_model(3)
    assert model.training  # refused before anything changed


def test_tiny_grammar_has_one_parser_used_by_api_cli_and_studies(monkeypatch):
    from locaudit.cli.export import load_named_model
    from locaudit.models import loading

    calls = []
    real = loading.parse_tiny
    monkeypatch.setattr(loading, "parse_tiny", lambda name: calls.append(name) or real(name))
    from locaudit import load_model

    assert real("tiny:llama") == ("llama", 0) and real("tiny:gpt2:7") == ("gpt2", 7) and real("tiny:") == ("llama", 0)
    assert real("smollm2-135m-instruct") is None
    assert load_model("tiny:gpt2:7").name == "tiny:gpt2:7"
    assert load_named_model("tiny:qwen2").sites.spec is not None
    assert calls[:2] == ["tiny:gpt2:7", "tiny:qwen2"]
    for bad, msg in [("tiny:lama", "did you mean tiny:llama"), ("tiny:llama:x", "seed 'x'"),
                     ("tiny:llama:1:2", "expected tiny:FAMILY")]:
        with pytest.raises(ConfigError, match=msg):
            real(bad)


def test_study_model_uses_the_same_parser():
    from types import SimpleNamespace

    from locaudit.study.steps.context import load_study_model

    spec = SimpleNamespace(resolved_model_name=lambda: "tiny:lama")
    with pytest.raises(ConfigError, match=r"model.name: .*did you mean tiny:llama"):
        load_study_model(spec)
    spec = SimpleNamespace(resolved_model_name=lambda: "tiny:opt:2")
    assert load_study_model(spec).name == "tiny:opt:2"


def test_cli_accepts_tiny_models(tmp_path, monkeypatch):
    from locaudit.cli.main import app

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Is {i} even?", "chosen": "Yes." if i % 2 == 0 else "No.",
                                         "rejected": "No." if i % 2 == 0 else "Yes."}) + "\n" for i in range(20)))
    res = runner.invoke(app, ["collect", "--model", "tiny:llama", "--data", f"pairs:{pairs}", "--device", "cpu",
                              "--precision", "fp32", "--out", str(tmp_path / "acts")])
    assert res.exit_code == 0, res.output
    assert "layers" in res.output and (tmp_path / "acts" / "meta.json").is_file()


@pytest.mark.parametrize("name,suggestion", [("smollm2-135m", "smollm2-135m-instruct"),
                                             ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
                                             ("gemma3-270", "gemma3-270m")])
def test_unknown_name_offline_fails_at_once_with_close_names(monkeypatch, name, suggestion):
    from locaudit import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"model '{name}'.*HF_HUB_OFFLINE.*did you mean '{suggestion}'") as e:
        load_model(name)
    assert time.perf_counter() - t < 3.0
    assert "\n" not in str(e.value)


def test_unknown_name_online_asks_the_hub_once_without_retries(monkeypatch):
    """With the hub unreachable (no HF_HUB_OFFLINE), one request with a short timeout, then one line."""
    import huggingface_hub

    from locaudit import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def unreachable(self, repo_id, timeout=None, **kw):
        calls.append((repo_id, timeout))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setenv("LOCAUDIT_HUB_TIMEOUT", "2")
    with pytest.raises(ConfigError, match=r"could not be asked.*timeout 2 s.*HF_HUB_OFFLINE=1.*did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m")
    assert calls == [("smollm2-135m", 2.0)]


@pytest.mark.parametrize("family,route", [("gpt2", "merge_and_unload()"), ("qwen3", "attention_bias=True"),
                                          ("mistral", "export --format merged"), ("mixtral", "no merged form")])
def test_each_family_records_how_its_iti_adapter_merges(family, route):
    from locaudit.edit.export import peft_merge_route

    lm = tiny_model(family)
    assert route in peft_merge_route("iti", lm)
    assert peft_merge_route("lora", lm).endswith("merge_and_unload()")


def test_a_hub_that_answers_with_an_error_other_than_not_found_is_left_to_from_pretrained(monkeypatch):
    """A rate limit or a server error is not 'no such model': check_hub_id lets from_pretrained report it."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    from locaudit.models.loading import check_hub_id

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    from types import SimpleNamespace

    def response(code):  # what the hub library's errors read of a response
        return SimpleNamespace(status_code=code, headers={}, request=None)

    def busy(self, repo_id, timeout=None, **kw):
        raise HfHubHTTPError("429 Too Many Requests", response=response(429))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", busy)
    check_hub_id("someorg/some-model")  # no error here

    def missing(self, repo_id, timeout=None, **kw):
        from huggingface_hub.errors import RepositoryNotFoundError

        raise RepositoryNotFoundError("404 Repository Not Found", response=response(404))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(ConfigError, match="no public model of that id"):
        check_hub_id("someorg/some-model")
