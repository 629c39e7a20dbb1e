"""The reference: one user's personal adapter trained the way the published OPPU script does it.

Per user: a fresh PEFT wrap (`get_peft_model`) of the base model with the task adapter merged
into it, the user's examples tokenized for that user, a fresh `transformers.Trainer`, padding to
the longest sequence of each batch (DataCollatorForSeq2Seq) and the model's full-sequence LM loss
with prompt and padding masked by labels = -100. Same examples, epochs, batch size, learning
rate (constant, as our loop), AdamW and gradient clipping as ours, so the two differ only in the
procedure. This module exists for the benchmark only; oppu never trains this way.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Sequence

from shared.adapters import peft_config
from shared.quant4bit import prepare_quantized_for_training
from shared.prompting import encode_answer, encode_prompt, fit_prompt
from shared.training import Example


class ListDataset:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def tokenize_user(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[dict]:
    """As a Trainer user tokenizes a user's data: prompt + answer ids, labels -100 on the prompt.
    (The same token sequences as ours, so losses and token counts compare.)"""
    rows = []
    for ex in examples:
        answer = encode_answer(tokenizer, ex.target)[: max_length // 2]
        prompt = fit_prompt(encode_prompt(tokenizer, ex.prompt), max_length - len(answer))
        ids = prompt + answer
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + answer})
    return rows


def merged_base(base_model: Any, base_spec: Any, base_state: dict) -> Any:
    """The task (base) adapter merged into the base weights, as the script does before users."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    pm = get_peft_model(base_model, peft_config(base_spec))
    set_peft_model_state_dict(pm, base_state)
    merged = pm.merge_and_unload()
    prepare_quantized_for_training(merged)  # merging re-quantizes the 4-bit layers
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def train_user(merged: Any, tokenizer: Any, examples: Sequence[Example], personal_spec: Any, train: Any,
               *, device: str, bf16: bool) -> tuple[Any, float]:
    """Fresh wrap + fresh Trainer for one user; returns (the wrapped model, seconds)."""
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    torch.manual_seed(train.seed)
    model = get_peft_model(merged, peft_config(personal_spec))
    data = ListDataset(tokenize_user(tokenizer, examples, train.max_length))
    with tempfile.TemporaryDirectory(prefix="oppu-reference-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=train.batch_size, num_train_epochs=train.epochs,
            learning_rate=train.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm or 0.0, optim="adamw_torch", logging_steps=10**6, save_strategy="no",
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
            seed=train.seed, use_cpu=device == "cpu", bf16=bf16,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
        Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    if device == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - start
