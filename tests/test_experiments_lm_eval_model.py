"""experiments.lm_eval_model: lm-eval runs local tasks (multiple choice, generation, rolling
log-likelihood) offline on the shipped model, checked against the project's own scorers."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from lminf_jax.experiments import lm_eval_model  # noqa: E402
from lminf_jax.experiments.generate import continuation_text  # noqa: E402
from lminf_jax.experiments.shipped import SHIPPED_MODEL  # noqa: E402
from lminf_jax.decoding import generate  # noqa: E402
from lminf_jax.evaluation.perplexity import sequence_nll  # noqa: E402

G, L, CHUNK = 2, 16, 16  # texts of the rolling task are longer than L and than one chunk
MODEL_ARGS = {"pretrained": str(SHIPPED_MODEL), "method": "lm_infinite", "G": G, "L": L, "dtype": "fp32",
              "batch_size": 2, "prefill_chunk": CHUNK}
# "import" + " sys" is one token ("import sys"): the context's ids do not begin the whole's
CHOICES = [{"question": "import os\nimport", "choices": ["sys", "os", "re"], "answer": 0},
           {"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b"], "answer": 0}]
PROMPTS = [{"prompt": "import os\nimport sys\nimport", "target": "re"},
           {"prompt": "class Foo:\n    def __init__(self", "target": "):"},
           {"prompt": "for i in range(10):\n   ", "target": "print(i)"}]
NEW_TOKENS, STOP = 12, "\n"
DOCUMENTS = [{"text": 'import os\nimport sys\n\n\ndef main(argv):\n    """Print each argument on its own line."""\n'
                      "    for arg in argv[1:]:\n        print(arg)\n    return 0\n\n\n"
                      "if __name__ == '__main__':\n    sys.exit(main(sys.argv))\n"},
             {"text": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
                      "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n"}]
TASKS = {
    "lminf_mc": (CHOICES, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
                          "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"),
    "lminf_gen": (PROMPTS, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
                           f"generation_kwargs:\n  until: [{json.dumps(STOP)}]\n  max_gen_toks: {NEW_TOKENS}\n"
                           "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"),
    "lminf_rolling": (DOCUMENTS, "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                                 "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network, as in CI: datasets and the hub read these when imported, and at every load."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.setenv(name, "1")
        import datasets.config
        import huggingface_hub.constants

        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The three tasks as YAML over local jsonl files (``dataset_path: json``)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, (docs, body) in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {root / 'cache'}\ntest_split: test\n{body}")
    return root


@pytest.fixture(scope="module")
def lm() -> lm_eval_model.LminfJaxLM:
    return lm_eval_model.LminfJaxLM(**MODEL_ARGS)


@pytest.fixture(scope="module")
def run(lm, task_dir) -> dict:
    return simple_evaluate(model=lm, tasks=list(TASKS), task_manager=TaskManager(include_path=str(task_dir)),
                           log_samples=True)


def reference_logprobs(lm, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """``(log P(continuation | context), greedy)`` per pair of ids from one forward pass over the
    right-padded batch (`LanguageModel.forward`) and a float64 log-softmax."""
    rows = [c + x for c, x in pairs]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    logits = np.asarray(lm.model.forward(lm.params, jnp.asarray(tokens)), np.float64)
    out = []
    for b, (context, continuation) in enumerate(pairs):
        scores = logits[b, len(context) - 1:len(rows[b]) - 1]
        logp = scores - scores.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        out.append((float(logp[np.arange(len(continuation)), continuation].sum()),
                    bool((scores.argmax(-1) == continuation).all())))
    return out


def samples(run: dict, task: str) -> list[dict]:
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihoods_are_the_projects_forward_scores_of_the_continuation_tokens(lm, run):
    tok, diffs = lm.tokenizer, []
    requests = [r for s in samples(run, "lminf_mc") for r in zip(s["arguments"], s["resps"])]
    assert len(requests) == sum(len(d["choices"]) for d in CHOICES)
    pairs, merged = [], 0
    for (context, continuation), _ in requests:
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        assert context_ids == [tok.bos_id, *tok.encode(context)]
        assert tok.decode(context_ids + continuation_ids) == context + continuation  # they spell the continuation
        pairs.append((context_ids, continuation_ids))
        merged += [tok.bos_id, *tok.encode(context + continuation)][:len(context_ids)] != context_ids
    assert 0 < merged < len(requests), "both encodings (split, and merged across the boundary) must be tested"
    expected = reference_logprobs(lm, pairs)
    for (_, resps), (logprob, greedy) in zip(requests, expected):
        assert resps[0][1] == greedy
        diffs.append(abs(float(resps[0][0]) - logprob))
    assert max(diffs) < 1e-4, max(diffs)
    starts = np.cumsum([0] + [len(d["choices"]) for d in CHOICES])
    best = [int(np.argmax([lp for lp, _ in expected[a:b]])) for a, b in zip(starts, starts[1:])]
    assert run["results"]["lminf_mc"]["acc,none"] == np.mean([b == d["answer"] for b, d in zip(best, CHOICES)])
    assert run["config"]["attention"] == f"lm_infinite(G={G}, L={L}, D={L})"  # get_model_info


def test_rolling_loglikelihood_is_the_perplexity_clis_nll(lm, run):
    docs = samples(run, "lminf_rolling")
    ids = [[lm.tokenizer.bos_id, *lm.tokenizer.encode(d["doc"]["text"])] for d in docs]
    assert min(map(len, ids)) > 2 * CHUNK and min(map(len, ids)) > 2 * L
    tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for b, row in enumerate(ids):
        tokens[b, :len(row)] = row
    nll = sequence_nll(lm.model.forward, lm.params, tokens)  # experiments.perplexity's scorer
    for d, row, scores in zip(docs, ids, nll):
        (logprob,), = d["resps"]
        expected = -float(scores[:len(row) - 1].astype(np.float64).sum())
        assert logprob == pytest.approx(expected, rel=1e-6, abs=1e-4)


def test_generation_is_the_projects_greedy_generate_cut_at_the_stop_string(lm, run):
    got = [s["resps"][0][0] for s in samples(run, "lminf_gen")]
    prompts = [[lm.tokenizer.bos_id, *lm.tokenizer.encode(p["prompt"])] for p in PROMPTS]
    cache = lm.model.init_cache(len(prompts), capacity=max(map(len, prompts)) + NEW_TOKENS)
    out = generate(lm.model, lm.params, prompts, cache, max_new_tokens=NEW_TOKENS, stop_tokens=[lm.tokenizer.eos_id])
    full = [continuation_text(lm.tokenizer, ids, [t for t in out.row(b) if t != lm.tokenizer.eos_id])
            for b, ids in enumerate(prompts)]
    assert got == [text.split(STOP)[0] for text in full]
    assert any(STOP in text for text in full), "no generation reached the stop string"


def test_max_length_windows_and_truncation_are_logged(lm, monkeypatch, caplog):
    monkeypatch.setattr(lm, "max_length", 24)
    monkeypatch.setattr(lm_eval_model.logger, "handlers", [caplog.handler])  # lm-eval's CLI stops propagation
    text = DOCUMENTS[0]["text"]
    ids = lm.tokenizer.encode(text)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.tokenizer.bos_id, 24, 1)]
    assert got == pytest.approx(sum(lp for lp, _ in reference_logprobs(lm, windows)), rel=1e-6, abs=1e-4)
    (logprob, _), = lm.loglikelihood([Instance("loglikelihood", {}, (text, " x"), 0)], disable_tqdm=True)
    context, continuation = lm._encode_pair(text, " x")
    row = context + continuation
    (expected, _), = reference_logprobs(lm, [(row[:1] + row[-24:-len(continuation)], continuation)])  # BOS + 24
    assert logprob == pytest.approx(expected, abs=1e-4)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "rolling windows of 24 tokens" in messages and "kept their first token and the latest ones" in messages


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # lm-eval's results table forks worker processes
def test_the_cli_runs_vanilla_and_the_method_reaches_the_model(run, task_dir, tmp_path):
    args = {**MODEL_ARGS, "method": "vanilla"}
    del args["G"], args["L"], args["batch_size"]  # lm-eval's CLI passes its own --batch_size
    lm_eval_model.main(["--model", "lminf_jax", "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
                        "--tasks", "lminf_rolling", "--include_path", str(task_dir), "--batch_size", "2",
                        "--output_path", str(tmp_path)])
    (path,) = tmp_path.rglob("results_*.json")
    vanilla = json.loads(path.read_text())
    assert vanilla["config"]["attention"] == "vanilla()" and vanilla["config"]["cache"] == "full"
    ours, theirs = (r["results"]["lminf_rolling"]["word_perplexity,none"] for r in (run, vanilla))
    assert np.isfinite(theirs) and abs(ours / theirs - 1) > 1e-3  # texts longer than L: the mask matters


def test_the_installed_entry_point_resolves_to_the_model_through_lm_evals_registry():
    """Releases that read the ``lm_eval.models`` group hold the entry point as a placeholder and
    materialise it on first use; 0.4.13's Registry does the same with a placeholder given to it."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import Registry

    (point,) = [p for p in entry_points(group="lm_eval.models") if p.name == lm_eval_model.NAME]
    registry = Registry("model")
    registry.register(lm_eval_model.NAME, target=point)
    assert registry.get(lm_eval_model.NAME) is lm_eval_model.LminfJaxLM


def test_short_names_are_the_command_lines_short_flags():
    assert lm_eval_model.SHORT_NAMES == {"G": "global_branch", "L": "local_branch", "D": "limit_distance"}
    values, top_k = lm_eval_model.method_model_args({"G": 3, "local_branch": "8", "leak": 2, "top_k_middle": 1})
    assert values == {"global_branch": ("G", 3), "local_branch": ("local_branch", 8), "leak": ("leak", 2)}
    assert top_k == {"top_k_middle": 1, "top_k_insert_at": None, "top_k_from_layer": None, "top_k_to_layer": None}


@pytest.mark.parametrize("args, message", [
    ("foo=1", "unknown argument 'foo'"),
    ("method=lm_infinity", "method=lm_infinity"),
    ("method=vanilla,L=32", "L= is not used by method vanilla"),
    ("method=sliding_window,global_branch=4", "global_branch= is not used by method sliding_window"),
    ("G=-1", "G=-1"),
    ("G=2,global_branch=3", "name the same parameter"),
    ("method=yarn", "give the extension factor"),
    ("method=self_extend@cover", "give group_size="),
    ("top_k_insert_at=3", "needs --top-k-middle"),
    ("dtype=int8", "dtype must be"),
])
def test_bad_model_args_fail_before_loading_weights(args, message, monkeypatch):
    monkeypatch.setattr(lm_eval_model, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        lm_eval_model.LminfJaxLM.create_from_arg_string(f"pretrained={SHIPPED_MODEL},{args}")
