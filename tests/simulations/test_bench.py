"""The benchmark's own arithmetic: the FLOP count it reports and the targets it states."""

import subprocess
import sys

import torch

from simulations.bench.flops import Shape, training_flops


def test_flop_count_matches_what_torch_executes(tiny_engine):
    """Our analytic count of one training step (frozen base, LoRA, head at answer positions) against
    torch's FLOP counter over the ops actually run, attention excluded (torch counts it non-causal)."""
    from torch.utils.flop_counter import FlopCounterMode

    from shared import adapters
    from shared.training import Example, answer_loss, collate, encode_examples

    e = tiny_engine
    enc = encode_examples(e.tokenizer, [Example("Rate this review: bright strings, good value " * 3, "5")], 256)
    ids, mask, labels = collate(enc, [0], e.tokenizer.pad_token_id, "cpu")
    adapters.activate(e.model, [adapters.BASE, adapters.PERSONAL], trainable=adapters.PERSONAL)
    e.model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            answer_loss(e.model, ids, mask, labels).backward()
    finally:
        e.model.zero_grad(set_to_none=True)
        adapters.activate(e.model, [adapters.BASE])
        e.model.eval()
    counts = counter.get_flop_counts()["Global"]
    measured = sum(v for k, v in counts.items() if "attention" not in str(k))
    shape = Shape.of(e.base.model.config)
    n, answer = len(enc[0].input_ids), len(enc[0].input_ids) - enc[0].n_prompt
    spec = e.personal_adapter_spec
    ours = training_flops(shape, [(n, answer)], lora_r=spec.r, lora_targets=spec.target_modules)
    # The same count without attention (torch's counter attributes it separately).
    no_attn = ours - 3 * 4 * shape.heads * shape.head_dim * n * (n + 1) / 2 * shape.layers
    # Base adapter LoRA is active too (forward + input grad; no weight grad): count it apart.
    base_lora = sum(spec.r * (i + o) for m, (i, o) in shape.linear_dims().items() if m in spec.target_modules)
    no_attn += 4 * base_lora * shape.layers * n
    assert abs(measured - no_attn) / measured < 0.05, (measured, no_attn)


def test_summary_states_each_target_with_met_or_not():
    from simulations.bench.summary import render

    machine = {"cpu": "X", "cores": 2, "simd": ["avx2"], "memory_gib": 8, "torch": "2", "torch_threads": 2,
               "device": "cpu", "bf16_compute": False}
    train = {"quantization": "nf4", "dtype": "float32", "device": "cpu", "mean_seconds_per_user": 10,
             "flops_per_second": 7e10, "matmul_flops_per_second": 1e11, "peak_rss_bytes": 2**30,
             "users": [{"examples": 12}, {"examples": 12}], "task": "amazon-rating", "epochs": 2}
    results = {
        "date": "now", "machine": machine, "wall_seconds": 1500.0, "complete": True, "fp32_matmul_flops_per_second": 1e11, "bf16_matmul_flops_per_second": 1e9,
        "jobs": {
            "training:nf4:ours": {**train, "procedure": "ours", "tokens_per_second": 300, "final_loss": 1.0},
            "training:nf4:reference": {**train, "procedure": "reference", "tokens_per_second": 100, "final_loss": 1.5},
            "memory": {"nf4": {"resident_bytes": 30}, "bf16": {"resident_bytes": 100}, "nf4_vs_bf16": 0.3},
            "footprint": {"task": "amazon-rating", "dtype": "torch.float32", "users": 3, "peak_mb": 3500.0,
                          "growth_mb": 12.0, "prompt_tokens": {"max": 500, "mean": 300},
                          "rss_mb": {"loaded": 550.0, "base_trained": 570.0, "after_user": [700.0, 705.0, 712.0]}},
        },
    }
    text = render(results)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "3.00x" in rows["training speed-up vs reference, nf4 base"] and "**met**" in rows["training speed-up vs reference, nf4 base"]
    assert "**not met**" in rows["same final loss as reference, nf4 base"]  # 0.5 apart, tolerance 0.25
    assert "70%" in rows["hardware utilization, nf4 base"] and "**met**" in rows["hardware utilization, nf4 base"]
    assert "**met**" in rows["base model resident size, nf4 vs bf16"]
    peak = next(v for k, v in rows.items() if k.endswith("peak resident"))
    assert "3500 MiB" in peak and "**not met**" in peak
    assert "+12 MiB" in rows["... resident growth from the first user to the last"] and "**met**" in rows["... resident growth from the first user to the last"]
    assert "| after user 3 | 712 MiB |" in text
    assert "no bf16 hardware" in text
    assert "25.0 min" in rows["whole benchmark wall time (`make bench`, model already prepared)"]
    assert "**met**" in rows["whole benchmark wall time (`make bench`, model already prepared)"]
    assert "2 users (12/12 history items of amazon-rating)" in text


def test_a_section_process_loads_torch_only_when_its_section_runs():
    """Every section's process imports the driver first; costcoeffs then times a worker's import of
    torch, the engine and the client as part of its model load (load_s). So neither the driver nor
    costcoeffs may load them at import."""
    probe = ("import sys, simulations.bench.run, simulations.bench.costcoeffs; "
             "print(sorted(m for m in ('torch', 'transformers', 'shared.engine', 'client.rounds') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
