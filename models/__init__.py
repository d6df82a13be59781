"""Model families (LLaMA, GPT-J, MPT) built on `lminf_jax`."""
