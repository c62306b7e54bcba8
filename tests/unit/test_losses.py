"""Preference losses, the BCO running mean and the MPO objective, against numbers worked out by hand.

Two pairs, β = 0.5 throughout (log-probs are sums over response tokens):

    pair A: log π(yc) = −1, log π(yr) = −3, log π0(yc) = −2, log π0(yr) = −2 -> Δc = 1,  Δr = −1, s = 0.5·2 = 1
    pair B: log π(yc) = −4, log π(yr) = −2, log π0(yc) = −3, log π0(yr) = −3 -> Δc = −1, Δr = 1,  s = −1

Facts used below: −log σ(x) = log(1 + e^−x); −log σ(−x) = −log σ(x) + x; σ(1) = 0.7310586, σ(−1) = 0.2689414;
−log σ(1) = 0.3132617, −log σ(−1) = 1.3132617; −log σ(0.5) = 0.4740770, −log σ(−0.5) = 0.9740770;
−log σ(0.25) = 0.5759394, −log σ(0.75) = 0.3868710.
"""

import json

import pytest
import torch

from internvl_tune.losses.objective import PreferenceObjective
from internvl_tune.losses.preference import PREFERENCE_LOSS_TYPES, preference_loss, rewards
from internvl_tune.losses.running import RunningRewardMean

BETA = 0.5


def _pairs(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected) for pairs A and B, each [2]."""
    policy_chosen = torch.tensor([-1.0, -4.0], dtype=torch.float64, requires_grad=requires_grad)
    policy_rejected = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=requires_grad)
    ref_chosen = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    ref_rejected = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


# Each case: loss_type, keyword arguments, expected per-pair losses [A, B].
CASES = [
    # −log σ(s): A −log σ(1) = 0.3132617; B −log σ(−1) = 1.3132617.
    ("sigmoid", {}, [0.3132617, 1.3132617]),
    # −0.9·log σ(s) − 0.1·log σ(−s) = −log σ(s) + 0.1·s: A 0.3132617 + 0.1 = 0.4132617; B 1.3132617 − 0.1.
    ("sigmoid", {"label_smoothing": 0.1}, [0.4132617, 1.2132617]),
    # [−0.9·log σ(s) + 0.1·log σ(−s)] / 0.8 = [0.8·(−log σ(s)) − 0.1·s] / 0.8 = −log σ(s) − 0.125·s:
    # A 0.3132617 − 0.125 = 0.1882617; B 1.3132617 + 0.125 = 1.4382617.
    ("robust", {"label_smoothing": 0.1}, [0.1882617, 1.4382617]),
    # ls = 0 is plain DPO.
    ("robust", {}, [0.3132617, 1.3132617]),
    # relu(1 − s): A relu(0) = 0; B relu(2) = 2.
    ("hinge", {}, [0.0, 2.0]),
    # Length-averaged: lengths chosen [2, 1], rejected [4, 2]; 1/(2β) = 1.
    # A: Δ̄c = −1/2 + 2/2 = 0.5, Δ̄r = −3/4 + 2/4 = −0.25 -> (0.75 − 1)² = 0.0625.
    # B: Δ̄c = −4/1 + 3/1 = −1, Δ̄r = −2/2 + 3/2 = 0.5 -> (−1.5 − 1)² = 6.25.
    ("ipo", {"chosen_lengths": torch.tensor([2, 1]), "rejected_lengths": torch.tensor([4, 2])}, [0.0625, 6.25]),
    # −log σ(βΔc − δ) − log σ(−(βΔr − δ)), δ = 0.25:
    # A: βΔc − δ = 0.25, −(βΔr − δ) = −(−0.5 − 0.25) = 0.75 -> 0.5759394 + 0.3868710 = 0.9628104.
    # B: βΔc − δ = −0.75, −(βΔr − δ) = −(0.5 − 0.25) = −0.25 -> (0.3868710 + 0.75) + (0.5759394 + 0.25) = 1.9628104.
    ("bco_pair", {"delta": 0.25}, [0.9628104, 1.9628104]),
    # δ = 0: A 2·(−log σ(0.5)) = 0.9481540; B 2·(−log σ(−0.5)) = 1.9481540.
    ("bco_pair", {}, [0.9481540, 1.9481540]),
    # (Δc − 0.5/β)² + (Δr + 0.5/β)², 0.5/β = 1: A (1 − 1)² + (−1 + 1)² = 0; B (−2)² + 2² = 8.
    ("sppo_hard", {}, [0.0, 8.0]),
    # −log σ(βΔc) − 0.5·log σ(−βΔc) − 0.5·log σ(−βΔr):
    # A: βΔc = 0.5, βΔr = −0.5 -> 0.4740770 + 0.5·0.9740770 + 0.5·0.4740770 = 1.1981540.
    # B: βΔc = −0.5, βΔr = 0.5 -> 0.9740770 + 0.5·0.4740770 + 0.5·0.9740770 = 1.6981540.
    ("nca_pair", {}, [1.1981540, 1.6981540]),
    # σ(s)(log σ(s) − log(1 − ls)) + σ(−s)(log σ(−s) − log ls), ls 0 -> 1e-3; log 0.999 = −0.0010005,
    # log 0.001 = −6.9077553.
    # A: 0.7310586·(−0.3132617 + 0.0010005) + 0.2689414·(−1.3132617 + 6.9077553) = −0.2282812 + 1.5045911 = 1.2763098.
    # B: 0.2689414·(−1.3132617 + 0.0010005) + 0.7310586·(−0.3132617 + 6.9077553) = −0.3529214 + 4.8209611 = 4.4680397.
    ("exo_pair", {}, [1.2763098, 4.4680397]),
    # ls = 0.1, log 0.9 = −0.1053605, log 0.1 = −2.3025851:
    # A: 0.7310586·(−0.3132617 + 0.1053605) + 0.2689414·(−1.3132617 + 2.3025851) = −0.1519879 + 0.2660700 = 0.1140821.
    # B: 0.2689414·(−1.3132617 + 0.1053605) + 0.7310586·(−0.3132617 + 2.3025851) = −0.3248547 + 1.4543119 = 1.1294573.
    ("exo_pair", {"label_smoothing": 0.1}, [0.1140821, 1.1294573]),
]


@pytest.mark.parametrize("loss_type, kwargs, expected", CASES)
def test_preference_loss_by_hand(loss_type, kwargs, expected):
    losses = preference_loss(loss_type, *_pairs(), beta=BETA, **kwargs)
    assert losses.shape == (2,)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_every_loss_type_has_a_case_and_a_gradient():
    assert {case[0] for case in CASES} == set(PREFERENCE_LOSS_TYPES)
    lengths = {"chosen_lengths": torch.tensor([2, 1]), "rejected_lengths": torch.tensor([4, 2])}
    for loss_type in PREFERENCE_LOSS_TYPES:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = _pairs(requires_grad=True)
        preference_loss(
            loss_type, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=BETA, **lengths
        ).sum().backward()
        assert torch.isfinite(policy_chosen.grad).all() and torch.isfinite(policy_rejected.grad).all(), loss_type


def test_preference_loss_is_stable_for_large_margins():
    # s = 0.5·(1000 − (−1000)) = 1000: a naive log(sigmoid(−1000)) would be log 0 = −inf.
    losses = preference_loss("sigmoid", *[torch.tensor([v]) for v in (-1000.0, 1000.0, 0.0, 0.0)], beta=BETA)
    assert losses.item() == pytest.approx(1000.0)


def test_preference_loss_errors():
    with pytest.raises(ValueError, match="unknown preference loss_type 'dpo'; known: sigmoid, bco_pair"):
        preference_loss("dpo", *_pairs())
    with pytest.raises(ValueError, match="ipo loss needs chosen_lengths and rejected_lengths"):
        preference_loss("ipo", *_pairs(), chosen_lengths=torch.tensor([2, 1]))
    with pytest.raises(ValueError, match=r"robust loss: label_smoothing must be in \[0, 0.5\)"):
        preference_loss("robust", *_pairs(), label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing must be >= 0"):
        preference_loss("sigmoid", *_pairs(), label_smoothing=-0.1)


def test_rewards_are_beta_logratios_detached():
    # β·Δc = 0.5·[1, −1], β·Δr = 0.5·[−1, 1].
    chosen_rewards, rejected_rewards = rewards(*_pairs(requires_grad=True), beta=BETA)
    assert chosen_rewards.tolist() == [0.5, -0.5] and rejected_rewards.tolist() == [-0.5, 0.5]
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_running_reward_mean_is_the_mean_of_all_rank_scalars():
    running = RunningRewardMean()
    assert running.mean == 0.0
    # Two ranks with means 1 and 3: batch mean 2, and the first update replaces the initial 0 -> 2.
    assert running.update(1.0 + 3.0, num_ranks=2) == 2.0
    # Two ranks with means 2 and 2: 2 + (2 − 2)·2/4 = 2.
    assert running.update(2.0 + 2.0, num_ranks=2) == pytest.approx(2.0)
    # One rank with mean 5: 2 + (5 − 2)·1/5 = 2.6 = (1 + 3 + 2 + 2 + 5) / 5.
    assert running.update(torch.tensor(5.0), num_ranks=1) == pytest.approx(2.6)
    assert running.count == pytest.approx(5.0)


def test_running_reward_mean_local_mean_and_state_dict():
    # (0.5 − 0.5 − 0.5 + 1.5) / 4 = 0.25.
    assert RunningRewardMean.local_mean(torch.tensor([0.5, -0.5]), torch.tensor([-0.5, 1.5])) == 0.25
    running = RunningRewardMean()
    running.update(4.0, num_ranks=2)
    restored = RunningRewardMean()
    restored.load_state_dict(json.loads(json.dumps(running.state_dict())))
    assert restored.state_dict() == running.state_dict()
    # The restored object continues exactly where the saved one would: (1 + 3 + 5) / 3 = 3.
    assert restored.update(5.0, num_ranks=1) == pytest.approx(3.0) == running.update(5.0, num_ranks=1)
    with pytest.raises(ValueError, match=r"missing \['count'\]"):
        RunningRewardMean().load_state_dict({"mean": 1.0})
    with pytest.raises(ValueError, match="num_ranks must be >= 1"):
        RunningRewardMean().update(1.0, num_ranks=0)


MPO = PreferenceObjective(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=BETA)
# Chosen responses: 2 tokens (pair A) and 4 tokens (pair B); their NLLs are −log π(yc) = 1 and 4.
CHOSEN_NUM_TOKENS = torch.tensor([2, 4])


def test_mpo_objective_by_hand():
    """L = (1/P)·Σ_pairs (0.8·L_sigmoid + 0.2·L_bco) + 1.0·L_sft, here the micro-batch is the whole step (P = 2).

    δ comes from the running mean as a recipe would read it: rewards [0.5, −0.5] and [−0.5, 0.5] have mean 0, so
    after the first update δ = 0.
    L_sigmoid = [0.3132617, 1.3132617], mean 0.8132617.
    L_bco (δ = 0) = [0.9481540, 1.9481540], mean 1.4481540.
    preference part: 0.8·0.8132617 + 0.2·1.4481540 = 0.9402401.
    L_sft (token mean) = (1 + 4) / (2 + 4) = 0.8333333.
    L = 0.9402401 + 0.8333333 = 1.7735734.
    """
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = pairs = _pairs(requires_grad=True)
    assert MPO.needs_delta and MPO.sft_weight == 1.0
    running = RunningRewardMean()
    delta = running.update(RunningRewardMean.local_mean(*MPO.rewards(*pairs)), num_ranks=1)
    assert delta == 0.0

    out = MPO(*pairs, delta=delta, chosen_num_tokens=CHOSEN_NUM_TOKENS)
    assert out.loss.item() == pytest.approx(1.7735734, abs=1e-6)
    assert {k: v.item() for k, v in out.terms.items()} == pytest.approx(
        {"sigmoid": 0.8132617, "bco_pair": 1.4481540, "sft": 0.8333333}, abs=1e-6
    )
    assert out.loss.item() == pytest.approx(
        0.8 * out.terms["sigmoid"].item() + 0.2 * out.terms["bco_pair"].item() + 1.0 * out.terms["sft"].item()
    )
    # Rewards: chosen β·Δc = [0.5, −0.5], rejected β·Δr = [−0.5, 0.5]; A is ranked right, B wrong; margins [1, −1].
    assert out.chosen_rewards.tolist() == [0.5, -0.5] and out.rejected_rewards.tolist() == [-0.5, 0.5]
    assert out.reward_accuracy.item() == 0.5 and out.reward_margin.item() == 0.0
    assert not out.chosen_rewards.requires_grad and not out.terms["sigmoid"].requires_grad
    out.loss.backward()
    assert policy_chosen.grad is not None and policy_rejected.grad is not None


def test_rewards_for_delta_are_the_rewards_the_objective_reports():
    # One formula: the objective's rewards, those a recipe folds into δ, and preference.rewards agree exactly.
    out = MPO(*_pairs(), delta=0.0, chosen_num_tokens=CHOSEN_NUM_TOKENS)
    for a, b in zip(MPO.rewards(*_pairs()), rewards(*_pairs(), beta=BETA), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(out.chosen_rewards, MPO.rewards(*_pairs())[0])


def test_mpo_objective_with_delta_and_sample_reduction():
    # δ = 0.25: L_bco = [0.9628104, 1.9628104], mean 1.4628104.
    out = MPO(*_pairs(), delta=0.25, chosen_num_tokens=CHOSEN_NUM_TOKENS)
    assert out.terms["bco_pair"].item() == pytest.approx(1.4628104, abs=1e-6)
    # Sample mean of per-pair token means: (1/2 + 4/4) / 2 = 0.75; L = 0.9402401 + 0.75 = 1.6902401.
    per_sample = PreferenceObjective(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=BETA, sft_reduction="sample")
    out = per_sample(*_pairs(), delta=0.0, chosen_num_tokens=CHOSEN_NUM_TOKENS)
    assert out.terms["sft"].item() == pytest.approx(0.75)
    assert out.loss.item() == pytest.approx(1.6902401, abs=1e-6)


@pytest.mark.parametrize("sft_reduction", ["token", "sample", "square"])
def test_micro_batch_shares_add_up_to_the_step_loss(sft_reduction):
    """Pairs A and B as two micro-batches of one pair, told the step's pair count (2) and SFT denominator.

    token: Σ n = 6, sft shares −log π(yc)/6 = 1/6 and 4/6 (sum 0.8333333); sample: 2 responses, (1/2)/2 = 0.25 and
    (4/4)/2 = 0.5 (sum 0.75); square: Σ √n = √2 + 2, shares (1/√2)/(√2 + 2) = 0.2071068 and (4/2)/(√2 + 2) = 0.5857864.
    The preference shares are each pair's loss / 2. Losses, terms and gradients add up to the whole step's.
    """
    objective = PreferenceObjective(
        ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=BETA, sft_reduction=sft_reduction
    )
    whole = _pairs(requires_grad=True)
    step = objective(*whole, delta=0.0, chosen_num_tokens=CHOSEN_NUM_TOKENS)
    step.loss.backward()

    split = _pairs(requires_grad=True)
    shares = [
        objective(
            *(t[i : i + 1] for t in split),
            delta=0.0,
            chosen_num_tokens=CHOSEN_NUM_TOKENS[i : i + 1],
            num_pairs_in_step=2,
            sft_weight_in_step={"token": 6.0, "sample": 2.0, "square": 2**0.5 + 2}[sft_reduction],
        )
        for i in (0, 1)
    ]
    sum(out.loss for out in shares).backward()
    expected_sft = {"token": [1 / 6, 4 / 6], "sample": [0.25, 0.5], "square": [0.2071068, 0.5857864]}[sft_reduction]
    assert [out.terms["sft"].item() for out in shares] == pytest.approx(expected_sft)
    assert sum(out.loss.item() for out in shares) == pytest.approx(step.loss.item(), abs=1e-12)
    for name in objective.loss_types:
        assert sum(out.terms[name].item() for out in shares) == pytest.approx(step.terms[name].item(), abs=1e-12)
    for a, b in zip(whole[:2], split[:2], strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_sft_reduction_sample_and_token_give_different_gradients():
    """The SFT term alone, d L / d log π(yc) per pair (lengths 2 and 4, one step of 2 pairs):

    token: L = −Σ log π(yc) / 6 -> [−1/6, −1/6]; sample: L = −(1/2)·Σ log π(yc)/|yc| -> [−1/4, −1/8].
    """
    grads = {}
    for reduction in ("token", "sample"):
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = _pairs(requires_grad=True)
        sft = PreferenceObjective(["sft"], [1.0], sft_reduction=reduction)
        sft(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_num_tokens=CHOSEN_NUM_TOKENS
        ).loss.backward()
        grads[reduction] = policy_chosen.grad.tolist()
    assert grads["token"] == pytest.approx([-1 / 6, -1 / 6])
    assert grads["sample"] == pytest.approx([-1 / 4, -1 / 8])


def test_one_pair_per_step_is_the_original_formula():
    """Pair A alone: 0.8·L_sigmoid + 0.2·L_bco + 1.0·NLL/|yc| = 0.8·0.3132617 + 0.2·0.9628104 + 1/2 = 0.9431714
    (δ = 0.25), with either reduction (one response: its token mean is the per-pair mean)."""
    pair_a = [t[:1] for t in _pairs()]
    for reduction in ("token", "sample"):
        objective = PreferenceObjective(
            ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=BETA, sft_reduction=reduction
        )
        out = objective(*pair_a, delta=0.25, chosen_num_tokens=CHOSEN_NUM_TOKENS[:1], num_pairs_in_step=1)
        assert out.loss.item() == pytest.approx(0.9431714, abs=1e-6)


def test_objective_passes_lengths_to_ipo():
    # IPO alone: mean of [0.0625, 6.25] = 3.15625; no delta needed.
    ipo = PreferenceObjective(["ipo"], [1.0], beta=BETA)
    assert not ipo.needs_delta and ipo.sft_weight == 0.0
    out = ipo(*_pairs(), chosen_num_tokens=torch.tensor([2, 1]), rejected_num_tokens=torch.tensor([4, 2]))
    assert out.loss.item() == pytest.approx(3.15625)


def test_original_spelling_gives_the_same_objective():
    ours = PreferenceObjective.from_config(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=BETA)
    original = PreferenceObjective.from_config(
        "sigmoid,bco_pair", sigmoid_loss_weight=0.8, bco_pair_loss_weight=0.2, rpo_alpha=1.0, beta=BETA
    )
    assert ours == original == MPO
    assert PreferenceObjective.from_config("sigmoid, bco_pair, sft", [0.8, 0.2, 1.0], beta=BETA) == MPO
    assert PreferenceObjective.from_config(["sigmoid", "bco_pair", "sft"], beta=BETA) == MPO  # weights unset: MPO's
    # The original defaults both weights to 1.0 in a combination, and has no SFT term without rpo_alpha.
    assert PreferenceObjective.from_config("sigmoid,bco_pair") == PreferenceObjective(["sigmoid", "bco_pair"], [1, 1])
    # ... and ignores the per-type weights for a single loss type.
    with pytest.warns(UserWarning, match=r"\['sigmoid_loss_weight'\] ignored for the single loss_type 'sigmoid'"):
        assert PreferenceObjective.from_config("sigmoid", sigmoid_loss_weight=0.8).loss_weights == [1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0]}, "1 weights .* for 2 loss types"),
        ({"loss_type": ["dpo"], "loss_weights": [1.0]}, "unknown type 'dpo'; known: sigmoid, .*, sft"),
        ({"loss_type": ["sigmoid"], "loss_weights": [-1.0]}, "weight of 'sigmoid' must be >= 0"),
        ({"loss_type": ["sft", "sigmoid", "sft"], "loss_weights": [1, 1, 1]}, r"\['sft'\] listed more than once"),
        ({"loss_type": [], "loss_weights": []}, "at least one loss type"),
        ({"loss_type": "sigmoid", "beta": 0.0}, "beta: must be > 0"),
        ({"loss_type": "sigmoid", "sft_reduction": "mean"}, "sft_reduction: must be one of token, sample, square"),
    ],
)
def test_objective_config_errors(kwargs, message):
    # The spellings of the loss mix are tested row by row against docs/losses.md in test_loss_spellings.py.
    with pytest.raises(ValueError, match=message):
        PreferenceObjective.from_config(**kwargs)


def test_objective_call_errors_and_warnings():
    with pytest.raises(ValueError, match="bco_pair needs delta"):
        MPO(*_pairs(), chosen_num_tokens=CHOSEN_NUM_TOKENS)
    with pytest.raises(ValueError, match="'sft' term needs chosen_num_tokens"):
        MPO(*_pairs(), delta=0.0)
    with pytest.warns(UserWarning, match="label_smoothing=0.1 is ignored"):
        PreferenceObjective(["bco_pair"], [1.0], label_smoothing=0.1)
