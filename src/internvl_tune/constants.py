"""Constants shared by every module: label ignore index, InternVL special tokens, normalisation statistics, and
the defaults that code outside the settings dataclasses needs as plain values."""

IGNORE_INDEX = -100

# The default tile budget: most tiles per image (`max_dynamic_patch`), as in the original InternVL training scripts.
# `PipelineSettings` (data/settings.py) takes its default from here, and so does every other default of a tile count.
DEFAULT_MAX_DYNAMIC_PATCH = 12

# The conversation template of InternVL 2.5 and 3 (`conv_style`, a checkpoint's `template`).
DEFAULT_TEMPLATE = "internvl2_5"

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

# Added as special tokens by the original SFT entry (docs/original-differences.md §1.1), in this order.
INTERNVL_SPECIAL_TOKENS = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

# Per-channel (mean, std) for `normalize_type` (docs/original-differences.md §3.1).
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# Roles of the tokens of a row that holds several sequences (`attention_roles`, model/attention.py): a rejected
# answer never attends to the chosen answer of its own group. Padding has group -1.
CONTEXT_ROLE, CHOSEN_ROLE, REJECTED_ROLE = 0, 1, 2
PADDING_GROUP = -1
