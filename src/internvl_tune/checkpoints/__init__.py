"""Checkpoint formats: the original remote-code layout and transformers' layout, read, converted and written.

- `convert`: the key tables and config mapping between the layouts, original LoRA merging, shard reading/writing.
- `read`: a folder in either layout read without running its code (config, tokenizer, dtype, weights
  fingerprint); an original folder as transformers' model in memory.
- `metadata`: `internvl_tune.json`, what a checkpoint carries besides weights, and the chat template from it.
- `write`: `convert` in both directions. Model folders from a model in memory (`save_hf_checkpoint`, `export`)
  are model/save.py's.
"""

from internvl_tune._lazy import lazy_exports

_EXPORTS = {
    "convert_to_hf": "write",
    "convert_to_original": "write",
    "load_original": "read",
    "read_metadata": "metadata",
    "ConversionError": "convert",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
