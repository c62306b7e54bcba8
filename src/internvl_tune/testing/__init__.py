"""Tiny models and reference checkpoints built offline, for tests, the demo, benchmarks and tools.

- `tiny`: a tiny tokenizer and random InternVL model (HF layout) built in-process; nothing is downloaded.
- `original_checkpoint`: tiny random checkpoints in the original remote-code layout (`InternVLChatModel`).
- `original_forward`: an independent float64 forward of the original model, the oracle of the converters.
- `parity`: max |logit difference| of a loaded model against that oracle.
"""
