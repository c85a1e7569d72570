"""IPO / DPO / SFT losses: hand-computed values on toy tensors, and TRL's DPOTrainer on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from locaudit.edit.objectives import PairLogps, dpo_loss, ipo_loss, pair_loss, preference_stats, sft_loss
from locaudit.errors import ConfigError

# two pairs: summed log-probs and completion lengths
POLICY = PairLogps(torch.tensor([-6.0, -2.0]), torch.tensor([-9.0, -1.0]), torch.tensor([3, 2]), torch.tensor([4, 1]))
REF = PairLogps(torch.tensor([-7.5, -2.5]), torch.tensor([-8.0, -1.5]), torch.tensor([3, 2]), torch.tensor([4, 1]))


def test_ipo_hand_computed():
    # pair 0: (-6+7.5)/3 - (-9+8)/4 = 0.5 + 0.25 = 0.75 ; pair 1: 0.5/2 - 0.5/1 = -0.25
    tau = 0.1
    expected = torch.tensor([(0.75 - 5.0) ** 2, (-0.25 - 5.0) ** 2])
    torch.testing.assert_close(ipo_loss(POLICY, REF, tau), expected)
    torch.testing.assert_close(pair_loss("ipo", POLICY, REF, tau=0.25), torch.tensor([(0.75 - 2) ** 2, (-0.25 - 2) ** 2]))


def test_dpo_hand_computed():
    # summed: pair 0: 1.5 - (-1) = 2.5 ; pair 1: 0.5 - 0.5 = 0
    beta = 0.2
    expected = torch.tensor([-math.log(1 / (1 + math.exp(-0.5))), math.log(2.0)])
    torch.testing.assert_close(dpo_loss(POLICY, REF, beta), expected)


def test_sft_hand_computed_and_batched_axes():
    # token-level mean NLL of chosen over the batch: (6 + 2) / (3 + 2)
    torch.testing.assert_close(sft_loss(POLICY), torch.tensor([1.6, 1.6]))
    two = PairLogps(*(torch.stack([t, t]) for t in (POLICY.chosen, POLICY.rejected, POLICY.n_chosen, POLICY.n_rejected)))
    torch.testing.assert_close(sft_loss(two), torch.full((2, 2), 1.6))
    torch.testing.assert_close(ipo_loss(two, REF, 0.1)[1], ipo_loss(POLICY, REF, 0.1))


def test_zero_edit_ipo_is_target_squared():
    assert torch.allclose(ipo_loss(REF, REF, 0.1), torch.full((2,), 25.0))


def test_preference_stats():
    s = preference_stats(POLICY)
    # averages: pair 0: -2 vs -2.25 (chosen wins); pair 1: -1 vs -1 (tie: not a win)
    assert s["accuracy"] == 0.5 and s["n"] == 2
    assert s["margin"] == pytest.approx((0.25 + 0.0) / 2)


def test_unknown_objective():
    with pytest.raises(ConfigError, match="objective"):
        pair_loss("kto", POLICY, REF)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid"])
def test_matches_trl_dpo_trainer(tmp_path, loss_type):
    """TRL's own loss on its own batch equals ours computed with models.scoring on the same tokens."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from locaudit.models.scoring import CompletionBatch, completion_logprobs
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    pairs = [dict(prompt=f"Q: question {i}?\nA:", chosen=f" yes {i}", rejected=f" no no {i % 3}") for i in range(8)]
    beta = 0.1
    args = DPOConfig(output_dir=str(tmp_path), loss_type=[loss_type], beta=beta, per_device_train_batch_size=4,
                     report_to=[], use_cpu=True, save_strategy="no", bf16=False)
    trainer = DPOTrainer(model=lm.model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=lm.tokenizer,
                         peft_config=LoraConfig(r=1, lora_alpha=1, target_modules=["o_proj"], lora_dropout=0.0))
    pm = trainer.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # a non-zero adapter, so that policy != reference
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(pm, batch))
        comp = batch["completion_mask"].bool()
        plen = comp.float().argmax(dim=1)
        cb = CompletionBatch(batch["input_ids"], batch["attention_mask"], comp, plen)
        pol_s, n = completion_logprobs(pm, cb)
        with pm.disable_adapter():
            ref_s, _ = completion_logprobs(pm, cb)
    B = len(n) // 2
    pol = PairLogps(pol_s[:B], pol_s[B:], n[:B], n[B:])
    ref = PairLogps(ref_s[:B], ref_s[B:], n[:B], n[B:])
    ours = pair_loss("ipo" if loss_type == "ipo" else "dpo", pol, ref, tau=beta, beta=beta).mean()
    zero_edit = 25.0 if loss_type == "ipo" else math.log(2.0)
    assert abs(trl_loss - zero_edit) > 1e-3  # the adapter really changes the model
    assert float(ours) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
