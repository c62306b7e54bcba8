"""The packer (budgets, buffer bound, over-budget policy), the packed sampler (ranks, resume) and the packed
collator, against hand-worked examples."""

import random

import pytest
import torch

from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.collate import pack_collate
from internvl_tune.data.errors import DataError
from internvl_tune.data.packing import PackedBatchSampler, PackingSettings, pack
from internvl_tune.losses.reduction import token_weights, weight_total


def test_worked_example_of_the_module_docstring():
    items = [("a", 6, 2), ("b", 5, 1), ("c", 4, 2), ("d", 3, 0)]
    assert list(pack(items, max_tokens=10, max_tiles=4, max_buffer_size=2)) == [["a", "c"], ["b", "d"]]


def test_rows_keep_both_budgets_and_every_sample_appears_once():
    rng = random.Random(0)
    items = [(i, rng.randint(1, 90), rng.choice([0, 0, 1, 5, 13])) for i in range(500)]
    rows = list(pack(items, max_tokens=100, max_tiles=16, max_buffer_size=5))
    size = {i: (n, t) for i, n, t in items}
    assert sorted(i for row in rows for i in row) == list(range(500))  # none lost, none twice
    for row in rows:
        assert sum(size[i][0] for i in row) <= 100 and sum(size[i][1] for i in row) <= 16
    assert len(rows) < 500 * 0.6  # it does pack


def test_the_buffer_keeps_its_bound():
    """Nothing fits together (each 6 of 10 tokens): with a buffer of 2 rows, a row is closed as soon as a third
    opens, the one with the most tiles first; at most 2 rows are ever open."""
    items = [("a", 6, 1), ("b", 6, 3), ("c", 6, 2), ("d", 6, 0)]
    rows = pack(items, max_tokens=10, max_tiles=10, max_buffer_size=2)
    assert next(rows) == ["b"]  # after c opened the third row: b has the most tiles
    assert next(rows) == ["c"]  # after d
    assert list(rows) == [["a"], ["d"]]  # the end of the epoch flushes the rest


def test_over_budget_sample_is_refused_with_its_place_or_alone():
    items = [(0, 5, 1), (1, 30, 1), (2, 5, 1)]
    with pytest.raises(DataError, match=r"train.jsonl:2: the sample needs 30 tokens and 1 tiles"):
        list(pack(items, max_tokens=10, max_tiles=4, max_buffer_size=4, where=lambda i: f"train.jsonl:{i + 1}"))
    rows = list(pack(items, max_tokens=10, max_tiles=4, max_buffer_size=4, oversize="alone"))
    assert rows == [[1], [0, 2]]
    rows = list(pack([(0, 5, 9)], max_tokens=10, max_tiles=4, max_buffer_size=4, oversize="alone"))
    assert rows == [[0]]  # too many tiles: alone too


def _sampler(rank=0, replicas=1, rows_per_batch=2, seed=3):
    rng = random.Random(1)
    lengths = [(rng.randint(10, 60), rng.randint(0, 6)) for _ in range(40)] + [None]  # a skipped record
    settings = PackingSettings(max_packed_tokens=100, num_images_expected=12, max_buffer_size=4)
    return PackedBatchSampler(lengths, rows_per_batch, settings, seed=seed, rank=rank, num_replicas=replicas)


def test_two_ranks_take_the_rows_of_one_rank_with_twice_the_batches():
    one = _sampler(rows_per_batch=1)
    ranks = [_sampler(rank=r, replicas=2, rows_per_batch=1) for r in (0, 1)]
    plan = one.rows(0)
    assert all(i != 40 for row in plan for i in row)  # the skipped record is not planned
    assert sorted(i for row in plan for i in row) == list(range(40))
    for b in range(ranks[0].batches_in_epoch(0)):
        for r in (0, 1):
            assert ranks[r].micro_batch(0, b) == plan[2 * b + r : 2 * b + r + 1]
    # The next epoch is another permutation, so other rows; its indices carry the epoch offset.
    assert one.rows(1) != plan and min(i for row in one.rows(1) for i in row) >= 41


def test_sampler_resumes_at_any_micro_batch_without_replaying():
    stream = iter(_sampler())
    expected = [next(stream) for _ in range(12)]  # crosses into epoch 1
    resumed = _sampler()
    resumed.load_state_dict(_sampler_state_after(7))
    it = iter(resumed)
    assert [next(it) for _ in range(5)] == expected[7:]


def _sampler_state_after(micro_batches: int) -> dict:
    probe = _sampler()
    epoch = 0
    while micro_batches >= probe.batches_in_epoch(epoch):
        micro_batches -= probe.batches_in_epoch(epoch)
        epoch += 1
    return {"epoch": epoch, "batch": micro_batches}


def _sample(ids, labels, tiles=0):
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.arange(len(ids)),
        "pixel_values": torch.full((tiles, 3, 2, 2), float(ids[0])) if tiles else None,
        "num_image_tokens": 0,
        "num_text_tokens": len(ids),
        "truncated": False,
        "where": "x",
    }


def test_pack_collate_example():
    x = IGNORE_INDEX
    samples = [
        {**_sample([5, 6, 7], [x, 6, 7], tiles=1), "row": 0},
        {**_sample([1, 2, 3, 4], [x, x, 3, 4]), "row": 1},
        {**_sample([5, 8], [5, 8], tiles=2), "row": 0},  # a first label that is not ignored: it is dropped
    ]
    batch = pack_collate(samples, pad_token_id=9, dummy_tile=torch.zeros(3, 2, 2), max_packed_tokens=5)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 5, 8], [1, 2, 3, 4, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["attention_groups"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert batch["sample_ids"].tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]
    assert batch["labels"].tolist() == [[x, 6, 7, x, 8], [x, x, 3, 4, x]]
    assert batch["num_labels"].tolist() == [2, 1, 2]
    # Tiles in row order: row 0's samples (1 + 2 tiles), then row 1 (none).
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [5.0, 5.0, 5.0] and batch["image_flags"].all()
    assert batch["num_pad_tokens"] == 1


def test_pack_collate_refuses_a_row_over_budget():
    samples = [{**_sample([1, 2, 3], [-100, 2, 3]), "row": 0}, {**_sample([1, 2, 3], [-100, 2, 3]), "row": 0}]
    with pytest.raises(DataError, match="longer than their cached lengths"):
        pack_collate(samples, pad_token_id=0, dummy_tile=torch.zeros(3, 2, 2), max_packed_tokens=5)


def test_loss_weights_by_hand():
    n = torch.tensor([2, 4, 0])
    assert token_weights(n, "token").tolist() == [1.0, 1.0, 0.0]
    assert token_weights(n, "sample").tolist() == [0.5, 0.25, 0.0]
    assert token_weights(n, "square").tolist() == pytest.approx([2**-0.5, 0.5, 0.0])
    assert weight_total([2, 4, 0], "token") == 6 and weight_total([2, 4, 0], "sample") == 2
    assert weight_total([2, 4, 0], "square") == pytest.approx(2**0.5 + 2)
    # The module docstring's example: NLL sums 1 over 2 tokens, 4 over 4 tokens.
    nll = torch.tensor([1.0, 4.0])
    for reduction, expected in (("token", 0.8333333), ("sample", 0.75), ("square", 0.7928932)):
        w = token_weights(n[:2], reduction)
        assert float((w * nll).sum() / weight_total([2, 4], reduction)) == pytest.approx(expected, abs=1e-6)


def test_length_grouped_batches_hold_similar_lengths_and_every_sample_once():
    from internvl_tune.data.sampler import LengthGroupedBatchSampler, ResumableBatchSampler

    rng = random.Random(2)
    lengths = [(rng.randint(10, 1000), 0) for _ in range(203)]
    grouped = LengthGroupedBatchSampler(lengths, 4, seed=1, group_size=8)
    plain = ResumableBatchSampler(203, 4, seed=1)
    stream, plain_stream = iter(grouped), iter(plain)
    batches = [next(stream) for _ in range(grouped.batches_per_epoch)]
    plain_batches = [next(plain_stream) for _ in range(plain.batches_per_epoch)]
    # The same samples as the ungrouped epoch (the last partial batch's 3 are left out of both).
    assert sorted(i for b in batches for i in b) == sorted(i for b in plain_batches for i in b)

    def waste(bs):
        return sum(max(lengths[i][0] for i in b) * len(b) - sum(lengths[i][0] for i in b) for b in bs)

    assert waste(batches) < 0.3 * waste(plain_batches)
    # The batch order is shuffled: lengths do not fall through the epoch.
    firsts = [max(lengths[i][0] for i in b) for b in batches]
    assert firsts != sorted(firsts, reverse=True)


def _reference_pack(items, *, max_tokens, max_tiles, max_buffer_size):
    """The packer as the module docstring states it, re-sorting the open rows after every sample (the planner keeps
    them sorted by moving the one row that changed)."""
    open_rows = []  # [ids, tokens, tiles]
    for index, tokens, tiles in items:
        if tokens > max_tokens or tiles > max_tiles:
            yield [index]
            continue
        row = next((r for r in open_rows if r[1] + tokens <= max_tokens and r[2] + tiles <= max_tiles), None)
        if row is None:
            row = [[], 0, 0]
            open_rows.append(row)
        row[0].append(index)
        row[1] += tokens
        row[2] += tiles
        if row[1] == max_tokens or row[2] == max_tiles:
            open_rows.remove(row)
            yield row[0]
        open_rows.sort(key=lambda r: -r[2])
        while len(open_rows) > max_buffer_size:
            yield open_rows.pop(0)[0]
    for row in open_rows:
        yield row[0]


def test_the_planner_packs_as_the_resorting_reference():
    """300 random epochs (budgets, buffer sizes, text samples with 0 tiles, samples over budget alone): the rows and
    their order equal the reference's."""
    for trial in range(300):
        rng = random.Random(trial)
        max_tokens, max_tiles = rng.choice([10, 50, 200]), rng.choice([1, 4, 12])
        items = [
            (i, rng.randint(0, max_tokens + 5), rng.randint(0, max_tiles) if rng.random() < 0.7 else 0)
            for i in range(rng.randint(1, 300))
        ]
        budgets = dict(max_tokens=max_tokens, max_tiles=max_tiles, max_buffer_size=rng.choice([1, 2, 5, 20]))
        assert list(pack(items, oversize="alone", **budgets)) == list(_reference_pack(items, **budgets)), trial


def test_length_grouped_order_equals_the_per_mega_batch_sort():
    """The vectorised epoch order (one stable sort by mega-batch, then length) == sorting each mega-batch on its own,
    cutting global batches and shuffling the full ones (the sampler's docstring), for sizes with and without a
    partial last batch and a skipped record."""
    from internvl_tune.data.sampler import LengthGroupedBatchSampler, ResumableBatchSampler

    for num, batch, replicas, group in [(50, 2, 2, 3), (64, 4, 1, 2), (7, 3, 2, 64)]:
        rng = random.Random(num)
        lengths = [(rng.randint(1, 20), 0) for _ in range(num)]
        lengths[3] = None
        kwargs = dict(seed=5, num_replicas=replicas)
        sampler = LengthGroupedBatchSampler(lengths, batch, group_size=group, **kwargs)
        usable = [i for i, n in enumerate(lengths) if n is not None]
        order = ResumableBatchSampler(num, batch, usable=usable, **kwargs)._permutation(1).tolist()
        size = batch * replicas
        blocks = []
        for start in range(0, len(order), size * group):
            mega = sorted(order[start : start + size * group], key=lambda i: -lengths[i][0])
            blocks += [mega[b : b + size] for b in range(0, len(mega), size)]
        partial = [blocks.pop()] if len(blocks[-1]) < size else []
        shuffle = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(5 + 1 + 1_000_003)).tolist()
        expected = [i for block in [blocks[j] for j in shuffle] + partial for i in block]
        assert sampler._permutation(1).tolist() == expected


def test_rows_counted_in_a_pool_equal_the_planned_rows():
    """`count_rows` in 2 workers gives each epoch's row count as planning it here does, and a sampler given them
    counts its micro-batches without planning (its plan cache stays empty)."""
    from internvl_tune.data.packing import count_rows

    rng = random.Random(0)
    lengths = [(rng.randint(1, 60), rng.randint(0, 4)) for _ in range(300)]
    settings = PackingSettings(max_packed_tokens=100, num_images_expected=6, max_buffer_size=4)
    sampler = PackedBatchSampler(lengths, 2, settings, seed=1)
    counted = count_rows(sampler.lengths, settings, 1, True, [0, 1, 2, 3], workers=2)
    assert counted == {e: len(sampler.rows(e)) for e in range(4)}
    fresh = PackedBatchSampler(lengths, 2, settings, seed=1)
    fresh.set_num_rows(counted)
    assert [fresh.batches_in_epoch(e) for e in range(4)] == [-(-counted[e] // 2) for e in range(4)]
    assert not fresh._plans
