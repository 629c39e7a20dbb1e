"""The OPPU engine: one loaded base model, the shared base adapter, one personal adapter slot.

Every caller (experiment harness, federation client, daemon) holds one Engine per process and
moves between users by resetting or loading the personal slot in place, so the base model is
loaded and wrapped exactly once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from . import adapters, soft_prompt
from .adapters import BASE, PERSONAL, AdapterManifest
from .config import AdapterSpec, BaseModelSpec, DecodingSpec, TrainSpec
from .inference import MAX_PROMPT_TOKENS, answer_tokens, choose_label, generate, label_loglik
from .model import LoadedBase, load_base_model
from .group_training import GroupLoRA, train_group
from .prompting import encode_answer, encode_prompt
from .training import Example, TrainResult, answer_loss, collate, encode_examples, train_adapter


def answer_set(task: Any) -> dict[str, Any]:
    """generate()'s `labels` and `ordinal` for a task: its closed answer set (labels; a rating
    scale is ordinal), or nothing for free text and for no task."""
    labels = getattr(task, "labels", None)
    if not labels:
        return {}
    return {"labels": tuple(labels), "ordinal": task.kind == "regression"}


class Engine:
    def __init__(
        self,
        base_model: BaseModelSpec | LoadedBase,
        base_adapter: AdapterSpec = AdapterSpec(),
        personal_adapter: AdapterSpec = AdapterSpec(),
        *,
        seed: int = 0,
        decoding: DecodingSpec = DecodingSpec(),
    ) -> None:
        self.base = base_model if isinstance(base_model, LoadedBase) else load_base_model(base_model)
        self.tokenizer = self.base.tokenizer
        self.base_adapter_spec = base_adapter
        self.personal_adapter_spec = personal_adapter
        self.model = adapters.wrap(self.base.model, base_adapter)
        # The personal slot is a PEFT adapter stacked on the base one (lora, ia3), or a soft
        # prompt in front of the input (prompt_tuning), which PEFT cannot stack.
        self.soft_prompt: Any = None
        if personal_adapter.peft_type == "prompt_tuning":
            init = soft_prompt.init_prompt(self.base.model, personal_adapter.num_virtual_tokens, seed)
            self.soft_prompt = init.to(self.base.device).requires_grad_(False)
            self._personal_init = {"prompt_embeddings": init.clone()}
        else:
            self._personal_init = adapters.add_slot(self.model, PERSONAL, personal_adapter, seed=seed)
        self.personal_loaded: str | None = None  # what the personal slot currently holds
        # How every answer is decoded: the experiment's, the daemon's or the federation's spec.
        self.decoding = decoding
        # Users served together in one mixed batch: user -> PEFT slot holding base ⊕ personal.
        self._served: dict[str, str] = {}
        self._slots_made = 0
        # Where base and personal stack into one LoRA, every answer goes through such slots (the
        # one-user path through `_alone_slot`), so a user's row of a mixed batch rounds exactly
        # as that user's own batch would.
        self._stacked_answers = self.soft_prompt is None and adapters.stack_problem(self.model) is None
        self._alone_slot: str | None = None
        # One model, many threads (daemon): generation and training must not interleave.
        self.lock = threading.RLock()
        adapters.activate(self.model, [BASE])

    @property
    def model_hash(self) -> str:
        return self.base.model_hash

    # -- base adapter -------------------------------------------------------------------------

    def train_base(self, examples: Sequence[Example], spec: TrainSpec, *, freeze_lora_a: bool = False,
                   proximal_mu: float = 0.0, **kw: Any) -> TrainResult:
        """Train the shared base adapter (THE training loop; `kw` goes to train_adapter, e.g.
        dp_sgd=). Every caller trains the base slot here: the simulation and the coordinator from
        base users, a federated client for its local update, the privacy ablation.

        freeze_lora_a: FFA-LoRA, only the B matrices train (and are exchanged).
        proximal_mu: FedProx, mu * (w - w_global) added to each gradient, which is the gradient
        of (mu/2) * ||w - w_global||^2 added to the loss (w_global: the state before training).
        """
        with self.lock:
            adapters.activate(self.model, [BASE], trainable=BASE)
            hooks = []
            try:
                named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
                if freeze_lora_a:
                    for n, p in named:
                        if ".lora_A." in n:
                            p.requires_grad_(False)
                params = [p for _, p in named if p.requires_grad]
                if proximal_mu > 0:
                    for p in params:
                        anchor = p.detach().clone()
                        hooks.append(p.register_hook(lambda g, p=p, a=anchor: g + proximal_mu * (p.detach() - a)))
                return train_adapter(self.model, self.tokenizer, examples, spec, params, **kw)
            finally:
                for h in hooks:
                    h.remove()
                adapters.activate(self.model, [BASE])

    def base_state(self) -> dict[str, Any]:
        return adapters.get_state(self.model, BASE)

    def set_base_state(self, state: dict[str, Any]) -> None:
        with self.lock:
            adapters.set_state(self.model, BASE, state)
            self.drop_served()  # their slots hold the previous base adapter

    def save_base(self, target: Path, manifest: AdapterManifest) -> Path:
        with self.lock:
            return adapters.save_adapter(self.model, BASE, target, manifest)

    def load_base(self, directory: Path) -> AdapterManifest:
        with self.lock:
            self.drop_served()
            return adapters.load_adapter(self.model, BASE, directory, base_model_hash=self.model_hash)

    # -- personal adapter ---------------------------------------------------------------------

    def reset_personal(self) -> None:
        """Fresh personal weights for the next user, in place (no re-wrapping)."""
        with self.lock:
            self.set_personal_state({k: v.clone() for k, v in self._personal_init.items()}, label=None)

    def _personal_names(self) -> list[str]:
        return [BASE] if self.soft_prompt is not None else [BASE, PERSONAL]

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
            self.resume_personal_training()
            if self.soft_prompt is not None:
                params, kw = [self.soft_prompt], {**kw, "soft_prompt": self.soft_prompt}
            else:
                params = adapters.trainable_parameters(self.model, PERSONAL)
            try:
                result = train_adapter(self.model, self.tokenizer, examples, spec, params, **kw)
            finally:
                adapters.activate(self.model, [BASE])
                if self.soft_prompt is not None:
                    self.soft_prompt.requires_grad_(False)
            self.personal_loaded = "trained"
            return result

    def train_personal_group(
        self,
        users: Sequence[Sequence[Example]],
        spec: TrainSpec,
        *,
        on_checkpoint: Any = None,
        **kw: Any,
    ) -> tuple[list[TrainResult], list[dict[str, Any]]]:
        """Train several users' personal adapters in one pass (shared.group_training), each from
        the fresh personal init as train_personal would; returns each user's result and final
        state. `on_checkpoint(user, step, total)` finds that user's adapter in the personal slot
        (scored as after train_personal's checkpoints). The personal slot is reset afterwards."""
        if self.soft_prompt is not None:
            raise ValueError("multi-user training needs LoRA personal adapters, not prompt tuning")
        with self.lock:
            group = GroupLoRA(self.model, PERSONAL, self._personal_init, len(users))
            adapters.activate(self.model, [BASE])  # the personal slot idles: the hooks add each row's own

            def check(user: int, step: int, total: int) -> None:
                self.set_personal_state(group.state(user), label=None)
                try:
                    on_checkpoint(user, step, total)
                finally:
                    adapters.activate(self.model, [BASE])

            try:
                with group:
                    results = train_group(self.model, self.tokenizer, users, spec, group,
                                          on_checkpoint=check if on_checkpoint is not None else None, **kw)
                return results, [group.state(u) for u in range(len(users))]
            finally:
                self.reset_personal()
                adapters.activate(self.model, [BASE])

    def resume_personal_training(self) -> None:
        """Set up what train_personal's loop needs: base + personal active, only the personal
        weights trainable, train mode. Anything that answers or scores between two training
        steps (a daemon's answer, a validation checkpoint) resets that; this puts it back."""
        if self.soft_prompt is not None:
            adapters.activate(self.model, [BASE])
            self.soft_prompt.requires_grad_(True)
        else:
            adapters.activate(self.model, [BASE, PERSONAL], trainable=PERSONAL)
        self.model.train()

    def personal_state(self) -> dict[str, Any]:
        """The personal slot's tensors themselves, not a copy: clone them to keep a state past the
        next reset_personal / set_personal_state / training step."""
        if self.soft_prompt is not None:
            return {"prompt_embeddings": self.soft_prompt.detach()}
        return adapters.get_state(self.model, PERSONAL)

    def set_personal_state(self, state: dict[str, Any], label: str | None = "state") -> None:
        with self.lock:
            if self.soft_prompt is not None:
                new = state.get("prompt_embeddings")
                if set(state) != {"prompt_embeddings"} or new is None or new.shape != self.soft_prompt.shape:
                    raise ValueError(
                        f"personal soft prompt must be {{'prompt_embeddings': {tuple(self.soft_prompt.shape)}}}"
                    )
                if not bool(torch.isfinite(new).all()):
                    raise ValueError("personal soft prompt holds NaN or inf")
                with torch.no_grad():
                    self.soft_prompt.copy_(new.to(self.soft_prompt.device, self.soft_prompt.dtype))
            else:
                adapters.set_state(self.model, PERSONAL, state)
            self.personal_loaded = label

    def save_personal(self, target: Path, manifest: AdapterManifest) -> Path:
        with self.lock:
            if self.soft_prompt is None:
                return adapters.save_adapter(self.model, PERSONAL, target, manifest)
            prompt = self.soft_prompt.detach().clone()
            write = lambda tmp: soft_prompt.write_peft_files(  # noqa: E731
                tmp, prompt, self.base.model.config, str(self.base.directory))
            return adapters.write_adapter_dir(target, write, manifest)

    def load_personal(self, directory: Path) -> AdapterManifest:
        with self.lock:
            if self.soft_prompt is None:
                m = adapters.load_adapter(self.model, PERSONAL, directory, base_model_hash=self.model_hash)
            else:
                m = adapters.verify_adapter_dir(directory, base_model_hash=self.model_hash)
                self.set_personal_state({"prompt_embeddings": soft_prompt.read_peft_prompt(directory)})
            self.personal_loaded = str(directory)
            return m

    def example_losses(self, examples: Sequence[Example], *, personal: bool, max_length: int = 512) -> list[float]:
        """Answer-token loss of each example under base + base adapter (+ personal), no training.

        Used to check what an adapter learned and by loss-threshold membership inference.
        """
        with self.lock, torch.no_grad():
            adapters.activate(self.model, self._personal_names() if personal else [BASE])
            prompt = self.soft_prompt if personal else None
            pad = self.tokenizer.pad_token_id
            was_training = self.model.training
            self.model.eval()
            try:
                encoded = encode_examples(self.tokenizer, examples, max_length)
                out = []
                for i in range(len(encoded)):
                    ids, mask, labels = collate(encoded, [i], pad, self.base.device)
                    out.append(float(answer_loss(self.model, ids, mask, labels, prompt)))
                return out
            finally:
                adapters.activate(self.model, [BASE])
                self.model.train(was_training)

    # -- many users at once ---------------------------------------------------------------------

    def serve_user(self, user: str, personal: dict[str, Any] | Path) -> None:
        """Make `user`'s personal adapter (a state or a saved adapter directory) servable in mixed
        batches: its slot holds base ⊕ personal as one LoRA (shared.adapters.stacked_as_one)."""
        if self.soft_prompt is not None:
            raise ValueError("mixed-batch serving needs LoRA personal adapters, not prompt tuning")
        with self.lock:
            if isinstance(personal, (str, Path)):
                self.load_personal(Path(personal))
                personal = self.personal_state()
            self._served[user] = self._fill_stacked_slot(self._served.get(user), personal)

    def _fill_stacked_slot(self, slot: str | None, personal: dict[str, Any]) -> str:
        """Write base ⊕ `personal` into PEFT slot `slot` (made when None or of another rank)."""
        with torch.no_grad():  # `personal` may be the trainable tensors themselves
            config, state = adapters.stacked_as_one(self.model, personal)
        if slot is None or self.model.peft_config[slot].r != config.r:
            if slot is not None:
                self.model.delete_adapter(slot)
            self._slots_made += 1
            slot = f"served{self._slots_made}"
            self.model.add_adapter(slot, config)
        adapters.set_state(self.model, slot, state)
        adapters.activate(self.model, [BASE])  # adding a slot must not change what is active
        return slot

    def drop_served(self) -> None:
        with self.lock:
            for slot in self._served.values():
                self.model.delete_adapter(slot)
            self._served.clear()
            adapters.activate(self.model, [BASE])

    def answer_users(self, prompts: Sequence[str], users: Sequence[str | None], *, max_new_tokens: int,
                     batch_size: int = 16, progress: bool | str = False, task: Any = None) -> list[str]:
        """Answer a mixed batch: prompt i with base + the personal adapter of `users[i]` (None:
        base adapter only), all users in one forward pass per batch, no adapter swapping."""
        if len(prompts) != len(users):
            raise ValueError(f"{len(prompts)} prompts but {len(users)} users")
        unknown = sorted({u for u in users if u is not None and u not in self._served})
        if unknown:
            raise KeyError(f"users {unknown[:3]} are not being served; call serve_user first")
        names = [BASE if u is None else self._served[u] for u in users]
        with self.lock:
            adapters.activate(self.model, [BASE])
            return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                            decoding=self.decoding, batch_size=batch_size, progress=progress, adapter_names=names,
                            **answer_set(task))

    # -- inference ----------------------------------------------------------------------------

    def answer_slot(self, personal: bool) -> str | None:
        """The PEFT adapter that answers for the base adapter (+ the personal slot's current
        weights when `personal`), passed per row as `adapter_names`; None where answers run on the
        active adapters instead (IA3, prompt tuning: no mixed batches there).

        It is the slot a mixed batch gives such a row (answer_users), not the two adapters one
        after the other: the same arithmetic, so a user's row computes the same among other users'
        rows as in a batch of their own, in any compute dtype (see adapters.stacked_as_one). (In
        bf16 a CPU's matmul may still round a row differently in a batch of another size.)"""
        if not self._stacked_answers:
            return None
        if not personal:
            return BASE
        with self.lock:
            self._alone_slot = self._fill_stacked_slot(self._alone_slot, self.personal_state())
            return self._alone_slot

    def answer_tokens(self, task: Any, history: Sequence[Any]) -> int:
        """The answer budget for a user with this history (HistoryItems, or training Examples),
        shared.inference.answer_tokens under the engine's decoding spec: what every caller
        passes as max_new_tokens."""
        if self.decoding.length_from_history <= 0:
            return task.max_new_tokens
        targets = [h.target if isinstance(h, Example) else task.item_to_example(h)[1] for h in history]
        return answer_tokens(self.tokenizer, targets, task.max_new_tokens, self.decoding)

    def answer(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int],
        personal: bool,
        raw: bool = False,
        batch_size: int = 8,
        progress: bool | str = False,
        task: Any = None,
    ) -> list[str]:
        """Generate with base + base adapter (+ the personal adapter when `personal`).

        `task`: the task the prompts ask; where it has a closed answer set (labels, ratings) the
        decoding spec's label_choice may pick the answer from the labels instead of generating.

        `raw` answers with the bare base model (no adapter at all), e.g. to write PAG profiles
        in free text rather than in the task's answer format the base adapter has learned.
        """
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        with self.lock:
            if raw:  # free text (a profile of several sentences): plain greedy decoding
                with self.model.disable_adapter():
                    return generate(self.model, self.tokenizer, prompts, **kw)
            kw["decoding"] = self.decoding
            kw.update(answer_set(task))
            try:
                return generate(self.model, self.tokenizer, prompts, **kw, **self._answering(personal, len(prompts)))
            finally:
                adapters.activate(self.model, [BASE])

    def _answering(self, personal: bool, n: int) -> dict[str, Any]:
        """Make the adapters that answer active; the keywords that route `n` prompts through them
        (the answer slot per row, or the personal soft prompt). Callers reactivate BASE after."""
        kw: dict[str, Any] = {}
        slot = self.answer_slot(personal)
        if slot is not None:
            kw["adapter_names"] = [slot] * n
        adapters.activate(self.model, self._personal_names() if personal else [BASE])
        if personal and self.soft_prompt is not None:
            kw["soft_prompt"] = self.soft_prompt
        return kw

    def validation_pass(self, examples: Sequence[Example], *, personal: bool, max_length: int,
                        max_new_tokens: int, task: Any) -> tuple[list[float], list[str]]:
        """Each example's answer-token loss (as example_losses) and the answer to its prompt (as
        answer): what per-user validation scores.

        Where `task` has labels the decoding picks from (label_choice other than 'generate'), one
        pass gives both: the label log-likelihoods decide the answer, and a target that is a label
        has as loss minus its log-likelihood over its tokens, the number training computes for it
        (up to rounding: a cached prompt pass instead of one pass over prompt and answer). A
        target that is not a label, or whose prompt training would cut (`max_length`), gets its
        own loss pass. Other tasks: a loss pass and a generation pass."""
        prompts = [e.prompt for e in examples]
        labels = answer_set(task)
        if not labels or self.decoding.label_choice == "generate":
            return (self.example_losses(examples, personal=personal, max_length=max_length),
                    self.answer(prompts, max_new_tokens=max_new_tokens, personal=personal, task=task))
        names = labels["labels"]
        with self.lock:
            try:
                loglik = label_loglik(self.model, self.tokenizer, prompts, names,
                                      **self._answering(personal, len(prompts)))
            finally:
                adapters.activate(self.model, [BASE])
            answers = [choose_label(torch.softmax(row, -1).tolist(), names, self.decoding.label_choice,
                                    labels["ordinal"]) for row in loglik]
            losses: list[float | None] = []
            for e, row in zip(examples, loglik):
                answer, n_prompt = encode_answer(self.tokenizer, e.target), len(encode_prompt(self.tokenizer, e.prompt))
                # Neither pass cut anything (encode_examples: the answer to half of max_length, the
                # prompt to the rest; the answer pass: the prompt to MAX_PROMPT_TOKENS).
                whole = (n_prompt + len(answer) <= max_length and len(answer) <= max_length // 2
                         and n_prompt <= MAX_PROMPT_TOKENS)
                losses.append(-float(row[names.index(e.target)]) / len(answer)
                              if e.target in names and whole else None)
            rest = [e for e, loss in zip(examples, losses) if loss is None]
            if rest:
                more = iter(self.example_losses(rest, personal=personal, max_length=max_length))
                losses = [next(more) if loss is None else loss for loss in losses]
            return [float(v) for v in losses], answers

