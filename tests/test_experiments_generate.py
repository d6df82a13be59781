"""experiments.generate: the CLI in-process on a tiny random LLaMA with a tiny sentencepiece tokenizer."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_checkpoint import PRETRAIN, make_model_dir, random_text

from lminf_jax.experiments import generate as cli
from lminf_jax.experiments.loading import load_model, load_tokenizer_from
from lminf_jax import AttentionSpec, DistanceLimit, LMInfinite, LambdaMask, Sampling, SlidingWindow, StreamingLLM, TopK, Vanilla, frequency_method
from lminf_jax.decoding import generate
from lminf_jax.models.bloom import BloomConfig
from lminf_jax import AttentionCall
from lminf_jax.models.llama import LlamaConfig

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("generate"))


def direct(model_dir: Path, prompts: list[str], spec: AttentionSpec, max_new_tokens: int, frequencies=None, **kw):
    """What generate() gives when called directly (BOS prepended, EOS stops)."""
    family, cfg, params = load_model(model_dir)
    tok = load_tokenizer_from(model_dir)
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    model = family.model(cfg, AttentionCall(spec, frequencies=frequencies))
    longest = max(map(len, ids))
    kw.setdefault("stop_tokens", [tok.eos_id])
    out = generate(model, params, ids, model.init_cache(len(ids), capacity=longest + max_new_tokens),
                   max_new_tokens=max_new_tokens, **kw)
    return tok, ids, [out.row(b) for b in range(len(ids))]


def test_one_prompt_streams_the_greedy_continuation(model_dir, tmp_path, capsys, monkeypatch):
    prompt = "the quick brown fox jumps over"
    writes = []  # (step index, text written): the text appears while tokens are generated

    class Recording(cli.TextStreamer):
        def __call__(self, index, tokens, done):
            before = self.printed
            super().__call__(index, tokens, done)
            writes.append((int(index), self.printed[len(before):]))

    monkeypatch.setattr(cli, "TextStreamer", Recording)
    assert cli.main([str(model_dir), "--prompt", prompt, "--max-new-tokens", "24", "-L", "8", "-G", "2",
                     "--prefill-chunk", "4", "--out", str(tmp_path / "out.json")]) == 0
    captured = capsys.readouterr()
    record = json.loads((tmp_path / "out.json").read_text())
    tok, ids, rows = direct(model_dir, [prompt], LMInfinite(2, 8), 24, prefill_chunk=4)
    assert record["prompt_ids"] == ids and record["generated_ids"] == rows
    text = cli.continuation_text(tok, ids[0], rows[0])
    assert text.strip() and record["continuations"] == [text]
    assert captured.out == text + "\n"  # streamed piece by piece, then a newline
    assert [i for i, _ in writes] == list(range(len(rows[0])))
    assert sum(bool(w) for _, w in writes) > len(rows[0]) // 2 and "".join(w for _, w in writes) == text
    assert record["prompts"] == [prompt] and record["stopped"] == [rows[0][-1] == tok.eos_id]
    settings = record["settings"]
    assert settings["attention"]["describe"] == "lm_infinite(G=2, L=8, D=8)"
    assert settings["sampling"] == {"temperature": 0.0, "top_k": None, "top_p": None}
    assert settings["stop_tokens"] == [tok.eos_id] and settings["bos"] and settings["cache_kind"] == "lambda"
    assert set(record["timings"]) >= {"load_s", "generate_s", "generated_tokens", "tokens_per_s"}
    err = captured.err
    assert "attention: lm_infinite(G=2, L=8, D=8)" in err and "cache: lambda(G=2, L=8)" in err
    assert f"generated tokens: {len(rows[0])}" in err and "tokens/s" in err and "includes compilation" in err


def test_rope_scaling_reaches_the_decoding(model_dir, tmp_path, capsys):
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    assert cli.main([str(model_dir), "--prompt", prompt, "--max-new-tokens", "12", "--method", "vanilla+yarn@2", "--ignore-eos", "--out", str(tmp_path / "out.json")]) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    yarn = frequency_method("yarn", 2.0, PRETRAIN)
    _, _, rows = direct(model_dir, [prompt], Vanilla(), 12, yarn, stop_tokens=())
    _, _, plain = direct(model_dir, [prompt], Vanilla(), 12, stop_tokens=())
    assert record["generated_ids"] == rows and rows != plain
    assert record["settings"]["rope_scaling"] == dataclasses.asdict(yarn)
    capsys.readouterr()


def test_text_streamer_holds_back_incomplete_characters():
    class Bytes:  # a byte-level tokenizer: one token per UTF-8 byte
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    out = io.StringIO()
    streamer = cli.TextStreamer(Bytes(), list(b"ab"), out)
    pieces = []
    for i, byte in enumerate("é!".encode()):
        streamer(i, np.array([byte]), np.array([False]))
        pieces.append(out.getvalue())
    assert pieces == ["", "é", "é!"]
    streamer.finish("é!")
    assert out.getvalue() == "é!"


def test_batch_of_prompts_with_sampling_stop_string_and_defaults(model_dir, tmp_path, capsys):
    prompts = ["the lion", "a quick zebra jumps over the lazy dog in the garden", "winter"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[1:]) + "\n\n")
    argv = [str(model_dir), "--prompt", prompts[0], "--prompt-file", str(tmp_path / "prompts.txt"),
            "--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "7",
            "--stop", "fox", "lion", "--stop", "fox", "--out", str(tmp_path / "out.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "out.json").read_text())
    tok = load_tokenizer_from(model_dir)
    (fox,), (lion,) = tok.encode("fox"), tok.encode("lion")
    spec = LMInfinite(10, 64)  # the defaults: G = 10, L = the model's max_position_embeddings
    assert record["settings"]["attention"]["describe"] == spec.describe()
    _, ids, rows = direct(model_dir, prompts, spec, 12, sampling=Sampling(0.9, 20, 0.95), seed=7,
                          stop_tokens=[tok.eos_id, fox, lion, fox])
    assert record["prompts"] == prompts and record["generated_ids"] == rows
    assert record["settings"]["stop_tokens"] == [tok.eos_id, fox, lion, fox]
    for b, prompt in enumerate(prompts):
        text = record["continuations"][b]
        assert text == cli.continuation_text(tok, ids[b], rows[b])
        assert f"=== prompt {b + 1}/3: {prompt}\n{text}\n" in out


def test_top_k_middle_tokens_use_a_full_cache_and_a_plain_prefill(model_dir, tmp_path, capsys):
    prompt = random_text(5, 3)
    argv = [str(model_dir), "--prompt", prompt, "--max-new-tokens", "6", "-L", "8", "-G", "2", "--prefill-chunk", "8",
            "--top-k-middle", "3", "--top-k-from-layer", "1", "--no-bos", "--ignore-eos", "--out",
            str(tmp_path / "out.json")]
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    family, cfg, params = load_model(model_dir)
    tok = load_tokenizer_from(model_dir)
    ids = tok.encode(prompt)
    plain = family.model(cfg, AttentionCall(LMInfinite(2, 8)))
    with_k = family.model(cfg, AttentionCall(LMInfinite(2, 8, top_k=TopK(3, 4, from_layer=1))))
    out = generate(with_k, params, [ids], with_k.init_cache(1, capacity=len(ids) + 6), max_new_tokens=6,
                   prefill_chunk=8, prefill_step=plain)
    assert record["prompt_ids"] == [ids] and record["generated_ids"] == [out.row(0)]
    assert record["settings"]["cache_kind"] == "full" and not record["settings"]["bos"]
    assert "top_k=3@4 layers[1,None)" in record["settings"]["attention"]["describe"]
    assert f"cache: full(capacity={len(ids) + 6})" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "--prompt", "x"], "model directory not found: {missing}"),
    (["{empty}", "--prompt", "x"], "{empty} is neither a converted checkpoint"),
    (["{model}"], "no prompt: give --prompt"),
    (["{model}", "--prompt", "x", "--stop", "quick brown"], "--stop 'quick brown' is not a single token"),
    (["{model}", "--prompt", "x", "--method", "vanilla", "-L", "8"],
     "-L/--local-branch is not used by --method vanilla"),
    (["{model}", "--prompt", "x", "--top-k-from-layer", "2"], "--top-k-from-layer needs --top-k-middle"),
    (["{model}", "--prompt", "x", "--temperature", "-1"], "temperature must be"),
    (["{model}", "--prompt", "x", "--top-k-middle", "2", "--top-k-from-layer", "2"],
     "top_k.from_layer is 2, but the model has 2 layers (0..1)"),
    (["{model}", "--prompt-file", "{latin1}"], "--prompt-file {latin1}: not UTF-8 text (byte 3"),
    (["{model}", "--prompt", "x", "--method", "ntk"], "--method ntk: give the extension factor"),
    (["{model}", "--prompt", "x", "--method", "self_extend@cover"],
     "--method self_extend@cover: @cover chooses --group-size per length"),
    (["{model}", "--prompt", "x", "--tokenizer", "{empty}"], "tokenizer directory {empty} has no tokenizer files"),
    (["{model}", "--prompt", "x", "--system", "be brief"], "--system needs --chat"),
    (["{model}", "--prompt", "x", "--chat", "--no-bos"], "--no-bos does not apply with --chat"),
])
def test_bad_arguments_say_what_is_wrong(model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    names = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "model": model_dir,
             "latin1": tmp_path / "latin1.txt"}
    argv = [a.format(**names) for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(**names) in err, err


@pytest.mark.parametrize("argv, message", [
    (["--method", "bogus"], "argument --method: method 'bogus': 'bogus' is not a mask method"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must lie in [1, 2**31 - 1], got 0"),
    (["-D", "4294967808"], "argument -D/--limit-distance: must lie in [1, 2**31 - 1], got 4294967808"),
    (["--out", "/proc/lminf-test/out.json"], "argument --out: cannot write in /proc"),
    (["--top-k-to-layer", "0"], "argument --top-k-to-layer: must lie in [1, 2**31 - 1], got 0"),
])
def test_argparse_errors_return_a_code(tmp_path, capsys, argv, message):
    # checked while parsing, before the model directory (here a missing one) is even looked at
    assert cli.main([str(tmp_path / "no-model"), "--prompt", "x", *argv]) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_missing_tokenizer_names_the_directory(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("converted.json", "params"):
        (bare / name).symlink_to(model_dir / name)
    assert cli.main([str(bare), "--prompt", "x"]) == 1
    assert capsys.readouterr().err == (f"error: model directory {bare} has no tokenizer files (tokenizer.model / "
                                       "tokenizer.json): give --tokenizer DIR, a directory with the model's tokenizer\n")
    # --tokenizer DIR: another directory's tokenizer
    assert cli.main([str(bare), "--prompt", "the fox", "--tokenizer", str(model_dir), "--max-new-tokens", "2",
                     "--out", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["tokenizer"] == str(model_dir)


#: A Llama-2-style chat template over the tiny tokenizer's words: BOS, then the messages.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}. "
                 "{% else %}the {{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %} and{% endif %}")


def test_chat_renders_each_prompt_with_the_checkpoint_template(model_dir, tmp_path, capsys):
    chat_dir = tmp_path / "chat"
    chat_dir.mkdir()
    for name in ("converted.json", "params", "tokenizer.model"):
        (chat_dir / name).symlink_to(model_dir / name)
    (chat_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    prompts = ["quick brown fox", "lion"]
    argv = [str(chat_dir), "--chat", "--system", "a lazy dog", "--max-new-tokens", "6", "--out",
            str(tmp_path / "out.json")]
    assert cli.main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    rendered = [f"<s>a lazy dog. the {p} and" for p in prompts]
    tok = load_tokenizer_from(model_dir)
    ids = [[tok.bos_id, *tok.encode(text.removeprefix("<s>"))] for text in rendered]  # "<s>" -> BOS, once
    assert record["prompts"] == prompts and record["rendered_prompts"] == rendered and record["prompt_ids"] == ids
    settings = record["settings"]
    assert settings["chat"] and settings["system"] == "a lazy dog" and not settings["bos"]
    assert settings["chat_template"] == f"{chat_dir / 'tokenizer_config.json'}: chat_template"
    family, cfg, params = load_model(model_dir)
    model = family.model(cfg, AttentionCall(LMInfinite(10, PRETRAIN)))
    out = generate(model, params, ids, model.init_cache(2, capacity=max(map(len, ids)) + 6), max_new_tokens=6,
                   stop_tokens=[tok.eos_id])
    assert record["generated_ids"] == [out.row(b) for b in range(2)]
    capsys.readouterr()


def test_chat_without_a_template_fails_before_loading_the_model(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main([str(model_dir), "--prompt", "x", "--chat"]) == 1
    assert capsys.readouterr().err == (f"error: {model_dir} has no chat template (no chat_template.jinja, no "
                                       "chat_template in tokenizer_config.json): the checkpoint is a base model, "
                                       "not a chat/instruct one\n")


def test_a_full_cache_too_large_for_memory_is_refused_before_loading_the_model(model_dir, capsys, monkeypatch):
    import lminf_jax.cache

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(lminf_jax.cache, "available_memory", lambda: (10**9, "host memory"))
    argv = [str(model_dir), "--prompt", "the fox", "--method", "vanilla", "--max-new-tokens", "2000000000",
            "--dtype", "fp32"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == (  # at --dtype's 4 bytes; without it, at least 2
        "error: --max-new-tokens 2,000,000,000 after the longest prompt (3 tokens): a full cache of capacity = "
        "2000000003 slots needs 520,000,000,780 bytes (2 layers x batch 1 x 2000000003 slots x 2 kv heads x 16 key "
        "+ value dims x 4 bytes, + positions), more than the 1,000,000,000 bytes of host memory; lower capacity (the "
        "longest sequence it must hold) or the batch\n")


def test_load_model_casts_and_reads_the_default_window(model_dir):
    family, cfg, params = load_model(model_dir, "bf16")
    assert family.name == "llama" and cfg.max_position_embeddings == PRETRAIN
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_hugging_face_directory_is_converted_on_the_fly(model_dir, tmp_path):
    from flax import traverse_util
    from safetensors.numpy import save_file

    family, cfg, params = load_model(model_dir)
    tensors = {}
    for name, array in traverse_util.flatten_dict(params, sep=".").items():
        if name.startswith(family.layer_prefix):
            for i, layer in enumerate(np.asarray(array)):
                tensors[f"{family.layer_prefix}{i}.{name[len(family.layer_prefix):]}"] = layer
        else:
            tensors[name] = np.asarray(array)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(tensors, str(hf / "model.safetensors"))
    config = json.loads((model_dir / "converted.json").read_text())["config"]
    (hf / "config.json").write_text(json.dumps(config))
    for dtype, want in ((None, jnp.float32), ("fp16", jnp.float16)):
        got_family, got_cfg, got = load_model(hf, dtype)
        assert got_family is family and got_cfg == cfg
        assert jax.tree.structure(got) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
            assert a.dtype == want
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(want)))


def _spec(argv, config):
    import argparse

    from lminf_jax.experiments.methods import add_attention_args, spec_from_args

    parser = argparse.ArgumentParser()
    add_attention_args(parser)
    return spec_from_args(parser.parse_args(argv), config)


def test_attention_options_and_their_defaults():
    from lminf_jax.models.gptj import GPTJConfig
    from lminf_jax.models.mpt import MPTConfig

    llama = LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 9, "hidden_size": 8, "intermediate_size": 8,
                                 "num_hidden_layers": 8, "num_attention_heads": 2, "max_position_embeddings": 4096})
    assert _spec([], llama) == LMInfinite(10, 4096, 4096)
    assert _spec(["-G", "3", "-L", "8", "-D", "5"], llama) == LMInfinite(3, 8, 5)
    assert _spec(["--method", "vanilla"], None) == Vanilla()
    assert _spec(["--method", "lambda_mask", "-L", "16"], None) == LambdaMask(10, 16)
    assert _spec(["--method", "streaming_llm"], llama) == StreamingLLM(4, 4096)
    assert _spec(["--method", "sliding_window"], llama) == SlidingWindow(4096)
    assert _spec(["--method", "distance_limit"], llama) == DistanceLimit(4096)
    assert _spec(["--method", "distance_limit", "-D", "7"], None) == DistanceLimit(7)
    assert _spec(["--top-k-middle", "5"], llama) == LMInfinite(10, 4096, top_k=TopK(5, 2048, 4))
    shallow = dataclasses.replace(llama, num_hidden_layers=2)  # no layer 4: top-k from its last layer
    assert _spec(["--top-k-middle", "5"], shallow) == LMInfinite(10, 4096, top_k=TopK(5, 2048, 1))
    assert _spec(["--method", "streaming_llm", "-L", "32", "--top-k-middle", "2", "--top-k-insert-at", "9",
                  "--top-k-from-layer", "0"], None) == StreamingLLM(4, 32, top_k=TopK(2, 9, 0))
    # L defaults to the pretraining length, whatever the family calls it
    gptj = GPTJConfig.from_hf({"model_type": "gptj", "vocab_size": 9, "n_embd": 8, "n_layer": 1, "n_head": 2,
                               "n_positions": 1024})
    mpt = MPTConfig.from_hf({"model_type": "mpt", "vocab_size": 9, "d_model": 8, "n_layers": 1, "n_heads": 2,
                             "max_seq_len": 512})
    assert _spec([], gptj).local_branch == 1024 and _spec([], mpt).local_branch == 512
    bloom = BloomConfig.from_hf({"model_type": "bloom", "vocab_size": 9, "hidden_size": 8, "n_layer": 1,
                                 "n_head": 2})  # no length field: BLOOM's 2048
    assert _spec([], bloom).local_branch == 2048
    errors = [
        (["--method", "vanilla", "-G", "2"], llama, "-G/--global-branch is not used by --method vanilla"),
        (["--method", "distance_limit", "-L", "2"], llama, "-L/--local-branch is not used by --method distance_limit"),
        (["--method", "vanilla", "--top-k-middle", "2"], llama, "--method vanilla hides none"),
        (["--top-k-insert-at", "2"], llama, "--top-k-insert-at needs --top-k-middle"),
        ([], None, "needs -L/--local-branch"),
    ]
    for argv, config, message in errors:
        with pytest.raises(ValueError, match=message):
            _spec(argv, config)
    for argv in (["-L", "0"], ["-G", "-1"], ["-D", str(2**31)], ["--top-k-middle", "0"]):
        with pytest.raises(SystemExit):  # argparse refuses these while parsing
            _spec(argv, llama)


def test_tokenizer_json_in_a_converted_directory_takes_bos_eos_from_its_config(tmp_path):
    from test_converters_tokenizer import write_word_level

    write_word_level(tmp_path)  # tokenizer_config.json names no BOS / EOS
    (tmp_path / "converted.json").write_text(json.dumps({"config": {"bos_token_id": 1, "eos_token_id": 2}}))
    tok = load_tokenizer_from(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
