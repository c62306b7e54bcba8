"""Which attention kernel runs, and the block masks of rows that hold more than one causal sequence.

A row is described by two integer tensors made by the collators on CPU (no T x T mask there):

- `attention_groups` [R, T]: which independent sequence a token belongs to (a preference pair, a packed sample);
  -1 for padding. Tokens never attend across groups.
- `attention_roles` [R, T]: 0 for context (prompt, or a whole SFT sample), 1 for a chosen answer, 2 for a rejected
  answer. A rejected token never attends to the chosen answer of its own group.

Within those rules attention is causal. Example, one pair P=2, Lc=2, Lr=1 (rows = queries, 1 = may attend)::

    groups  0 0 0 0 0     roles  0 0 1 1 2
              p0 p1 c0 c1 r0
        p0     1  .  .  .  .
        p1     1  1  .  .  .
        c0     1  1  1  .  .
        c1     1  1  1  1  .
        r0     1  1  .  .  1

Two kernels apply the rule. On CPU (and wherever flex attention is not available) the rule becomes a dense
[R, 1, T, T] boolean mask for SDPA. On CUDA the LLM runs PyTorch flex attention with a `BlockMask` built from the
same rule, which skips fully masked blocks and never materialises T x T scores. The ViT always runs SDPA (its tiles
have no mask). `model.attn_implementation: auto` picks by device; an explicit value is honoured.
"""

from __future__ import annotations

import torch

from internvl_tune.constants import CHOSEN_ROLE as CHOSEN
from internvl_tune.constants import PADDING_GROUP
from internvl_tune.constants import REJECTED_ROLE as REJECTED

FLEX = "flex_attention"


def resolve_attn_implementation(requested: str, device: torch.device | str) -> str | dict[str, str]:
    """The `attn_implementation` to load the model with: `auto` is flex attention for the LLM (SDPA for the ViT) on
    CUDA, SDPA elsewhere; any other value is passed through (`sdpa`, `eager`, `flash_attention_2`, ...)."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" and flex_attention_available():
        return {"text_config": FLEX, "vision_config": "sdpa"}
    return "sdpa"


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def uses_flex(model) -> bool:
    """Whether the model's LLM runs flex attention (then row masks must be `BlockMask`s)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    return getattr(text, "_attn_implementation", None) == FLEX


def dense_block_mask(groups: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """The rule above as [R, 1, T, T] bool (True = may attend), for SDPA. A padding token attends to itself only,
    so no softmax row is empty."""
    length = groups.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=groups.device).tril()
    same = groups[:, :, None] == groups[:, None, :]  # [R, T, T]
    sees_chosen = (roles[:, :, None] == REJECTED) & (roles[:, None, :] == CHOSEN)
    real = (groups != PADDING_GROUP)[:, :, None]
    eye = torch.eye(length, dtype=torch.bool, device=groups.device)
    mask = (same & causal & ~sees_chosen & real) | (~real & eye)
    return mask.unsqueeze(1)


def flex_block_mask(groups: torch.Tensor, roles: torch.Tensor):
    """The rule above as a flex-attention `BlockMask` on the tensors' device (padding attends causally to padding,
    which keeps its rows non-empty; their outputs are never read)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return (groups[b, q] == groups[b, kv]) & (kv <= q) & ~((roles[b, q] == REJECTED) & (roles[b, kv] == CHOSEN))

    rows, length = groups.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=groups.device)


def row_attention_mask(model, groups: torch.Tensor, roles: torch.Tensor, device: torch.device | str):
    """The attention mask a model takes for rows described by (groups, roles): a `BlockMask` when its LLM runs flex
    attention, else the dense [R, 1, T, T] mask, on `device`."""
    groups, roles = groups.to(device, non_blocking=True), roles.to(device, non_blocking=True)
    return flex_block_mask(groups, roles) if uses_flex(model) else dense_block_mask(groups, roles)
