"""`load_tokenizer`: a checkpoint's tokenizer behind one small interface; `load_chat_template` /
`render_chat` / `encode_chat`: an instruct checkpoint's chat template, rendered and encoded."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer(Protocol):
    """Text <-> token ids. `encode` adds no special tokens; `decode` drops them."""

    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece ``tokenizer.model`` (LLaMA)."""

    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id = _optional_id(self._sp.bos_id())
        self.eos_id = _optional_id(self._sp.eos_id())
        self.vocab_size: int = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (GPT-J, MPT). BOS/EOS come from
    tokenizer_config.json's ``bos_token``/``eos_token``, else config.json's ``*_token_id``."""

    def __init__(self, path: Path):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id(path.parent, "bos")
        self.eos_id = self._special_id(path.parent, "eos")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _special_id(self, root: Path, kind: str) -> int | None:
        token = special_token(root, kind)
        if token is not None:
            return self._tok.token_to_id(token)
        token_id = _json(root / "config.json").get(f"{kind}_token_id")
        return token_id if isinstance(token_id, int) else None


def special_token(hf_dir: str | os.PathLike, kind: str) -> str | None:
    """tokenizer_config.json's ``{kind}_token`` (e.g. ``bos``): a string or an AddedToken dict's
    ``content``; None when absent."""
    token = _json(Path(hf_dir) / TOKENIZER_CONFIG_FILE).get(f"{kind}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _optional_id(token_id: int) -> int | None:
    return None if token_id < 0 else token_id


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def load_tokenizer(hf_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of checkpoint directory `hf_dir`: ``tokenizer.model`` (sentencepiece)
    when present, else ``tokenizer.json`` (read with `tokenizers`)."""
    root = Path(hf_dir)
    if (root / "tokenizer.model").is_file():
        return SentencePieceTokenizer(root / "tokenizer.model")
    if (root / "tokenizer.json").is_file():
        return HFTokenizer(root / "tokenizer.json")
    raise FileNotFoundError(f"no tokenizer in {root}: expected tokenizer.model or tokenizer.json")


# ----- chat templates ---------------------------------------------------------------------------


class ChatTemplateError(ValueError):
    """A chat template that does not compile or render, or that rejected the messages."""


@functools.cache
def _chat_environment():
    """The jinja2 environment chat templates render in. It mirrors what transformers 5 gives them
    (``transformers.utils.chat_template_utils._cached_compile_jinja_template``): an
    ``ImmutableSandboxedEnvironment`` (templates are untrusted code) with ``trim_blocks`` and
    ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that leaves non-ASCII and
    HTML characters unescaped and takes ``ensure_ascii``/``indent``/``separators``/``sort_keys``,
    and the globals ``raise_exception(message)`` and ``strftime_now(format)``. Not mirrored:
    transformers' ``{% generation %}`` tag (assistant-token masks) and its hardened
    ``dict``/``namespace`` globals (jinja2's own ``namespace`` is there)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ChatTemplateError(f"the chat template rejected the messages: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, bos_token: str | None,
                eos_token: str | None, add_generation_prompt: bool = True, **extra: Any) -> str:
    """The text chat `template` (jinja2) renders for `messages` (``{"role", "content"}`` dicts).

    The template sees what transformers' ``apply_chat_template(messages, tokenize=False)`` passes:
    ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None), the special tokens
    that are set (a None one stays undefined, so it renders as ""), and `extra`. A template that
    does not compile, fails or calls ``raise_exception`` raises `ChatTemplateError`.
    """
    import jinja2

    specials = {"bos_token": bos_token, "eos_token": eos_token}
    context = {"tools": None, "documents": None, **{k: v for k, v in specials.items() if v is not None}, **extra,
               "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
    try:
        return _chat_environment().from_string(template).render(**context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from e


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template, where it came from, and the special tokens it is rendered with."""

    template: str
    source: str
    bos_token: str | None = None
    eos_token: str | None = None

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """`render_chat` with this checkpoint's template and special tokens; errors name `source`."""
        try:
            return render_chat(self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                               add_generation_prompt=add_generation_prompt, **extra)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.source}: {e}") from e


def load_chat_template(hf_dir: str | os.PathLike) -> ChatTemplate:
    """The chat template of checkpoint directory `hf_dir`, found where transformers looks:
    ``chat_template.jinja`` (what transformers >= 4.43 saves) first, else tokenizer_config.json's
    ``chat_template``, a string or a list of ``{"name", "template"}`` of which the ``"default"`` one
    is used. BOS/EOS strings come from tokenizer_config.json (`special_token`). A ValueError says
    when there is none (a base model) or the field is malformed."""
    root = Path(hf_dir)
    specials = {f"{kind}_token": special_token(root, kind) for kind in ("bos", "eos")}
    if (root / CHAT_TEMPLATE_FILE).is_file():
        return ChatTemplate((root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"), str(root / CHAT_TEMPLATE_FILE),
                            **specials)
    config = root / TOKENIZER_CONFIG_FILE
    field = _json(config).get("chat_template")
    if field is None:
        raise ValueError(f"{root} has no chat template (no {CHAT_TEMPLATE_FILE}, no chat_template in "
                         f"{TOKENIZER_CONFIG_FILE}): the checkpoint is a base model, not a chat/instruct one")
    if isinstance(field, str):
        return ChatTemplate(field, f"{config}: chat_template", **specials)
    if not (isinstance(field, list) and field and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in field)):
        raise ValueError(f"{config}: chat_template must be a string or a list of "
                         f"{{\"name\": ..., \"template\": ...}} strings, got {json.dumps(field)[:80]}")
    named = {t["name"]: t["template"] for t in field}
    if "default" not in named:
        raise ValueError(f"{config}: chat_template has no template named 'default' (available: "
                         f"{', '.join(sorted(named))})")
    return ChatTemplate(named["default"], f"{config}: chat_template['default']", **specials)


def encode_chat(tokenizer: Tokenizer, text: str, bos_token: str | None) -> list[int]:
    """The token ids of chat `text` rendered by a template, which writes special tokens as text.

    The rule: a ``tokenizer.json`` encodes the whole text, parsing added tokens (``<|im_start|>``,
    a ``<s>`` BOS) into their ids, as transformers' ``apply_chat_template(tokenize=True)`` does.
    sentencepiece reads a control token such as ``<s>`` as plain characters, so for it a leading
    `bos_token` string becomes ``bos_id`` and the rest is encoded (Meta's Llama-2 chat format:
    BOS, then the text with its dummy-prefix space); any other special-token string stays text.
    """
    if isinstance(tokenizer, SentencePieceTokenizer) and bos_token and tokenizer.bos_id is not None \
            and text.startswith(bos_token):
        return [tokenizer.bos_id, *tokenizer.encode(text[len(bos_token):])]
    return tokenizer.encode(text)
