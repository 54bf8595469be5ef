"""Serving: the batched decode engine with MTP self-speculation, sampling and the OpenAI-compatible server.

Sits on top of `lmspec.runtime` (the generated model, its KV cache, checkpoints and tokenizers) beside
`lmspec.train`; neither imports the other.
"""
