"""`load_model`: an InternVL checkpoint folder in either layout as transformers' model and its tokenizer;
`load_for_inference`: the same, ready to answer (chat, sampling, evaluation, the server)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerBase

from internvl_tune.checkpoints.convert import is_original_checkpoint, refuse_quantized
from internvl_tune.checkpoints.metadata import checkpoint_sample_settings
from internvl_tune.checkpoints.read import load_original, load_tokenizer, read_model_config
from internvl_tune.constants import IMG_CONTEXT_TOKEN, INTERNVL_SPECIAL_TOKENS
from internvl_tune.data.transform import SampleSettings
from internvl_tune.errors import UserError
from internvl_tune.model.attention import resolve_attn_implementation


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load an InternVL checkpoint folder in either layout as `InternVLForConditionalGeneration` + tokenizer.

    HF-native folders load directly; original remote-code folders (`InternVLChatModel`) are converted in memory
    without running their code (`internvl-tune convert` does it once on disk). Nothing is downloaded.

    `attn_implementation="auto"` is flex attention for the LLM on CUDA and SDPA elsewhere (model/attention.py).

    Raises:
        ValueError: the folder is missing, is not an InternVL checkpoint, or its tokenizer lacks the InternVL
            special tokens.
    """
    path = Path(path)
    config = read_model_config(path)
    refuse_quantized(config, path)
    attn_implementation = resolve_attn_implementation(
        attn_implementation, "cuda" if torch.cuda.is_available() else "cpu", config.text_config.model_type
    )
    if is_original_checkpoint(path):  # converted in memory; runs no remote code
        model, tokenizer = load_original(path, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = InternVLForConditionalGeneration.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
        keep_used_renamings(model)
        tokenizer = load_tokenizer(path, config)
    # Absolute, so that LoRA adapters (PEFT records this as their base) find the base from any directory.
    model.name_or_path = model.config.name_or_path = str(path.resolve())
    missing = [t for t in INTERNVL_SPECIAL_TOKENS[:3] if t not in tokenizer.get_vocab()]
    if missing:
        raise UserError(f"{path}: the tokenizer lacks the InternVL tokens {missing}")
    if tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) != model.config.image_token_id:
        raise UserError(
            f"{path}: config.image_token_id={model.config.image_token_id} but the tokenizer maps {IMG_CONTEXT_TOKEN} "
            f"to {tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)}"
        )
    return model, tokenizer


def load_for_inference(
    model_path: str | Path,
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase, SampleSettings]:
    """A model folder (either layout) ready to answer: the model in eval mode on the GPU in bf16 when there is one
    (else on the CPU in fp32), its tokenizer, and the settings its prompts are built with (`SampleSettings` of the
    checkpoint). Chat, sampling and the `hf` generation backend load models here.

    Raises:
        ValueError: a LoRA adapter folder, or a folder that is not an InternVL checkpoint.
    """
    if (Path(model_path) / "adapter_config.json").is_file():
        raise UserError(
            f"{model_path} holds LoRA adapters only: use the merged model training wrote next to it "
            f"(final/), or merge them first: internvl-tune export {model_path} MERGED_DIR --merge-lora"
        )
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model, tokenizer = load_model(model_path, dtype=dtype)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer, checkpoint_sample_settings(model_path, model.config)


def keep_used_renamings(model) -> None:
    """Keep only the key renamings the load used, which `save_pretrained` reverses to write the names the folder had.

    transformers' loader keeps only those; its ZeRO-3 loader (5.x, `zero3_init_flag`) keeps every renaming it knows,
    legacy ones included, and a save then writes `language_model.model.model.*` for `language_model.model.*`."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions and all(hasattr(c, "was_used") for c in conversions):
        model._weight_conversions = [c for c in conversions if c.was_used()]
