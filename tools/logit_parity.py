"""Max |logit difference| between converted original checkpoints and the reference forward of the original
(internvl_tune/testing/original_forward.py, docs/original-differences.md §4).

    python tools/logit_parity.py

Builds a tiny original-layout checkpoint for each LLM family and ViT style (`internvl_tune.testing`), loads it with
`load_model` (converted, no remote code) and compares logits with the original forward on a batch with a 3-tile
image and a two-image row.
"""

import json
import tempfile
from pathlib import Path

from internvl_tune.model.load import load_model
from internvl_tune.testing.original_checkpoint import build_original_checkpoint
from internvl_tune.testing.parity import max_logit_diff
from internvl_tune.testing.tiny import build_tiny_tokenizer

tokenizer = build_tiny_tokenizer()
for llm in ("qwen2", "llama", "internlm2"):
    for vit in ("300m", "6b"):
        with tempfile.TemporaryDirectory() as folder:
            state_dict = build_original_checkpoint(Path(folder), llm=llm, vit=vit, tokenizer=tokenizer, seed=3)
            config = json.loads((Path(folder) / "config.json").read_text())
            model, loaded_tokenizer = load_model(folder)
            diff = max_logit_diff(model.eval(), state_dict, config, loaded_tokenizer)
            print(f"{llm:10s} InternViT-{vit:5s} max |logit diff| = {diff:.2e}")
