"""Record-level DP-SGD for THE training loop (shared/training.py), with Opacus.

Each example's record is protected inside one user's training: batches are Poisson-sampled with
rate q = batch_size / n by Opacus's `UniformWithReplacementSampler` (so a batch may be empty),
every example's gradient is clipped to `max_grad_norm` and Gaussian noise of std
noise_multiplier · max_grad_norm is added to their sum by Opacus's `DPOptimizer`, which then
averages over the expected batch size. A run of `steps` such steps is accounted in RDP
(shared/privacy.py) as `steps` compositions of the sampled Gaussian mechanism with (z, q).

Per-example gradients come from one backward pass per sampled example (the answer-only loss of
that example alone), written to `p.grad_sample` where `DPOptimizer` expects them. An empty
Poisson batch contributes a zero per-example gradient: the step still happens and still adds
noise, which is what Opacus's `rand_on_empty=True` guarantees for its data loader (an empty
batch would otherwise crash the optimizer), without feeding random tokens through the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .privacy import RDPAccountant


@dataclass
class DPSGD:
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int
    seed: int = 0
    sample_rate: float = 0.0  # set by plan()
    steps: int = 0  # set by plan()

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0 or self.max_grad_norm <= 0 or self.expected_batch_size <= 0:
            raise ValueError("DP-SGD needs noise_multiplier > 0, max_grad_norm > 0 and a batch size > 0")

    def plan(self, n: int, epochs: float) -> list[list[int]]:
        """Poisson batches covering `epochs` passes in expectation (some may be empty)."""
        import torch
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.sample_rate = min(1.0, self.expected_batch_size / n)
        self.steps = max(1, math.ceil(epochs / self.sample_rate))
        gen = torch.Generator().manual_seed(self.seed)
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=self.sample_rate, generator=gen,
                                                steps=self.steps)
        return [list(b) for b in sampler]

    def wrap_optimizer(self, optimizer: Any) -> Any:
        from opacus.optimizers import DPOptimizer

        return DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                           expected_batch_size=self.expected_batch_size, loss_reduction="mean")

    def backward(self, example_loss: Callable[[int], Any], batch: Sequence[int], params: Sequence[Any]) -> float | None:
        """Per-example gradients of the sampled examples into `p.grad_sample`; their mean loss."""
        import torch

        per_param: list[list[Any]] = [[] for _ in params]
        losses = []
        for i in batch:
            loss = example_loss(i)
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for slot, g, p in zip(per_param, grads, params):
                slot.append(torch.zeros_like(p) if g is None else g.detach())
            losses.append(float(loss.detach()))
        for p, slot in zip(params, per_param):
            p.grad_sample = torch.stack(slot) if slot else torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
        return sum(losses) / len(losses) if losses else None

    def account(self, accountant: RDPAccountant) -> None:
        accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)
