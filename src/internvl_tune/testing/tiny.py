"""Tiny InternVL models and tokenizers built entirely offline, for tests, the demo and benchmarks.

The tokenizer is a byte-level BPE (the Qwen2 family's scheme) trained in-process on a small built-in corpus,
with the chat-template and InternVL special tokens added the way the original SFT entry adds them. Byte "!"
gets id 0, as in Qwen2 tokenizers, so any code that still detects padding with `input_ids != 0` breaks visibly
in tests (docs/original-differences.md §2.6).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast

from internvl_tune.constants import IMG_CONTEXT_TOKEN, INTERNVL_SPECIAL_TOKENS
from internvl_tune.model.attention import NO_SDPA_LLMS

CHAT_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
# OpenAI's harmony tokens that the `internvl3_5_gpt_oss` template renders (`<|end|>` is above); special tokens of
# the GPT-OSS tokenizer.
HARMONY_SPECIAL_TOKENS = ("<|start|>", "<|message|>", "<|channel|>", "<|return|>")
# Qwen3's thought markers: added tokens of its tokenizer, but not special ones, so decoded text keeps them.
THINK_TOKENS = ("<think>", "</think>")

_BASE_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture shows a red circle, a blue square and a green triangle.
What colour is the shape? How many shapes are there? Describe the image in detail. What is in the picture?
There are two shapes. There are three shapes. There is one shape. The answer is yes. The answer is no.
red green blue yellow purple orange white black circle square triangle one two three four five six
You are a helpful assistant. Please answer the question with a single word. Frame-1: Frame-2: Frame-3:
system user assistant Hello! How are you? I am fine, thank you. 1 2 3 4 5 6 7 8 9 10 100 0.5 , . ; : ? !
"""


def build_tiny_tokenizer(
    extra_texts: Iterable[str] = (), vocab_size: int = 600, *, harmony: bool = False, think_tokens: bool = False
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer with the InternVL and chat special tokens.

    Args:
        extra_texts: more training text (e.g. a task's questions and answers) so they tokenize compactly.
        vocab_size: target size of the BPE vocabulary before the special tokens are added.
        harmony: add the GPT-OSS harmony special tokens (`HARMONY_SPECIAL_TOKENS`), after the others.
        think_tokens: add Qwen3's `<think>` and `</think>` as added, non-special tokens, last. Both are off by
            default so the ids and sizes of the default tokenizer (and the pinned losses) stay as they are.

    Returns:
        A fast tokenizer whose EOS is `<|im_end|>` and whose pad token is `<|endoftext|>` (as Qwen2 chat models).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_BASE_CORPUS, *extra_texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    special = [*CHAT_SPECIAL_TOKENS, *INTERNVL_SPECIAL_TOKENS, *(HARMONY_SPECIAL_TOKENS if harmony else ())]
    fast.add_special_tokens({"additional_special_tokens": special})
    if think_tokens:
        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return fast


TINY_LLMS = ("qwen2", "qwen3", "qwen3_moe", "gpt_oss")
_TINY_LLM_EXTRAS = {
    "qwen2": lambda hidden, layers, heads: {},
    "qwen3": lambda hidden, layers, heads: {"head_dim": hidden // heads},
    "qwen3_moe": lambda hidden, layers, heads: {
        "head_dim": hidden // heads,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": hidden,
        "norm_topk_prob": True,
        "router_aux_loss_coef": 0.001,
    },
    "gpt_oss": lambda hidden, layers, heads: {
        "head_dim": hidden // heads,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": hidden,
        "sliding_window": 8,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "router_aux_loss_coef": 0.9,
    },
}


def build_tiny_config(
    vocab_size: int,
    image_token_id: int,
    *,
    image_size: int = 56,
    patch_size: int = 14,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    downsample_ratio: float = 0.5,
    vision_norm_type: str = "layer_norm",
    llm: str = "qwen2",
) -> InternVLConfig:
    """An InternVL config (InternViT-300M style ViT + a Qwen2 LLM, or one of InternVL3.5's: `llm` = "qwen3",
    "qwen3_moe" or "gpt_oss") scaled down to test size.

    With the defaults a 56 px tile has (56/14)^2 = 16 patches and, after the 0.5 pixel shuffle, 4 image tokens. The
    MoE LLMs have 4 experts, 2 per token; GPT-OSS alternates sliding-window (window 8, so that it cuts the tests'
    sequences) and full layers, with attention sinks, as the real model.
    """
    if llm not in TINY_LLMS:
        raise ValueError(f"llm={llm!r}: expected one of {TINY_LLMS}")
    num_patches = (image_size // patch_size) ** 2
    return InternVLConfig(
        vision_config={
            "hidden_size": vision_hidden_size,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "intermediate_size": 4 * vision_hidden_size,
            "image_size": image_size,
            "patch_size": patch_size,
            "attention_bias": vision_norm_type == "layer_norm",
            "use_qk_norm": vision_norm_type == "rms_norm",
            "norm_type": vision_norm_type,
        },
        text_config={
            "model_type": llm,
            "vocab_size": vocab_size,
            "hidden_size": text_hidden_size,
            "intermediate_size": 4 * text_hidden_size,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_heads,
            "num_key_value_heads": text_kv_heads,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            **_TINY_LLM_EXTRAS[llm](text_hidden_size, text_layers, text_heads),
        },
        image_token_id=image_token_id,
        image_seq_length=int(num_patches * downsample_ratio**2),
        downsample_ratio=downsample_ratio,
        tie_word_embeddings=False,  # InternVL 2.5 / 3 never tie (docs/original-differences.md §4.1)
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **config_kwargs
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerFast]:
    """Build a random tiny InternVL and its tokenizer, deterministically from `seed`."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = build_tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN), **config_kwargs)
    if config.text_config.model_type in NO_SDPA_LLMS:
        config.text_config._attn_implementation = "eager"  # transformers refuses SDPA for these (model/attention.py)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    return model, tokenizer


def tiny_tokenizer_for(llm: str, extra_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with the tokens the `llm` family's real tokenizer has: harmony's for GPT-OSS, `<think>` for
    the Qwen3s."""
    return build_tiny_tokenizer(extra_texts, harmony=llm == "gpt_oss", think_tokens=llm in ("qwen3", "qwen3_moe"))


def save_tiny_model(
    path, *, extra_texts: Iterable[str] = (), seed: int = 0, llm: str = "qwen2", **config_kwargs
) -> None:
    """Build a tiny InternVL and write it as an HF-native checkpoint folder that `load_model` reads."""
    model, tokenizer = build_tiny_model(tiny_tokenizer_for(llm, extra_texts), seed=seed, llm=llm, **config_kwargs)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
