"""Hugging Face checkpoint converters that fill `models` parameters.

* `converters.reader.CheckpointReader`: config.json plus one tensor at a time from
  model.safetensors, sharded safetensors (index), or pytorch_model.bin (needs torch);
  safetensors headers are validated up front and tensors memory-mapped (bf16 included).
* `converters.layout.CheckpointLayout`: a family's parameter template and how HF names map
  onto it (ignored buffers, aliases, per-layer tensors stacked on a leading layer axis);
  `converters.families.layout_for` builds it for a `models.registry` family.
* `converters.convert.load_params`: validate a checkpoint against a layout (one error
  listing every problem), then build the params pytree one parameter at a time, each placed
  straight into its sharding when ``shardings`` is given.
* `converters.store.save_converted` / `load_converted`: orbax params + converted.json
  (restored into given shardings the same way).
* `converters.tokenizer.load_tokenizer`: sentencepiece tokenizer.model or tokenizer.json.
* ``python -m converters HF_DIR OUT_DIR [--dtype bf16|fp32|fp16] [--no-progress] [--overwrite]``.
"""
