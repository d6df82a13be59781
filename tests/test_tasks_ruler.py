"""tasks.ruler: RULER's synthetic tasks at an exact token length and depth, and the answers trained on."""

from __future__ import annotations

import collections
import dataclasses
import re

import pytest
from ruler_examples import TEXT, TOKENIZER, make

from lminf_jax.tasks import ruler
from lminf_jax.tasks.ruler_scoring import score

#: Lengths per task: the shortest prompts of vt (its one-shot example), niah_multiquery (four keys
#: asked twice) and cwe (60 list entries and an example) do not fit in 256 tokens.
LENGTHS = {**{t: (256, 1000, 4096) for t in ruler.TASKS}, "vt": (512, 1000, 4096),
           "niah_multiquery": (512, 1000, 4096), "cwe": (1500, 4096)}
NEEDLE = re.compile(r"One of the special magic \w+ for \S+ is: \S+\.\n?")
VT_LINE = re.compile(r"VAR [A-Z]+ = (?:VAR [A-Z]+|\d+)")


def ids(inst: ruler.Instance) -> list[int]:
    return ruler.prompt_tokens(TOKENIZER, inst.prompt, inst.answer_prefix)


def n_tokens(text: str) -> int:
    return len(TOKENIZER.encode(text))


@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompts_have_the_requested_token_length(task):
    for length in LENGTHS[task]:
        inst = make(task, length)
        assert length - ruler.SLACK[task] <= len(ids(inst)) == inst.tokens <= length
        assert inst.prompt.startswith(("Some special", "A special", "Memorize", "Below is", "Read the"))
        assert inst.max_new_tokens == ruler.MAX_NEW_TOKENS[task]


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t not in ("cwe", "fwe")])
def test_needles_sit_at_the_requested_depth_of_the_haystack(task):
    for length in (1000, 4096):
        for depth in (0.0, 0.3, 1.0):
            inst = make(task, length, depth)
            tokens = ids(inst)
            start, end = inst.haystack
            assert 0 < start <= inst.needle_positions[0] < end < len(tokens)
            context = TOKENIZER.decode(tokens[start:end])
            if task == "vt":
                inserted, unit = VT_LINE.findall(context), 0
            elif ruler.NIAH[task].haystack == "needle":
                inserted = [m for m in NEEDLE.findall(context) if inst.outputs[0] in m]
                unit = n_tokens(inserted[0])  # the haystack's units are needles as long as this one
            else:
                inserted, unit = NEEDLE.findall(context), 0
            cfg = ruler.NIAH.get(task)
            expected = (ruler.VT_HOPS + 1 if cfg is None else 1 if cfg.haystack == "needle"
                        else max(cfg.keys, cfg.queries) * cfg.values)
            assert len(inserted) == expected
            target = next(s for s in inserted if inst.outputs[0] in s)
            before_target = context[:context.index(target)]
            before = sum(n_tokens(s) for s in inserted if context.index(s) < context.index(target))
            own = end - start - sum(n_tokens(s) for s in inserted)
            at = n_tokens(before_target) - before
            assert abs(at - depth * own) <= 0.01 * own + unit / 2 + 4, (length, depth, at, own)
            assert abs(inst.needle_positions[0] - start - n_tokens(before_target)) <= 1


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t not in ("cwe", "fwe")])
def test_each_needle_position_points_at_its_output(task):
    inst = make(task, 1000, None, seed=3)
    tokens = ids(inst)
    assert len(inst.needle_positions) == len(inst.outputs)
    for pos, out in zip(inst.needle_positions, inst.outputs):
        piece = TOKENIZER.decode(tokens[pos:pos + 100])
        needle = f"VAR {out} = " if task == "vt" else "One of the special magic"
        assert 0 <= piece.find(needle) <= 2 and pos > 0 and needle not in TOKENIZER.decode(tokens[pos - 1:pos + 1])
        assert task == "vt" or out in piece[piece.find(needle):].split("\n")[0]


def test_niah_questions_and_answers_follow_ruler():
    single = make("niah_single_1", 1000)
    key = re.search(r"for (\S+) mentioned", single.prompt).group(1)
    assert single.prompt.startswith("A special magic number is hidden within the following text.")
    assert single.prompt.endswith(f"What is the special magic number for {key} mentioned in the provided text?")
    assert single.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert f"One of the special magic numbers for {key} is: {single.outputs[0]}." in single.prompt
    assert re.fullmatch(r"\d{7}", single.outputs[0]) and "The grass is green. The sky is blue." in single.prompt
    uuids = make("niah_multikey_3", 1000)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuids.outputs[0])
    assert len(NEEDLE.findall(uuids.prompt)) >= 8  # a haystack of distractor needles
    query = make("niah_multiquery", 1000)
    keys = re.search(r"numbers for (.+) mentioned in the provided text\?$", query.prompt).group(1)
    assert query.prompt.startswith("Some special magic numbers are hidden") and keys.count(", ") == 3
    assert ", and " in keys and query.answer_prefix.endswith("text are") and len(set(query.outputs)) == 4
    values = make("niah_multivalue", 1000)
    key = re.search(r"numbers for (\S+) mentioned", values.prompt).group(1)
    assert sorted(values.outputs) == sorted(re.findall(rf"for {key} is: (\d+)\.", values.prompt))


def test_vt_chain_resolves_to_the_expected_variables():
    inst = make("vt", 1000)
    main = inst.prompt[inst.prompt.rindex("Memorize and track"):]
    value = re.search(r"assigned the value (\d+) in", main).group(1)
    found = [re.search(rf"VAR (\w+) = {value} ", main).group(1)]
    while m := re.search(rf"VAR (\w+) = VAR {found[-1]}\b", main):
        found.append(m.group(1))
    assert found == list(inst.outputs) and len(found) == ruler.VT_HOPS + 1
    assert f"{ruler.VT_HOPS + 1} variables are assgined the value {value}, they are: " in inst.answer_prefix
    assert inst.prompt.count("Memorize and track") == 2  # the one-shot example first


def test_cwe_answer_is_the_ten_most_common_words_of_the_list():
    for length in (1500, 8192):
        inst = make("cwe", length)
        main = inst.prompt[inst.prompt.rindex("most often.\n") + len("most often.\n"):inst.prompt.rindex("\nQuestion")]
        counts = collections.Counter(re.findall(r"\d+\. (\w+)", main))
        top = sorted(counts.values(), reverse=True)
        assert set(inst.outputs) == {w for w, _ in counts.most_common(10)} and top[9] > top[10]
        assert top[0] == (30 if length >= 4096 else 6)  # RULER's repeats
        assert inst.answer_prefix == ruler.CWE_ANSWER


def test_fwe_answer_is_the_three_most_frequent_coded_words():
    inst = make("fwe", 1000)
    context = inst.prompt[len("Read the following coded text"):inst.prompt.rindex("\nQuestion")]
    counts = collections.Counter(w for w in context.split()[13:] if w != "...")
    assert [w for w, _ in counts.most_common(3)] == list(inst.outputs)
    assert sorted(counts.values(), reverse=True)[2] > sorted(counts.values(), reverse=True)[3]
    assert context.split().count("...") > counts.most_common(1)[0][1]  # rank 1 is the noise


def test_generation_is_reproducible_and_differs_across_seeds():
    for task in ruler.TASKS:
        length = LENGTHS[task][0]
        a, b, c = make(task, length, seed=5), make(task, length, seed=5), make(task, length, seed=6)
        assert a == b and a.seed == 5
        assert a.prompt != c.prompt and a.outputs != c.outputs


def test_too_short_lengths_and_bad_arguments_fail_clearly():
    for task, length in (("vt", 256), ("cwe", 256), ("niah_multiquery", 128), ("fwe", 100)):
        with pytest.raises(ValueError, match="too short"):
            make(task, length)
    with pytest.raises(ValueError, match="depth must be None"):
        ruler.generate("cwe", TOKENIZER, 2000, 0.5, 0)
    with pytest.raises(ValueError, match=r"depth must lie in \[0, 1\]"):
        ruler.generate("niah_single_1", TOKENIZER, 1000, 1.5, 0)
    with pytest.raises(ValueError, match="needs a text haystack"):
        ruler.generate("niah_single_2", TOKENIZER, 1000, 0.5, 0)
    with pytest.raises(ValueError, match="ran out"):
        ruler.generate("niah_single_2", TOKENIZER, 1000, 0.5, 0, TEXT[:2000])
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.generate("qa_1", TOKENIZER, 1000, 0.5, 0)



@pytest.mark.parametrize("task", ruler.TASKS)
def test_the_trained_answer_of_every_task_scores_full_marks(task):
    inst = make(task, LENGTHS[task][0])
    assert score(inst, ruler.answer_text(inst)) == 1.0
    assert score(inst, ruler.answer_text(dataclasses.replace(inst, outputs=inst.outputs[1:]))) < 1.0 or (
        len(inst.outputs) == 1)

