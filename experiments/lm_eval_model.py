"""An lm-evaluation-harness model: any model this project loads, under any of its attention methods.

    python -m experiments.lm_eval_model --model lminf_jax \\
        --model_args pretrained=MODEL_DIR[,tokenizer=DIR][,method=METHOD][,G=G][,L=L][,D=D][,group_size=g]
            [,leak=k][,top_k_middle=K][,top_k_insert_at=N][,top_k_from_layer=H][,top_k_to_layer=H]
            [,dtype=bf16|fp16|fp32][,max_gen_toks=N][,max_length=N][,prefill_chunk=C] \\
        --tasks TASKS [--batch_size B] [any other option of lm-eval's command line]

This module registers `LminfJaxLM` with lm-eval as ``lminf_jax`` and hands its arguments to lm-eval's
own command line (`main`): lm-eval 0.4.13 reads no plugins. Later releases read the ``lm_eval.models``
entry-point group (lm-evaluation-harness PR #4013, docs/plugin_guide.md) and find the model through
pyproject.toml, so ``python -m lm_eval --model lminf_jax ...`` works there. In Python: ``lm_eval.simple_evaluate(model=LminfJaxLM(pretrained=..., ...), ...)``.

MODEL_DIR: a converted or Hugging Face directory (`experiments.loading.load_model`), tokenizer
included (``tokenizer=DIR``: another directory's). ``method``: a mask method (`lminf_jax.spec.KINDS`, default ``lm_infinite``), a RoPE frequency
method at a fixed factor (``yarn@4``) or both (``lm_infinite+ntk@2``), written as for
`experiments.methods.MethodChoice` (``dynamic_ntk`` needs no factor; ``@cover`` is refused: requests
have many lengths). The method parameters are the CLIs' (``global_branch``, ``local_branch``,
``limit_distance``, ``group_size``, ``leak``; ``G``/``L``/``D`` as ``-G/-L/-D``) with their defaults (L and D
from the model's pretraining length), and so are the top-k middle tokens (``top_k_middle`` etc.,
`experiments.methods.spec_from_options`). ``dtype``: cast the weights and compute in it (default: the
stored one). ``batch_size``: rows per model call (lm-eval's ``--batch_size``, default 1; a number, not
``auto``). ``prefill_chunk``: tokens per model call of a prompt's prefill and of a rolling document
(default 512; prompts longer than it compile once per multiple of it). A key that is neither lm-eval's
nor this model's, a method that does not exist or a parameter the method does not use is a ValueError
naming it, raised before any weight is read.

Tokens: BOS (when the tokenizer has one) + ``encode(text)``, as the project's CLIs. lm-eval splits a
request into context and continuation: the continuation's ids are those of ``encode(context +
continuation)`` after the context's (lm-eval's HFLM) when the context's own ids begin it, else (the
tokenizer merged a token across the boundary, e.g. ``import`` + `` sys`` into ``import sys``)
``encode(continuation)``: the scored ids always spell the continuation.

Requests, sorted longest first as HFLM does, ``batch_size`` rows per call (the last batch filled up)
and lengths rounded up to `bucket` sizes, so that a few shapes compile:

* ``loglikelihood``: context + continuation in one left-padded pass scoring each next token
  (`models.decoder.LanguageModel.score`, the perplexity CLI's call: the head runs on a chunk of
  positions at a time, no batch x length x vocabulary logits); the continuation's log-probabilities
  are summed, and it is greedy when each of its tokens is the argmax.
* ``loglikelihood_rolling``: a document is scored as one stream, BOS + its tokens, each token
  predicted once from every token before it under the method's own attention, in chunks of
  ``prefill_chunk`` tokens (`lminf_jax.evaluation.streaming.streaming_nll`, what ``experiments.stream_nll`` runs:
  constant memory on a Λ-cache, a full cache for unbounded methods), one document per call. That is
  lm-eval's rolling log-likelihood with one window as long as the document: the method, not a window,
  decides what each token sees, as in the project's perplexity.
* ``generate_until``: the context continued by `lminf_jax.decoding.generate` (chunked prefill,
  a Λ-cache for bounded methods, else a full cache; top-k middle tokens only at the prompt's end,
  as ``experiments.generate``), greedy unless the task asks ``do_sample`` (then its
  ``temperature``, ``top_k``, ``top_p``), up to ``max_gen_toks`` tokens (the task's, else the model
  argument, default 256), ending at EOS; the text (`experiments.generate.continuation_text`) is cut
  before the first ``until`` string (one that is a single token also ends the row).

Nothing is truncated unless ``max_length`` is given: every method runs at any length (LM-Infinite by
design, vanilla at whatever length it is given). With it, a loglikelihood input or a prompt plus
``max_gen_toks`` longer than ``max_length`` tokens keeps its first token (BOS) and the latest ones, as
``experiments.passkey``'s truncation, and a document is scored in lm-eval's rolling windows of
``max_length`` tokens (`lm_eval.utils.get_rolling_token_windows`); each is logged as a warning.

``dynamic_ntk`` follows the longest row of a batch (as in `generate`): ``batch_size`` 1 gives each
request its own frequencies. One device, JAX's default (lm-eval's ``--device`` is not used).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    # lm-eval's own models first: get_model registers them only into an empty registry
    importlib.import_module("lm_eval.models")
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    raise ImportError(f"experiments.lm_eval_model needs lm-eval: pip install -e '.[eval]' ({e})") from None
from tqdm import tqdm

from lminf_jax.experiments.generate import continuation_text
from lminf_jax.experiments.methods import TOP_K_OPTIONS, fixed_method, spec_from_options
from lminf_jax.experiments.loading import (
    load_config, load_model, open_tokenizer, params_dtype, pretraining_length, resolve_dtype,
)
from lminf_jax.experiments.options import check_outputs_apart, int_option
from lminf_jax.method_parameters import PARAMETERS
from lminf_jax.spec import METHODS

#: The name lm-eval knows this model by (``--model lminf_jax``).
NAME = "lminf_jax"
#: The method parameters the CLIs take by a short flag (-G/-L/-D), by their symbol.
SHORT_NAMES = {declared.symbol: name for name, declared in PARAMETERS.items() if declared.short_flag}

logger = logging.getLogger("lm_eval.models.lminf_jax")  # under lm-eval's logger, which its CLI shows


def bucket(n: int) -> int:
    """``n`` rounded up to one of four sizes per octave (multiples of 2**(bits - 3), at least 8): a batch
    compiles once per bucket, and wastes at most a quarter of its width."""
    step = 1 << max(n.bit_length() - 3, 3)
    return -(-n // step) * step


def keep_latest(ids: list[int], limit: int) -> list[int]:
    """``ids`` if at most ``limit`` long, else its first token (BOS) and the latest ``limit - 1``."""
    return ids if len(ids) <= limit else ids[:1] + ids[len(ids) - limit + 1:]


def _int_arg(name: str, value: Any, minimum: int) -> int:
    try:
        return int_option(minimum)(str(value))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"model_args {name}={value!r}: {e}") from None


def method_model_args(options: dict[str, Any]) -> tuple[dict[str, tuple[str, int]], dict[str, int | None]]:
    """``({method parameter: (model_args key, value)}, {top-k option: value or None})`` of the model
    arguments that are neither lm-eval's nor the model's own; a ValueError names a bad one."""
    values, top_k, seen = {}, dict.fromkeys(TOP_K_OPTIONS), {}
    for key, value in options.items():
        name = SHORT_NAMES.get(key, key)
        if name in seen:
            raise ValueError(f"model_args {key}= and {seen[name]}= name the same parameter")
        seen[name] = key
        if name in TOP_K_OPTIONS:
            top_k[name] = _int_arg(key, value, TOP_K_OPTIONS[name])
        elif name in PARAMETERS:
            values[name] = (key, _int_arg(key, value, PARAMETERS[name].minimum))
        else:
            known = ["pretrained", "tokenizer", "method", "dtype", "batch_size", "max_gen_toks", "max_length",
                     "prefill_chunk", *PARAMETERS, *SHORT_NAMES, *TOP_K_OPTIONS]
            raise ValueError(f"model_args: unknown argument {key!r}; known: {', '.join(known)}")
    return values, top_k


def attention_call(pretrained: str, method: str, options: dict[str, Any]):
    """``(family, config, AttentionCall, MethodChoice)`` of ``method`` and its ``options`` for the model
    in directory ``pretrained``, read without its weights; a ValueError names a bad model argument."""
    from lminf_jax import AttentionCall

    values, top_k = method_model_args(options)
    choice = fixed_method(str(method), "model_args method=", lambda parameter: f"{parameter}=")
    taken = METHODS[choice.mask].OPTIONS
    for name, (key, _) in values.items():
        if name not in taken:
            raise ValueError(f"model_args {key}= is not used by method {choice.mask} (it takes "
                             f"{', '.join(taken) or 'no parameter'})")
    family, config = load_config(pretrained)
    try:
        spec = spec_from_options(choice.mask, {name: value for name, (_, value) in values.items()}, config, top_k,
                                 method=str(method))
        call = AttentionCall(spec, frequencies=choice.frequencies(0, pretraining_length(config)))
        family.model(config, call)  # a frequency method on an ALiBi model fails here
    except ValueError as e:
        raise ValueError(f"model_args: {e}") from None
    return family, config, call, choice


class LminfJaxLM(TemplateLM):
    """``--model lminf_jax``: see the module docstring for the model arguments and what each request does."""

    def __init__(self, pretrained: str, method: str = "lm_infinite", tokenizer: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, max_gen_toks: int = 256, max_length: int | None = None,
                 prefill_chunk: int = 512, device: str | None = None, max_batch_size: int | None = None,
                 **options: Any) -> None:
        super().__init__()
        del max_batch_size  # lm-eval's, for batch_size=auto, which is refused below
        if str(batch_size).startswith("auto"):
            raise ValueError(f"batch_size={batch_size} is not supported: give the rows per model call")
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 1)
        self.max_length = None if max_length is None else _int_arg("max_length", max_length, 2)
        self.prefill_chunk = _int_arg("prefill_chunk", prefill_chunk, 1)
        try:
            compute = resolve_dtype(dtype)
        except ValueError as e:
            raise ValueError(f"model_args: {e}") from None
        family, config, call, choice = attention_call(pretrained, method, options)  # before reading weights
        if device is not None:
            import jax

            logger.info(f"device={device} is not used: JAX runs on {jax.devices()[0]}")
        self.pretrained = str(pretrained)
        self.tokenizer = open_tokenizer(pretrained, tokenizer, option="tokenizer=DIR in --model_args")
        if self.tokenizer.bos_id is None and self.tokenizer.eos_id is None:
            raise ValueError(f"the tokenizer of {pretrained} has neither BOS nor EOS: lm-eval needs one to condition "
                             "the first token on")

        self.params = load_model(pretrained, dtype)[2]
        compute = compute or params_dtype(self.params)
        self.vocab_size = config.vocab_size
        self.model = family.model(config, call, compute)
        spec = call.spec
        self.prefill_model = None if spec.top_k is None else family.model(
            config, dataclasses.replace(call, spec=dataclasses.replace(spec, top_k=None)), compute)
        self.info = {"model": self.pretrained, "family": family.name, "method": choice.name,
                     "attention": spec.describe(), "compute_dtype": compute.name,
                     "rope_scaling": None if call.frequencies is None else dataclasses.asdict(call.frequencies),
                     "cache": "lambda" if spec.bounded else "full", "max_length": self.max_length}
        logger.info(f"lminf_jax: {family.name} from {pretrained}, {choice.name}: {spec.describe()}, compute "
                    f"{compute.name}, {self.info['cache']} cache, batch {self.batch_size}")

    # ----- TemplateLM -------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a rolling document condition on: BOS (else EOS)."""
        return self.tokenizer.eos_id if self.tokenizer.bos_id is None else self.tokenizer.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """BOS (when the tokenizer has one, unless ``add_special_tokens`` is False) + ``encode(string)``."""
        ids = list(self.tokenizer.encode(string))
        if add_special_tokens is not False and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id, *ids]
        if ids and max(ids) >= self.vocab_size:
            raise ValueError(f"the tokenizer of {self.pretrained} produced token {max(ids)} but the model's "
                             f"vocabulary has {self.vocab_size} entries")
        return ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(BOS + encode(context), continuation ids)``, the context's trailing spaces moved to the
        continuation (as lm-eval does). The continuation ids are those ``encode(context + continuation)``
        has after the context's (HFLM's split) when the context's ids begin it, else (the tokenizer merged
        a token across the boundary, e.g. ``import`` + `` sys`` into ``import sys``) ``encode(continuation)``:
        the scored ids always spell the continuation exactly."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids, whole = self.tok_encode(context), self.tok_encode(context + continuation)
        if whole[:len(context_ids)] == context_ids:
            return context_ids, whole[len(context_ids):]
        return context_ids, self.tok_encode(continuation, add_special_tokens=False)

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' ``config``: the model and the attention it ran."""
        return dict(self.info)

    def _no_top_k(self, request: str) -> None:
        """A ValueError when top-k middle tokens were asked for: they apply to generation only."""
        if self.model.spec.top_k is not None:
            raise ValueError(f"top_k_middle applies to the last query of a model call (the prompt's end in "
                             f"generate_until); it has no meaning for {request}: drop it for such tasks")

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(sum of the continuation's log-probabilities, greedy)`` of each ``(strings, context ids,
        continuation ids)``, longest first in batches of one `bucket` width."""
        from lminf_jax.decoding import left_pad

        self._no_top_k("loglikelihood")
        limit = None if self.max_length is None else self.max_length + 1
        cut = 0
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        out = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="lminf_jax loglikelihood") as bar:
            for batch in collator.get_batched(n=self.batch_size):
                rows = []
                for _, context, continuation in batch:
                    row = context + continuation
                    if limit is not None and len(row) > limit:
                        if len(continuation) >= limit:
                            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit "
                                             f"max_length={self.max_length}")
                        row, cut = keep_latest(row, limit), cut + 1
                    rows.append(row)
                width = bucket(max(map(len, rows)))
                tokens, positions = left_pad(rows + rows[-1:] * (self.batch_size - len(rows)), width)
                scores = self.model.score(self.params, tokens, positions)
                logprobs, greedy = np.asarray(scores.logprobs), np.asarray(scores.top1)
                for b, (strings, _, continuation) in enumerate(batch):
                    first = width - 1 - len(continuation)  # its first score: every row ends at the last column
                    answer = (float(logprobs[b, first:].astype(np.float64).sum()), bool(greedy[b, first:].all()))
                    out.append(answer)
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                bar.update(len(batch))
        if cut:
            logger.warning(f"{cut} loglikelihood input(s) longer than max_length={self.max_length} tokens kept their "
                           "first token and the latest ones")
        return collator.get_original(out)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood: one stream (BOS + tokens) through `streaming_nll`, or, with
        ``max_length``, lm-eval's rolling windows of that many tokens (see the module docstring)."""
        from lminf_jax.evaluation.streaming import streaming_nll

        self._no_top_k("loglikelihood_rolling")
        texts = [req.args[0] for req in requests]
        documents = [self.tok_encode(text, add_special_tokens=False) for text in texts]
        if self.max_length is not None:
            return self._rolling_windows(texts, documents, disable_tqdm)
        out = []
        for text, ids in zip(tqdm(texts, disable=disable_tqdm, desc="lminf_jax loglikelihood_rolling"), documents):
            total = 0.0  # an empty document: nothing to predict
            if ids:
                stream = np.asarray([self.prefix_token_id, *ids], np.int32)
                cache = self.model.init_cache(1, capacity=bucket(stream.size))
                result = streaming_nll(self.model, self.params, stream, cache, chunk=self.prefill_chunk, progress=False)
                total = -result.nll * result.tokens
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def _rolling_windows(self, texts: list[str], documents: list[list[int]], disable_tqdm: bool) -> list[float]:
        """Each document's log-likelihood as the sum over lm-eval's rolling windows of ``max_length`` tokens."""
        windows, owners = [], []
        for i, ids in enumerate(documents):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        longer = sum(len(ids) > self.max_length for ids in documents)
        if longer:
            logger.warning(f"{longer} document(s) longer than max_length={self.max_length} tokens scored in lm-eval's "
                           f"rolling windows of {self.max_length} tokens")
        totals = [0.0] * len(documents)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut before its first ``until`` string (see the module docstring)."""
        items = [(context, kwargs, self.tok_encode(context)) for context, kwargs in (req.args for req in requests)]
        collator = Collator(items, sort_fn=lambda x: (-len(x[2]), x[0]), group_by="gen_kwargs", group_fn=lambda x: x[1])
        out = []
        with tqdm(total=len(items), disable=disable_tqdm, desc="lminf_jax generate_until") as bar:
            for batch in collator.get_batched(n=self.batch_size):
                texts = self._generate([ids for _, _, ids in batch], batch[0][1])
                for (context, kwargs, _), text in zip(batch, texts):
                    out.append(text)
                    self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                bar.update(len(batch))
        return collator.get_original(out)

    def _generate(self, prompts: list[list[int]], gen_kwargs: dict) -> list[str]:
        """One batch of prompts (token ids) continued under one set of lm-eval generation kwargs."""
        from lminf_jax.decoding import generate
        from lminf_jax.sampling import Sampling

        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until, new_tokens = kwargs.pop("until"), kwargs.pop("max_gen_toks")
        do_sample, temperature = kwargs.pop("do_sample"), float(kwargs.pop("temperature", 0.0))
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        sampling = Sampling(temperature, top_k, top_p) if do_sample else Sampling()
        if kwargs:
            logger.warning(f"generation kwargs not used by lminf_jax: {sorted(kwargs)}")
        if self.max_length is not None:
            room = self.max_length - new_tokens
            if room < 1:
                raise ValueError(f"max_gen_toks={new_tokens} leaves no room for a prompt in "
                                 f"max_length={self.max_length}")
            cut = sum(len(ids) > room for ids in prompts)
            if cut:
                logger.warning(f"{cut} prompt(s) longer than max_length - max_gen_toks = {room} tokens kept their "
                               "first token and the latest ones")
                prompts = [keep_latest(ids, room) for ids in prompts]
        eos = self.tokenizer.eos_id
        stops = [] if eos is None else [eos]
        for text in until:  # a stop string that is one token also ends the row
            ids = self.tokenizer.encode(text)
            if len(ids) == 1 and text in self.tokenizer.decode(ids):
                stops.append(ids[0])
        longest = max(map(len, prompts))
        rows = prompts + [[self.prefix_token_id]] * (self.batch_size - len(prompts))
        cache = self.model.init_cache(len(rows), capacity=bucket(longest) + new_tokens)
        # the prefill chunk: a power of two <= the longest prompt, at most prefill_chunk (few shapes to compile)
        chunk = min(self.prefill_chunk, 1 << (longest.bit_length() - 1))
        result = generate(self.model, self.params, rows, cache, max_new_tokens=new_tokens, sampling=sampling,
                          stop_tokens=stops, prefill_chunk=chunk, prefill_step=self.prefill_model)
        texts = []
        for b, ids in enumerate(prompts):
            generated = result.row(b)
            if generated and generated[-1] == eos:
                generated = generated[:-1]
            text = continuation_text(self.tokenizer, ids, generated)
            texts.append(postprocess_generated_text(text, until, None))
        return texts


if NAME not in model_registry:  # releases that read entry points hold a placeholder for this class already
    register_model(NAME)(LminfJaxLM)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (``lm-eval [run] ARGS``) with ``lminf_jax`` registered; an
    ``--output_path`` that is or lies inside the ``pretrained`` model directory (or ``tokenizer``'s) is
    refused."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        setup_logging()
        cli = HarnessCLI()
        args = cli.parse_args()
        model_args = getattr(args, "model_args", None) or {}
        inputs = [(f"{key}=", str(model_args[key])) for key in ("pretrained", "tokenizer") if key in model_args]
        output = getattr(args, "output_path", None)
        if inputs and output is not None:
            try:
                check_outputs_apart([("--output_path", output)], inputs)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
        cli.execute(args)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
