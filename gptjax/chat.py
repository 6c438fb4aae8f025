"""Chat formats: how a conversation becomes the text a model continues, and what ends the model's turn.

A model folder's chat template (Jinja: ``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``) is rendered as transformers' ``apply_chat_template`` renders it: a sandboxed
environment with ``trim_blocks``, ``lstrip_blocks`` and loop controls, ``raise_exception``, ``strftime_now``,
a ``tojson`` that keeps non-ASCII text, and the special tokens (``bos_token``, ``eos_token``, ...) as
variables. The turn ends at the ids ``generation_config.json`` lists as end of sequence, and the tokenizer's
``eos_token``.

GPT-2 is a base model with no template: a conversation is plain text it continues. A system message's
content, then a blank line; each user / assistant message as ``User: TEXT`` / ``Assistant: TEXT`` on its own
line; then ``Assistant:``; the turn ends at ``<|endoftext|>`` or at ``\\nUser:``. A model folder without a
template gets the same, ending at its own end-of-sequence ids.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gptjax.presets import ModelConfig, family_of
from gptjax.tokenizer import ENDOFTEXT_ID, Encoding, HFEncoding, get_tokenizer, load_tokenizer

PLAIN_TEXT_STOP = "\nUser:"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# The on/off switches a client may offer when a template reads them (vLLM's chat_template_kwargs carries them);
# a template's other free variables (messages, tools, date_string, ...) are not switches.
TEMPLATE_SWITCHES = ("enable_thinking",)


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat format: its Jinja ``template`` (None: the plain-text one above), the special tokens the
    template sees, the token ids and texts that end the model's turn."""

    template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    stop_ids: frozenset[int] = frozenset({ENDOFTEXT_ID})
    stop: tuple[str, ...] = (PLAIN_TEXT_STOP,)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text of ``messages`` (``{"role", "content"}`` dicts); ``kwargs`` reach the template
        (Qwen3's ``enable_thinking``, Llama 3's ``date_string``, ``tools``)."""
        if self.template is None:
            return _plain_text(messages)
        return _compiled(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **{**self.special_tokens, **kwargs})


GPT2_CHAT = ChatFormat()


def _plain_text(messages: list[dict[str, Any]]) -> str:
    parts = [f"{m['content']}\n\n" if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}\n"
             for m in messages]
    return "".join(parts) + "Assistant:"


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    # transformers' environment (chat_template_utils): templates from the Hub are untrusted code, hence the
    # sandbox; the rest is what published templates rely on.
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def template_switches(chat: ChatFormat) -> list[str]:
    """The :data:`TEMPLATE_SWITCHES` the chat template reads (Qwen3's ``enable_thinking``); none for the
    plain-text format. Read from the parsed template, so a name in a comment or a string does not count."""
    if chat.template is None:
        return []
    from jinja2 import meta

    free = meta.find_undeclared_variables(_compiled(chat.template).environment.parse(chat.template))
    return [name for name in TEMPLATE_SWITCHES if name in free]


def load_chat_format(folder: str | os.PathLike, encoding: Any) -> ChatFormat:
    """The chat format a model folder describes; ``encoding`` (its tokenizer) turns ``eos_token`` into an id."""
    folder = Path(folder)
    config = _json(folder / "tokenizer_config.json")
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():  # where transformers 5 writes it
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(template, list):  # several named templates: the default one serves chat
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    special = {name: _content(config[name]) for name in SPECIAL_TOKEN_NAMES if config.get(name)}
    eos = _json(folder / "generation_config.json").get("eos_token_id", [])
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    if "eos_token" in special:
        ids = encoding.encode(special["eos_token"], allowed_special="all")
        if len(ids) == 1:
            stop_ids.add(ids[0])
    if not stop_ids:
        raise ValueError(f"{folder} names no end-of-sequence token (eos_token_id in generation_config.json or "
                         "eos_token in tokenizer_config.json); add one so generation knows where a turn ends")
    return ChatFormat(template, special, frozenset(stop_ids), () if template else (PLAIN_TEXT_STOP,))


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"cannot read {path}: {e}; fix or replace it") from None


def _content(token: str | dict) -> str:
    """A special token as tokenizer_config.json gives it: its text, or an AddedToken dict with ``content``."""
    return token["content"] if isinstance(token, dict) else token


def model_text(cfg: ModelConfig, folder: str | os.PathLike | None) -> tuple[Encoding | HFEncoding, ChatFormat]:
    """A model's tokenizer and chat format: GPT-2's bundled ones for a GPT-2 config, else those of the
    tokenizer files in ``folder`` (:func:`gptjax.weights.tokenizer_folder` finds it beside the weights)."""
    if family_of(cfg) == "gpt2":
        return get_tokenizer(), GPT2_CHAT
    if folder is None:
        raise ValueError(f"a {family_of(cfg)} model needs its tokenizer files (tokenizer.json, tokenizer_config.json) "
                         "beside its weights; copy them from the folder its weights came from")
    encoding = load_tokenizer(folder)
    return encoding, load_chat_format(folder, encoding)
