"""load_tokenizer: sentencepiece tokenizer.model, tokenizers tokenizer.json, errors; chat templates
rendered and encoded exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest

from lminf_jax.converters.tokenizer import ChatTemplateError, encode_chat, load_chat_template, load_tokenizer, render_chats

WORDS = (
    "the quick brown fox jumps over lazy dog lion tiger bear wolf river mountain cloud "
    "yellow purple garden kitchen window zebra jacket vivid whisper quartz"
).split()


def random_text(seed: int, lines: int = 300) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(lines))


def train_sentencepiece(tmp_path) -> None:
    """A sentencepiece ``tokenizer.model`` in `tmp_path` (vocabulary 50; BOS 1, EOS 2)."""
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(random_text(0))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=50,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )


def test_sentencepiece_model(tmp_path):
    train_sentencepiece(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # tokenizer.model takes precedence
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 50)
    text = random_text(1, lines=1)
    ids = tok.encode(text)
    assert ids and all(3 <= i < 50 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def write_word_level(tmp_path, **special) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(special))
    return vocab


def test_tokenizer_json(tmp_path):
    vocab = write_word_level(tmp_path, bos_token="<s>", eos_token={"content": "</s>"})
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, len(vocab))
    text = random_text(2, lines=1)
    ids = tok.encode(text)
    assert ids == [vocab[w] for w in text.split()]
    assert tok.decode([1, *ids, 2]) == text


def test_tokenizer_json_special_ids_from_config(tmp_path):
    write_word_level(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [2, 1]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (2, None)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name, content, error", [
    ("tokenizer.json", "{x", "not a readable tokenizer.json"),
    ("tokenizer.model", "garbage", "not a readable sentencepiece model"),
    ("tokenizer_config.json", "{x", "not valid JSON"),
    ("tokenizer_config.json", "[]", "not a JSON object"),
    ("config.json", "[" * 100_000, "not valid JSON"),
])
def test_malformed_tokenizer_files_are_value_errors_naming_the_file(tmp_path, name, content, error):
    write_word_level(tmp_path)  # no special tokens in tokenizer_config.json: config.json is read too
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))}: {error}"):
        load_tokenizer(tmp_path)


# ----- chat templates ---------------------------------------------------------------------------

#: Qwen2.5-Instruct's chat template (its tokenizer_config.json), without the tool-call branches.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

#: Llama-3.1-Instruct-style: BOS from ``bos_token``, a date from ``strftime_now`` unless given, block tags on
#: their own lines (trim_blocks / lstrip_blocks), and ``raise_exception`` on an unknown role.
LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}\n"
    "{{- system_message + '<|eot_id|>' }}\n"
    "{% for message in messages %}\n"
    "    {% if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{ raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {% endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>"]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "the quick brown fox"}],
    "system": [{"role": "system", "content": "a lazy dog "}, {"role": "user", "content": "the quick brown fox"}],
    "turns": [{"role": "user", "content": "the lion"}, {"role": "assistant", "content": "a tiger"},
              {"role": "user", "content": "zebra over the river"}],
}


def write_chat_checkpoint(root, chat_template=None, **special):
    """A tokenizer.json with the chat special tokens added, and a tokenizer_config.json holding
    `chat_template` (when given) and `special`; its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate([*WORDS, "system", "user", "assistant"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(CHAT_SPECIALS)
    tok.save(str(root / "tokenizer.json"))
    config = dict(special) if chat_template is None else {**special, "chat_template": chat_template}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return {**vocab, **{t: tok.token_to_id(t) for t in CHAT_SPECIALS}}


def reference(root):
    """transformers' tokenizer of checkpoint directory `root` (its chat template read by transformers)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(root)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template, special, extra", [
    (QWEN25, {"bos_token": None, "eos_token": "<|im_end|>"}, {}),
    (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>",
                                                                "special": True}}, {"date_string": "26 Jul 2024"}),
], ids=["qwen2.5", "llama3"])
def test_chat_template_renders_and_encodes_as_transformers(tmp_path, template, special, extra, conversation,
                                                           add_generation_prompt):
    vocab = write_chat_checkpoint(tmp_path, template, **special)
    messages = CONVERSATIONS[conversation]
    expected = reference(tmp_path).apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt, **extra)
    chat = load_chat_template(tmp_path)
    assert (chat.template, chat.source) == (template, f"{tmp_path / 'tokenizer_config.json'}: chat_template")
    text = chat.render(messages, add_generation_prompt=add_generation_prompt, **extra)
    assert text == expected
    assert text.endswith("assistant<|end_header_id|>\n\n" if template is LLAMA3 else "<|im_start|>assistant\n") \
        == add_generation_prompt
    ids = encode_chat(load_tokenizer(tmp_path), text, chat.bos_token)
    assert ids == reference(tmp_path).apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt, **extra)
    first = "<|begin_of_text|>" if template is LLAMA3 else "<|im_start|>"
    assert ids[0] == vocab[first]  # the special-token text became its id


def test_chat_template_jinja_file_then_the_default_of_a_list(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": QWEN25}]
    write_chat_checkpoint(tmp_path, named, eos_token="<|im_end|>")
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)  # as transformers >= 4.43 saves it: it comes first
    messages = CONVERSATIONS["system"]
    chat = load_chat_template(tmp_path)
    assert (chat.template, chat.source, chat.bos_token) == (LLAMA3, str(tmp_path / "chat_template.jinja"), None)
    expected = reference(tmp_path).apply_chat_template(messages, tokenize=False, date_string="1 Jan 2025")
    assert chat.render(messages, add_generation_prompt=False, date_string="1 Jan 2025") == expected
    assert not expected.startswith("None")  # no bos_token: undefined, rendered as ""
    (tmp_path / "chat_template.jinja").unlink()
    chat = load_chat_template(tmp_path)
    assert chat.template == QWEN25 and chat.source.endswith("tokenizer_config.json: chat_template['default']")
    assert chat.render(messages) == reference(tmp_path).apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
    assert chat.render_each([messages, CONVERSATIONS["turns"]]) == [chat.render(messages),
                                                                    chat.render(CONVERSATIONS["turns"])]


def test_chat_template_errors_name_the_file_and_field(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    write_chat_checkpoint(tmp_path, bos_token="<s>")
    with pytest.raises(ValueError, match=f"^{tmp_path} has no chat template .*a base model"):
        load_chat_template(tmp_path)
    write_chat_checkpoint(tmp_path, [{"name": "tool_use", "template": "a"}, {"name": "rag", "template": "b"}])
    with pytest.raises(ValueError, match=f"^{config}: chat_template has no template named 'default' "
                                         r"\(available: rag, tool_use\)"):
        load_chat_template(tmp_path)
    for field in (5, [], [{"name": "default"}], {"default": "x"}):
        write_chat_checkpoint(tmp_path, field)
        with pytest.raises(ValueError, match=f"^{config}: chat_template must be a string or a list of"):
            load_chat_template(tmp_path)


def test_raise_exception_and_broken_templates_are_clear_errors(tmp_path):
    import jinja2

    write_chat_checkpoint(tmp_path, LLAMA3, bos_token="<|begin_of_text|>")
    messages = [{"role": "robot", "content": "the dog"}]
    with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):  # what transformers raises
        reference(tmp_path).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match=f"^{tmp_path / 'tokenizer_config.json'}: chat_template: the chat "
                                                "template rejected the messages: Unknown role: robot$"):
        load_chat_template(tmp_path).render(messages)
    with pytest.raises(ValueError, match="the chat template failed: .*unsafe"):  # the sandbox
        render_chats("{{ messages.__class__.__mro__ }}", [messages], bos_token=None, eos_token=None)


def write_template(root, template):
    """`template` as the chat_template of a tokenizer_config.json in `root`; the message prefix naming it."""
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return re.escape(f"{root / 'tokenizer_config.json'}: chat_template: the chat template ")


@pytest.mark.parametrize("template, error", [
    ("{% for m in messages %}", "failed: TemplateSyntaxError: .*'endfor'"),
    ("{{ 1/0 }}", "failed: ZeroDivisionError: division by zero$"),
    ("{{ range(10**7) }}", "failed: OverflowError: Range too big"),
    ('{{ "{0}".format_map({}) }}', "failed: IndexError: tuple index out of range$"),
    ('{{ "x" * 10**12 }}', "exceeded its limits: it needs more than 2 GiB of memory$"),
    ('{% for i in range(400) %}{{ "x" * 100000 }}{% endfor %}',
     "exceeded its limits: its output is longer than 33,554,432 characters$"),
], ids=["syntax", "division", "range", "format_map", "memory", "output"])
def test_every_rendering_failure_is_a_chat_template_error_naming_the_file(tmp_path, template, error):
    prefix = write_template(tmp_path, template)
    with pytest.raises(ChatTemplateError, match=f"^{prefix}{error}"):
        load_chat_template(tmp_path).render(CONVERSATIONS["user"])


@pytest.mark.skipif(sys.platform != "linux", reason="the memory limit is enforced on Linux only")
def test_a_template_cannot_take_more_than_its_memory(tmp_path):
    prefix = write_template(tmp_path, '{{ ("x" * 3 * 2**30) | length }}')  # 3 GiB: within what the OS would give
    with pytest.raises(ChatTemplateError, match=f"^{prefix}exceeded its limits: it needs more than 2 GiB of memory$"):
        load_chat_template(tmp_path).render(CONVERSATIONS["user"])


def test_a_runaway_template_stops_in_time_naming_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr("lminf_jax.converters.chat_render.MAX_SECONDS", 1.0)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    began = time.monotonic()
    with pytest.raises(ChatTemplateError, match=f"^{re.escape(str(tmp_path / 'chat_template.jinja'))}: the chat "
                                                "template exceeded its limits: it ran for more than 1 s$"):
        load_chat_template(tmp_path).render(CONVERSATIONS["user"])
    assert time.monotonic() - began < 5


def test_template_variables_must_be_json_data():
    for value in [(1, 2), {1: "a"}, object()]:
        with pytest.raises(ValueError, match="the chat template's variables must be JSON data"):
            render_chats("{{ extra }}", [[]], bos_token=None, eos_token=None, extra=value)


def test_template_environment_matches_transformers(tmp_path):
    write_chat_checkpoint(tmp_path, "unused", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    template = (
        "{% for m in messages %}\n"
        "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "  {% if m.role == 'assistant' %}{% continue %}{% endif %}\n"
        "  {{ m | tojson(indent=2, sort_keys=true) }}|{{ m | tojson }}|{{ m | tojson(separators=(',', ':')) }}\n"
        "  {{ m | tojson(ensure_ascii=true) }}\n"
        "{% endfor %}\n"
        "{{ eos_token }}{{ pad_token }}|{{ strftime_now('%Y') }}|{{ extra }}|{{ tools is none }}{{ documents is none }}"
    )
    messages = [{"role": "user", "content": "caf\u00e9 <b> & \"q\""}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": "never"}]
    expected = reference(tmp_path).apply_chat_template(messages, chat_template=template, tokenize=False, extra=7)
    assert render_chats(template, [messages], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                        add_generation_prompt=False, extra=7) == [expected]
    assert "caf\u00e9 <b> &" in expected and "never" not in expected and expected.endswith("|7|TrueTrue")


def test_encode_chat_encodes_a_tokenizer_json_text_whole(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # a Metaspace that prepends "▁" only at the start of the text: after a BOS read from the text, no "▁"
    vocab = {"<unk>": 0, "<s>": 1, "the": 2, "▁the": 3, "▁fox": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.add_special_tokens(["<s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{{ messages[0]['content'] }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": template}))
    messages = [{"role": "user", "content": "the fox"}]
    expected = reference(tmp_path).apply_chat_template(messages, tokenize=True, return_dict=False)
    chat = load_chat_template(tmp_path)
    assert encode_chat(load_tokenizer(tmp_path), chat.render(messages), chat.bos_token) == expected == [1, 2, 4]


def test_encode_chat_maps_a_leading_bos_string_for_sentencepiece(tmp_path):
    train_sentencepiece(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "the quick brown fox"
    assert encode_chat(tok, "<s>" + text, "<s>") == [tok.bos_id, *tok.encode(text)]
    assert encode_chat(tok, text, "<s>") == encode_chat(tok, text, None) == tok.encode(text)
    assert tok.bos_id not in encode_chat(tok, text + "<s>", "<s>")  # only a leading one: the rest stays text
