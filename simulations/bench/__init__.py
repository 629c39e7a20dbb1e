"""`make bench`: what one user's adapter and many users' serving cost, side by side with the
obvious way of doing it, measured in one run on one machine.

Sections (each in its own process, so each peak memory is its own):

| module      | measures                                                                       |
|-------------|--------------------------------------------------------------------------------|
| training    | personal-adapter training per user, ours vs the published OPPU procedure      |
|             | (reference.py), nf4 and bf16 bases; FLOP/s over useful tokens vs dense matmul |
| serving     | answers/s for M users: one mixed batch vs swapping adapters per request vs one |
|             | shared adapter at the same batch size                                          |
| memory      | resident size of the base model, nf4 vs bf16                                   |
| scaling     | `oppu simulate` wall time and peak memory for N virtual users; base-model     |
|             | loads per worker process                                                       |
| comms       | bytes per client per round (LoRA vs FFA-LoRA), one-time base-model transfer    |
| costmodel   | coefficients of the cost model of `oppu simulate` (costcoeffs.py); predict a   |
|             | run's wall time with `python -m simulations.bench.costmodel` (costmodel.py)    |

    python -m simulations.bench --out bench [--sections training,serving,...] [--quick]
"""
