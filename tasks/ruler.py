"""RULER's synthetic tasks, generated offline at an exact token length (`generate`); their files are
`lminf_jax.tasks.ruler_jsonl`, their scoring `lminf_jax.tasks.ruler_scoring`.

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

`answer_text` is an instance's expected answer as a model is fine-tuned on it
(`lminf_jax.tasks.training_mix`); `held_out_text` the held-out text of a corpus, for the text haystacks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lminf_jax.tasks import corpus

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
    """The held-out documents of `source` (`tasks.corpus`'s split), joined by blank lines: a
    haystack no model trained here has seen."""
    docs, _ = corpus.held_out_documents(
        source, corpus.DEFAULT_HELD_OUT_PERCENT if held_out_percent is None else held_out_percent)
    return "\n\n".join(d.text for d in docs)


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
