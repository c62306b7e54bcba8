"""`internvl-tune precompute-ref`: the reference log-probs of every pair of an MPO run's data, computed once.

Training with `mpo.reference=precomputed` then holds one model; it checks every pair against the cache, images'
and videos' bytes included, before the first step (`ReferenceCache.check`).

Launch: `internvl-tune precompute-ref --config configs/mpo/FILE.yaml [key=value ...]` (or under `accelerate launch`).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from internvl_tune.checkpoints.read import weights_fingerprint
from internvl_tune.config import ConfigError, MPOConfig
from internvl_tune.data.collate import pair_collate
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.images import blank_tile
from internvl_tune.data.preference import PairBuilder
from internvl_tune.data.transform import SampleBuilder
from internvl_tune.model.load import load_model
from internvl_tune.model.prepare import check_template, sample_settings
from internvl_tune.model.reference import LiveReference, MediaDigests, ReferenceCache, frozen_copy, pair_keys
from internvl_tune.recipes.mpo import cache_settings, reference_cache_path
from internvl_tune.training.engine import prepare_reference
from internvl_tune.training.session import run_session

logger = logging.getLogger(__name__)


def precompute_reference(config: MPOConfig) -> Path:
    """Write the reference log-probs of every pair of the run's data to the reference cache, once."""
    with run_session(config.train) as accelerator:
        return _precompute_reference(config, accelerator)


@torch.no_grad()
def _precompute_reference(config: MPOConfig, accelerator: Accelerator) -> Path:
    model_args, data_args, train_args = config.model, config.data, config.train
    check_template(data_args, model_args.model_name_or_path)
    if data_args.v2pe == "random":
        # Each epoch would draw other strides, so one log-prob per pair would not be the reference's.
        raise ConfigError("precomputed reference log-probs need data.v2pe off or fixed; random draws strides per epoch")
    model, tokenizer = load_model(model_args.model_name_or_path, attn_implementation=model_args.attn_implementation)
    settings = sample_settings(data_args, model.config)
    random_frames = data_args.video_sample == "rand" or data_args.min_num_frame != data_args.max_num_frame
    dataset = RecordDataset(
        data_args.meta_path,
        PairBuilder(SampleBuilder(tokenizer, settings)),
        seed=train_args.seed,
        on_bad_sample=data_args.on_bad_sample,
        require_data_augment=False,
    )
    augmented = [e.name for e in dataset.entries if e.data_augment]
    if augmented:
        raise ConfigError(f"precomputed reference log-probs need data_augment false; it is on for {augmented}")
    model = frozen_copy(model)
    reference = LiveReference(model, forward=prepare_reference(accelerator, model))  # sharded under FSDP2 / ZeRO-3
    dummy_tile = blank_tile(settings.image_size, settings.normalize_type)
    collate = partial(
        pair_collate,
        pad_token_id=tokenizer.pad_token_id,
        dummy_tile=dummy_tile,
        mode="shared",
    )
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    digests = MediaDigests()  # every media file read and hashed: the keys must see the bytes the model sees
    keys = pair_keys(dataset, digests, indices, progress=accelerator.is_main_process)
    pair_of = {key: pair for key, pair, _ in keys}
    batch_size = train_args.per_device_train_batch_size
    # A pair skipped as bad keeps NaN, so the cache covers every pair of the data and training can check that.
    logps: dict[str, tuple[float, float]] = {pair: (math.nan, math.nan) for _, pair, _ in keys}
    # Every rank runs as many forwards as the rank with most pairs (one padding forward for each it lacks): a
    # sharded reference gathers its parameters collectively.
    num_chunks = math.ceil(len(indices) / batch_size)
    if accelerator.num_processes > 1:
        most = torch.tensor(num_chunks, device=accelerator.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        num_chunks = int(most.item())
    for start in tqdm(
        range(0, num_chunks * batch_size, batch_size), desc="reference", disable=not accelerator.is_main_process
    ):
        chunk = indices[start : start + batch_size]
        if not chunk:
            reference.idle(tokenizer.pad_token_id, dummy_tile, accelerator.device)
            continue
        if random_frames and any("video" in dataset.record(i)[0] for i in chunk):
            raise ConfigError(
                "precomputed reference log-probs need the frames training will see: set data.video_sample=middle "
                "and min_num_frame == max_num_frame for video pairs"
            )
        batch = collate([dataset[i] for i in chunk])
        if not batch["num_pairs"]:
            reference.idle(tokenizer.pad_token_id, dummy_tile, accelerator.device)
            continue
        chosen, rejected = reference(batch, accelerator.device)
        pairs = [pair_of[key] for key in batch["keys"]]
        logps.update(zip(pairs, zip(chosen.tolist(), rejected.tolist(), strict=True), strict=True))
    gathered: dict[str, tuple[float, float]] = {}
    record_keys: dict[str, str] = {}
    media: dict[str, list] = {}
    for part_logps, part_keys, part_media in gather_object([(logps, keys, digests.stamps)]):
        gathered.update(part_logps)
        record_keys.update((pair, key) for key, pair, _ in part_keys)
        media.update(part_media)
    path = reference_cache_path(config)
    if accelerator.is_main_process:
        ReferenceCache(
            weights_fingerprint(model_args.model_name_or_path),
            cache_settings(settings),
            gathered,
            record_keys=record_keys,
            media=media,
        ).save(path)
        logger.info("wrote reference log-probs of %d pairs to %s", len(gathered), path)
    return path
