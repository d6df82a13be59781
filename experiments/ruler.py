"""RULER's synthetic tasks, generated offline at an exact token length, and their scoring.

RULER: Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654. Definitions follow its code (NVIDIA/RULER, read in the fork
hsiehjackson/RULER and copies): ``scripts/synthetic.yaml`` (the task list below),
``scripts/data/synthetic/constants.py`` (templates, answer prefixes, tokens to generate),
``niah.py``, ``variable_tracking.py``, ``common_words_extraction.py``, ``freq_words_extraction.py``
(instances) and ``scripts/eval/synthetic/constants.py`` (``string_match_all`` / ``_part``).

Tasks: ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``, ``niah_multiquery``
(needle "One of the special magic {numbers|uuids} for {key} is: {value}."; haystack ``noise``: RULER's
repeated sentence, ``text``: held-out text passed as a string where RULER uses Paul Graham's essays,
``needle``: distractor needles), ``vt`` (one chain of 4 hops of ``VAR X = ...`` in noise), ``cwe`` (the
10 words repeated most often in a numbered list) and ``fwe`` (the 3 most frequent coded words in
Zipf-distributed text, alpha = 2). QA tasks (SQuAD, HotpotQA: downloads) are not here.

Length: an instance's model input is ``prompt_tokens``: BOS (when the tokenizer has one) +
``encode(prompt + answer_prefix)``. Its token count n satisfies ``length - SLACK[task] <= n <= length``
(checked, a RuntimeError otherwise). The haystack is grown by binary search over its units (noise
sentences, words of the text, distractor needles, list entries, coded words), then over the
characters of one more unit (noise, text, needle haystacks: the last unit may be cut mid-word),
extra "..." words (fwe) or up to its uncommon repeats of words listed once (cwe). RULER differs: its ``max_seq_length`` also holds the tokens to generate,
and it grows the haystack in steps of 25 to 500 units, so its prompts fall short by up to a step.

Depth (niah, vt): the fraction of the haystack's own tokens (inserted needles not counted) before
the needle; the needle goes to the unit boundary nearest it. RULER draws every needle's depth at
random from 40 depths in [0, 100]% (``depth=None`` here); with a depth, the first expected output's
needle (vt: the chain's first assignment) sits at it, other needles at random grid depths (vt: the
later hops at sorted random depths after it). cwe and fwe have no needle and no depth.

Other differences from RULER, all because nothing is downloaded: keys are two 6-letter pseudo-words
(consonant-vowel syllables from the instance's seeded generator; RULER: wonderwords adjective-noun
pairs) and cwe's words are such pseudo-words (RULER: wonderwords nouns, adjectives and verbs). Equal
lengths keep one word from containing another, which a substring metric would count as found.
Needles in ``noise`` go between its five short sentences (RULER: between whole repeats) and in
``text`` between words (RULER: between nltk sentences). vt's one-shot example has 10 noise
sentences (RULER's: a whole 500-token instance).

Evaluation (`main`)::

    python -m experiments.ruler [MODEL_DIR] [--tokenizer DIR] [--tasks T ...] [--lengths N ... | --multiples 4 8 16]
        [--depths 0 0.25 0.5 0.75 1 | random] [--samples 2] [--seed 0] [--methods ... | all] [-G G] [-L L] [-D D]
        [--group-size g] [--leak k] [--top-k-middle 5] [--top-k-from-layer 4] [--top-k-to-layer H]
        [--top-k-insert-at N] [--instances FILE.jsonl | --write-instances FILE.jsonl] [--batch 8]
        [--out results/ruler.json] [--plot PNG (default: --out with .png) | --no-plot]

Instances are made with the model's tokenizer (``--tokenizer DIR``: another directory's), or read from
``--instances``, whose grid they
then define, every line checked against what `generate` makes) before the model loads, after a
check that they fit in host memory, and every method continues the same ones: greedy, left-padded
batches, ``max_new_tokens`` per task, stopping at EOS. Methods and their defaults are
`experiments.passkey`'s (truncation keeps BOS + the last L_train - 1 - new tokens); MODEL_DIR
defaults to the shipped model fine-tuned on the mix below. A task too short for a length (cwe below
about 1,000 tokens) is skipped there and listed in the JSON. Output: scores x 100 per task, method
and length (a table on stdout, with the share of instances whose needles the mask lets the prompt's
last token see), JSON (settings, instances without their prompts, every prediction, its score and
whether its needles were visible, scores per task, length and depth) and a heat map (length x
depth; its format by --plot's extension: png, pdf, svg, ...) per task and method. The JSON is saved
after each task x length x method cell; a rerun with the same settings and weights
(``settings.params``: their `lminf_jax.evaluation.fingerprint.tree_fingerprint`) keeps the finished cells
(methods may be added), and one with other settings or weights is refused.

Fine-tuning (`TrainingMix`, ``python -m experiments.train ... --ruler-fraction F``): windows of
L_train tokens holding an instance of a random task, length (up to what fits) and depth, its answer
(`answer_text`), EOS, then BOS and training text. Text haystacks come from the training split, so
evaluation haystacks (held-out text) stay unseen.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import reprlib
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from lminf_jax.experiments.loading import (
    add_tokenizer_arg, hf_config, load_config, load_model, open_tokenizer, params_dtype, pretraining_length,
)
from lminf_jax.experiments.methods import (
    TOP_K_DEFAULTS, add_task_methods_arg, method_options, method_spec, task_attention_call, task_method_names,
    task_method_specs, top_k_from_args,
)
from lminf_jax.experiments.options import (
    add_output_args, command_parser, input_path, int_option, output_file, run_cli, save_result,
)
from lminf_jax.experiments.passkey import filled_window
from lminf_jax.experiments.shipped import SHIPPED_RULER_MODEL, add_model_arg

VERSION = 1
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type} afterwards.\n{context}\n"
                 "What are all the special magic {type} for {query} mentioned in the provided text?")
NIAH_ANSWER = " The special magic {type} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
# "assgined": RULER's spelling.
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
             "are assgined the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?")
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"
#: RULER's needle depths: ``np.round(np.linspace(0, 100, 40))`` percent.
DEPTHS = tuple(float(d) / 100 for d in np.round(np.linspace(0, 100, num=40)))
VT_HOPS, VT_EXAMPLE_NOISE = 4, 10
FWE_ALPHA, FWE_WORD = 2.0, 6
_CONSONANTS, _VOWELS = "bdfghklmnprstvwz", "aeiou"


@dataclasses.dataclass(frozen=True)
class Niah:
    """One needle-in-a-haystack configuration (RULER's ``synthetic.yaml`` arguments)."""

    haystack: str  # "noise", "text" or "needle"
    key: str  # "words" or "uuids"
    value: str  # "numbers" or "uuids"
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("text", "words", "numbers"),
    "niah_single_3": Niah("text", "words", "uuids"),
    "niah_multikey_1": Niah("text", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("text", "words", "numbers", values=4),
    "niah_multiquery": Niah("text", "words", "numbers", keys=4, queries=4),
}
TASKS = (*NIAH, "vt", "cwe", "fwe")
#: Tasks whose haystack is the `text` argument.
NEEDS_TEXT = tuple(t for t, c in NIAH.items() if c.haystack == "text")
#: RULER's ``tokens_to_generate`` per task.
MAX_NEW_TOKENS = {**{t: 128 for t in NIAH}, "vt": 30, "cwe": 120, "fwe": 50}
#: The most tokens an instance may fall short of its length (cwe's last step is one list entry).
SLACK = {**{t: 4 for t in NIAH}, "vt": 4, "cwe": 12, "fwe": 4}


@dataclasses.dataclass(frozen=True)
class Instance:
    """One generated instance. Token indices count in `prompt_tokens` (BOS included): the token
    holding each needle's first character, one per expected output (none for cwe and fwe), and the
    haystack's [start, end): from the token holding its first character to the one holding its last."""

    task: str
    length: int
    depth: float | None
    seed: int
    prompt: str
    answer_prefix: str
    outputs: tuple[str, ...]
    needle_positions: tuple[int, ...]
    haystack: tuple[int, int]
    tokens: int
    max_new_tokens: int


def prompt_tokens(tokenizer, prompt: str, answer_prefix: str) -> list[int]:
    """The model's input: BOS (when the tokenizer has one) + ``encode(prompt + answer_prefix)``."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + list(tokenizer.encode(prompt + answer_prefix))


# ----- random pieces ----------------------------------------------------------------------------


def pseudo_words(rng: np.random.Generator, count: int, syllables: int = 3, exclude: Iterable[str] = ()) -> list[str]:
    """`count` distinct pronounceable words of `syllables` consonant-vowel pairs."""
    seen, out = set(exclude), []
    while len(out) < count:
        word = "".join(_CONSONANTS[c] + _VOWELS[v] for c, v in zip(rng.integers(0, len(_CONSONANTS), syllables),
                                                                    rng.integers(0, len(_VOWELS), syllables)))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _random(kind: str, rng: np.random.Generator, exclude: set[str]) -> str:
    """A key or value: ``words`` (two pseudo-words), ``numbers`` (7 digits) or ``uuids`` (version 4)."""
    while True:
        if kind == "words":
            item = "-".join(pseudo_words(rng, 2))
        elif kind == "numbers":
            item = str(int(rng.integers(10**6, 10**7)))
        else:
            item = str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
        if item not in exclude:
            exclude.add(item)
            return item


def _coded_words(rng: np.random.Generator, count: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    seen: set[str] = set()
    while len(seen) < count:
        seen.add("".join(letters[i] for i in rng.integers(0, 26, FWE_WORD)))
    return sorted(seen)


# ----- haystacks and fitting --------------------------------------------------------------------


class TooShort(ValueError):
    """A task's shortest prompt is longer than the length asked for."""


def _largest(fits: Callable[[int], bool], hi: int) -> int:
    """The largest n in [0, hi] with ``fits(n)`` (binary search; fits(0) is assumed)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclasses.dataclass
class _Layout:
    """A prompt as ``head + context + tail`` (+ answer prefix), the context being haystack units
    (each with its trailing separator) with needles inserted at depths."""

    head: str
    tail: str
    answer_prefix: str
    units: list[str]
    needles: list[tuple[float, str]]  # (depth, text with its trailing separator), in order
    unit_tokens: list[float] = dataclasses.field(default_factory=list)  # filled on first build

    def build(self, tokenizer, n: int, chars: int = 0) -> tuple[str, list[int], tuple[int, int]]:
        """(prompt, needle char offsets, context char span) with `n` units and `chars` of the next."""
        if not self.unit_tokens:  # per unit, scaled to the count of each run of 32 (tokens span spaces)
            for i in range(0, len(self.units), 32):
                each = np.array([len(tokenizer.encode(u)) for u in self.units[i:i + 32]], float)
                self.unit_tokens += list(each * len(tokenizer.encode("".join(self.units[i:i + 32]))) / each.sum())
        hay = self.units[:n] + ([self.units[n][:chars]] if chars else [])
        cum = np.cumsum([0, *self.unit_tokens[:n], *([len(tokenizer.encode(hay[-1]))] if chars else [])])
        slots = [int(np.argmin(np.abs(cum - d * cum[-1]))) for d, _ in self.needles]
        order = sorted(range(len(slots)), key=lambda i: (slots[i], i))
        parts, offsets, at, k = [self.head], [0] * len(slots), len(self.head), 0
        for slot in range(len(hay) + 1):
            while k < len(order) and slots[order[k]] == slot:
                offsets[order[k]] = at
                parts.append(self.needles[order[k]][1])
                at += len(parts[-1])
                k += 1
            if slot < len(hay):
                parts.append(hay[slot])
                at += len(hay[slot])
        context = "".join(parts[1:]).rstrip()
        return self.head + context + self.tail, offsets, (len(self.head), len(self.head) + len(context))

    def count(self, tokenizer, n: int, chars: int = 0) -> int:
        return len(prompt_tokens(tokenizer, self.build(tokenizer, n, chars)[0], self.answer_prefix))

    def fit(self, tokenizer, length: int, cut: bool = True) -> tuple[int, int]:
        """(units, chars of the next unit) of the longest prompt of at most `length` tokens."""
        if self.count(tokenizer, 0) > length:
            raise TooShort(f"length {length} is too short: the prompt without haystack has "
                             f"{self.count(tokenizer, 0)} tokens")
        n = _largest(lambda m: self.count(tokenizer, m) <= length, len(self.units) - 1)
        if not cut:
            return n, 0
        return n, _largest(lambda c: self.count(tokenizer, n, c) <= length, len(self.units[n]) - 1)


def _noise_units(count: int) -> list[str]:
    sentences = [s + "." for s in NOISE.rstrip(".").split(". ")]
    return [s + ("\n" if i % len(sentences) == len(sentences) - 1 else " ")
            for i, s in zip(range(count), sentences * (count // len(sentences) + 1))]


def _text_units(text: str, count: int) -> list[str]:
    """The first `count` words of `text`, whitespace collapsed as RULER does with its essays."""
    words = re.sub(r"\s+", " ", text).strip().split(" ")[:count]
    return [w + " " for w in words if w]


def _other_depths(rng: np.random.Generator, count: int) -> list[float]:
    return [DEPTHS[i] for i in rng.choice(len(DEPTHS), size=count, replace=False)]


def _niah(name: str, tokenizer, length: int, depth: float | None, rng: np.random.Generator,
          text: str | None) -> tuple[_Layout, list[str], bool]:
    cfg = NIAH[name]
    used: set[str] = set()
    keys = [_random(cfg.key, rng, used) for _ in range(max(cfg.keys, cfg.queries))]
    values = [[_random(cfg.value, rng, used) for _ in range(cfg.values)] for _ in keys]
    queried = [int(i) for i in rng.permutation(len(keys))[:cfg.queries]]
    single = cfg.queries * cfg.values == 1
    kind = cfg.value[:-1] if single else cfg.value
    needle_of = {(k, v): NEEDLE.format(type=cfg.value, key=keys[k], value=v) for k in range(len(keys)) for v in values[k]}
    answers = [(k, v) for k in queried for v in values[k]]
    rest = [kv for kv in needle_of if kv not in answers]
    placed = answers + rest
    depths = [depth, *_other_depths(rng, len(placed) - 1)] if depth is not None else _other_depths(rng, len(placed))
    sep = "\n" if cfg.haystack != "text" else " "
    cap = 4 * length + 16
    if cfg.haystack == "noise":
        units = _noise_units(cap // 4)
    elif cfg.haystack == "text":
        if not text:
            raise ValueError(f"{name} needs a text haystack: pass text= (e.g. held_out_text())")
        units = _text_units(text, cap)
    else:
        units = [NEEDLE.format(type=cfg.value, key=_random(cfg.key, rng, used), value=_random(cfg.value, rng, used)) + sep
                 for _ in range(cap // 16)]
    template, answer = NIAH_TEMPLATE, NIAH_ANSWER
    if single:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        answer = answer.replace("are", "is")
    names = [keys[k] for k in queried]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    head, tail = template.format(type=kind, query=query, context="\0").split("\0")
    layout = _Layout(head, tail, answer.format(type=kind, query=query), units,
                     [(d, needle_of[kv] + sep) for d, kv in zip(depths, placed)])
    return layout, [v for _, v in answers], True


def _vt(tokenizer, length: int, depth: float | None, rng: np.random.Generator) -> tuple[_Layout, list[str], bool]:
    def chain(letters: int) -> tuple[list[str], list[str]]:
        names: list[str] = []
        while len(names) < VT_HOPS + 1:
            name = "".join(chr(65 + int(i)) for i in rng.integers(0, 26, letters))
            names += [name] if name not in names else []
        value = str(int(rng.integers(10000, 99999)))
        return names, [f"VAR {names[0]} = {value} "] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]

    example_vars, example_chain = chain(3)
    positions = sorted(int(p) for p in rng.choice(VT_EXAMPLE_NOISE, size=len(example_chain)))
    noise = _noise_units(VT_EXAMPLE_NOISE)
    for j, (p, line) in enumerate(zip(positions, example_chain)):
        noise.insert(p + j, line)
    query = example_chain[0].split("=")[-1].strip()
    example = (VT_TEMPLATE.format(context="".join(noise).rstrip(), query=query)
               + VT_ANSWER.format(num_v=VT_HOPS + 1, query=query) + " ".join(example_vars) + "\n\n")
    names, lines = chain(5)
    query = lines[0].split("=")[-1].strip()
    if depth is None:
        depths = sorted(float(d) for d in rng.random(len(lines)))
    else:
        depths = [depth, *sorted(depth + (1 - depth) * float(d) for d in rng.random(len(lines) - 1))]
    head, tail = VT_TEMPLATE.format(context="\0", query=query).split("\0")
    layout = _Layout(example + head, tail, VT_ANSWER.format(num_v=VT_HOPS + 1, query=query),
                     _noise_units(length), list(zip(depths, lines)))
    return layout, names, True


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


#: cwe's settings (RULER's): example words, their repeats (common, uncommon), the list's repeats.
CWE_SHORT, CWE_LONG = (20, 3, 1, 6, 1), (40, 10, 3, 30, 3)


def _cwe(tokenizer, length: int, rng: np.random.Generator) -> tuple[str, list[str]]:
    """(prompt, answer) of common-words extraction with the longest list that fits: `CWE_LONG` from
    4096 tokens on when its shortest prompt fits (RULER: always from 4096), else `CWE_SHORT`."""
    words = pseudo_words(rng, CWE_LONG[0] + length)
    example_seed, order_seed = (int(x) for x in rng.integers(2**63, size=2))

    def shuffled(items: list[str], seed: int) -> list[str]:
        return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]

    def prompt(settings: tuple[int, ...], uncommon: int, once: int = 0) -> str:
        ex_words, ex_cw, ex_ucw, cw, ucw = settings
        example, common, pool = words[:ex_words], words[ex_words:ex_words + 10], words[ex_words + 10:]
        ex_list = shuffled(example[:10] * ex_cw + example[10:] * ex_ucw, example_seed)
        items = shuffled(common * cw + pool[:uncommon] * ucw + pool[uncommon:uncommon + once], order_seed)
        return (CWE_TEMPLATE.format(context=_numbered(ex_list)) + CWE_ANSWER + " " + _numbered(example[:10]) + "\n"
                + CWE_TEMPLATE.format(context=_numbered(items)))

    def count(settings: tuple[int, ...], uncommon: int, once: int = 0) -> int:
        return len(prompt_tokens(tokenizer, prompt(settings, uncommon, once), CWE_ANSWER))

    settings = CWE_LONG if length >= 4096 and count(CWE_LONG, 0) <= length else CWE_SHORT
    if count(settings, 0) > length:
        raise TooShort(f"length {length} is too short for cwe: its shortest prompt has "
                         f"{count(settings, 0)} tokens")
    ucw = settings[-1]
    u = _largest(lambda m: count(settings, m) <= length, len(words) - settings[0] - 10 - ucw - 1)
    once = _largest(lambda k: count(settings, u, k) <= length, ucw)
    return prompt(settings, u, once), words[settings[0]:settings[0] + 10]


def _fwe(tokenizer, length: int, rng: np.random.Generator) -> tuple[str, list[str]]:
    """(prompt, answer) of frequent-words extraction: counts ``int(n k^-alpha / zeta(alpha))`` of
    rank k = 1, 2, ... of ``length // 50`` coded words (rank 1 is "...", noise); n as large as fits."""
    vocab = _coded_words(rng, max(length // 50, 5))
    vocab = [vocab[i] for i in rng.permutation(len(vocab))]
    vocab[0] = "..."
    ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
    zeta = math.pi ** 2 / 6  # zeta(FWE_ALPHA = 2)
    order_seed = int(rng.integers(2**63))

    def counts(n: int) -> np.ndarray:
        return (n * ranks ** -FWE_ALPHA / zeta).astype(int)

    def prompt(n: int, dots: int = 0) -> str:
        items = [w for w, c in zip(vocab, counts(n)) for _ in range(c)] + ["..."] * dots
        items = [items[i] for i in np.random.default_rng(order_seed).permutation(len(items))]
        return FWE_TEMPLATE.format(context=" ".join(items))

    def fits(n: int, dots: int = 0) -> bool:
        return len(prompt_tokens(tokenizer, prompt(n, dots), FWE_ANSWER)) <= length

    n = _largest(fits, 4 * length)
    c = counts(n)
    if len(c) < 5 or not c[1] > c[2] > c[3] > c[4]:
        raise TooShort(f"length {length} is too short for fwe: word counts {c[:5].tolist()} leave the "
                         f"three most frequent words ambiguous")
    return prompt(n, _largest(lambda d: fits(n, d), 64)), vocab[1:4]


# ----- instances --------------------------------------------------------------------------------


def generate(task: str, tokenizer, length: int, depth: float | None, seed: int, text: str | None = None) -> Instance:
    """One instance of `task` at `length` tokens (see the module docstring), reproducible from `seed`.

    `depth` in [0, 1] or None (RULER's random depths); None for cwe and fwe. `text`: the haystack
    of the ``text`` tasks (`NEEDS_TEXT`). A `TooShort` error says when `length` is too short."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    if task in ("cwe", "fwe") and depth is not None:
        raise ValueError(f"{task} has no needle: depth must be None, got {depth}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = np.random.default_rng(seed)
    if task in ("cwe", "fwe"):
        prompt, outputs = (_cwe if task == "cwe" else _fwe)(tokenizer, length, rng)
        answer_prefix, offsets = (CWE_ANSWER if task == "cwe" else FWE_ANSWER), []
        start = prompt.rindex("\n", 0, prompt.rindex("\nQuestion:")) + 1 if task == "cwe" else len(
            FWE_TEMPLATE.split("{context}")[0])
        span = (start, prompt.rindex("\nQuestion:"))
    else:
        layout, outputs, cut = (_vt(tokenizer, length, depth, rng) if task == "vt"
                                else _niah(task, tokenizer, length, depth, rng, text))
        n, chars = layout.fit(tokenizer, length, cut)
        prompt, offsets, span = layout.build(tokenizer, n, chars)
        answer_prefix = layout.answer_prefix
        if n == len(layout.units) - 1:
            raise ValueError(f"{task}: the haystack ran out at {n} units before {length} tokens (pass more text)")
    tokens = len(prompt_tokens(tokenizer, prompt, answer_prefix))
    if not length - SLACK[task] <= tokens <= length:
        raise RuntimeError(f"{task}: made {tokens} tokens for length {length} (allowed: {SLACK[task]} fewer)")

    def at(char: int) -> int:  # the token holding character `char` (tokenizing the prompt up to it)
        return len(prompt_tokens(tokenizer, prompt[:char + 1], "")) - 1

    return Instance(task, length, depth, seed, prompt, answer_prefix, tuple(outputs),
                    tuple(at(o) for o in offsets[:len(outputs)]), (at(span[0]), at(span[1] - 1) + 1), tokens, MAX_NEW_TOKENS[task])


def generate_grid(tasks: Sequence[str], tokenizer, lengths: Sequence[int], depths: Sequence[float | None],
                  samples: int, seed: int = 0, text: str | None = None) -> list[Instance]:
    """`samples` instances (seeds ``seed .. seed + samples - 1``) per task, length and depth; cwe and
    fwe get depth None once per length."""
    return [generate(task, tokenizer, n, d, s, text)
            for task in tasks for n in lengths for d in ((None,) if task in ("cwe", "fwe") else depths)
            for s in range(seed, seed + samples)]


def held_out_text(source: str = "stdlib", held_out_percent: float | None = None) -> str:
    """The held-out documents of `source` (`experiments.corpus`'s split), joined by blank lines: a
    haystack no model trained here has seen."""
    from lminf_jax.experiments import corpus

    docs, _ = corpus.held_out_documents(
        source, corpus.DEFAULT_HELD_OUT_PERCENT if held_out_percent is None else held_out_percent)
    return "\n\n".join(d.text for d in docs)


# ----- fine-tuning mix --------------------------------------------------------------------------


def answer_text(instance: Instance) -> str:
    """The continuation of `instance`'s answer prefix a model is fine-tuned on: its expected outputs
    in the format of the task's prompt (vt's and cwe's one-shot examples; ``" a, b."`` for niah)."""
    if instance.task == "vt":
        return " ".join(instance.outputs)  # VT_ANSWER ends with a space, as in its example
    if instance.task == "cwe":
        return " " + _numbered(instance.outputs)
    if instance.task == "fwe":
        return " " + " ".join(instance.outputs)
    return " " + ", ".join(instance.outputs) + "."


class TrainingMix:
    """Fine-tuning windows of RULER instances no longer than a training length (`windows`).

    Every task of `tasks` whose shortest instance with its answer fits in `seq_len` takes part
    (`included`; `excluded` says why the others do not, e.g. cwe, whose shortest prompt is about
    1,000 tokens). Text haystacks are decoded from the training token stream, never held-out text."""

    def __init__(self, tokenizer, seq_len: int, stream: np.ndarray, tasks: Sequence[str] = TASKS):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task {unknown[0]!r}; known: {', '.join(TASKS)}")
        if tokenizer.eos_id is None:
            raise ValueError("the RULER fine-tuning mix ends each answer with EOS: the tokenizer has none")
        self.tokenizer, self.seq_len, self.stream = tokenizer, seq_len, stream
        self.shortest: dict[str, int] = {}
        self.excluded: dict[str, str] = {}
        text = self._text(np.random.default_rng(0))
        for task in tasks:
            fits = self._fits(task, text)
            if fits is None:
                self.excluded[task] = f"its shortest instance with its answer needs more than {seq_len} tokens"
            else:
                self.shortest[task] = fits
        if not self.shortest:
            raise ValueError(f"no RULER task of {', '.join(tasks)} fits in {seq_len} tokens: "
                             + "; ".join(f"{t}: {why}" for t, why in self.excluded.items()))

    @property
    def included(self) -> tuple[str, ...]:
        return tuple(self.shortest)

    def describe(self) -> str:
        """The tasks in the mix, then each one left out and why (for logs and model cards)."""
        return ", ".join(self.included) + "".join(f"; not {t}: {why}" for t, why in self.excluded.items())

    def _text(self, rng: np.random.Generator) -> str:
        span = 4 * self.seq_len  # words enough for any haystack of seq_len tokens
        start = int(rng.integers(0, max(1, self.stream.shape[0] - span)))
        return self.tokenizer.decode([int(t) for t in self.stream[start:start + span]])

    def _room(self, instance: Instance) -> int:
        """Tokens left in a window after the prompt, its answer, EOS and BOS (negative: too long)."""
        return self.seq_len - instance.tokens - len(self.tokenizer.encode(answer_text(instance))) - 2

    def _fits(self, task: str, text: str) -> int | None:
        """The shortest length (a multiple of 8) at which `task` makes an instance that fits, or None."""
        for n in range(16, self.seq_len + 1, 8):
            try:
                instance = generate(task, self.tokenizer, n, None if task in ("cwe", "fwe") else 0.5, 0, text)
            except TooShort:
                continue
            return n if self._room(instance) >= 0 else None
        return None

    def instance(self, rng: np.random.Generator) -> Instance:
        """A random instance (task, length, depth, seed drawn from `rng`) that fits with its answer."""
        task = self.included[int(rng.integers(len(self.included)))]
        depth = None if task in ("cwe", "fwe") else float(rng.random())
        seed = int(rng.integers(2**31))
        text = self._text(rng) if task in NEEDS_TEXT else None
        length = int(rng.integers(self.shortest[task], self.seq_len - 1))
        for _ in range(16):  # the answer's tokens are known once the instance is made
            try:
                instance = generate(task, self.tokenizer, length, depth, seed, text)
            except TooShort:  # this seed's shortest prompt is longer than the one `shortest` measured
                length += 8
                continue
            except RuntimeError:  # needles moved by a unit changed the tokens at their seams: another seed
                seed += 1
                continue
            room = self._room(instance)
            if room >= 0:
                return instance
            length += room
        raise RuntimeError(f"{task}: no instance of seed {seed} fits in {self.seq_len} tokens with its answer")

    def windows(self, rows: int, rng: np.random.Generator, bos_id: int) -> np.ndarray:
        """``(rows, seq_len)`` int32 windows: an instance's prompt, its answer (`answer_text`) and EOS,
        then BOS and training tokens from a random offset to fill the window."""
        out = np.empty((rows, self.seq_len), np.int32)
        for r in range(rows):
            instance = self.instance(rng)
            head = (prompt_tokens(self.tokenizer, instance.prompt, instance.answer_prefix)
                    + list(self.tokenizer.encode(answer_text(instance))) + [self.tokenizer.eos_id, bos_id])
            out[r] = filled_window(head, self.stream, self.seq_len, rng)
        return out


def write_jsonl(instances: Iterable[Instance], path: str | os.PathLike) -> None:
    """One JSON object per line: every `Instance` field and ``"version"``."""
    with Path(path).open("w", encoding="utf-8") as f:
        for inst in instances:
            f.write(json.dumps({"version": VERSION, **dataclasses.asdict(inst)}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[Instance]:
    """The instances `write_jsonl` wrote, each line checked by `parse_instance` (a ValueError names
    the file and line of the first bad one)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.append(parse_instance(line))
            except ValueError as e:
                raise ValueError(f"{path}:{i + 1}: {e}") from None
    return out


def parse_instance(line: str) -> Instance:
    """One `write_jsonl` line as an `Instance`, every field checked against what `generate` makes
    (`instance_problem`); a ValueError says what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(record, dict) or not _integer(record.get("version"), VERSION, VERSION):
        raise ValueError(f"not a version {VERSION} RULER instance")
    fields = [f.name for f in dataclasses.fields(Instance)]
    missing = [k for k in fields if k not in record]
    unknown = [k for k in record if k not in (*fields, "version")]
    problems = [f"missing key(s): {', '.join(missing)}"] if missing else []
    problems += [f"unknown key(s): {', '.join(unknown)}"] if unknown else []
    problem = "; ".join(problems) or instance_problem(record)
    if problem:
        raise ValueError(problem)
    tuples = {k: tuple(record[k]) for k in ("outputs", "needle_positions", "haystack")}
    depth = None if record["depth"] is None else float(record["depth"])
    return Instance(**{k: record[k] for k in fields} | tuples | {"depth": depth})


def _integer(value: object, low: int, high: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def instance_problem(record: dict) -> str | None:
    """What in an instance's fields (all present) `generate` could not have made, or None: the
    rule ``length - SLACK[task] <= tokens <= length``, needle positions inside the prompt, etc.
    (That `tokens` is the prompt's count under a tokenizer is `make_instances`'s check.)"""
    task, length, tokens, depth, seed = (record[k] for k in ("task", "length", "tokens", "depth", "seed"))
    outputs, positions, haystack = record["outputs"], record["needle_positions"], record["haystack"]
    needles = task not in ("cwe", "fwe")
    if not isinstance(task, str) or task not in TASKS:
        return f"task {reprlib.repr(task)} is not a RULER task; known: {', '.join(TASKS)}"
    if not _integer(length, 1):
        return f"length must be a positive integer, got {reprlib.repr(length)}"
    if not _integer(tokens, length - SLACK[task], length):
        return (f"length {length} and tokens {reprlib.repr(tokens)} disagree: {task} prompts have length - "
                f"{SLACK[task]} <= tokens <= length")
    if depth is not None and not needles:
        return f"{task} has no needle: depth must be null, got {reprlib.repr(depth)}"
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1):
        return f"depth must be a number in [0, 1] or null, got {reprlib.repr(depth)}"
    if not _integer(seed, 0):
        return f"seed must be a non-negative integer, got {reprlib.repr(seed)}"
    if not isinstance(record["prompt"], str) or not record["prompt"]:
        return "prompt must be a non-empty string"
    if not isinstance(record["answer_prefix"], str):
        return "answer_prefix must be a string"
    if not (isinstance(outputs, list) and outputs and all(isinstance(o, str) and o for o in outputs)):
        return f"outputs must be a non-empty list of non-empty strings, got {reprlib.repr(outputs)}"
    wanted = len(outputs) if needles else 0
    if not (isinstance(positions, list) and len(positions) == wanted
            and all(_integer(p, 0, tokens - 1) for p in positions)):
        what = f"{wanted} integer(s) in [0, {tokens - 1}] (one per output)" if needles else f"[] ({task} has no needle)"
        return f"needle_positions must be {what}, got {reprlib.repr(positions)}"
    if not (isinstance(haystack, list) and len(haystack) == 2 and _integer(haystack[0], 0)
            and _integer(haystack[1], haystack[0], tokens)):
        return (f"haystack must be [start, end] with 0 <= start <= end <= tokens = {tokens}, "
                f"got {reprlib.repr(haystack)}")
    new = record["max_new_tokens"]
    if not _integer(new, MAX_NEW_TOKENS[task], MAX_NEW_TOKENS[task]):
        return f"max_new_tokens must be {MAX_NEW_TOKENS[task]} (RULER's for {task}), got {reprlib.repr(new)}"
    return None


# ----- scoring ----------------------------------------------------------------------------------


def string_match_all(prediction: str, outputs: Sequence[str]) -> float:
    """RULER's metric for all synthetic tasks: the fraction of `outputs` found in `prediction`
    (substring, case-insensitive)."""
    pred = prediction.lower()
    return sum(o.lower() in pred for o in outputs) / len(outputs)


def string_match_part(prediction: str, outputs: Sequence[str]) -> float:
    """RULER's metric for its QA tasks: 1 when any of `outputs` is found in `prediction`."""
    pred = prediction.lower()
    return float(any(o.lower() in pred for o in outputs))


def score(instance: Instance, prediction: str) -> float:
    """`string_match_all` of a prediction (the continuation after the answer prefix)."""
    return string_match_all(prediction, instance.outputs)


def aggregate(instances: Sequence[Instance], predictions: Sequence[str]) -> dict[tuple[str, int, float | None], dict]:
    """``{(task, length, depth): {"score": mean in [0, 1], "n": instances}}`` (RULER reports x 100)."""
    if len(instances) != len(predictions):
        raise ValueError(f"{len(instances)} instances but {len(predictions)} predictions")
    cells: dict[tuple[str, int, float | None], list[float]] = {}
    for inst, pred in zip(instances, predictions):
        cells.setdefault((inst.task, inst.length, inst.depth), []).append(score(inst, pred))
    return {k: {"score": float(np.mean(v)), "n": len(v)} for k, v in cells.items()}


# ----- evaluation -------------------------------------------------------------------------------

DEFAULT_MULTIPLES, DEFAULT_DEPTHS, DEFAULT_SAMPLES = (4, 8, 16), (0.0, 0.25, 0.5, 0.75, 1.0), 2
#: Options that choose the instances: not allowed with ``--instances``, whose grid the file defines.
GRID_OPTIONS = ("tasks", "lengths", "multiples", "depths", "samples", "seed")
#: Host memory per prompt token: while an instance is made (its haystack's units and their
#: tokenizations: tracemalloc peaks of `generate` up to 1,166 over every task at 4,096, 16,384 and
#: 65,536 tokens) and while it is held (its ids in a Python list: 36; its prompt: ~3).
MAKE_BYTES_PER_TOKEN, HOLD_BYTES_PER_TOKEN = 1200, 40


def depth_option(text: str) -> float | None:
    """An argparse type: a depth in [0, 1], or ``random`` (None: RULER's random depths)."""
    if text == "random":
        return None
    try:
        depth = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'random', got {text!r}") from None
    if not 0.0 <= depth <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return depth


def depth_label(depth: float | None) -> str:
    """A depth as a JSON key: ``f"{depth:g}"``, ``"any"`` for None (random, or cwe and fwe)."""
    return "any" if depth is None else f"{depth:g}"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("ruler", "RULER's synthetic tasks: every method on the same instances.")
    add_model_arg(p, SHIPPED_RULER_MODEL, "the shipped model fine-tuned on RULER instances")
    add_tokenizer_arg(p)
    p.add_argument("--tasks", nargs="+", choices=TASKS, metavar="TASK", help=f"of {', '.join(TASKS)} (default: all)")
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument("--lengths", type=int_option(1), nargs="+", metavar="N",
                         help="prompt lengths in tokens (default: those of --multiples)")
    lengths.add_argument("--multiples", type=int_option(1), nargs="+", metavar="M",
                         help=f"prompt lengths as multiples of L_train (default {' '.join(map(str, DEFAULT_MULTIPLES))})")
    p.add_argument("--depths", type=depth_option, nargs="+", metavar="F",
                   help=f"needle depths in [0, 1] or 'random' (default {' '.join(f'{d:g}' for d in DEFAULT_DEPTHS)})")
    p.add_argument("--samples", type=int_option(1), help=f"instances per task, length and depth (default {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int_option(0), help="first instance seed (default 0)")
    add_task_methods_arg(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--instances", type=input_path, metavar="JSONL", help="read the instances (write_jsonl's) instead of making them")
    source.add_argument("--write-instances", type=output_file, metavar="JSONL", help="also write the instances made")
    p.add_argument("--batch", type=int_option(1), default=8, metavar="B", help="prompts per generate call")
    add_output_args(p, "results/ruler.json", "the result (JSON), saved after each cell; a rerun resumes it",
                    plot="heat maps of the score by length and depth")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


def make_instances(args: argparse.Namespace, tokenizer, l_train: int) -> tuple[list[Instance], dict]:
    """The instances (generated, or read from ``--instances`` and checked against this tokenizer) and
    where they came from. A task whose shortest prompt is longer than a length is skipped there and
    listed under ``"skipped"``; any other failure to make an instance stops the run."""
    if args.instances is not None:
        given = [f"--{o}" for o in GRID_OPTIONS if getattr(args, o) is not None]
        if given:
            raise ValueError(f"--instances defines the tasks, lengths and depths: drop {', '.join(given)}")
        instances = read_jsonl(args.instances)
        if not instances:
            raise ValueError(f"{args.instances} holds no instances")
        for i, inst in enumerate(instances):  # read_jsonl checked the rest
            if len(prompt_tokens(tokenizer, inst.prompt, inst.answer_prefix)) != inst.tokens:
                raise ValueError(f"{args.instances}:{i + 1}: the prompt does not make {inst.tokens} tokens with "
                                 f"{args.tokenizer or args.model_dir}'s tokenizer (made with another one?)")
        return instances, {"file": str(args.instances)}
    tasks = args.tasks or list(TASKS)
    lengths = sorted(set(args.lengths or [m * l_train for m in args.multiples or DEFAULT_MULTIPLES]))
    samples = DEFAULT_SAMPLES if args.samples is None else args.samples
    seed = args.seed or 0
    depths = args.depths or DEFAULT_DEPTHS
    per_length = samples * sum(1 if task in ("cwe", "fwe") else len(depths) for task in tasks)
    check_host_memory({n: per_length for n in lengths})
    text = held_out_text() if set(tasks) & set(NEEDS_TEXT) else None
    instances, skipped = [], {}
    for n in lengths:
        for task in tasks:
            try:
                instances += generate_grid([task], tokenizer, [n], depths, samples, seed, text)
            except TooShort as e:  # e.g. cwe below about 1,000 tokens: that cell stays empty, said here and in the JSON
                skipped[f"{task}@{n}"] = str(e)
                print(f"skipping {task} at {n:,} tokens: {e}", file=sys.stderr)
            except ValueError as e:
                raise ValueError(f"{task} at {n:,} tokens: {e}") from None
    if not instances:
        raise ValueError(f"no task can be made at {', '.join(f'{n:,}' for n in lengths)} tokens: "
                         + "; ".join(f"{cell}: {why}" for cell, why in skipped.items()))
    return instances, {"generated": {"samples": samples, "seed": seed, "text": "stdlib held-out" if text else None,
                                     "skipped": skipped}}


def check_host_memory(instances: dict[int, int]) -> None:
    """Raise a ValueError, before any instance is made, when `instances` (how many per length)
    would not fit in the host's memory: `MAKE_BYTES_PER_TOKEN` of the longest while it is made,
    `HOLD_BYTES_PER_TOKEN` of every one while the run holds them."""
    from lminf_jax.cache import host_memory

    longest, count = max(instances), sum(instances.values())
    need = longest * MAKE_BYTES_PER_TOKEN + sum(n * k for n, k in instances.items()) * HOLD_BYTES_PER_TOKEN
    have = host_memory()
    if need > have:
        raise ValueError(f"{count:,} instances of up to {longest:,} tokens need about {need:,} bytes of host memory "
                         f"({MAKE_BYTES_PER_TOKEN:,} per token to make the longest, {HOLD_BYTES_PER_TOKEN} per token "
                         f"to hold them all), more than its {have:,}: lower --lengths, --multiples or --samples")


def instance_record(inst: Instance, tokens: list[int]) -> dict:
    """An instance for the result file: its fields but the prompt, and the sha256 of its token ids."""
    fields = {k: v for k, v in dataclasses.asdict(inst).items() if k not in ("prompt", "answer_prefix")}
    return {**fields, "prompt_sha256": hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()}


def predict(model, prefill, params, tokenizer, prompts: list[list[int]], new_tokens: int, batch: int,
            keep: int | None) -> list[dict]:
    """Greedy continuations stopping at EOS, `batch` prompts per call (the last padded with copies of
    its last prompt); ``keep``: truncate each prompt to its first token + its last `keep`."""
    from lminf_jax.decoding import generate

    if keep is not None:
        prompts = [t[:1] + t[-keep:] if len(t) > keep + 1 else t for t in prompts]
    size = min(batch, len(prompts))
    capacity = None if model.spec.bounded else max(map(len, prompts)) + new_tokens
    stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    rows = []
    for first in range(0, len(prompts), size):
        chunk = prompts[first:first + size]
        out = generate(model, params, chunk + [chunk[-1]] * (size - len(chunk)), model.init_cache(size, capacity=capacity),
                       max_new_tokens=new_tokens, stop_tokens=stops, prefill_step=prefill)
        for b in range(len(chunk)):
            ids = out.row(b)[:out.lengths[b] - int(out.stopped[b])]
            rows.append({"prediction": tokenizer.decode(ids), "new_tokens": len(ids), "stopped": bool(out.stopped[b])})
    return rows


def needles_visible(spec, instance: Instance, keep: int | None = None) -> bool | None:
    """Whether the prompt's last token attends every needle of `instance` under the mask of `spec`
    (top-k middle tokens, chosen per layer, aside), or, with ``keep``, whether truncation to the
    first token + the last `keep` kept them all; None for tasks without needles (cwe, fwe)."""
    if not instance.needle_positions:
        return None
    needles = np.asarray(instance.needle_positions)
    if keep is not None:
        return bool(instance.tokens <= keep + 1 or np.all(needles >= instance.tokens - keep))
    last = np.full_like(needles, instance.tokens - 1)
    return not bool(np.any(np.asarray(spec.middle(last, needles))))


def previous_run(path: str | os.PathLike, settings: dict) -> dict | None:
    """The record at `path` (None when there is no file) once its settings are `settings` in every
    field but ``"params"``, the weights' fingerprint, which `finished` checks once they are loaded; a
    ValueError when it holds another run."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        saved = old["settings"]
        differ = [k for k in {**settings, **saved} if k != "params" and saved.get(k) != settings.get(k)]
        ours = isinstance(old["methods"], dict)
    except (ValueError, KeyError, TypeError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"--out {path} exists and is not a RULER result: pass another --out or remove it")
    if differ:
        raise ValueError(f"--out {path} holds a RULER run with other settings ({', '.join(differ)} differ): "
                         "pass another --out or remove it")
    return old


def finished(path: str | os.PathLike, old: dict | None, params: str) -> dict:
    """The ``"methods"`` (finished cells) of `previous_run`'s record `old` (none when None) when its
    weights' fingerprint is `params`; a ValueError when it holds a run of other weights."""
    if old is None:
        return {}
    if old["settings"].get("params") != params:
        raise ValueError(f"--out {path} holds a RULER run of other weights (settings.params: "
                         f"{old['settings'].get('params')} there, {params} here): pass another --out or remove it")
    print(f"resuming {path}", file=sys.stderr)
    return old["methods"]


def run(args: argparse.Namespace) -> int:
    from lminf_jax.evaluation.fingerprint import tree_fingerprint

    family, config = load_config(args.model_dir)
    l_train = pretraining_length(config)
    tokenizer = open_tokenizer(args.model_dir, args.tokenizer)
    specs = {name: task_method_specs(config, name, args) for name in task_method_names(args.methods)}
    instances, source = make_instances(args, tokenizer, l_train)
    prompts = [prompt_tokens(tokenizer, i.prompt, i.answer_prefix) for i in instances]
    tasks = list(dict.fromkeys(i.task for i in instances))
    lengths = sorted({i.length for i in instances})
    new_tokens = {t: next(i.max_new_tokens for i in instances if i.task == t) for t in tasks}
    if "truncation" in specs and l_train - 1 - max(new_tokens.values()) < 1:
        raise ValueError(f"truncation keeps L_train - 1 - new tokens = {l_train - 1 - max(new_tokens.values())} "
                         f"prompt tokens: L_train {l_train} is too short for {max(new_tokens, key=new_tokens.get)}")
    for name, (spec, _) in specs.items():  # a method that cannot apply to this model fails here
        for n in lengths:
            family.model(config, task_attention_call(name, spec, n, l_train))
    if args.write_instances:
        write_jsonl(instances, args.write_instances)
    records = [instance_record(i, t) for i, t in zip(instances, prompts)]
    # lm_infinite_top_k's middle tokens, recorded whichever methods run (a rerun may add that one)
    top_k = top_k_from_args(args, method_spec("lm_infinite", config, **method_options(args)).window,
                            config.num_layers, k=TOP_K_DEFAULTS["k"])
    settings = json.loads(json.dumps({
        "model": str(Path(args.model_dir).resolve()), "family": family.name, "config": hf_config(args.model_dir),
        "l_train": l_train, "eos_id": tokenizer.eos_id, "tasks": tasks, "lengths": lengths,
        "depths": sorted({depth_label(i.depth) for i in instances}), "new_tokens": new_tokens,
        "instances_sha256": hashlib.sha256(json.dumps(records).encode()).hexdigest(), "batch": args.batch,
        "tokenizer": args.tokenizer, "method_options": method_options(args), "top_k": dataclasses.asdict(top_k)}))
    old = previous_run(args.out, settings)
    _, config, params = load_model(args.model_dir)
    dtype = params_dtype(params)
    settings["params"] = tree_fingerprint(params)
    record = {"settings": settings, "source": source, "instances": records,
              "methods": finished(args.out, old, settings["params"])}
    cells = {(t, n): [k for k, i in enumerate(instances) if (i.task, i.length) == (t, n)] for t in tasks for n in lengths}
    cells = {key: picked for key, picked in cells.items() if picked}
    todo = [(name, n, t) for name in specs for n in lengths for t in tasks
            if (t, n) in cells and f"{t}@{n}" not in record["methods"].get(name, {"cells": {}})["cells"]]
    built: dict[tuple[str, int], tuple] = {}
    for name, n, task in todo:
        spec, prefill_spec = specs[name]
        call = task_attention_call(name, spec, n, l_train)
        if (name, n) not in built:
            built = {(name, n): (family.model(config, call, dtype), None if prefill_spec is None else family.model(
                config, dataclasses.replace(call, spec=prefill_spec), dtype))}
        t0 = time.perf_counter()
        keep = l_train - 1 - new_tokens[task] if name == "truncation" else None
        rows = predict(*built[name, n], params, tokenizer, [prompts[k] for k in cells[task, n]], new_tokens[task],
                       args.batch, keep)
        for k, row in zip(cells[task, n], rows):
            row.update(instance=k, score=score(instances[k], row["prediction"]),
                       needles_visible=needles_visible(call.spec, instances[k], keep))
        record["methods"].setdefault(name, {"cells": {}})["cells"][f"{task}@{n}"] = {
            "attention": call.spec.describe(), "seconds": time.perf_counter() - t0, "predictions": rows,
            "rope_scaling": None if call.frequencies is None else dataclasses.asdict(call.frequencies)}
        print(f"{name} {task} at {n:,}: {100 * np.mean([r['score'] for r in rows]):.1f} "
              f"({len(rows)} instances, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        record["scores"] = scores(record, instances)
        _write_atomic(record, Path(args.out))
    record["scores"] = scores(record, instances)
    record["needles_visible"] = visibility(record)
    print(format_table(record))
    save_result(record, args.out, plot, None if args.no_plot else args.plot)
    return 0


def _write_atomic(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # an interrupted run never leaves half a file


def scores(record: dict, instances: Sequence[Instance]) -> dict:
    """``{method: {task: {"<length>": {"all": mean, "<depth>": mean, ...}}}}`` (in [0, 1]) of the
    finished cells, by `aggregate`."""
    out: dict = {}
    for name, res in record["methods"].items():
        rows = [r for cell in res["cells"].values() for r in cell["predictions"]]
        picked, predictions = [instances[r["instance"]] for r in rows], [r["prediction"] for r in rows]
        by_task = out[name] = {}
        for (task, n, depth), cell in aggregate(picked, predictions).items():
            by_task.setdefault(task, {}).setdefault(str(n), {})[depth_label(depth)] = cell["score"]
        for (task, n, _), cell in aggregate([dataclasses.replace(i, depth=None) for i in picked], predictions).items():
            by_task[task][str(n)]["all"] = cell["score"]
    return out


def visibility(record: dict) -> dict:
    """``{method: {"<length>": share}}``: the share of the finished instances with needles (niah, vt)
    whose needles all stay visible to the prompt's last token (`needles_visible`)."""
    out: dict = {}
    for name, res in record["methods"].items():
        seen: dict[str, list[bool]] = {}
        for cell in res["cells"].values():
            for r in cell["predictions"]:
                if r.get("needles_visible") is not None:
                    seen.setdefault(str(record["instances"][r["instance"]]["length"]), []).append(r["needles_visible"])
        out[name] = {n: float(np.mean(v)) for n, v in seen.items()}
    return out


def format_table(record: dict) -> str:
    """Scores x 100 per task (blocks), method (rows) and length (columns), then their mean over the
    tasks made at every length (a task skipped at some length, e.g. cwe when too short, is left out),
    then, where instances have needles, the share each method lets the last prompt token see."""
    lengths, tasks = record["settings"]["lengths"], record["settings"]["tasks"]
    made = {(i["task"], i["length"]) for i in record["instances"]}
    everywhere = [t for t in tasks if all((t, n) in made for n in lengths)]
    average = "average" if everywhere == tasks else f"average of {', '.join(everywhere)}"
    width = max(9, *(len(f"{n:,}") + 1 for n in lengths))
    name_width = max(24, *(len(name) + 4 for name in record["methods"]))
    lines = [f"{'task / method':<{name_width}}" + "".join(f"{n:>{width},}" for n in lengths)]

    def cell(name: str, task: str, n: int) -> float | None:
        got = record["scores"].get(name, {}).get(task, {}).get(str(n))
        return None if got is None else 100 * got["all"]

    for task in [*tasks, average]:
        lines.append(task)
        for name in record["methods"]:
            values = [cell(name, task, n) if task != average else
                      (None if None in (got := [cell(name, t, n) for t in everywhere]) else float(np.mean(got)))
                      for n in lengths]
            lines.append(f"  {name:<{name_width - 2}}" + "".join(
                f"{'-':>{width}}" if v is None else f"{v:>{width}.1f}" for v in values))
    visible = visibility(record)
    if not any(visible.values()):  # only niah and vt instances have needles
        return "\n".join(lines)
    lines.append("needles visible to the prompt's last token (% of niah and vt instances)")
    for name, by_length in visible.items():
        values = [by_length.get(str(n)) for n in lengths]
        lines.append(f"  {name:<{name_width - 2}}" + "".join(
            f"{'-':>{width}}" if v is None else f"{100 * v:>{width}.1f}" for v in values))
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """A heat map (length x depth) of the score per task (rows) and method (columns)."""
    from matplotlib.figure import Figure

    lengths, tasks, methods = record["settings"]["lengths"], record["settings"]["tasks"], list(record["methods"])
    fig = Figure(figsize=(2.6 * len(methods) + 1, 1.8 * len(tasks) + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(len(tasks), len(methods), squeeze=False))
    for row, task in zip(axes, tasks):
        depths = sorted({d for by_length in (record["scores"].get(m, {}).get(task, {}) for m in methods)
                         for by_depth in by_length.values() for d in by_depth if d != "all"},
                        key=lambda d: (d == "any", 0.0 if d == "any" else float(d)))
        for ax, name in zip(row, methods):
            by_length = record["scores"].get(name, {}).get(task, {})
            grid = np.asarray([[by_length.get(str(n), {}).get(d, np.nan) for n in lengths] for d in depths], float)
            image = ax.imshow(grid.reshape(len(depths), len(lengths)), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                              origin="lower")
            ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], fontsize=6, rotation=45)
            ax.set_yticks(range(len(depths)), depths, fontsize=6)
            ax.set_title(f"{task}: {name}", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("depth", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("prompt length (tokens)", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="score")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    raise SystemExit(main())
