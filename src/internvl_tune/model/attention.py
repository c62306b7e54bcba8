"""Which attention kernel runs, and the block masks of rows that hold more than one causal sequence.

A row is described by two integer tensors made by the collators on CPU (no T x T mask there):

- `attention_groups` [R, T]: which independent sequence a token belongs to (a preference pair, a packed sample);
  -1 for padding. Tokens never attend across groups.
- `attention_roles` [R, T]: 0 for context (prompt, or a whole SFT sample), then one role per answer of the group:
  1 for a chosen answer and 2 for a rejected one (a preference pair), or 1..G for the G responses of an RL group
  (`group_collate`). An answer's token attends to its group's context and to its own answer, never to another
  answer: a rejected answer never sees the chosen one, a response never sees its siblings.

Within those rules attention is causal. Example, one pair P=2, Lc=2, Lr=1 (rows = queries, 1 = may attend)::

    groups  0 0 0 0 0     roles  0 0 1 1 2
              p0 p1 c0 c1 r0
        p0     1  .  .  .  .
        p1     1  1  .  .  .
        c0     1  1  1  .  .
        c1     1  1  1  1  .
        r0     1  1  .  .  1

Three kernels apply the rule:

- `sdpa_segments` (the CPU default): the LLM's attention runs SDPA once per segment of the row, never over the
  whole row: a packed sample, or a pair's prompt + chosen answer, is one causal call; a rejected answer is one call
  whose keys are its prompt and itself. The work is the sum of the segments' squares, not the row's square (a
  4,096-token row of five samples: about 5x less attention time on 2 CPU cores). Rows laid out otherwise, and
  batches without groups, take plain SDPA with its mask. The segments are read from the collator's CPU tensors, so
  on CPU nothing waits; asked for on CUDA it reads them on the host each forward (flex attention is the CUDA default).
- `flex_attention` (the CUDA default): PyTorch flex attention with a `BlockMask` built from the rule, which skips
  fully masked blocks and never materialises T x T scores.
- `sdpa` (or `eager`) asked for explicitly: the rule as a dense [R, 1, T, T] boolean mask. It is the reference the
  other two are tested against.

The ViT always runs SDPA (its tiles have no mask). `model.attn_implementation: auto` picks by device; an explicit
value is honoured, except that an LLM without an SDPA path in transformers (GPT-OSS: its attention sinks) runs
`eager` where SDPA was asked for.

Sliding windows and attention sinks (GPT-OSS; docs/internvl3_5.md). A layer with a window W lets a token see only the
keys less than W tokens before it *in its own sequence*: in a shared-prefix row a rejected answer's first token is
one token after the prompt, however long the chosen answer between them is. So the window is measured on
`sequence_offsets` (each token's index in its own sequence), not on row positions, by all three kernels: the
segments compute it per segment, the dense and flex masks get one mask per layer type (`{"full_attention": ...,
"sliding_attention": ...}`, which transformers' models take as they are). A sink is one learned logit per head that
joins every softmax row and is dropped after it; the segment kernel and its dense fallback apply it (SDPA has no
such term), flex attention through transformers' own log-sum-exp correction (CUDA only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from internvl_tune.constants import CONTEXT_ROLE as CONTEXT
from internvl_tune.constants import PADDING_GROUP

logger = logging.getLogger(__name__)

FLEX = "flex_attention"
SEGMENTS = "sdpa_segments"  # the setting (model.attn_implementation)
# The name transformers knows the segment kernel by: one without "sdpa" in it, because transformers checks any
# name containing "sdpa" against the model's SDPA support, which GPT-OSS lacks and this kernel does not need.
SEGMENT_KERNEL = "internvl_tune_segments"


# LLM families (text_config.model_type) that transformers runs without SDPA: their layers need a term SDPA lacks.
NO_SDPA_LLMS = ("gpt_oss",)


def resolve_attn_implementation(
    requested: str, device: torch.device | str, llm_type: str | None = None
) -> str | dict[str, str]:
    """The `attn_implementation` to load the model with: `auto` is flex attention for the LLM on CUDA and
    `sdpa_segments` elsewhere (the ViT runs SDPA with either); `sdpa_segments` asked for is that on any device; any
    other value is passed through (`sdpa`, `eager`, `flash_attention_2`, ...), with `eager` for the LLM instead of
    `sdpa` when `llm_type` (the LLM's model_type) is one of `NO_SDPA_LLMS`."""
    if requested == "sdpa" and llm_type in NO_SDPA_LLMS:
        logger.info(
            "model.attn_implementation=sdpa: the %s LLM has no SDPA path in transformers; it runs eager", llm_type
        )
        return {"text_config": "eager", "vision_config": "sdpa"}
    if requested == SEGMENTS:
        requested = {"text_config": SEGMENT_KERNEL, "vision_config": "sdpa"}
    elif requested == "auto":
        if torch.device(device).type == "cuda" and flex_attention_available():
            return {"text_config": FLEX, "vision_config": "sdpa"}
        requested = {"text_config": SEGMENT_KERNEL, "vision_config": "sdpa"}
    if isinstance(requested, dict) and SEGMENT_KERNEL in requested.values():
        register_segment_attention()
    return requested


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def llm_attn_implementation(model) -> str | None:
    """The attention implementation the model's LLM runs."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    return getattr(text, "_attn_implementation", None)


def uses_flex(model) -> bool:
    """Whether the model's LLM runs flex attention (then row masks must be `BlockMask`s)."""
    return llm_attn_implementation(model) == FLEX


def sliding_windows(model) -> dict[str, int | None]:
    """The LLM's attention layer types and each one's window (None: full attention), e.g. GPT-OSS's
    `{"sliding_attention": 128, "full_attention": None}`; `{}` for an LLM whose layers all see every earlier key."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    layer_types = set(getattr(text, "layer_types", None) or ())
    if "sliding_attention" not in layer_types or not getattr(text, "sliding_window", None):
        return {}
    return {kind: text.sliding_window if kind == "sliding_attention" else None for kind in layer_types}


def sequence_offsets(groups: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """Each token's index in its own sequence [R, T]: a packed sample's tokens count from 0, a pair's prompt from 0
    and each of its answers from the prompt's length (as in a separate forward of prompt + that answer). Assumes the
    layout `row_segments` accepts (each group's context, chosen and rejected tokens contiguous, in that order)."""
    length = groups.shape[1]
    t = torch.arange(length, device=groups.device).expand_as(groups)
    starts = torch.ones_like(groups, dtype=torch.bool)
    starts[:, 1:] = (groups[:, 1:] != groups[:, :-1]) | (roles[:, 1:] != roles[:, :-1])
    run_start = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    slot = groups + 1  # padding (-1) counts in slot 0, never read
    # A row holds at most T groups: sized so, nothing is read back from the device.
    prompt_lengths = torch.zeros(groups.shape[0], length + 1, dtype=torch.long, device=groups.device)
    prompt_lengths.scatter_add_(1, slot, (roles == CONTEXT).long())
    prompt = prompt_lengths.gather(1, slot)
    return (t - run_start) + torch.where(roles != CONTEXT, prompt, torch.zeros_like(prompt))


def dense_block_mask(groups: torch.Tensor, roles: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The rule above as [R, 1, T, T] bool (True = may attend), for SDPA; with `window`, only keys less than
    `window` tokens back in the query's own sequence. A padding token attends to itself only, so no softmax row is
    empty."""
    length = groups.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=groups.device).tril()
    same = groups[:, :, None] == groups[:, None, :]  # [R, T, T]
    visible = (roles[:, None, :] == CONTEXT) | (roles[:, None, :] == roles[:, :, None])  # context, or its own answer
    real = (groups != PADDING_GROUP)[:, :, None]
    eye = torch.eye(length, dtype=torch.bool, device=groups.device)
    allowed = same & causal & visible & real
    if window is not None:
        offsets = sequence_offsets(groups, roles)
        allowed = allowed & (offsets[:, :, None] - offsets[:, None, :] < window)
    return (allowed | (~real & eye)).unsqueeze(1)


def flex_block_mask(groups: torch.Tensor, roles: torch.Tensor, window: int | None = None):
    """The rule above as a flex-attention `BlockMask` on the tensors' device (padding attends causally to padding,
    which keeps its rows non-empty; their outputs are never read); `window` as in `dense_block_mask`."""
    from torch.nn.attention.flex_attention import create_block_mask

    offsets = sequence_offsets(groups, roles) if window is not None else None

    def mask_mod(b, h, q, kv):
        visible = (roles[b, kv] == CONTEXT) | (roles[b, kv] == roles[b, q])
        allowed = (groups[b, q] == groups[b, kv]) & (kv <= q) & visible
        if offsets is not None:
            allowed = allowed & (offsets[b, q] - offsets[b, kv] < window)
        return allowed

    rows, length = groups.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=groups.device)


def row_attention(
    model, groups: torch.Tensor, roles: torch.Tensor, device: torch.device | str
) -> tuple[torch.Tensor | dict | None, dict]:
    """What the model's LLM takes for rows described by (groups, roles): `(attention_mask, extra kwargs)`.

    Under `sdpa_segments` the mask is None and the kwargs carry the rows' segments (when every row is laid out as
    segments, see `row_segments`); under flex attention a `BlockMask`; else the dense [R, 1, T, T] mask. An LLM with
    sliding-window layers gets one mask per layer type (`sliding_windows`). All on `device`.
    """
    implementation = llm_attn_implementation(model)
    windows = sliding_windows(model)
    if implementation == SEGMENT_KERNEL:
        segments = row_segments(groups, roles)
        if segments is not None:
            return None, {SEGMENTS_KWARG: segments}
        if windows:  # `sequence_offsets` needs the segment layout, which every collator of ours makes
            raise ValueError("rows not laid out as segments cannot be given sliding-window masks")
    groups, roles = groups.to(device, non_blocking=True), roles.to(device, non_blocking=True)
    if implementation == FLEX:
        build = flex_block_mask
    elif implementation == "eager":
        # transformers' eager attention adds the mask to the scores: it takes 0 / a large negative, not a bool.
        dtype = next(model.parameters()).dtype

        def build(groups, roles, window=None):
            allowed = dense_block_mask(groups, roles, window)
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
    else:
        build = dense_block_mask
    if windows:
        return {kind: build(groups, roles, window) for kind, window in windows.items()}, {}
    return build(groups, roles), {}


# ----------------------------------------------------------------------------------------------------------------------
# sdpa_segments: the rule as one SDPA call per segment.

SEGMENTS_KWARG = "internvl_tune_row_segments"


@dataclass(frozen=True)
class Segment:
    """One SDPA call of a row. Queries `[start, end)` attend to keys `[context_start, context_end)` (all of them)
    followed by keys `[start, end)` causally. A group's prompt + chosen answer (or a packed sample) is a segment with
    an empty context; its rejected answer is a segment whose context is the prompt. Padding is not a segment (its
    outputs are zeros, never read)."""

    start: int
    end: int
    context_start: int = 0
    context_end: int = 0


def row_segments(groups: torch.Tensor, roles: torch.Tensor) -> list[list[Segment]] | None:
    """Each row's segments, or None when some row is not laid out as contiguous groups of context, then chosen,
    then rejected tokens (then the dense rule applies). Read on the host: collators make (groups, roles) on CPU."""
    groups, roles = groups.cpu(), roles.cpu()
    rows = []
    for g, r in zip(groups.tolist(), roles.tolist(), strict=True):
        segments = _segments_of_row(g, r)
        if segments is None:
            return None
        rows.append(segments)
    return rows


def _segments_of_row(groups: list[int], roles: list[int]) -> list[Segment] | None:
    # Runs of equal (group, role), in order.
    runs: list[list[int]] = []  # [group, role, start, end]
    for t, (g, r) in enumerate(zip(groups, roles, strict=True)):
        if runs and runs[-1][0] == g and (g == PADDING_GROUP or runs[-1][1] == r):
            runs[-1][3] = t + 1
        else:
            runs.append([g, r, t, t + 1])
    segments: list[Segment] = []
    seen: set[int] = set()
    i = 0
    while i < len(runs):
        group = runs[i][0]
        if group == PADDING_GROUP:
            i += 1
            continue
        if group in seen:  # a group split by another one
            return None
        seen.add(group)
        spans = {}  # role -> (start, end) within this group's contiguous runs
        while i < len(runs) and runs[i][0] == group:
            role, start, end = runs[i][1], runs[i][2], runs[i][3]
            if role in spans or any(other > role for other in spans):  # roles must come as context, chosen, rejected
                return None
            spans[role] = (start, end)
            i += 1
        # The context and the first answer are one causal segment; every later answer is a segment whose context
        # is the group's prompt (a pair's rejected answer, an RL group's 2nd..G-th response).
        group_start = min(start for start, _ in spans.values())
        answers = sorted(role for role in spans if role != CONTEXT)
        segments.append(Segment(group_start, spans[answers[0]][1] if answers else spans[CONTEXT][1]))
        context_end = spans[CONTEXT][1] if CONTEXT in spans else group_start
        for role in answers[1:]:
            segments.append(Segment(*spans[role], group_start, context_end))
    return segments


def segment_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, KV, T, D]
    value: torch.Tensor,  # [B, KV, T, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface for `sdpa_segments`: per-segment SDPA when the forward passed
    the rows' segments, else transformers' own SDPA. Returns [B, T, H, D] like every attention function."""
    segments = kwargs.pop(SEGMENTS_KWARG, None)
    window, sinks = kwargs.get("sliding_window"), kwargs.get("s_aux")
    if segments is None:
        if sinks is not None:  # SDPA has no sink term
            if attention_mask is None:  # transformers leaves it out where SDPA's is_causal would do: spell it out
                attention_mask = _causal_mask(query.shape[2], key.shape[2], window, query.device)
            return _sink_attention(query, key, value, attention_mask, sinks, dropout, scaling, module.training)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    heads, length = query.shape[1], query.shape[2]
    repeat = heads // key.shape[1]
    if repeat > 1:  # grouped-query attention: head h reads key/value head h // repeat
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    # The rows and their segments are taken with split, never by slicing the whole tensor once per piece: the
    # backward of a slice allocates a zero tensor the size of what it was sliced from, one per slice (on a packed
    # row of 8,192 tokens that was ~1 s of memory fills per step on 2 CPU cores); split's backward is one cat.
    outputs = []
    for q, k, v, row in zip(query.split(1), key.split(1), value.split(1), segments, strict=True):
        pieces: list[tuple[int, int, Segment | None]] = []  # (start, end, segment) in order; None = padding
        covered = 0
        for seg in sorted(row, key=lambda s: s.start):
            if seg.start > covered:
                pieces.append((covered, seg.start, None))
            pieces.append((seg.start, seg.end, seg))
            covered = seg.end
        if covered < length:
            pieces.append((covered, length, None))
        sizes = [end - start for start, end, _ in pieces]
        qs, ks, vs = q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2)
        out = []
        for i, (_, _, seg) in enumerate(pieces):
            if seg is None:
                out.append(q.new_zeros(1, heads, sizes[i], q.shape[-1]))
                continue
            context = None
            if seg.context_end > seg.context_start:
                context = _context_keys(ks, vs, pieces, seg)
            if window is None and sinks is None:
                out.append(_segment_attention(qs[i], ks[i], vs[i], context, dropout, scaling))
            else:
                out.append(_windowed_segment_attention(qs[i], ks[i], vs[i], context, window, sinks, dropout, scaling))
        outputs.append(torch.cat(out, dim=2))
    return torch.cat(outputs, dim=0).transpose(1, 2).contiguous(), None


def _context_keys(ks, vs, pieces, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of a rejected answer's context (its prompt), sliced from the piece that holds them (the
    group's prompt + chosen segment), so the slice's backward stays that piece's size."""
    for j, (start, end, _) in enumerate(pieces):
        if start <= seg.context_start and seg.context_end <= end:
            span = slice(seg.context_start - start, seg.context_end - start)
            return ks[j][:, :, span], vs[j][:, :, span]
    raise ValueError(f"the context {seg.context_start}:{seg.context_end} is not inside one segment of its row")


def _segment_attention(q, k, v, context, dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal attention of one segment's queries over its keys, after all the `context` keys when there are any."""
    if context is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
    k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
    n, c = q.shape[2], context[0].shape[2]
    mask = torch.ones(n, c + n, dtype=torch.bool, device=q.device)
    mask[:, c:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # all the context, itself causally
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)


def _windowed_segment_attention(q, k, v, context, window, sinks, dropout: float, scaling: float | None):
    """`_segment_attention` for a layer with a sliding window and / or attention sinks. The keys are the context
    (the prompt) then the segment itself, so a key's index in them is its index in the query's own sequence and the
    window is a plain offset: query i (at c + i) sees key j when j <= c + i and c + i - j < window."""
    if context is not None:
        k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
    mask = _causal_mask(q.shape[2], k.shape[2], window, q.device)
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    out, _ = _sink_attention(q, k, v, mask, sinks, dropout, scaling, dropout > 0)
    return out.transpose(1, 2)


def _causal_mask(queries: int, keys: int, window: int | None, device) -> torch.Tensor:
    """[Tq, Tk] bool: the queries are the last `queries` of the `keys` positions (a KV cache holds the others)."""
    query_at = torch.arange(keys - queries, keys, device=device)[:, None]
    key_at = torch.arange(keys, device=device)[None, :]
    mask = key_at <= query_at
    return mask & (query_at - key_at < window) if window is not None else mask


def _sink_attention(query, key, value, mask, sinks, dropout: float, scaling: float | None, training: bool):
    """Attention with one sink logit per head in every softmax row (dropped after it), as GPT-OSS defines it.
    `mask`: bool (True = may attend) or additive float, broadcastable to [B, H, Tq, Tk]. Returns [B, Tq, H, D]."""
    repeat = query.shape[1] // key.shape[1]
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    sink = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(scores.shape[0], -1, scores.shape[2], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    probs = F.dropout(probs, p=dropout, training=training)
    return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous(), None


def register_segment_attention() -> None:
    """Make `sdpa_segments` a transformers attention implementation (idempotent). Its masks, for batches without
    segments and for generation, are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SEGMENT_KERNEL, segment_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_KERNEL, sdpa_mask)
