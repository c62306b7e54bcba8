import pytest
import torch

from internvl_tune.data.collate import pad_collate
from internvl_tune.data.errors import DataError
from internvl_tune.data.sampler import ResumableBatchSampler


def _sample(ids, labels, tiles=None):
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.arange(len(ids)),
        "pixel_values": tiles,
        "num_image_tokens": 0,
        "num_text_tokens": len(ids),
        "truncated": False,
        "where": "x:1",
    }


def test_pad_collate_rows_spelled_out():
    dummy = torch.zeros(3, 4, 4)
    # Token id 0 is a real token ("!" in Qwen2-style vocabularies): it must not be treated as padding.
    batch = pad_collate(
        [_sample([5, 0, 7], [-100, 0, 7]), _sample([5, 8], [-100, 8])], pad_token_id=9, dummy_tile=dummy
    )
    assert batch["input_ids"].tolist() == [[5, 0, 7], [5, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 0, 7], [-100, 8, -100]]
    assert batch["num_pad_tokens"] == 1 and batch["num_samples"] == 2
    # No tiles in the batch: one dummy tile whose features are dropped.
    assert batch["pixel_values"].shape == (1, 3, 4, 4) and batch["image_flags"].tolist() == [False]


def test_pad_collate_concatenates_tiles_and_drops_skipped():
    tiles_a, tiles_b = torch.ones(2, 3, 4, 4), torch.full((1, 3, 4, 4), 2.0)
    skipped = {"skipped": "x:3: bad", "where": "x:3"}
    batch = pad_collate(
        [_sample([1], [1], tiles_a), skipped, _sample([2], [2], tiles_b)],
        pad_token_id=0,
        dummy_tile=torch.zeros(3, 4, 4),
    )
    assert batch["skipped"] == [("x:3", "x:3: bad")] and batch["num_samples"] == 2
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0]
    assert batch["image_flags"].tolist() == [True, True, True]
    assert pad_collate([skipped], pad_token_id=0, dummy_tile=tiles_b[0])["num_samples"] == 0


def test_sampler_shards_global_batches_and_keeps_the_tail():
    ranks = [list(ResumableBatchSampler(10, 2, shuffle=False, rank=r, num_replicas=2)._permutation(0)) for r in (0, 1)]
    assert ranks[0] == list(range(10))
    batches = []
    for rank in (0, 1):
        it = iter(ResumableBatchSampler(10, 2, shuffle=False, rank=rank, num_replicas=2))
        batches.append([next(it) for _ in range(4)])
    # The last global batch [8, 9] is partial: rank 1 gets an empty micro-batch; epoch 1 starts at index 10.
    assert batches[0] == [[0, 1], [4, 5], [8, 9], [10, 11]]
    assert batches[1] == [[2, 3], [6, 7], [], [12, 13]]


def test_sampler_epochs_hold_the_usable_samples_only():
    sampler = ResumableBatchSampler(10, 3, seed=1, usable=[1, 4, 5, 8])
    it = iter(sampler)
    epochs = [[next(it) for _ in range(sampler.batches_per_epoch)] for _ in range(2)]
    assert sampler.batches_per_epoch == 2 and [len(b) for b in epochs[0]] == [3, 1]
    assert sorted(i for b in epochs[0] for i in b) == [1, 4, 5, 8]
    assert sorted(i for b in epochs[1] for i in b) == [11, 14, 15, 18]
    with pytest.raises(DataError, match="all 10 records were skipped"):
        ResumableBatchSampler(10, 3, usable=[])


def test_sampler_resume_continues_exactly():
    sampler = ResumableBatchSampler(7, 2, seed=3)
    it = iter(sampler)
    stream = [next(it) for _ in range(8)]
    resumed = ResumableBatchSampler(7, 2, seed=3)
    resumed.load_state_dict({"epoch": 1, "batch": 1})  # 4 batches per epoch (the last of 1): position 5
    it = iter(resumed)
    assert [next(it) for _ in range(3)] == stream[5:8]
    assert sorted(i % 7 for b in stream[:3] for i in b) == sorted(set(i % 7 for b in stream[:3] for i in b))
