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
* `converters.store.save_converted` / `load_converted`: one aligned safetensors file per
  parameter under ``params/`` (format 2; orbax format-1 directories are still read) +
  converted.json; each file memory-mapped and placed into its sharding in turn.
* `converters.convert.write_params`: the converter's streaming writer (one checkpoint row at a time).
* `converters.chat_render` (a chat template rendered in a bounded child process) and
  `converters.json_object` (the one JSON-object reader: every error names its file).
* `converters.tokenizer.load_tokenizer`: sentencepiece tokenizer.model or tokenizer.json.
* ``python -m converters HF_DIR OUT_DIR [--dtype bf16|fp32|fp16] [--no-progress] [--overwrite]``.
"""
