"""Prompt tuning as a personal adapter stacked on the shared LoRA/IA3 base adapter.

PEFT's own prompt-tuning model cannot sit on top of another PEFT adapter, so the personal soft
prompt lives here: `n` trainable embedding vectors prepended to the token embeddings of every
prompt, while the base model and the base adapter stay frozen. It is saved in PEFT's own
prompt-tuning format (adapter_config.json + `prompt_embeddings` in safetensors), so plain
`peft` can load it onto the same base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def init_prompt(model: Any, n_tokens: int, seed: int) -> Any:
    """Initial soft prompt: embeddings of random vocabulary tokens (PEFT's SAMPLE_VOCAB init),
    which start at the scale the model expects, unlike a unit-normal init."""
    import torch

    emb = model.get_input_embeddings()  # looked up, not indexed: it may be stored in 4 bits
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(emb.num_embeddings, 5000), (n_tokens,), generator=g)
    with torch.no_grad():
        return emb(ids.to(next(model.parameters()).device)).detach().clone().float()


def prepend(model: Any, prompt: Any, ids: Any, mask: Any) -> tuple[Any, Any]:
    """Token embeddings with the soft prompt in front, and the matching attention mask."""
    import torch

    embeds = model.get_input_embeddings()(ids)
    prefix = prompt.to(embeds.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
    ones = torch.ones((ids.shape[0], prompt.shape[0]), dtype=mask.dtype, device=mask.device)
    return torch.cat([prefix, embeds], dim=1), torch.cat([ones, mask], dim=1)


def write_peft_files(directory: Path, prompt: Any, model_config: Any, base_path: str) -> None:
    """PEFT's prompt-tuning files for `prompt` (loadable by PeftModel.from_pretrained)."""
    from peft import PromptTuningConfig
    from safetensors.torch import save_file

    cfg = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=int(prompt.shape[0]),
        token_dim=int(prompt.shape[1]),
        num_transformer_submodules=1,
        num_attention_heads=int(model_config.num_attention_heads),
        num_layers=int(model_config.num_hidden_layers),
        base_model_name_or_path=base_path,
    )
    cfg.save_pretrained(str(directory))
    save_file({"prompt_embeddings": prompt.detach().float().cpu().contiguous()},
              str(Path(directory) / "adapter_model.safetensors"))


def read_peft_prompt(directory: Path) -> Any:
    from safetensors.torch import load_file

    cfg = json.loads((Path(directory) / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"{directory}: adapter is {cfg.get('peft_type')}, expected PROMPT_TUNING")
    state = load_file(str(Path(directory) / "adapter_model.safetensors"))
    if set(state) != {"prompt_embeddings"}:
        raise ValueError(f"{directory}: expected only 'prompt_embeddings', found {sorted(state)[:3]}")
    return state["prompt_embeddings"]
