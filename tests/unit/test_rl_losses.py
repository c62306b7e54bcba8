"""GRPO advantages and the GSPO / GRPO policy loss (losses/rl.py) against numbers worked out by hand.

Facts used below: sqrt(1/3) = 0.5773503, sqrt(1/2) = 0.7071068; e^0.1 = 1.1051709, e^0.2 = 1.2214028,
e^0.3 = 1.3498588, e^−0.5 = 0.6065307, e^1.5 = 4.4816891, e^−1 = 0.3678794, e^10 = 22026.466, e^12 = 162754.79,
e^20 = 4.8516520e8.

The policy-loss tests use old log-probs 0, so a token's log-ratio is its logp. Responses (padded to 3 tokens):

    a: 2 tokens, logp [0.1, 0.3]   GSPO s_a = e^0.2 = 1.2214028 (> 1.2)   GRPO ρ = 1.1051709, 1.3498588
    b: 1 token,  logp [−0.5]       GSPO s_b = e^−0.5 = 0.6065307 (< 0.8)  GRPO ρ = 0.6065307
"""

import math

import pytest
import torch

from internvl_tune.config import ConfigError, RLArgs
from internvl_tune.losses.rl import (
    LOSS_AGG_MODES,
    RLLoss,
    group_advantages,
    k3_kl,
    loss_normalizer,
    policy_loss,
    rl_metrics,
)


def _settings(loss="gspo", mode="seq-mean-token-mean", conventions="verl", **kwargs) -> RLLoss:
    return RLLoss(loss, mode, 0.2, 0.2, conventions, **kwargs)


def _ab(requires_grad=True):
    """logp [2, 3], old_logp, mask for responses a and b."""
    logp = torch.tensor([[0.1, 0.3, 0.0], [-0.5, 0.0, 0.0]], dtype=torch.float64, requires_grad=requires_grad)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return logp, torch.zeros(2, 3, dtype=torch.float64), mask


# ---- advantages ------------------------------------------------------------------------------------------------


def test_group_advantages_verl_and_trl():
    """Group [1, 0, 0, 1]: mean 0.5, std (Bessel) sqrt((4 · 0.25) / 3) = 0.5773503: A = ±0.5 / (0.5773503 + eps):
    verl (eps 1e-6) 0.8660239, trl (eps 1e-4) 0.8658754. Group [2, 2, 2, 2] (zero variance): std 0, A = 0 / eps = 0
    in both."""
    rewards = torch.tensor([[1.0, 0, 0, 1], [2, 2, 2, 2]])
    sign = torch.tensor([1.0, -1, -1, 1])
    verl = group_advantages(rewards, conventions="verl")
    trl = group_advantages(rewards, conventions="trl")
    torch.testing.assert_close(verl[0], 0.8660239 * sign)
    torch.testing.assert_close(trl[0], 0.8658754 * sign)
    assert verl[1].tolist() == [0.0] * 4 and trl[1].tolist() == [0.0] * 4


def test_one_response_group_verl_keeps_the_reward_trl_zero():
    """group_ids [0, 0, 1], rewards [1, 0, 3]. Group 0: mean 0.5, std sqrt(0.5) = 0.7071068, A = ±0.5 / 0.7071078
    = ±0.7071058 (verl). Group 1 has one response: verl takes mean 0, std 1, A = 3 / (1 + 1e-6) = 2.999997; TRL's
    mean is the reward itself, A = 0."""
    rewards = torch.tensor([1.0, 0.0, 3.0])
    verl = group_advantages(rewards, [0, 0, 1], conventions="verl")
    trl = group_advantages(rewards, [0, 0, 1], conventions="trl")
    torch.testing.assert_close(verl, torch.tensor([0.7071058, -0.7071058, 2.999997]))
    assert trl[2] == 0.0
    # No std scaling (Dr. GRPO): verl's lone response keeps its raw reward.
    assert group_advantages(rewards, [0, 0, 1], scale_rewards="none").tolist() == [0.5, -0.5, 3.0]


def test_group_ids_in_any_order_and_batch_scaling():
    """ids [7, 3, 7, 3], rewards [1, 5, 0, 5]: group 7 is [1, 0] (±0.7071058), group 3 [5, 5] (0).
    batch: rewards [[1, 0, 0, 1], [2, 2, 2, 2]] have mean 1.25 and Σ(r − 1.25)² = 2·0.0625 + 2·1.5625 + 4·0.5625
    = 5.5, std sqrt(5.5 / 7) = 0.8864053; A = (r − group mean) / 0.8864063 = ±0.5640754 and 0."""
    grouped = group_advantages(torch.tensor([1.0, 5, 0, 5]), torch.tensor([7, 3, 7, 3]))
    torch.testing.assert_close(grouped, torch.tensor([0.7071058, 0.0, -0.7071058, 0.0]))
    batch = group_advantages(torch.tensor([[1.0, 0, 0, 1], [2, 2, 2, 2]]), scale_rewards="batch")
    torch.testing.assert_close(batch[0], 0.5640754 * torch.tensor([1.0, -1, -1, 1]))
    assert batch[1].tolist() == [0.0] * 4


def test_mean_scaling_is_maxrl():
    """scale_rewards=mean divides by the group's mean reward (MaxRL). [1, 0, 0, 0]: mean 0.25, A = 0.75 / 0.25 = 3
    and −0.25 / 0.25 = −1; [1, 1, 1, 0]: mean 0.75, A = 0.25 / 0.75 = 1/3 and −1; [0, 0, 0, 0]: no pass rate, A = 0
    (not 0 / eps); [1, 1, 1, 1]: A = 0. eps 1e-6 moves these by < 1e-4 (3 becomes 2.999988)."""
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    mean = group_advantages(rewards, scale_rewards="mean")
    expected = torch.tensor([[3.0, -1, -1, -1], [1 / 3, 1 / 3, 1 / 3, -1], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(mean, expected, atol=1e-4, rtol=0)
    # A lone response: verl's rule (mean 0) with 1 for the denominator keeps the reward; TRL's gives 0.
    lone = torch.tensor([1.0, 0.0, 0.5])
    torch.testing.assert_close(group_advantages(lone, [0, 0, 1], scale_rewards="mean"), torch.tensor([1.0, -1, 0.5]))
    assert group_advantages(lone, [0, 0, 1], scale_rewards="mean", conventions="trl")[2] == 0.0


def test_mean_scaling_weights_a_prompt_by_its_supervised_gradient():
    """Why mean: one prompt with a right answer of probability p, softmax over answers, G = 4 responses. The
    expected update of the right answer's logit is E[Σ_i A_i r_i] (Σ_i A_i = 0 in a group), and the supervised
    gradient of its G right answers is G (1 − p); their ratio is the weight RL gives the prompt. Under mean,
    Σ_i A_i r_i = K (1 − p̂) / p̂ = G (1 − p̂) for K ≥ 1 right answers, so the weight is exactly
    1 − (1 − p)^(G − 1): 0.271 at p = 0.1, 0.999 at p = 0.9. Under group (GRPO) it is 0.146 and 1.317: a prompt the
    model mostly gets wrong weighs 9x less than one it mostly gets right, against 3.7x under mean. Enumerated over the
    16 reward patterns."""

    def weight(p, scale):
        total = 0.0
        for bits in range(16):
            rewards = torch.tensor([[float(bits >> k & 1) for k in range(4)]], dtype=torch.float64)
            prob = math.prod(p if r else 1 - p for r in rewards[0].tolist())
            total += prob * float((group_advantages(rewards, scale_rewards=scale, std_epsilon=1e-12) * rewards).sum())
        return total / (4 * (1 - p))

    for p in (0.1, 0.5, 0.9):
        assert weight(p, "mean") == pytest.approx(1 - (1 - p) ** 3, abs=1e-9)
    assert weight(0.1, "group") == pytest.approx(0.146, abs=1e-3)
    assert weight(0.9, "group") == pytest.approx(1.317, abs=1e-3)


def test_mean_scaling_refuses_negative_rewards():
    with pytest.raises(ValueError, match="needs rewards >= 0"):
        group_advantages(torch.tensor([[1.0, -0.5]]), scale_rewards="mean")


def test_group_advantages_refuses_ungrouped_rewards():
    with pytest.raises(ValueError, match="need group_ids"):
        group_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="conventions"):
        group_advantages(torch.tensor([[1.0, 0.0]]), conventions="openrlhf")


# ---- GSPO ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conventions", ["verl", "trl"])
def test_gspo_ratios_outside_the_clip_range(conventions):
    """A = [+1, −1]: a has s = 1.2214 > 1.2 with A > 0: clipped, ℓ = −1.2 per token; b (one token) has s = 0.6065
    < 0.8 with A < 0: clipped, ℓ = max(0.6065, 0.8) = 0.8. seq-mean-token-mean: (−1.2 + 0.8) / 2 = −0.2, no gradient.

    A = [−1, +1]: both unclipped (the larger term is −A·s): ℓ_a = 1.2214028, ℓ_b = −0.6065307, loss
    (1.2214028 − 0.6065307) / 2 = 0.3074360. dℓ_t/dlogp_t = −A·s, times 1/|y_i| and 1/N = 1/2:
    a: 1.2214028 / 4 = 0.3053507 on each of its tokens, b: −0.6065307 / 2 = −0.3032653."""
    logp, old, mask = _ab()
    out = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, settings=_settings(conventions=conventions))
    assert out.loss.item() == pytest.approx(-0.2)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert grad.abs().sum() == 0
    metrics = rl_metrics(out.stats)
    assert metrics["clip_fraction"].item() == 1.0

    out = policy_loss(logp, old, torch.tensor([-1.0, 1.0]), mask, settings=_settings(conventions=conventions))
    assert out.loss.item() == pytest.approx(0.3074360)
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.3053507, 0.3053507, 0], [-0.3032653, 0, 0]], dtype=grad.dtype))
    assert rl_metrics(out.stats)["clip_fraction"].item() == 0.0
    assert out.ratio_max.item() == pytest.approx(1.2214028) and out.ratio_min.item() == pytest.approx(0.6065307)


def test_gspo_clip_fraction_per_token_verl_per_sequence_trl():
    """A = [+1, +1]: a is clipped (its 2 tokens), b is not (s < 1 with A > 0: unclipped, ℓ = −0.6065307).
    verl counts tokens: 2 of 3 = 0.6667; TRL counts sequences: 1 of 2. Loss (−1.2 − 0.6065307) / 2 = −0.9032653."""
    logp, old, mask = _ab()
    verl = policy_loss(logp, old, torch.tensor([1.0, 1.0]), mask, settings=_settings(conventions="verl"))
    trl = policy_loss(logp, old, torch.tensor([1.0, 1.0]), mask, settings=_settings(conventions="trl"))
    assert verl.loss.item() == pytest.approx(-0.9032653) and trl.loss.item() == pytest.approx(-0.9032653)
    assert rl_metrics(verl.stats)["clip_fraction_high"].item() == pytest.approx(2 / 3)
    assert rl_metrics(trl.stats)["clip_fraction_high"].item() == pytest.approx(1 / 2)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # (2·1.2214028 − 0.6065307) / 3 tokens
        ("token-mean", 0.6120916),
        # (2·1.2214028 − 0.6065307) / 2 responses
        ("seq-mean-token-sum", 0.9181374),
        # (1.2214028 − 0.6065307) / 2
        ("seq-mean-token-mean", 0.3074360),
        # (2·1.2214028 − 0.6065307) / (2 responses · L 4)
        ("seq-mean-token-sum-norm", 0.2295344),
    ],
)
def test_each_aggregation_mode(mode, expected):
    """A = [−1, +1], nothing clipped: ℓ_a = 1.2214028 on each of a's 2 tokens, ℓ_b = −0.6065307."""
    logp, old, mask = _ab()
    settings = _settings(mode=mode, norm_length=4 if mode.endswith("norm") else None)
    out = policy_loss(logp, old, torch.tensor([-1.0, 1.0]), mask, settings=settings)
    assert out.loss.item() == pytest.approx(expected, abs=1e-7)


def test_gspo_sequence_log_ratio_clamp_verl_only():
    """One response, logp − old = [11, 13], mean 12, A = −1 (unclipped: the larger term is s). verl clamps log s at
    10: ℓ = e^10 = 22026.466 and no gradient; TRL: ℓ = e^12 = 162754.79, gradient s / |y| = 81377.40 per token."""
    logp = torch.tensor([[11.0, 13.0]], dtype=torch.float64, requires_grad=True)
    old, mask, adv = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2), torch.tensor([-1.0])
    verl = policy_loss(logp, old, adv, mask, settings=_settings(conventions="verl"))
    trl = policy_loss(logp, old, adv, mask, settings=_settings(conventions="trl"))
    assert verl.loss.item() == pytest.approx(22026.466) and trl.loss.item() == pytest.approx(162754.79)
    assert torch.autograd.grad(verl.loss, logp)[0].abs().sum() == 0
    torch.testing.assert_close(
        torch.autograd.grad(trl.loss, logp)[0], torch.full((1, 2), 81377.396, dtype=torch.float64)
    )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_gspo_straight_through_verl_equals_trl_sequence_mean(mode):
    """verl's per-token form sg(log s) + logp − sg(logp) and TRL's log s itself give the same loss and gradient in
    every mode (each mode weighs a response's tokens alike), away from verl's clamp."""
    torch.manual_seed(0)
    lengths = [3, 1, 4]
    mask = torch.tensor([[1] * n + [0] * (4 - n) for n in lengths])
    base = 0.3 * torch.randn(3, 4, dtype=torch.float64)
    old = base + 0.2 * torch.randn(3, 4, dtype=torch.float64)
    adv = torch.tensor([0.7, -1.1, 0.4])
    results = []
    for conventions in ("verl", "trl"):
        logp = base.clone().requires_grad_()
        settings = _settings(mode=mode, conventions=conventions, norm_length=6)
        out = policy_loss(logp, old, adv, mask, settings=settings)
        results.append((out.loss.detach(), torch.autograd.grad(out.loss, logp)[0]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


# ---- GRPO ------------------------------------------------------------------------------------------------------


def _grpo_batch():
    """Responses a [0.1, 0.3] (A = +1), b [−0.5] (A = −1), c [1.5] (A = −1), padded to 2 tokens."""
    logp = torch.tensor([[0.1, 0.3], [-0.5, 0.0], [1.5, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]])
    return logp, torch.zeros(3, 2, dtype=torch.float64), mask, torch.tensor([1.0, -1.0, -1.0])


def test_grpo_token_clip_both_sides_and_dual_clip():
    """Per token, ρ = e^logp:
    a1: ρ 1.1051709 in range, A > 0: ℓ = −1.1051709, gradient −ρ.   a2: ρ 1.3498588 > 1.2, A > 0: ℓ = −1.2 (clipped).
    b:  ρ 0.6065307 < 0.8, A < 0: ℓ = max(0.6065, 0.8) = 0.8 (clipped).
    c:  ρ 4.4816891, A < 0: unclipped 4.4816891; verl's dual-clip (c = 3) caps it at 3 (no gradient); TRL has none.
    token-mean over 4 tokens: verl (−1.1051709 − 1.2 + 0.8 + 3) / 4 = 0.3737073; TRL with 4.4816891: 0.7441296.
    Gradients: a1 −1.1051709 / 4 = −0.2762927 (both); c: TRL 4.4816891 / 4 = 1.1204223, verl 0.
    Clip fractions: verl low, high, dual 1/4 each (3/4); TRL low, high 1/4 each (1/2)."""
    logp, old, mask, adv = _grpo_batch()
    verl = policy_loss(logp, old, adv, mask, settings=_settings("grpo", "token-mean", "verl"))
    trl = policy_loss(logp, old, adv, mask, settings=_settings("grpo", "token-mean", "trl"))
    assert verl.loss.item() == pytest.approx(0.3737073) and trl.loss.item() == pytest.approx(0.7441296)
    grad_verl = torch.autograd.grad(verl.loss, logp)[0]
    grad_trl = torch.autograd.grad(trl.loss, logp)[0]
    torch.testing.assert_close(grad_verl, torch.tensor([[-0.2762927, 0], [0, 0], [0, 0]], dtype=torch.float64))
    torch.testing.assert_close(grad_trl, torch.tensor([[-0.2762927, 0], [0, 0], [1.1204223, 0]], dtype=torch.float64))
    m_verl, m_trl = rl_metrics(verl.stats), rl_metrics(trl.stats)
    assert [m_verl[k].item() for k in ("clip_fraction_low", "clip_fraction_high", "clip_fraction_dual")] == [0.25] * 3
    assert m_verl["clip_fraction"].item() == 0.75 and m_trl["clip_fraction"].item() == 0.5
    # An explicit 0 turns verl's dual-clip off: the loss is TRL's.
    off = policy_loss(logp, old, adv, mask, settings=_settings("grpo", "token-mean", "verl", clip_ratio_c=0))
    assert off.loss.item() == pytest.approx(0.7441296)


def test_grpo_token_log_ratio_clamp_verl_only():
    """A token with log-ratio 25: verl clamps it to 20 (ratio e^20 = 4.8516520e8), TRL does not (e^25)."""
    logp, old, mask = (
        torch.tensor([[25.0]], dtype=torch.float64),
        torch.zeros(1, 1, dtype=torch.float64),
        torch.ones(1, 1),
    )
    adv = torch.tensor([1.0])
    verl = policy_loss(logp, old, adv, mask, settings=_settings("grpo", "token-mean", "verl"))
    trl = policy_loss(logp, old, adv, mask, settings=_settings("grpo", "token-mean", "trl"))
    assert verl.ratio_max.item() == pytest.approx(4.8516520e8) and trl.ratio_max.item() == pytest.approx(math.exp(25))


# ---- KL --------------------------------------------------------------------------------------------------------


def test_k3_kl_term_and_verl_clamp():
    """One token, logp = old = −1 (ratio 1), A = 0 (no policy loss), ref = −2: x = ref − logp = −1,
    k3 = e^−1 + 1 − 1 = 0.3678794; kl_coef 0.5: loss 0.1839397; d k3 / d logp = 1 − e^x = 0.6321206, times 0.5:
    0.3160603. Far from the reference (logp −30, ref 0): verl clamps x to 20 and k3 to 10, TRL gives e^30 − 31."""
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    ref, old, mask = (
        torch.tensor([[-2.0]], dtype=torch.float64),
        torch.tensor([[-1.0]], dtype=torch.float64),
        torch.ones(1, 1),
    )
    settings = _settings(mode="token-mean", kl_coef=0.5)
    out = policy_loss(logp, old, torch.tensor([0.0]), mask, settings=settings, ref_logp=ref)
    assert out.loss.item() == pytest.approx(0.1839397) and out.terms["kl"].item() == pytest.approx(0.3678794)
    assert torch.autograd.grad(out.loss, logp)[0].item() == pytest.approx(0.3160603)
    assert rl_metrics(out.stats)["kl"].item() == pytest.approx(0.3678794)
    far, zero = torch.tensor([-30.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    assert k3_kl(far, zero, clamp=True).item() == 10.0
    assert k3_kl(far, zero, clamp=False).item() == pytest.approx(math.exp(30) - 31)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(logp, old, torch.tensor([0.0]), mask, settings=settings)


# ---- normalisation over the step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["gspo", "grpo"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_add_up_to_the_whole_step(loss, mode):
    """Five responses of 3, 1, 4, 2, 5 tokens as one micro-batch, or as micro-batches of 2 and 3 told the step's
    normalizer (`loss_normalizer` of all five): the losses and the gradients add up to the whole's."""
    torch.manual_seed(1)
    lengths = [3, 1, 4, 2, 5]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    base = 0.3 * torch.randn(5, 5, dtype=torch.float64)
    old = base + 0.2 * torch.randn(5, 5, dtype=torch.float64)
    adv, ref = torch.randn(5, dtype=torch.float64), base + 0.1 * torch.randn(5, 5, dtype=torch.float64)
    settings = _settings(loss, mode, kl_coef=0.1, norm_length=5)

    logp = base.clone().requires_grad_()
    whole = policy_loss(logp, old, adv, mask, settings=settings, ref_logp=ref)
    (whole_grad,) = torch.autograd.grad(whole.loss, logp)

    step = loss_normalizer(lengths, mode, norm_length=5)
    logp = base.clone().requires_grad_()
    parts = [
        policy_loss(
            logp[rows], old[rows], adv[rows], mask[rows], settings=settings, ref_logp=ref[rows], normalizer=step
        )
        for rows in (slice(0, 2), slice(2, 5))
    ]
    (parts_grad,) = torch.autograd.grad(sum(p.loss for p in parts), logp)
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss)
    torch.testing.assert_close(parts_grad, whole_grad)
    summed = {key: sum(p.stats[key] for p in parts) for key in whole.stats}
    for key, value in rl_metrics(summed).items():
        torch.testing.assert_close(value, rl_metrics(whole.stats)[key])


def test_per_micro_batch_means_are_not_the_step_token_mean():
    """What verl's actor does (each micro-batch's own token mean, divided by the number of micro-batches, or times
    its share of the responses with dynamic batches) differs from the step's token mean when micro-batches hold
    different token counts. GRPO, ratio 1, so ℓ_t = −A: micro-batch 1 is one token with A = −1 (ℓ = 1), micro-batch 2
    one response of 3 tokens with A = 0. The step's token mean is 1 / 4 = 0.25; verl's (1/1 + 0/3) / 2 = 0.5."""
    settings = _settings("grpo", "token-mean")
    one = (torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    three = (torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0.0]), torch.ones(1, 3))
    own = [policy_loss(*mb, settings=settings).loss.item() for mb in (one, three)]
    assert sum(own) / 2 == 0.5
    step = loss_normalizer([1, 3], "token-mean")
    assert sum(policy_loss(*mb, settings=settings, normalizer=step).loss.item() for mb in (one, three)) == 0.25


def test_flat_packed_tokens_equal_padded_rows():
    """Responses a and b as one flat row [prompt, a1, a2, prompt, b1] with seq_ids [−1, 0, 0, −1, 1]."""
    logp, old, mask = _ab(requires_grad=False)
    adv = torch.tensor([-1.0, 1.0])
    flat = torch.tensor([9.0, 0.1, 0.3, 9.0, -0.5], dtype=torch.float64)
    seq_ids = torch.tensor([-1, 0, 0, -1, 1])
    for settings in (_settings(), _settings("grpo", "token-mean")):
        padded = policy_loss(logp, old, adv, mask, settings=settings)
        packed = policy_loss(flat, torch.zeros(5, dtype=torch.float64), adv, settings=settings, seq_ids=seq_ids)
        torch.testing.assert_close(packed.loss, padded.loss)


def test_a_response_without_loss_tokens_has_weight_zero():
    """b's only token masked out: seq-mean-token-mean is a's alone (1.2214028 with A = −1), not a nan (verl divides
    b's token sum by its 0 tokens) and not halved (b is not counted)."""
    logp, old, _ = _ab()
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = policy_loss(logp, old, torch.tensor([-1.0, 1.0]), mask, settings=_settings())
    assert out.loss.item() == pytest.approx(1.2214028) and out.stats["sequences"].item() == 1
    assert loss_normalizer([2, 0], "seq-mean-token-mean") == 1.0
    assert loss_normalizer([2, 4], "token-mean") == 6.0
    assert loss_normalizer([2, 4], "seq-mean-token-sum-norm", norm_length=8) == 16.0


# ---- settings --------------------------------------------------------------------------------------------------


def test_default_rl_args_are_the_official_stage():
    """InternVL3.5's stage: verl's GRPO advantage with loss_mode=gspo, seq-mean-token-mean, clip 0.2 / 0.2, no KL,
    16 responses a prompt; GSPO has no dual-clip."""
    args = RLArgs()
    args.validate()
    settings = RLLoss(**args.loss_settings())
    assert (settings.loss, settings.loss_agg_mode, settings.conventions) == ("gspo", "seq-mean-token-mean", "verl")
    assert (settings.clip_ratio_low, settings.clip_ratio_high, settings.kl_coef) == (0.2, 0.2, 0.0)
    assert settings.dual_clip is None and args.num_generations == 16
    assert RLLoss(**RLArgs(loss="grpo").loss_settings()).dual_clip == 3.0
    assert RLLoss(**RLArgs(loss="grpo", conventions="trl").loss_settings()).dual_clip is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clip_ratio_c": 3.0}, "rl.clip_ratio_c: dual-clip is a grpo setting"),
        ({"loss": "grpo", "clip_ratio_c": 0.5}, r"rl.clip_ratio_c: must be > 1"),
        ({"clip_ratio_low": 1.0}, r"rl.clip_ratio_low: must be in \[0, 1\)"),
        ({"kl_coef": -0.1}, "rl.kl_coef: must be >= 0"),
        ({"loss_agg_mode": "seq-mean-token-sum-norm"}, "rl.norm_length: loss_agg_mode=seq-mean-token-sum-norm"),
        ({"num_generations": 0}, "rl.num_generations must be >= 1"),
        ({"num_generations": 1, "conventions": "trl"}, "rl.num_generations=1: under conventions=trl"),
        ({"std_epsilon": 0.0}, "rl.std_epsilon must be > 0"),
        ({"scale_rewards": "mean", "rewards": ["accuracy", "repetition"]}, "rl.scale_rewards=mean divides by"),
        ({"scale_rewards": "mean", "reward_weights": [0.9, -0.1]}, r"format \(weight -0.1\) can make"),
    ],
)
def test_rl_args_refuse_bad_values_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        RLArgs(**changes).validate()
    assert "\n" not in str(info.value)
