"""The OPPU engine: one loaded base model, the shared base adapter, one personal adapter slot.

Every caller (experiment harness, federation client, daemon) holds one Engine per process and
moves between users by resetting or loading the personal slot in place, so the base model is
loaded and wrapped exactly once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from . import adapters
from .adapters import BASE, PERSONAL, AdapterManifest
from .config import AdapterSpec, BaseModelSpec, TrainSpec
from .inference import generate
from .model import LoadedBase, load_base_model
from .training import Example, TrainResult, train_adapter


class Engine:
    def __init__(
        self,
        base_model: BaseModelSpec | LoadedBase,
        base_adapter: AdapterSpec = AdapterSpec(),
        personal_adapter: AdapterSpec = AdapterSpec(),
        *,
        seed: int = 0,
    ) -> None:
        self.base = base_model if isinstance(base_model, LoadedBase) else load_base_model(base_model)
        self.tokenizer = self.base.tokenizer
        self.base_adapter_spec = base_adapter
        self.personal_adapter_spec = personal_adapter
        self.model = adapters.wrap(self.base.model, base_adapter)
        self._personal_init = adapters.add_slot(self.model, PERSONAL, personal_adapter, seed=seed)
        self.personal_loaded: str | None = None  # what the personal slot currently holds
        # One model, many threads (daemon): generation and training must not interleave.
        self.lock = threading.RLock()
        adapters.activate(self.model, [BASE])

    @property
    def model_hash(self) -> str:
        return self.base.model_hash

    # -- base adapter -------------------------------------------------------------------------

    def train_base(self, examples: Sequence[Example], spec: TrainSpec, **kw: Any) -> TrainResult:
        with self.lock:
            adapters.activate(self.model, [BASE], trainable=BASE)
            try:
                return train_adapter(
                    self.model, self.tokenizer, examples, spec,
                    adapters.trainable_parameters(self.model, BASE), **kw,
                )
            finally:
                adapters.activate(self.model, [BASE])

    def base_state(self) -> dict[str, Any]:
        return adapters.get_state(self.model, BASE)

    def set_base_state(self, state: dict[str, Any]) -> None:
        with self.lock:
            adapters.set_state(self.model, BASE, state)

    def save_base(self, target: Path, manifest: AdapterManifest) -> Path:
        with self.lock:
            return adapters.save_adapter(self.model, BASE, target, manifest)

    def load_base(self, directory: Path) -> AdapterManifest:
        with self.lock:
            return adapters.load_adapter(self.model, BASE, directory, base_model_hash=self.model_hash)

    # -- personal adapter ---------------------------------------------------------------------

    def reset_personal(self) -> None:
        """Fresh personal weights for the next user, in place (no re-wrapping)."""
        with self.lock:
            adapters.set_state(self.model, PERSONAL, {k: v.clone() for k, v in self._personal_init.items()})
            self.personal_loaded = None

    def train_personal(
        self,
        examples: Sequence[Example],
        spec: TrainSpec,
        *,
        fresh: bool = True,
        **kw: Any,
    ) -> TrainResult:
        """Train the personal adapter stacked on the frozen base + frozen base adapter."""
        with self.lock:
            if fresh:
                self.reset_personal()
            adapters.activate(self.model, [BASE, PERSONAL], trainable=PERSONAL)
            try:
                result = train_adapter(
                    self.model, self.tokenizer, examples, spec,
                    adapters.trainable_parameters(self.model, PERSONAL), **kw,
                )
            finally:
                adapters.activate(self.model, [BASE])
            self.personal_loaded = "trained"
            return result

    def personal_state(self) -> dict[str, Any]:
        return adapters.get_state(self.model, PERSONAL)

    def set_personal_state(self, state: dict[str, Any], label: str = "state") -> None:
        with self.lock:
            adapters.set_state(self.model, PERSONAL, state)
            self.personal_loaded = label

    def save_personal(self, target: Path, manifest: AdapterManifest) -> Path:
        with self.lock:
            return adapters.save_adapter(self.model, PERSONAL, target, manifest)

    def load_personal(self, directory: Path) -> AdapterManifest:
        with self.lock:
            m = adapters.load_adapter(self.model, PERSONAL, directory, base_model_hash=self.model_hash)
            self.personal_loaded = str(directory)
            return m

    # -- inference ----------------------------------------------------------------------------

    def answer(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        personal: bool,
        raw: bool = False,
        batch_size: int = 8,
        progress: bool | str = False,
    ) -> list[str]:
        """Generate with base + base adapter (+ the personal adapter when `personal`).

        `raw` answers with the bare base model (no adapter at all), e.g. to write PAG profiles
        in free text rather than in the task's answer format the base adapter has learned.
        """
        kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        with self.lock:
            if raw:
                with self.model.disable_adapter():
                    return generate(self.model, self.tokenizer, prompts, **kw)
            adapters.activate(self.model, [BASE, PERSONAL] if personal else [BASE])
            try:
                return generate(self.model, self.tokenizer, prompts, **kw)
            finally:
                adapters.activate(self.model, [BASE])

