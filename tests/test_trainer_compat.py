"""A dude-patched model stays a normal transformers model: ``transformers.Trainer``
trains it (only the adapter moves) and ``dude.save`` writes the result."""

from __future__ import annotations

import torch
from tiny_models import VOCAB, tiny_llama

import dude


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_hf_trainer_trains_a_dude_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = dude.apply(tiny_llama(), dude.AdapterConfig(method="dude", r=4, alpha=8))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and frozen
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())  # base weights untouched
    assert all(not torch.equal(after[n], p) for n, p in trained.items())  # every adapter tensor moved
    dude.save(model, tmp_path / "adapter")
    reloaded = dude.load(tiny_llama(), tmp_path / "adapter")
    x = _Rows().ids[:2]
    model.eval()
    torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
