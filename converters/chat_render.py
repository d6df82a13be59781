"""Chat templates rendered in a child process, so that a template (untrusted code) can neither hang
nor exhaust its caller: ``python -P chat_render.py`` reads ``{"template", "contexts"}`` as JSON on
stdin and writes ``{"texts": [...]}`` (one text per context) or ``{"error": message}`` on stdout.

Its limits, for all contexts together: `MAX_SECONDS` of wall clock, start-up included (the parent
kills the child then: `converters.tokenizer.render_chats`); `MAX_OUTPUT_CHARS` of output, checked
as the template writes; `MAX_MEMORY_BYTES` of address space (``RLIMIT_AS``, on Linux only: macOS
does not enforce it, so there a memory bomb is stopped by the time limit alone, or by the OS).
A script, not a package module: it imports only the standard library and jinja2.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

MAX_SECONDS = 10.0
MAX_OUTPUT_CHARS = 2**25
MAX_MEMORY_BYTES = 2**31


class Rejected(Exception):
    """A template's ``raise_exception(message)``."""


class LimitExceeded(Exception):
    """Rendering went past one of the limits."""


def environment():
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
        raise Rejected(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


def render_all(template: str, contexts: list[dict]) -> list[str]:
    """`template` rendered with each of `contexts`; `LimitExceeded` once the texts together pass
    `MAX_OUTPUT_CHARS`."""
    compiled = environment().from_string(template)
    texts, written = [], 0
    for context in contexts:
        chunks = []
        for chunk in compiled.generate(**context):
            written += len(chunk)
            if written > MAX_OUTPUT_CHARS:
                raise LimitExceeded(f"its output is longer than {MAX_OUTPUT_CHARS:,} characters")
            chunks.append(chunk)
        texts.append("".join(chunks))
    return texts


def reply(request: dict) -> dict:
    """`render_all` of `request`: ``{"texts"}``, or ``{"error"}`` saying how the template failed."""
    try:
        return {"texts": render_all(request["template"], request["contexts"])}
    except Rejected as e:
        return {"error": f"the chat template rejected the messages: {e}"}
    except LimitExceeded as e:
        return {"error": f"the chat template exceeded its limits: {e}"}
    except MemoryError:
        return {"error": f"the chat template exceeded its limits: it needs more than {MAX_MEMORY_BYTES >> 30} GiB "
                         "of memory"}
    except Exception as e:  # the template is code: whatever it raises is its failure
        return {"error": f"the chat template failed: {type(e).__name__}: {e}"}


def limit_memory() -> None:
    """This process's address space to `MAX_MEMORY_BYTES` (Linux; a lower hard limit stays)."""
    if sys.platform == "linux":
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = MAX_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(MAX_MEMORY_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


if __name__ == "__main__":
    limit_memory()
    json.dump(reply(json.load(sys.stdin)), sys.stdout)
