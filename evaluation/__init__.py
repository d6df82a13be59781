"""The evaluation harness, on top of the attention core and beside the models (it takes a model's step or
forward as a function): streaming NLL over unbounded token streams with a resumable checkpoint store
(`streaming`), perplexity by length on the same held-out text at every length (`perplexity`), parameter
fingerprints for resumes (`fingerprint`) and generation-quality metrics (`metrics`). Nothing is imported
here: a command imports the module it needs (so its --help imports no jax)."""
