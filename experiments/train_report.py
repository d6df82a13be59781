"""What a finished ``python -m experiments.train`` run writes beside its params: ``model_card.md``
(`model_card`) and ``loss.png`` (`plot_loss`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from lminf_jax.tasks.corpus import BOS_ID

if TYPE_CHECKING:
    from lminf_jax.experiments.train import TrainConfig
    from lminf_jax.tasks.training_mix import TrainingMix


def plot_loss(log_path: Path, png: Path) -> str:
    """Draw the train and held-out losses of ``loss.jsonl`` at `png`; say what was written (or why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss.png (pip install matplotlib)"
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["heldout_loss"]) for r in rows if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"wrote {png}"


def _fine_tuning(cfg: TrainConfig, ruler: TrainingMix | None) -> str:
    if cfg.init is None and cfg.passkey_fraction == 0 and ruler is None:
        return ""
    start = f"started from `{cfg.init}`" if cfg.init is not None else "trained from scratch"
    shares = [f"{cfg.task_rows('passkey_fraction')} of {cfg.batch} rows of each batch are passkey windows "
              "(tasks.passkey)"] if cfg.passkey_fraction else []
    if ruler is not None:
        shares.append(f"{cfg.task_rows('ruler_fraction')} of {cfg.batch} rows are RULER instances with their answers "
                      f"(tasks.training_mix.TrainingMix) of {ruler.describe()}")
    return f"- Fine-tuning: {start}" + "".join(f"; {s}" for s in shares) + "\n"


def model_card(cfg: TrainConfig, config: dict, manifest: dict, n_params: int, meta: dict, heldout: float,
               n_eval: int, seconds: float, ruler: TrainingMix | None = None) -> str:
    """``model_card.md`` of a trained model: architecture, corpus, tokenizer, training, fine-tuning, losses."""
    from lminf_jax.models import registry

    family = registry.family_for_config(config).name
    positional = {"llama": "RoPE (half layout)", "gptj": f"interleaved partial RoPE (rotary_dim {config.get('rotary_dim')})",
                  "mpt": "ALiBi"}[family]
    tr = manifest["splits"]["train"]
    ho = manifest["splits"]["heldout"]
    return f"""# {cfg.preset} (lminf_jax, {'fine-tuned' if cfg.init is not None else 'trained from scratch'})

- Architecture: {family}-style decoder, {positional}; config in `converted.json`:
  `{json.dumps({k: v for k, v in config.items() if k != 'architectures'})}`
- Parameters: {n_params:,} ({n_params * 2 / 1e6:.1f} MB in bf16, {n_params * 4 / 1e6:.1f} MB in float32); saved as {cfg.save_dtype}
- Training length L_train: {cfg.seq_len} tokens; every window starts with BOS (id {BOS_ID})
- Corpus: `{manifest['settings']['source']}` (sha256 {manifest['settings']['corpus_sha256'][:16]}...),
  train {tr['documents']} documents / {tr['bytes'] / 1e6:.2f} MB / {tr['tokens']:,} tokens;
  held out {ho['documents']} documents / {ho['bytes'] / 1e6:.2f} MB / {ho['tokens']:,} tokens.
  Split: {manifest['split_rule']}
- Tokenizer: `tokenizer.model`, sentencepiece BPE, vocab {manifest['vocab_size']}, byte fallback (sha256 {manifest['tokenizer_sha256'][:16]}...)
- Training: {meta['step']} steps x batch {cfg.batch} x {cfg.seq_len} tokens = {meta['tokens_seen']:,} tokens seen
  ({meta['tokens_seen'] / max(tr['tokens'], 1):.2f} epochs); AdamW lr {cfg.lr} (warmup {cfg.warmup_steps}, cosine to 10%),
  weight decay {cfg.weight_decay}, clip {cfg.clip}, compute dtype {cfg.dtype}, seed {cfg.seed};
  {seconds:.0f} s in the last session
{_fine_tuning(cfg, ruler)}- Final train loss (mean of the last logged steps): {meta['last_loss']:.4f} nats/token
- Held-out loss at L_train ({n_eval} windows of {cfg.seq_len} tokens, BOS + held-out tokens at evenly spaced offsets):
  {heldout:.4f} nats/token, perplexity {math.exp(heldout):.3f} per token
  ({math.exp(heldout * 1 / ho['bytes_per_token']):.3f} per byte)
"""
