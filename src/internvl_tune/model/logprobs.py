"""Log-probs of the tokens a loss reads: the LM head applied at those positions only, in chunks."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from internvl_tune.constants import IGNORE_INDEX

DEFAULT_LOGPROB_CHUNK = 1024  # rows of [chunk, vocab] logits alive at once: 1024 x 151,674 fp32 = 0.6 GiB


class _LinearTargetLogps(torch.autograd.Function):
    """log_softmax((h @ W.T + b) * s)[target] per row (s = 1 / temperature), in chunks of rows, never holding
    [N, V] logits.

    Forward keeps only the per-row logsumexp; backward recomputes one chunk's logits at a time and forms
    d logp / d logits = s * (onehot(target) - softmax) in fp32, so peak logit memory is chunk x V in both passes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale):  # hidden [N, D], weight [V, D], targets [N]
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = torch.nn.functional.linear(hidden[start:end], weight, bias).float()  # [c, V]
            if scale != 1.0:
                logits.mul_(scale)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            out[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.scale = chunk_size, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [N]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        # One chunk: its [V, D] product is the gradient, in the weight's dtype. Several: summed in place into one
        # fp32 buffer (addmm_), so no second [V, D] temporary exists beside the sum.
        single_chunk = hidden.shape[0] <= ctx.chunk_size
        grad_weight = None
        if need_weight and not single_chunk:
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end]
            logits = torch.nn.functional.linear(h, weight, bias).float()
            if ctx.scale != 1.0:
                logits.mul_(ctx.scale)
            g = grad_out[start:end, None].float()
            grad_logits = logits.sub_(lse[start:end, None]).exp_().mul_(-g)  # -g * softmax, in the logits' memory
            grad_logits.scatter_add_(-1, targets[start:end, None], g)  # + g * onehot
            if ctx.scale != 1.0:
                grad_logits.mul_(ctx.scale)  # through the scaling, to the unscaled logits
            if need_bias:
                grad_bias += grad_logits.sum(0)
            if need_hidden:
                grad_hidden[start:end] = grad_logits.to(h.dtype) @ weight
            if need_weight:
                if single_chunk:
                    grad_weight = grad_logits.to(h.dtype).t() @ h  # [V, D]
                else:
                    grad_weight.addmm_(grad_logits.t(), h.float())
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None,
            None,
            None,
        )


def _check_scoring(chunk_size: int, temperature: float) -> None:
    if chunk_size < 1:
        raise ValueError(f"logprob chunk size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"logprob temperature must be > 0, got {temperature}")


def target_logps(
    hidden: torch.Tensor,  # [N, D]
    lm_head: torch.nn.Module,
    targets: torch.Tensor,  # [N]
    chunk_size: int = DEFAULT_LOGPROB_CHUNK,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(target | hidden) per row, fp32 [N]: the LM head applied only to the rows a loss reads, in chunks.
    With `temperature`, of the distribution softmax(logits / temperature) (online RL scores the distribution it
    sampled from, as verl and TRL do).

    Equal (values and gradients) to `log_softmax(lm_head(hidden).float() / temperature)[arange(N), targets]`, but no
    [N, vocab] tensor exists at once: peak logit memory is `chunk_size x vocab` fp32, in forward and backward.
    A plain `nn.Linear` head uses one fused autograd function (forward: one matmul per chunk; backward: the chunk's
    logits recomputed, then the two gradient matmuls). Any other head (a LoRA-wrapped one, a head whose weight is
    partitioned by ZeRO-3) is called as a module per chunk under activation checkpointing, with the same bound.

    Example: hidden [3, D], targets [7, 9, 2] -> [log_softmax(W h0)[7], log_softmax(W h1)[9], log_softmax(W h2)[2]].
    """
    _check_scoring(chunk_size, temperature)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    weight = getattr(lm_head, "weight", None)
    # A ZeRO-3 parameter (`ds_id`) may be whole now and released before the backward (after a no-grad pass in eval
    # mode DeepSpeed leaves it gathered): only a module call makes DeepSpeed gather it again for the backward.
    fused = weight is not None and weight.dim() == 2 and not hasattr(weight, "ds_id")
    if type(lm_head) is torch.nn.Linear and fused:
        return _LinearTargetLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_size, 1.0 / temperature)

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).float() / temperature
        return logits.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    parts = [
        torch.utils.checkpoint.checkpoint(
            chunk_logps, hidden[s : s + chunk_size], targets[s : s + chunk_size], use_reentrant=False
        )
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(parts)


def target_logps_and_entropy(
    hidden: torch.Tensor,  # [N, D]
    lm_head: torch.nn.Module,
    targets: torch.Tensor,  # [N]
    chunk_size: int = DEFAULT_LOGPROB_CHUNK,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Without gradients: `target_logps` and the entropy of each row's next-token distribution, fp32 [N] each.

    Entropy H = logsumexp(z) - sum_v softmax(z)_v z_v, from the same chunk of logits as the log-prob (peak logit
    memory `chunk_size x vocab`, twice for the softmax). Online RL logs it from its no-grad pass over the rollouts.
    """
    _check_scoring(chunk_size, temperature)
    logps, entropies = [], []
    with torch.no_grad():
        for s in range(0, hidden.shape[0], chunk_size):
            logits = lm_head(hidden[s : s + chunk_size]).float() / temperature
            lse = torch.logsumexp(logits, dim=-1)
            logps.append(logits.gather(-1, targets[s : s + chunk_size, None]).squeeze(-1) - lse)
            entropies.append(lse - (torch.softmax(logits, dim=-1) * logits).sum(-1))
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(logps), torch.cat(entropies)


def response_gather(
    rows: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B, L]
    targets: torch.Tensor,  # [B, L]
    mask: torch.Tensor,  # [B, L] bool
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A collator's per-response gather ([B, L] padded) as flat lists for `InternVLTrainingForward`: the positions
    `row * seq_len + position`, their targets and the response each belongs to, masked tokens dropped. Call it on
    CPU tensors (collator output): selecting by the mask on an accelerator would wait for the device.

    Example: rows [1], positions [[3, 4, 0]], mask [[1, 1, 0]], seq_len 10 -> index [13, 14], segment [0, 0].
    """
    segment = torch.arange(len(rows)).unsqueeze(1).expand_as(positions)
    flat = rows.unsqueeze(1) * seq_len + positions
    return flat[mask], targets[mask], segment[mask]


def label_gather(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SFT labels [B, T] (IGNORE_INDEX where no loss is taken) as flat gather lists: position t of row b predicts
    labels[b, t + 1]; returns (index b * T + t, target, sample b). On CPU tensors, like `response_gather`.

    Example: labels [[-100, 5, 7]] -> index [0, 1], targets [5, 7], segment [0, 0].
    """
    batch, seq_len = labels.shape
    next_labels = labels[:, 1:]
    keep = next_labels != IGNORE_INDEX  # [B, T - 1]
    rows, cols = keep.nonzero(as_tuple=True)
    return rows * seq_len + cols, next_labels[keep], rows


def segment_sum(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of `values` [K] per segment id [K] -> [num_segments] (a response's summed log-prob)."""
    return values.new_zeros(num_segments).index_add(0, segment, values)


def pair_logps(forward: nn.Module, batch: dict[str, Any], device) -> dict[str, torch.Tensor]:
    """Summed chosen / rejected response log-probs and token counts of a collated pair batch.

    The gather lists are made from the batch's CPU tensors, so nothing waits for the device; the LM head runs only
    on the response positions (`InternVLTrainingForward` with `logp_index`).
    """
    num_pairs, seq_len = batch["num_pairs"], batch["input_ids"].shape[1]
    sides = [
        response_gather(*(batch[f"{side}_{k}"] for k in ("rows", "positions", "targets", "mask")), seq_len=seq_len)
        for side in ("chosen", "rejected")
    ]
    index = torch.cat([sides[0][0], sides[1][0]])
    targets = torch.cat([sides[0][1], sides[1][1]])
    segment = torch.cat([sides[0][2], sides[1][2] + num_pairs])  # chosen of pair b -> b, rejected -> B + b
    layout = ("attention_groups", "attention_roles") if "attention_groups" in batch else ("attention_mask",)
    token_logps = forward(
        input_ids=batch["input_ids"].to(device, non_blocking=True),
        position_ids=batch["position_ids"].to(device, non_blocking=True),
        pixel_values=batch["pixel_values"].to(device, non_blocking=True),
        image_flags=batch["image_flags"],  # stays on CPU: the tile split is made there
        logp_index=index.to(device, non_blocking=True),
        logp_targets=targets.to(device, non_blocking=True),
        **{"attention_mask": None, **{k: batch[k].to(device, non_blocking=True) for k in layout}},
    )  # [K]
    sums = segment_sum(token_logps, segment.to(device, non_blocking=True), 2 * num_pairs)
    return {
        "chosen_logps": sums[:num_pairs],
        "rejected_logps": sums[num_pairs:],
        "chosen_num_tokens": batch["chosen_mask"].sum(-1).to(device, non_blocking=True),
        "rejected_num_tokens": batch["rejected_mask"].sum(-1).to(device, non_blocking=True),
    }


def group_token_logps(
    forward: nn.Module, batch: dict[str, Any], device, *, with_entropy: bool = False, temperature: float = 1.0
):
    """Per-token log-probs [K] of the responses of a `group_collate` batch (in `response_of_token` order): one
    forward per batch, the LM head only on the response positions; of softmax(logits / `temperature`). With
    `with_entropy` (no gradients): the pair (log-probs, each token's next-token entropy at that temperature)."""
    return forward(
        with_entropy=with_entropy,
        logit_temperature=temperature,
        input_ids=batch["input_ids"].to(device, non_blocking=True),
        position_ids=batch["position_ids"].to(device, non_blocking=True),
        pixel_values=batch["pixel_values"].to(device, non_blocking=True),
        image_flags=batch["image_flags"],  # stays on CPU: the tile split is made there
        logp_index=batch["logp_index"].to(device, non_blocking=True),
        logp_targets=batch["logp_targets"].to(device, non_blocking=True),
        attention_mask=None,
        attention_groups=batch["attention_groups"].to(device, non_blocking=True),
        attention_roles=batch["attention_roles"].to(device, non_blocking=True),
    )
