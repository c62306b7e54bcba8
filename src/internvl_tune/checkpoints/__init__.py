"""Checkpoint formats: the original remote-code layout and transformers' layout, read, converted and written.

- `convert`: the key tables and config mapping between the layouts, original LoRA merging, shard reading/writing.
- `read`: a folder in either layout read without running its code (config, tokenizer, dtype, weights
  fingerprint); an original folder as transformers' model in memory.
- `metadata`: `internvl_tune.json`, what a checkpoint carries besides weights, and the chat template from it.
- `write`: HF folders from a model, `convert` in both directions, `export` (LoRA merged).
"""
