"""Pretrain small LLaMA-, GPT-J- and MPT-style models on the token files of `tasks.corpus`.

* Presets: ``{llama,gptj,mpt}-{tiny,small}`` (`experiments.train_presets`), whose length is the
  training length L_train.
* Windows: each training example is BOS followed by ``seq_len - 1`` tokens read from a uniformly
  random offset of the training stream (documents are BOS-separated in the stream, so windows may
  cross document boundaries, as in packed pretraining). Every window thus starts with BOS at
  position 0, where the paper's models (which begin every sequence with BOS) can form an attention
  sink; starting windows only at document starts would instead over-sample file headers and waste
  compute on padding. The offsets of step ``s`` come from ``numpy.random.default_rng([seed, s])``,
  so the data position is the step and a resumed run sees exactly the windows it would have seen.
* Loss: next-token cross entropy in float32 of ``LanguageModel(...).forward`` (vanilla attention).
  ``--dtype bf16`` computes in bfloat16 with float32 master params.
* Optimiser: optax AdamW (b2 = 0.95, weight decay on matrices only) with linear warmup and cosine
  decay to 10% of the peak, after global-norm gradient clipping.
* Checkpoints: orbax, every ``--checkpoint-every`` steps and at the end, in ``OUT/checkpoints/STEP``
  (the last two kept): ``state`` (params and optimiser state), ``meta`` (step, seed, tokens seen,
  last loss, and the run's identity: every setting that determines the result, the model config,
  a hash of the token files and tokenizer, the initial params' fingerprint) and ``checksum`` (a
  `lminf_jax.evaluation.fingerprint.json_digest` of meta, a `tree_fingerprint` of state). A rerun resumes
  from the newest checkpoint that reads back intact (a damaged newer one is removed with a
  warning) and reaches bit-identical params (float32, same machine); it is refused, naming the
  field, when its identity differs. ``loss.jsonl`` is cut back to the resumed step first. All of
  this is `experiments.train_checkpoint`'s, on `lminf_jax.evaluation.resume`.
* Output ``OUT/model``: `converters.store.save_converted` params (loadable by every CLI of the
  project), ``tokenizer.model`` and ``model_card.md``. Also ``OUT/loss.jsonl`` (one JSON line per
  logged step / evaluation), ``OUT/loss.png`` when matplotlib is installed, ``OUT/run.json``; the
  card and the plot are `experiments.train_report`'s.

* Fine-tuning: ``--init MODEL_DIR`` starts from a converted model of the same preset and length;
  ``--passkey-fraction F`` makes that share of every batch passkey windows
  (`tasks.passkey.training_windows`, drawn from ``numpy.random.default_rng([seed, step, 1])``);
  ``--ruler-fraction F`` the next share RULER instances with their answers and EOS
  (`tasks.training_mix.TrainingMix`: every task that fits in ``--seq-len``; drawn from
  ``numpy.random.default_rng([seed, step, 2])``).

CLI::

    python -m experiments.train --data data/stdlib --preset llama-small --steps 2000 --batch 16 \\
        --seq-len 512 --out runs/llama-small [--dtype bf16] [--lr 1e-3]
        [--init MODEL_DIR --passkey-fraction 0.5 --ruler-fraction 0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lminf_jax.evaluation.resume import write_json_atomic
from lminf_jax.experiments.loading import hf_config, load_tokenizer_from
from lminf_jax.experiments.options import command_parser, input_path, output_dir, parse_checked
from lminf_jax.experiments.train_checkpoint import Checkpoints, run_identity, truncate_log
from lminf_jax.experiments.train_presets import PRESETS, make_config, parameter_count
from lminf_jax.experiments.train_report import model_card, plot_loss
from lminf_jax.tasks import corpus as corpus_lib
from lminf_jax.tasks.passkey import PasskeyBuilder, training_windows
from lminf_jax.tasks.training_mix import TrainingMix

if TYPE_CHECKING:
    import optax

    from lminf_jax.models.registry import Family

BOS_ID = corpus_lib.BOS_ID
#: ``--dtype`` / ``--save-dtype`` names and the dtypes they stand for.
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    preset: str = "llama-small"
    steps: int = 1000
    batch: int = 16
    seq_len: int = 512
    lr: float = 1e-3
    warmup: int | None = None  # default: min(100, steps // 10)
    weight_decay: float = 0.1
    clip: float = 1.0
    dtype: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 200
    eval_windows: int = 16
    final_eval_windows: int = 64
    log_every: int = 10
    save_dtype: str = "fp32"
    init: str | None = None  # a converted model directory to start from (fine-tuning)
    passkey_fraction: float = 0.0  # share of each batch made of passkey windows (tasks.passkey)
    ruler_fraction: float = 0.0  # share of each batch made of RULER windows (tasks.training_mix.TrainingMix)

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("steps", "batch", "checkpoint_every", "eval_every", "eval_windows", "final_eval_windows",
                     "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must lie in [0, steps={self.steps}), got {self.warmup}")
        for name in ("passkey_fraction", "ruler_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.task_rows("passkey_fraction") + self.task_rows("ruler_fraction") > self.batch:
            raise ValueError(f"passkey_fraction {self.passkey_fraction} and ruler_fraction {self.ruler_fraction} "
                             f"together take more than the batch of {self.batch} rows")
        for name in ("dtype", "save_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")

    def task_rows(self, fraction: str) -> int:
        """Rows of each batch given to the task windows of `fraction` (at least one when it is > 0)."""
        share = getattr(self, fraction)
        return max(1, round(share * self.batch)) if share > 0 else 0

    @property
    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the run it continues (the data and the model `init`
        starts from enter its identity by content, see `experiments.train_checkpoint.run_identity`)."""
        d = dataclasses.asdict(self)
        for k in ("out", "checkpoint_every", "eval_every", "log_every", "data", "init"):
            d.pop(k)
        return d


# ----- data -------------------------------------------------------------------------------------


def sample_windows(stream: np.ndarray, batch: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """(batch, seq_len) int32 windows for `step`: BOS + ``seq_len - 1`` tokens from random offsets."""
    n = seq_len - 1
    if stream.shape[0] < n:
        raise ValueError(f"the token stream holds {stream.shape[0]} tokens, fewer than seq_len - 1 = {n}")
    offsets = np.random.default_rng([seed, step]).integers(0, stream.shape[0] - n + 1, size=batch)
    out = np.empty((batch, seq_len), np.int32)
    out[:, 0] = BOS_ID
    for i, o in enumerate(offsets):
        out[i, 1:] = stream[o:o + n]
    return out


def eval_windows(stream: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    """Up to `count` fixed held-out windows (BOS + ``seq_len - 1`` tokens, evenly spaced offsets)."""
    n = seq_len - 1
    if stream.shape[0] < n:
        raise ValueError(f"the held-out stream holds {stream.shape[0]} tokens, fewer than seq_len - 1 = {n}")
    count = min(count, max(1, stream.shape[0] // n))
    offsets = np.linspace(0, stream.shape[0] - n, count).astype(np.int64)
    out = np.empty((count, seq_len), np.int32)
    out[:, 0] = BOS_ID
    for i, o in enumerate(offsets):
        out[i, 1:] = stream[o:o + n]
    return out


# ----- model, loss, step ------------------------------------------------------------------------


def _model(config_items: tuple, dtype: str):
    import jax.numpy as jnp

    from lminf_jax.models import registry

    config = json.loads(config_items[0])
    family = registry.family_for_config(config)
    return family, family.model(family.config_from_hf(config), dtype=jnp.dtype(DTYPES[dtype]))


def loss_fn(model, params, tokens):
    import optax

    logits = model.forward(params, tokens)  # float32
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _decay_mask(params):
    import jax

    def decays(path, leaf):
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        last = name.split(".")[-2] if "." in name else name
        return name.endswith("weight") and "norm" not in last and not last.startswith("ln") and "wte" not in last \
            and "embed" not in last
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps, end_value=cfg.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=cfg.weight_decay,
                                   mask=_decay_mask))


@functools.lru_cache(maxsize=8)
def _compiled(config_json: str, cfg: TrainConfig):
    """(model, optimizer, jitted train step, jitted eval loss), cached so repeated runs reuse compilation."""
    import jax
    import optax

    norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm
    _, model = _model((config_json,), cfg.dtype)
    opt = make_optimizer(cfg)

    @jax.jit
    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, model))(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, norm(grads)

    @jax.jit
    def eval_loss(params, tokens):
        return loss_fn(model, params, tokens)

    return model, opt, train_step, eval_loss


def evaluate(eval_loss, params, windows: np.ndarray, batch: int) -> float:
    """Mean next-token loss over `windows` (equal-length windows, so a mean of batch means is exact
    when batches are equal; the last partial batch is weighted by its size)."""
    import jax.numpy as jnp

    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        total += float(eval_loss(params, jnp.asarray(chunk))) * len(chunk)
        count += len(chunk)
    return total / count


# ----- training ---------------------------------------------------------------------------------


def _init_config(cfg: TrainConfig, preset_config: dict) -> dict:
    """The config of the model `cfg.init` starts from; it must be the preset's (same sizes)."""
    config = hf_config(cfg.init)
    differ = {k: (config.get(k), v) for k, v in preset_config.items() if k != "architectures" and config.get(k) != v}
    if differ:
        raise ValueError(f"--init {cfg.init} is not a {cfg.preset} model for this data and --seq-len "
                         f"(field: (init, preset)): {differ}")
    return config


@dataclasses.dataclass(frozen=True)
class _Run:
    """What `train` sets up before step one: checked inputs, model, compiled steps, identity, task windows."""
    cfg: TrainConfig
    out: Path
    manifest: dict
    train_stream: np.ndarray
    held_stream: np.ndarray
    config: dict
    family: Family
    n_params: int
    opt: optax.GradientTransformation
    train_step: Callable
    eval_loss: Callable
    identity: dict
    passkeys: PasskeyBuilder | None
    ruler: TrainingMix | None

    @property
    def log_path(self) -> Path:
        return self.out / "loss.jsonl"


@dataclasses.dataclass
class _State:
    """The training state a step advances: params, optimiser state, steps done and the checkpoint's meta."""
    params: Any
    opt_state: Any
    step: int
    meta: dict


def _setup(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[_Run, Any]:
    """Check `cfg` and its data (refusing a finished ``--out`` before any compilation), then compile the
    model's steps; returns the run and its initial params (``--init``'s or random)."""
    import jax
    import jax.numpy as jnp

    from lminf_jax.converters.store import load_converted

    cfg.check()
    out = Path(cfg.out)
    manifest = corpus_lib.load_manifest(cfg.data)
    train_stream = corpus_lib.load_tokens(cfg.data, "train")
    held_stream = corpus_lib.load_tokens(cfg.data, "heldout")
    config = make_config(cfg.preset, manifest["vocab_size"], cfg.seq_len)
    if cfg.init is not None:
        config = _init_config(cfg, config)
    config_json = json.dumps(config, sort_keys=True)
    family, _ = _model((config_json,), cfg.dtype)
    n_params = parameter_count(config)
    model_dir = out / "model"
    if (model_dir / "converted.json").exists():
        raise FileExistsError(f"{model_dir} already holds a trained model; choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    model, opt, train_step, eval_loss = _compiled(config_json, dataclasses.replace(cfg, out="", data=""))
    if cfg.init is not None:
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), load_converted(cfg.init)[0])
    else:
        params = family.init_params(model.config, jax.random.PRNGKey(cfg.seed), jnp.float32)
    identity = run_identity(cfg.resume_key(), config, [train_stream, held_stream],
                            Path(cfg.data) / corpus_lib.TOKENIZER_FILE, params)
    passkeys = PasskeyBuilder(load_tokenizer_from(cfg.data)) if cfg.passkey_fraction > 0 else None
    ruler = TrainingMix(load_tokenizer_from(cfg.data), cfg.seq_len, train_stream) if cfg.ruler_fraction > 0 else None
    if ruler is not None:
        log(f"RULER mix: {ruler.describe()}")
    return _Run(cfg, out, manifest, train_stream, held_stream, config, family, n_params, opt, train_step, eval_loss,
                identity, passkeys, ruler), params


def _resume(run: _Run, params: Any, log: Callable[[str], None]) -> tuple[_State, Checkpoints]:
    """The state to train from: the newest intact checkpoint of this run, else `params` at step 0.
    Records the run in ``run.json`` and logs its size."""
    cfg = run.cfg
    opt_state = run.opt.init(params)
    checkpoints = Checkpoints(run.out / "checkpoints")
    state = _State(params, opt_state, 0, {"step": 0, "seed": cfg.seed, "tokens_seen": 0, "last_loss": float("nan"),
                                          "identity": run.identity})
    restored = checkpoints.restore(run.identity, params, opt_state)
    if restored is not None:
        state.params, state.opt_state, state.meta = restored
        state.step = int(state.meta["step"])
        log(f"resumed from {run.out / 'checkpoints'} at step {state.step}")
    write_json_atomic(run.out / "run.json", {"identity": run.identity, "data": str(cfg.data)})
    log(f"{cfg.preset}: {run.n_params:,} parameters ({run.n_params * 2 / 1e6:.2f} MB in bf16), "
        f"{run.train_stream.shape[0]:,} training tokens, L_train {cfg.seq_len}, batch {cfg.batch}, dtype {cfg.dtype}")
    return state, checkpoints


def _batch(run: _Run, step: int) -> np.ndarray:
    """The (batch, seq_len) windows of `step`: stream windows, the first rows passkey then RULER ones if asked."""
    cfg = run.cfg
    tokens = sample_windows(run.train_stream, cfg.batch, cfg.seq_len, cfg.seed, step)
    rows = cfg.task_rows("passkey_fraction")
    if run.passkeys is not None:
        rng = np.random.default_rng([cfg.seed, step, 1])
        tokens[:rows] = training_windows(run.passkeys, rows, cfg.seq_len, rng, run.train_stream, BOS_ID)
    if run.ruler is not None:
        tokens[rows:rows + cfg.task_rows("ruler_fraction")] = run.ruler.windows(
            cfg.task_rows("ruler_fraction"), np.random.default_rng([cfg.seed, step, 2]), BOS_ID)
    return tokens


def _train_steps(run: _Run, state: _State, checkpoints: Checkpoints, end: int, progress: bool) -> float:
    """Advance `state` to step `end`, logging to ``loss.jsonl`` (cut back to the resumed step first),
    evaluating on held-out windows and checkpointing on schedule; returns the seconds it took."""
    import jax.numpy as jnp

    from lminf_jax.progress import Progress

    cfg, meta = run.cfg, state.meta
    held_windows = eval_windows(run.held_stream, cfg.eval_windows, cfg.seq_len)
    truncate_log(run.log_path, state.step)
    recent: list[float] = []
    tokens_per_step = cfg.batch * cfg.seq_len
    t_start = time.monotonic()
    with open(run.log_path, "a") as log_file, Progress(
            cfg.steps * tokens_per_step, "tokens", f"training {cfg.preset}", rate=True,
            initial=state.step * tokens_per_step, enabled=progress, interval=1.0) as bar:
        while state.step < end:
            tokens = jnp.asarray(_batch(run, state.step))
            state.params, state.opt_state, loss, gnorm = run.train_step(state.params, state.opt_state, tokens)
            state.step += 1
            step = state.step
            meta["tokens_seen"] = int(meta["tokens_seen"]) + tokens_per_step
            if step % cfg.log_every == 0 or step == end:
                loss = float(loss)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr")
                recent = (recent + [loss])[-5:]
                meta["last_loss"] = float(np.mean(recent))
                log_file.write(json.dumps({"step": step, "loss": round(loss, 5), "grad_norm": round(float(gnorm), 4),
                                           "tokens_seen": meta["tokens_seen"],
                                           "seconds": round(time.monotonic() - t_start, 2)}) + "\n")
                log_file.flush()
            if step % cfg.eval_every == 0 and step < cfg.steps:
                held = evaluate(run.eval_loss, state.params, held_windows, cfg.batch)
                log_file.write(json.dumps({"step": step, "heldout_loss": round(held, 5)}) + "\n")
                log_file.flush()
            loss_text = f", loss {meta['last_loss']:.4f}" if math.isfinite(meta["last_loss"]) else ""
            bar.update(tokens_per_step, postfix=f"step {step}{loss_text}")
            if step % cfg.checkpoint_every == 0 or step == end:
                meta["step"] = step
                checkpoints.save(step, state.params, state.opt_state, meta)
    return time.monotonic() - t_start


def _finish(run: _Run, state: _State, seconds: float, log: Callable[[str], None]) -> Path:
    """Evaluate the trained params on the final held-out windows, save them as ``OUT/model`` with the
    tokenizer and model card, plot the loss and report; returns the model folder."""
    import jax
    import jax.numpy as jnp

    from lminf_jax.converters.store import save_converted

    cfg, model_dir = run.cfg, run.out / "model"
    final_windows = eval_windows(run.held_stream, cfg.final_eval_windows, cfg.seq_len)
    held = evaluate(run.eval_loss, state.params, final_windows, cfg.batch)
    with open(run.log_path, "a") as log_file:
        log_file.write(json.dumps({"step": state.step, "heldout_loss": round(held, 5), "final": True}) + "\n")
    save = jax.tree.map(lambda a: a.astype(jnp.dtype(DTYPES[cfg.save_dtype])), state.params)
    save_converted(model_dir, save, run.config, run.family.name)
    shutil.copyfile(Path(cfg.data) / corpus_lib.TOKENIZER_FILE, model_dir / corpus_lib.TOKENIZER_FILE)
    (model_dir / "model_card.md").write_text(model_card(cfg, run.config, run.manifest, run.n_params, state.meta,
                                                        held, len(final_windows), seconds, run.ruler))
    log(plot_loss(run.log_path, run.out / "loss.png"))
    log(f"final train loss {state.meta['last_loss']:.4f}, held-out loss {held:.4f} (perplexity {math.exp(held):.3f}) "
        f"at L_train {cfg.seq_len}; wrote {model_dir.absolute()}")
    return model_dir.absolute()


def train(cfg: TrainConfig, *, stop_after: int | None = None, log=print, progress: bool = True) -> Path | None:
    """Run (or resume) training; returns the final model folder, or None when stopped at `stop_after`."""
    run, params = _setup(cfg, log)
    state, checkpoints = _resume(run, params, log)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    seconds = _train_steps(run, state, checkpoints, end, progress)
    checkpoints.close()
    if state.step < cfg.steps:
        log(f"stopped at step {state.step} of {cfg.steps}; rerun the same command to resume")
        return None
    return _finish(run, state, seconds, log)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("train", __doc__)
    parser.add_argument("--data", required=True, type=input_path, help="folder written by python -m experiments.corpus")
    parser.add_argument("--out", required=True, type=output_dir, help="run folder (checkpoints, logs, model/)")
    parser.add_argument("--preset", default="llama-small", choices=sorted(PRESETS), help="model architecture")
    d = TrainConfig("", "")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=d.batch, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="training length L_train (tokens)")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default min(100, steps/10))")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (matrices only)")
    parser.add_argument("--clip", type=float, default=d.clip, help="global gradient-norm clip")
    parser.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES), help="compute dtype (params stay fp32)")
    parser.add_argument("--save-dtype", default=d.save_dtype, choices=sorted(DTYPES), help="dtype of the saved model")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the initial params and the windows")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    parser.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows per evaluation")
    parser.add_argument("--final-eval-windows", type=int, default=d.final_eval_windows,
                        help="held-out windows of the final evaluation")
    parser.add_argument("--log-every", type=int, default=d.log_every, help="steps between lines of loss.jsonl")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="checkpoint and stop after this step (a later run with the same arguments resumes; "
                             "default: run to --steps)")
    parser.add_argument("--init", type=input_path, metavar="MODEL_DIR",
                        help="start from this converted model (fine-tuning; default: random params)")
    parser.add_argument("--passkey-fraction", type=float, default=d.passkey_fraction, metavar="F",
                        help="share of each batch made of passkey windows (tasks.passkey; default 0)")
    parser.add_argument("--ruler-fraction", type=float, default=d.ruler_fraction, metavar="F",
                        help="share of each batch made of RULER instances with their answers, every task that fits "
                             "in --seq-len (tasks.training_mix.TrainingMix; default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_checked(parser, argv)
    cfg = TrainConfig(data=args.data, out=args.out, preset=args.preset, steps=args.steps, batch=args.batch,
                      seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                      clip=args.clip, dtype=args.dtype, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      eval_every=args.eval_every, eval_windows=args.eval_windows,
                      final_eval_windows=args.final_eval_windows, log_every=args.log_every,
                      save_dtype=args.save_dtype, init=args.init, passkey_fraction=args.passkey_fraction,
                      ruler_fraction=args.ruler_fraction)
    try:
        train(cfg, stop_after=args.stop_after, log=lambda m: print(m, file=sys.stderr), progress=not args.quiet)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
