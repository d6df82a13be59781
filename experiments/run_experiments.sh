#!/usr/bin/env bash
# The evaluations behind EXPERIMENTS.md, on the three shipped models (a GPU takes minutes; a
# CPU runs the same commands in hours).
#
#   python -m experiments.corpus --out data/stdlib        # held-out stdlib tokens (data/stdlib/heldout.npy)
#   python -m experiments.corpus --out data/site-packages --encode-with data/stdlib/tokenizer.model \
#       --source "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" --split all \
#       --max-tokens 10000000                            # a 10^7-token stream no model here trained on
#   bash experiments/run_experiments.sh OUT_DIR [STREAM.npy] [STREAM_CHUNK]
#
# Writes OUT_DIR/perplexity-<model>.{json,png} (all six methods, 10 segments of the held-out
# stdlib, L_train x {1..32}) and OUT_DIR/stream-<model>.{json,png} (streaming NLL, LM-Infinite
# with a Λ-cache, over STREAM.npy, default data/site-packages/stream.npy) and
# OUT_DIR/factors-<model>/ (the three failure factors: 4 segments of 32 x L_train) and
# OUT_DIR/continuation-<model>.{json,png} (generation quality from L_train x {1, 4, 16}). The passkey
# run needs a fine-tuned model first; its two commands are in EXPERIMENTS.md, section 5.
set -euo pipefail
out=${1:?OUT_DIR}; stream=${2:-data/site-packages/stream.npy}; chunk=${3:-4096}
mkdir -p "$out"
for model in llama gptj mpt; do
  python3 -m experiments.perplexity "experiments/shipped/$model-small-stdlib" --tokens data/stdlib/heldout.npy \
    --sequences 10 --methods all --batch-tokens 65536 --no-progress \
    --out "$out/perplexity-$model.json" --plot "$out/perplexity-$model.png"
done
for model in llama gptj mpt; do
  python3 -m experiments.stream_nll "experiments/shipped/$model-small-stdlib" --tokens "$stream" --chunk "$chunk" \
    --no-progress --out "$out/stream-$model.json" --plot "$out/stream-$model.png"
done
for model in llama gptj mpt; do
  python3 -m experiments.factors "experiments/shipped/$model-small-stdlib" --tokens data/stdlib/heldout.npy \
    --sequences 4 --multiple 32 --out "$out/factors-$model"
done
for model in llama mpt; do
  python3 -m experiments.continuation "experiments/shipped/$model-small-stdlib" --tokens data/stdlib/heldout.npy \
    --sequences 16 --new-tokens 64 --out "$out/continuation-$model.json" --plot "$out/continuation-$model.png"
done
