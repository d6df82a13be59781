"""The evaluation tasks (installed as `lminf_jax.tasks`): the text corpora, passkey retrieval, RULER's
synthetic tasks and the training mixes built from them. Each builds its instances from a tokenizer and a
seed and scores answers; it runs no model (the commands in `lminf_jax.experiments` do)."""
