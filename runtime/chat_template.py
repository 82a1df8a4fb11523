"""Render Hugging Face chat templates with jinja2, without transformers.

The environment copies the one that transformers' `apply_chat_template` sets up (checked
against transformers 5.25). It is a sandboxed jinja2 environment with `trim_blocks` and
`lstrip_blocks` and the loop-controls extension. It has a `tojson` filter that keeps non-ASCII
characters and the globals `raise_exception(message)` and `strftime_now(format)`. A
`{% generation %}` block renders as its plain content, because the runtime needs no mask of
assistant tokens. The template sees `messages`, `add_generation_prompt` and the tokenizer's
special tokens (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """An invalid chat template, or one whose `raise_exception(...)` rejected the messages."""


class _GenerationBlock(Extension):
    """Accept `{% generation %}...{% endgeneration %}`, which some templates use to mark assistant text."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"invalid chat template (line {error.lineno}): {error.message}") from error


def render_chat_template(
    source: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **extra,
) -> str:
    """Render `messages` (dicts with "role" and "content") to the prompt text the model was trained on."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    template = compile_chat_template(source)
    return template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        **(special_tokens or {}),
        **extra,
    )


def _token_text(value) -> str | None:
    # tokenizer_config.json stores a special token either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(tokenizer_dir: str | Path) -> tuple[str | None, dict[str, str]]:
    """Return (template source or None, special tokens) read from a tokenizer folder.

    The template comes from `chat_template.jinja` when present, else from the
    `chat_template` field of `tokenizer_config.json`. A list of named templates in that field
    (the older multi-template form) yields the one named "default".
    """
    tokenizer_dir = Path(tokenizer_dir)
    config_path = tokenizer_dir / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except json.JSONDecodeError as error:
        raise ChatTemplateError(f"invalid JSON in {config_path}: {error}") from error

    special_tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        text = _token_text(config.get(key))
        if text is not None:
            special_tokens[key] = text

    jinja_path = tokenizer_dir / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), special_tokens

    source = config.get("chat_template")
    if isinstance(source, list):
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default")
    return source, special_tokens
