"""`load_tokenizer`: a checkpoint's tokenizer behind one small interface; `load_chat_template` /
`render_chats` / `encode_chat`: an instruct checkpoint's chat template, rendered and encoded."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lminf_jax.converters import chat_render
from lminf_jax.converters.json_object import read_json_object

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

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:  # sentencepiece names no file
            raise ValueError(f"{path}: not a readable sentencepiece model ({e})") from None
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

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception that names no file
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
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
    """`read_json_object` of an optional file: {} when it is absent."""
    return read_json_object(path) if path.is_file() else {}


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
    """A chat template that does not compile or render, exceeds its limits, or rejected the messages."""


def render_chats(template: str, conversations: Sequence[Sequence[Mapping[str, Any]]], *, bos_token: str | None,
                 eos_token: str | None, add_generation_prompt: bool = True, **extra: Any) -> list[str]:
    """The text chat `template` (jinja2) renders for each of `conversations` (lists of
    ``{"role", "content"}`` dicts).

    The template sees what transformers' ``apply_chat_template(messages, tokenize=False)`` passes:
    ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None), the special tokens
    that are set (a None one stays undefined, so it renders as ""), and `extra`: JSON data (a
    ValueError says when they are not). It renders in a child process (`converters.chat_render`,
    about 0.1 s to start), bounded in time, output and memory (its ``MAX_*`` limits). A template
    that does not compile, fails, exceeds a limit or calls ``raise_exception`` raises
    `ChatTemplateError`.
    """
    specials = {"bos_token": bos_token, "eos_token": eos_token}
    contexts = [{"tools": None, "documents": None, **{k: v for k, v in specials.items() if v is not None}, **extra,
                 "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
                for messages in conversations]
    try:
        request = json.dumps({"template": template, "contexts": contexts}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the chat template's variables must be JSON data: {e}") from None
    if json.loads(request)["contexts"] != contexts:
        raise ValueError("the chat template's variables must be JSON data (no tuples, no non-string keys)")
    return _render_in_child(request)


def _render_in_child(request: str) -> list[str]:
    """The texts `converters.chat_render` renders for `request` in a child process, killed after
    ``chat_render.MAX_SECONDS``."""
    try:
        done = subprocess.run([sys.executable, "-P", chat_render.__file__], input=request.encode(),
                              capture_output=True, timeout=chat_render.MAX_SECONDS)
    except subprocess.TimeoutExpired:
        raise ChatTemplateError(f"the chat template exceeded its limits: it ran for more than "
                                f"{chat_render.MAX_SECONDS:g} s") from None
    if done.returncode != 0:
        raise ChatTemplateError(f"the chat template renderer {chat_render.__file__} exited with status "
                                f"{done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    reply = json.loads(done.stdout)
    if "error" in reply:
        raise ChatTemplateError(reply["error"])
    return reply["texts"]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template, where it came from, and the special tokens it is rendered with."""

    template: str
    source: str
    bos_token: str | None = None
    eos_token: str | None = None

    def render_each(self, conversations: Sequence[Sequence[Mapping[str, Any]]], *,
                    add_generation_prompt: bool = True, **extra: Any) -> list[str]:
        """`render_chats` with this checkpoint's template and special tokens (one child process for
        all `conversations`); errors name `source`."""
        try:
            return render_chats(self.template, conversations, bos_token=self.bos_token, eos_token=self.eos_token,
                                add_generation_prompt=add_generation_prompt, **extra)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.source}: {e}") from e

    def render(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        """`render_each` of one conversation."""
        return self.render_each([messages], **kwargs)[0]


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
