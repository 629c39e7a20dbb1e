"""How a prompt is assembled and tokenized; shared by training and inference so they never drift.

A prompt is: optional user profile (PAG), optional retrieved history items (RAG), then the
task's query input. It is wrapped in the model's chat template when it has one (the embedded
model is an instruct model), and the answer follows as the assistant turn.
"""

from __future__ import annotations

from typing import Any, Sequence

from .records import HistoryItem


def first_line(text: str) -> str:
    """The first non-empty line of an answer, stripped: what every task's answer is read as."""
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def clip_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def build_prompt(
    task: Any,
    query_input: str,
    retrieved: Sequence[HistoryItem] = (),
    profile: str | None = None,
    *,
    item_max_words: int = 60,
    item_format: str = "template",
) -> str:
    parts: list[str] = []
    if profile:
        parts.append(f"About this user: {profile.strip()}")
    if retrieved:
        lines = [f"- {render_history_item(task, it, item_max_words, item_format)}" for it in retrieved]
        parts.append("This user's earlier items:\n" + "\n".join(lines))
    parts.append(query_input)
    return "\n\n".join(parts)


def render_history_item(task: Any, item: HistoryItem, max_words: int, item_format: str = "template") -> str:
    """A history item as prompt context: the task's sentence ("template"), a JSON record ("json"),
    or "key: value" pairs ("fields"). The last two exist to test robustness to history format."""
    if item_format == "template":
        return clip_words(task.render_item(item), max_words)
    fields = {k: clip_words(str(v), max_words) for k, v in item.fields.items()}
    if item_format == "json":
        import json

        return json.dumps(fields, ensure_ascii=False)
    if item_format == "fields":
        return "; ".join(f"{k}: {v}" for k, v in fields.items())
    raise ValueError(f"item_format={item_format!r}; choose from template, json, fields")


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of the prompt up to where the answer starts."""
    if _has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def answer_end_ids(tokenizer: Any) -> list[int]:
    """Tokens that close an answer: the chat end-of-turn marker when there is one, else EOS."""
    if _has_chat_template(tokenizer):
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end, int) and end != tokenizer.unk_token_id:
            return [end]
    return [tokenizer.eos_token_id]


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + answer_end_ids(tokenizer)


def fit_prompt(prompt_ids: list[int], budget: int, head: int = 16) -> list[int]:
    """Cut an over-long prompt from the middle: the chat header and the query (at the end) stay."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    head = min(head, budget // 4)
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head):]
