"""A personal-adapter training job of the daemon: examples from the user's history, THE training
loop with per-user validation (through the model host), and the decision said in words."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from shared.adapters import TRAINED_ON, AdapterManifest
from shared.config import TrainSpec
from shared.personalize import history_examples
from shared.selection import validation_size

from .jobs import JobControl
from .personal import new_manifest, version_name

if TYPE_CHECKING:  # for the annotations only: the service imports this module
    from .service import ClientService

log = logging.getLogger(__name__)


def run_training(svc: ClientService, ctl: JobControl, spec: TrainSpec) -> dict[str, Any]:
    ctl.set_phase("loading the base adapter")
    svc.host.load_base_adapter()
    ctl.set_phase("reading the history")
    ctx = svc.history_context()
    with svc.store_lock:
        history = svc.store.items()
        if not history:
            raise RuntimeError("the history is empty; add items before training")
        ctl.set_phase(f"building {len(history)} training examples ({svc.spec.augmentation})")
        # Example i retrieves only from items before i (no leakage of the future).
        examples = history_examples(svc.task, history, ctx, svc.spec.augmentation)
    if ctl.cancelled():
        return {"cancelled": True, "steps": 0}
    held_out = validation_size(len(examples), svc.spec.selection)
    if not held_out:
        ctl.set_phase("training")
    elif len(examples) - held_out >= svc.spec.selection.min_train:
        ctl.set_phase(f"scoring base + base adapter on the {held_out} newest items, held out for validation")
    else:
        ctl.set_phase("checking the history size against selection.min_train")

    def on_step(steps_done: int, steps_total: int, loss: float) -> None:
        if steps_done == 1:
            ctl.set_phase(f"training on {len(examples) - held_out} examples" +
                          (f", validating on {held_out}" if held_out else ""))
        ctl.progress(steps_done, steps_total, loss)

    def summary(result: Any) -> dict[str, Any]:
        return {"steps": result.steps, "examples": len(examples),
                "final_loss": result.final_loss if result.losses else None,
                "seconds": round(result.seconds, 3), "tokens_per_second": round(result.tokens_per_second, 1)}

    def manifest(result: Any, sel: Any) -> AdapterManifest:
        return new_manifest(
            base_model_hash=svc.engine.model_hash, task=svc.task.name,
            peft_type=svc.spec.personal_adapter.peft_type,
            data={"history_items": len(history), "examples": sel.train_items,
                  "validation_items": sel.validation_items},
            train={**summary(result), "epochs": spec.epochs, "lr": spec.lr, "augmentation": svc.spec.augmentation,
                   "job": ctl.job.id, TRAINED_ON: svc.host.base_info["version"],
                   "selection": sel.summary()},
        )

    result, sel, version = svc.host.train(svc.task, examples, spec, svc.spec.selection, on_step=on_step,
                                            cancelled=ctl.cancelled, manifest=manifest)
    log.info("training job %s: %s", ctl.job.id, sel.summary())
    if version is not None:
        decision = sel.verdict(version_name(version))
    elif result.cancelled:
        decision = "not adopted: training cancelled"
    else:
        pub = svc.host.published
        decision = sel.verdict() + (f"; {version_name(pub.version)} keeps answering" if pub
                                    else "; answers stay without a personal adapter")
    log.info("training job %s: %s", ctl.job.id, decision)
    out = {**summary(result), "history_items": len(history), "adopted": sel.adopted,
           "selection": sel.summary(), "decision": decision}
    if result.cancelled:
        return {**out, "cancelled": True}
    return out if version is None else {**out, "version": version}
