"""A tokenizer's chat template applied to one user message, for `kvtier qa` and both runtimes.

The template is the model's own Jinja code: it can raise anything (`raise_exception`, an undefined field, a
syntax error). Its failure is one ValueError that names it and the way around it, never a jinja2 traceback."""

from __future__ import annotations

from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer: Any, content: str, *, tokenize: bool, way_around: str) -> Any:
    """The template over `[{"role": "user", "content": content}]` with the generation prompt: text, or token
    ids if `tokenize`. way_around: what the caller can do instead, said in the error."""
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=tokenize,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - the template's own code: anything it raises is the template failing
        raise ValueError(f"the tokenizer's chat template cannot write the prompt ({type(e).__name__}: {e}); "
                         f"{way_around}") from None
