"""The evaluation harness, on top of the attention core and beside the models (it takes a model's step or
forward as a function): streaming NLL over unbounded token streams (`streaming`) with its resumable checkpoint
store (`stream_store`), position buckets (`buckets`), perplexity by length on the same held-out text at every
length (`perplexity`), parameter fingerprints (`fingerprint`), the one way every resumable command saves and
resumes its work (`resume`: atomic writes, the run's identity, folders of its own) and generation-quality
metrics (`metrics`). Nothing is imported here: a command imports the module it needs (so its --help imports no
jax)."""
