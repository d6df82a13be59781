"""Generate text with LM-Infinite attention (or an ablation): text in, text out.

    python -m experiments.generate MODEL_DIR [--prompt TEXT ...] [--prompt-file F]  (at least one prompt)
        [--tokenizer DIR] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
        [--stop TEXT ...] [--ignore-eos] [--dtype bf16|fp16|fp32] [--prefill-chunk C] [--no-bos]
        [--chat [--system TEXT]] [--out JSON] [--method MASK[+FREQ@FACTOR]] [-G G] [-L L] [-D D]
        [--group-size g] [--leak k] [--top-k-middle K] [--top-k-insert-at N] [--top-k-from-layer H]
        [--top-k-to-layer H]

MODEL_DIR is a converted directory (``python -m converters``) or a Hugging Face directory
(converted in memory); its tokenizer (and chat template) is read from the same directory, or from
``--tokenizer DIR``. ``--top-k`` is sampling's (the K most likely tokens); ``--top-k-middle`` and the
other ``--top-k-*`` options are LM-Infinite's middle tokens. All prompts run as
one left-padded batch (`lminf_jax.decoding.generate`: the prompts in one jitted call, then the tokens
in calls of a fixed number of steps, so memory does not grow with N): with a
bounded method the cache is a Λ-cache of G + L slots whatever the prompt length; vanilla,
distance_limit and top-k middle tokens use a full cache of (longest prompt + N) slots (refused,
with the bytes it needs, before the weights are read when it cannot fit).
``--method MASK+FREQ@FACTOR`` adds a static RoPE frequency method (e.g. ``lm_infinite+yarn@4``) to
the mask.

With one prompt the continuation is printed on stdout as it is generated; with several
(repeat ``--prompt``, or ``--prompt-file`` with one prompt per line, blank lines skipped)
each continuation is printed at the end. BOS is prepended when the tokenizer has one
(unless ``--no-bos``). With ``--chat`` (an instruct checkpoint) each prompt becomes one user
message, after ``--system``'s system message if given, rendered with the checkpoint's chat
template (`converters.tokenizer.load_chat_template`) and encoded with
`converters.tokenizer.encode_chat`: the template writes BOS itself, so none is prepended.
Generation stops at EOS (unless ``--ignore-eos``) and at each ``--stop`` string, which must
encode to exactly one token; the stop token is part of the output. A summary goes to stderr; ``--out`` writes
prompts (and with ``--chat`` the rendered ones), continuations, token ids, settings and timings as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lminf_jax.converters.tokenizer import ChatTemplate, encode_chat, load_chat_template
from lminf_jax.experiments.loading import (
    DTYPES, add_tokenizer_arg, load_config, load_model, model_kind, open_tokenizer, params_dtype, resolve_dtype,
)
from lminf_jax.experiments.methods import add_attention_args, frequencies_from_args, spec_from_args, spec_settings
from lminf_jax.experiments.options import add_output_args, command_parser, input_path, int_option, run_cli
from lminf_jax.experiments.shipped import add_model_arg
from lminf_jax.experiments.text import read_text_file
from lminf_jax.evaluation.resume import write_json_atomic

if TYPE_CHECKING:  # jax is imported only when a command runs
    from lminf_jax.cache import KVCache
    from lminf_jax.decoding import Generation
    from lminf_jax.rope import RopeScaling
    from lminf_jax.sampling import Sampling
    from lminf_jax.spec import AttentionSpec

#: Prompt tokens decoded before the generated ones, so the continuation keeps its leading space.
CONTEXT_TOKENS = 16


def continuation_text(tokenizer, prompt_ids: list[int], generated: list[int]) -> str:
    """The text `generated` adds after the prompt (decoded together with the prompt's last
    tokens, so a word-initial space is kept); ``decode(generated)`` if that is not a suffix."""
    context = list(prompt_ids[-CONTEXT_TOKENS:])
    before = tokenizer.decode(context)
    after = tokenizer.decode(context + list(generated))
    if after.startswith(before):
        return after[len(before):]
    return tokenizer.decode(list(generated))


class TextStreamer:
    """An ``on_tokens`` callback for one prompt: prints the new text after each token.

    The whole continuation so far is decoded each time and only its new suffix is written
    (a trailing U+FFFD, an incomplete UTF-8 sequence, waits for the next token).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], out=None):
        self.tokenizer, self.prompt_ids, self.out = tokenizer, prompt_ids, out
        self.ids: list[int] = []
        self.printed = ""
        self.finished = False

    def __call__(self, index, tokens, done) -> None:
        if self.finished:
            return
        self.ids.append(int(tokens[0]))
        self.finished = bool(done[0])
        self._emit(continuation_text(self.tokenizer, self.prompt_ids, self.ids), final=False)

    def finish(self, text: str) -> None:
        """Write whatever of the final continuation `text` is not printed yet."""
        self._emit(text, final=True)

    def _emit(self, text: str, final: bool) -> None:
        if not text.startswith(self.printed):
            return  # the tokenizer re-segmented printed text: nothing can be taken back
        new = text[len(self.printed):]
        if not final:
            new = new.rstrip("\ufffd")
        if new:
            out = self.out or sys.stdout
            out.write(new)
            out.flush()
            self.printed += new


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("generate", __doc__)
    add_model_arg(p, None)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeat for a batch; default: none, then --prompt-file)")
    p.add_argument("--prompt-file", type=input_path, metavar="F", help="prompts, one per line (blank lines skipped)")
    add_tokenizer_arg(p)
    p.add_argument("--max-new-tokens", type=int_option(1), default=128, metavar="N", help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0: greedy")
    p.add_argument("--top-k", type=int_option(1), metavar="K",
                   help="sample among the K most likely tokens (default: all; the middle tokens are --top-k-middle)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int_option(0), default=0, metavar="S", help="sampling seed")
    p.add_argument("--stop", action="extend", nargs="+", default=[], metavar="TEXT",
                   help="also stop after these strings (each must be a single token; default: none)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="cast floating params and compute in this dtype (default: the params' dtype)")
    p.add_argument("--prefill-chunk", type=int_option(1), default=512, metavar="C", help="prompt tokens per prefill call")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS")
    p.add_argument("--chat", action="store_true",
                   help="render each prompt as a user message with the checkpoint's chat template (instruct models)")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before each prompt (default: none)")
    add_output_args(p, None, "write prompts, continuations, token ids, settings and timings here")
    add_attention_args(p)
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        prompts += [line for line in read_text_file(args.prompt_file, "--prompt-file").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT or --prompt-file F")
    return prompts


def chat_prompts(args: argparse.Namespace, prompts: list[str]) -> tuple[ChatTemplate | None, list[str] | None]:
    """With ``--chat``: the checkpoint's chat template and each prompt rendered as a user message
    (after ``--system``'s system message); else ``(None, None)``."""
    if not args.chat:
        if args.system is not None:
            raise ValueError("--system needs --chat")
        return None, None
    if args.no_bos:
        raise ValueError("--no-bos does not apply with --chat: the chat template decides where BOS goes")
    template = load_chat_template(args.model_dir if args.tokenizer is None else args.tokenizer)
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    return template, template.render_each([[*system, {"role": "user", "content": text}] for text in prompts])


def stop_tokens(tokenizer, stops: list[str], use_eos: bool) -> list[int]:
    """EOS (if any and `use_eos`) plus each stop string's single token."""
    out = [tokenizer.eos_id] if use_eos and tokenizer.eos_id is not None else []
    for text in stops:
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"--stop {text!r} is not a single token: it encodes to {len(ids)} tokens {ids}")
        out.append(ids[0])
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


@dataclasses.dataclass
class Request:
    """What ``run`` checked and built before the weights are read: the prompts and their token
    ids, the attention and sampling settings, the tokenizer and the stop tokens."""

    prompts: list[str]
    rendered: list[str] | None  # with --chat: the prompts rendered by the chat template
    template: ChatTemplate | None
    spec: AttentionSpec
    frequencies: RopeScaling | None
    sampling: Sampling
    tokenizer: Any
    bos: list[int]
    prompt_ids: list[list[int]]
    stops: list[int]

    @property
    def longest(self) -> int:
        """The longest prompt's token count."""
        return max(len(ids) for ids in self.prompt_ids)


@dataclasses.dataclass
class LoadedModel:
    """The model with its weights: the step (and top-k's prefill step), its empty cache and the load time."""

    family: Any
    params: Any
    stored: Any  # the params' dtype as read
    model: Any
    prefill_step: Any
    cache: KVCache
    load_s: float


@dataclasses.dataclass
class Continuations:
    """What generation gave: each prompt's generated ids and continuation text, and its wall time."""

    generation: Generation
    generated: list[list[int]]
    texts: list[str]
    wall: float

    @property
    def total(self) -> int:
        """The generated tokens, all prompts together."""
        return sum(len(g) for g in self.generated)


def run(args: argparse.Namespace) -> int:
    """The command: check the options and encode the prompts, read the weights, generate, report."""
    request = prepare(args)
    loaded = load(args, request)
    continuations = generate_continuations(args, request, loaded)
    print_summary(args, request, loaded, continuations)
    if args.out is not None:
        write_record(args, request, loaded, continuations)
    return 0


def encode_prompts(args: argparse.Namespace, tokenizer, config, prompts: list[str], template: ChatTemplate | None,
                   rendered: list[str] | None) -> tuple[list[int], list[list[int]]]:
    """The BOS prepended (``[]`` or ``[bos_id]``) and each prompt's token ids; refuses an empty
    prompt and a token outside the model's vocabulary."""
    if template is None:
        bos = [] if args.no_bos or tokenizer.bos_id is None else [tokenizer.bos_id]
        prompt_ids = [bos + tokenizer.encode(text) for text in prompts]
    else:
        bos = []  # the template wrote BOS, if the model takes one
        prompt_ids = [encode_chat(tokenizer, text, template.bos_token) for text in rendered]
    for b, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {b + 1} is empty (and no BOS is prepended): nothing to continue")
        if max(ids) >= config.vocab_size:
            raise ValueError(f"the tokenizer of {args.tokenizer or args.model_dir} produced token {max(ids)} but the model's "
                             f"vocabulary has {config.vocab_size} entries")
    return bos, prompt_ids


def prepare(args: argparse.Namespace) -> Request:
    """Check every option and encode the prompts before the weights are read: a full cache that
    cannot fit is refused here too."""
    from lminf_jax import AttentionCall, Sampling
    from lminf_jax.cache import NARROWEST_DTYPE, check_cache_fits
    from lminf_jax.decoding import check_positions

    prompts = read_prompts(args)
    family, config = load_config(args.model_dir)  # validate the options before reading weights
    template, rendered = chat_prompts(args, prompts)
    spec = spec_from_args(args, config)
    frequencies = frequencies_from_args(args, config)
    model = family.model(config, AttentionCall(spec, frequencies=frequencies))  # the spec, and RoPE scaling, apply here
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    tokenizer = open_tokenizer(args.model_dir, args.tokenizer)
    bos, prompt_ids = encode_prompts(args, tokenizer, config, prompts, template, rendered)
    stops = stop_tokens(tokenizer, args.stop, not args.ignore_eos)
    request = Request(prompts, rendered, template, spec, frequencies, sampling, tokenizer, bos, prompt_ids, stops)
    longest = request.longest
    check_positions(longest, args.max_new_tokens)
    # a full cache that cannot fit is refused before the weights are read (which set its dtype without --dtype)
    check_cache_fits(lambda: model.init_cache(len(prompts), capacity=longest + args.max_new_tokens,
                                              dtype=resolve_dtype(args.dtype) or NARROWEST_DTYPE),
                     f"--max-new-tokens {args.max_new_tokens:,} after the longest prompt ({longest:,} tokens)")
    return request


def load(args: argparse.Namespace, request: Request) -> LoadedModel:
    """Read the weights and build the model in the compute dtype, top-k's prefill step and the empty cache."""
    from lminf_jax import AttentionCall

    began = time.perf_counter()
    family, config, params = load_model(args.model_dir, args.dtype, progress=sys.stderr.isatty())
    load_s = time.perf_counter() - began
    stored = params_dtype(params)
    compute = resolve_dtype(args.dtype) or stored
    spec, frequencies = request.spec, request.frequencies
    model = family.model(config, AttentionCall(spec, frequencies=frequencies), compute)
    prefill_step = None
    if spec.top_k is not None:  # top-k middle tokens only at the prompt's end, as in one forward pass
        prefill_step = family.model(config, AttentionCall(dataclasses.replace(spec, top_k=None),
                                                          frequencies=frequencies), compute)
    cache = model.init_cache(len(request.prompts), capacity=request.longest + args.max_new_tokens)
    return LoadedModel(family, params, stored, model, prefill_step, cache, load_s)


def generate_continuations(args: argparse.Namespace, request: Request, loaded: LoadedModel) -> Continuations:
    """Generate (streaming one prompt's continuation to stdout) and print the continuations."""
    from lminf_jax.decoding import generate

    prompts, prompt_ids, tokenizer = request.prompts, request.prompt_ids, request.tokenizer
    streamer = TextStreamer(tokenizer, prompt_ids[0]) if len(prompts) == 1 else None
    began = time.perf_counter()
    out = generate(loaded.model, loaded.params, prompt_ids, loaded.cache, max_new_tokens=args.max_new_tokens,
                   sampling=request.sampling, seed=args.seed, stop_tokens=request.stops,
                   prefill_chunk=args.prefill_chunk, prefill_step=loaded.prefill_step, on_tokens=streamer)
    wall = time.perf_counter() - began

    generated = [out.row(b) for b in range(len(prompts))]
    texts = [continuation_text(tokenizer, ids, gen) for ids, gen in zip(prompt_ids, generated)]
    if streamer is not None:
        streamer.finish(texts[0])
        print(flush=True)
    else:
        for b, (prompt, text) in enumerate(zip(prompts, texts)):
            print(f"=== prompt {b + 1}/{len(prompts)}: {prompt}\n{text}\n", flush=True)
    return Continuations(out, generated, texts, wall)


def print_summary(args: argparse.Namespace, request: Request, loaded: LoadedModel, output: Continuations) -> None:
    """The model, settings, token counts, cache and timings, on stderr."""
    prompts, total, wall = request.prompts, output.total, output.wall
    print(
        f"model: {loaded.family.name} from {args.model_dir} ({model_kind(args.model_dir)}), params {loaded.stored.name}, "
        f"compute {loaded.model.dtype.name}\n"
        f"attention: {request.spec.describe()}; sampling: {request.sampling.describe()}, seed {args.seed}\n"
        f"prompt tokens: {sum(len(ids) for ids in request.prompt_ids)} in {len(prompts)} prompt(s) "
        f"(longest {request.longest}); "
        f"generated tokens: {total} ({int(output.generation.stopped.sum())}/{len(prompts)} ended on a stop token)\n"
        f"cache: {loaded.cache.describe()}\n"
        f"wall time {wall:.2f} s for generation (includes compilation on the first call; time to first token "
        f"is not measured), {total / max(wall, 1e-9):.1f} tokens/s; loading {loaded.load_s:.2f} s",
        file=sys.stderr,
    )


def write_record(args: argparse.Namespace, request: Request, loaded: LoadedModel, output: Continuations) -> None:
    """Write ``--out``: prompts, continuations, token ids, settings and timings as JSON."""
    spec, frequencies, template = request.spec, request.frequencies, request.template
    total, wall = output.total, output.wall
    record = {
        "model": str(args.model_dir),
        "tokenizer": None if args.tokenizer is None else str(args.tokenizer),
        "family": loaded.family.name,
        "prompts": request.prompts,
        "rendered_prompts": request.rendered,
        "continuations": output.texts,
        "prompt_ids": request.prompt_ids,
        "generated_ids": output.generated,
        "stopped": [bool(s) for s in output.generation.stopped],
        "settings": {
            "method": args.method,
            "attention": spec_settings(spec),
            "rope_scaling": None if frequencies is None else dataclasses.asdict(frequencies),
            "sampling": dataclasses.asdict(request.sampling),
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "stop": args.stop,
            "stop_tokens": request.stops,
            "bos": bool(request.bos),
            "chat": args.chat,
            "system": args.system,
            "chat_template": None if template is None else template.source,
            "params_dtype": loaded.stored.name,
            "compute_dtype": loaded.model.dtype.name,
            "prefill_chunk": args.prefill_chunk,
            "cache": loaded.cache.describe(),
            "cache_kind": "lambda" if spec.bounded else "full",
        },
        "timings": {
            "load_s": loaded.load_s,
            "generate_s": wall,
            "generated_tokens": total,
            "tokens_per_s": total / max(wall, 1e-9),
            "includes_compilation": True,
        },
    }
    path = Path(args.out)
    write_json_atomic(path, record)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
