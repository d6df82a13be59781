"""A converted tiny random LLaMA with its own sentencepiece tokenizer, for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from conftest import TINY_MODELS

from lminf_jax.converters.store import save_converted
from lminf_jax.models import registry

WORDS = (
    "the a of and to in is was he she it they we you that this with for on at by from as "
    "quick brown fox jumps over lazy dog lion tiger bear wolf river mountain cloud yellow purple garden "
    "kitchen window zebra jacket vivid whisper quartz stone bridge forest candle mirror silver winter summer "
    "ocean harbor lantern meadow thunder copper velvet pepper orange violet castle valley rabbit falcon "
    "morning evening shadow island desert engine pencil rocket"
).split()
PRETRAIN = 64  # the tiny model's max_position_embeddings: the default L


def random_text(seed: int, lines: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + "." for _ in range(lines))


def make_model_dir(root: Path, seed: int = 0) -> Path:
    """A converted tiny random LLaMA (GQA) plus a sentencepiece tokenizer (BOS 1, EOS 2) whose
    vocabulary is the model's, trained here on a few KB of text."""
    import sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(random_text(seed, 500))
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"), vocab_size=97,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(root / "tokenizer.model")).get_piece_size()
    config = {**TINY_MODELS["llama_gqa"], "vocab_size": vocab, "max_position_embeddings": PRETRAIN}
    family = registry.family_for_config(config)
    cfg = family.config_from_hf(config)
    key = jax.random.key(seed)
    params = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape), family.init_params(cfg, key))
    out = save_converted(root / "model", params, config, family.name)
    (out / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
    return out
