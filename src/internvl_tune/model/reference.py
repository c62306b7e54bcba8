"""The reference model of preference training, three ways (design decision 6).

- `copy`: a frozen copy of the starting model, in eval mode (no dropout / DropPath, as the original reference).
- `lora_disabled`: the policy itself with its LoRA adapters switched off (exactly the starting model, no copy).
- `precomputed`: summed log-probs of every pair computed once (`internvl-tune precompute-ref`) into a cache; training
  then holds one model. The cache records the data settings and a fingerprint of the reference weights, and keys
  each pair by its record and the bytes of its images or video (`pair_keys`). Training checks every pair of its data
  against the cache before the first step and refuses a stale or incomplete cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from internvl_tune.atomic import atomic_write_bytes
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.errors import DataError
from internvl_tune.data.preference import pair_media_paths, record_key
from internvl_tune.digests import StampedDigests, file_stamp, hash_files
from internvl_tune.model.forward import InternVLTrainingForward, idle_inputs
from internvl_tune.model.logprobs import pair_logps

CACHE_VERSION = 2
# Pairs named in a refusal; the count says how many there are in all.
_LISTED = 3


class LiveReference:
    """Reference log-probs from a model run under no_grad in eval mode: a frozen copy, or the LoRA-disabled policy.

    `forward` is what is called: by default a plain `InternVLTrainingForward(model)`; under FSDP2 or ZeRO-3 the one
    the engine sharded (training/engine.py `prepare_reference`), which every rank must call together (`idle`).
    """

    def __init__(self, model: nn.Module, *, disable_lora_of: nn.Module | None = None, forward: nn.Module | None = None):
        self.model = model
        self.forward = forward if forward is not None else InternVLTrainingForward(model)
        self.disable_lora_of = disable_lora_of

    @contextlib.contextmanager
    def _evaluating(self):
        was_training = self.model.training
        self.model.eval()  # the reference never drops paths or dropout, also when it is the policy itself
        context = (
            self.disable_lora_of.disable_adapter() if self.disable_lora_of is not None else contextlib.nullcontext()
        )
        try:
            with context:
                yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor]:
        with self._evaluating():
            out = pair_logps(self.forward, batch, device)
        return out["chosen_logps"], out["rejected_logps"]

    @torch.no_grad()
    def idle(self, pad_token_id: int, dummy_tile: torch.Tensor, device) -> None:
        """A forward on one padding token, for a rank with no pair in a micro-batch: a sharded reference gathers its
        parameters collectively, so every rank must run each of its forwards."""
        with self._evaluating():
            self.forward(**idle_inputs(pad_token_id, dummy_tile, device))


def frozen_copy(model: nn.Module) -> nn.Module:
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MediaDigests:
    """Content digests of media files: SHA-256 of the bytes (never decoded), read again only when needed.

    A file whose stamp (size, mtime and ctime: `internvl_tune.digests`) matches a digest recorded with the cache
    (`known`) keeps that digest without being read; any other file is read and hashed. ctime cannot be set back by
    tools that preserve mtime (`cp -p`, `rsync -t`, `touch -r`), so a file replaced under the same name is always
    re-read. A copied or moved dataset is re-read once (its ctimes differ) and still matches. A file that cannot be
    read digests as "missing", as its pair is skipped or refused when it is built. What each way costs on 10k images:
    docs/losses.md.
    """

    def __init__(self, known: dict[str, list] | None = None):
        self._digests = StampedDigests(known)
        self.stamps = self._digests.stamps  # path -> [size, mtime_ns, ctime_ns, digest] of every file seen this run

    def __call__(self, path: str) -> str:
        """The digest of a file, or of a folder of video frames (each file's name and digest, in name order)."""
        if os.path.isdir(path):
            digest = hashlib.sha256()
            for name in sorted(os.listdir(path)):
                child = os.path.join(path, name)
                if os.path.isfile(child):
                    digest.update(f"{name}\0{self._file(child)}\0".encode())
            return digest.hexdigest()[:32]
        return self._file(path)

    def _file(self, path: str) -> str:
        if path in self.stamps:  # one image is often shared by several pairs
            return self.stamps[path][-1]
        try:
            return self._digests(path, file_stamp(path), lambda: hash_files([path])[:32])
        except OSError:
            return "missing"


def pair_keys(
    dataset: RecordDataset, digests: MediaDigests, indices: list[int] | None = None, *, progress: bool = True
) -> list[tuple[str, str, str]]:
    """(record key, pair key, file:line) of each pair: the record key is what batches carry (`record_key`), the pair
    key adds the digests of the pair's media, so it changes when an image changes under the same name.

    Reads records and stats (or hashes, see `MediaDigests`) media files; decodes nothing. A progress bar shows from
    1000 pairs on.
    """
    indices = range(len(dataset)) if indices is None else indices
    keys = []
    for i in tqdm(indices, desc="reference cache keys", unit="pair", disable=not progress or len(indices) < 1000):
        d, line = dataset.index[i]
        try:
            record, where, entry = dataset.record(i)
        except DataError:  # an unreadable line is skipped or refused when it is built; key it by its place
            where = dataset.files[d].where(line)
            keys.append((where, where, where))
            continue
        key = record_key(record, entry.name)
        media = [digests(path) for path in pair_media_paths(record, where, entry)]
        pair = hashlib.sha256(json.dumps([key, media]).encode()).hexdigest()[:32]
        keys.append((key, pair, where))
    return keys


class ReferenceCache:
    """Precomputed reference log-probs, `{pair key: (chosen_logps, rejected_logps)}`, and what they depend on.

    Pairs skipped as bad when the cache was computed are in it with NaN log-probs, so the cache covers the whole
    data; training skips them too. `media` holds the stamps and digests of the media files (`MediaDigests`), so
    that the check at start-up reads only files that changed.
    """

    def __init__(
        self,
        fingerprint: str,
        settings: dict[str, Any],
        logps: dict[str, tuple[float, float]],
        *,
        record_keys: dict[str, str] | None = None,
        media: dict[str, list] | None = None,
    ):
        self.fingerprint = fingerprint
        self.settings = settings
        self.logps = logps
        self.record_keys = record_keys or {}  # pair key -> record key, to tell a changed image from a new record
        self.media = media or {}
        self.by_record: dict[str, tuple[float, float]] | None = None  # set by `check`
        self.path: Path | str = "reference cache"  # the file, once loaded, for messages

    def save(self, path: str | Path) -> None:
        """Write the cache atomically (temporary name, then rename): a crash leaves the old cache or the new one."""
        keys = sorted(self.logps)
        buffer = io.BytesIO()
        torch.save(
            {
                "version": CACHE_VERSION,
                "fingerprint": self.fingerprint,
                "settings": json.dumps(self.settings, sort_keys=True),
                "keys": keys,
                "record_keys": [self.record_keys.get(k, "") for k in keys],
                "logps": torch.tensor([self.logps[k] for k in keys], dtype=torch.float64).reshape(-1, 2),
                "media": self.media,
            },
            buffer,
        )
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str, settings: dict[str, Any]) -> ReferenceCache:
        """Load a cache; one computed for other weights or data settings is refused with the reason (`DataError`)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no reference cache; run `internvl-tune precompute-ref` with this config first")
        raw = torch.load(path, weights_only=True)
        if raw.get("version") != CACHE_VERSION:
            raise DataError(f"{path}: cache version {raw.get('version')} is not {CACHE_VERSION}; recompute it")
        if raw["fingerprint"] != fingerprint:
            raise DataError(
                f"{path}: stale cache: computed for other reference weights; recompute it", "stale reference cache"
            )
        cached_settings = json.loads(raw["settings"])
        if cached_settings != settings:
            changed = sorted(
                k for k in settings.keys() | cached_settings.keys() if settings.get(k) != cached_settings.get(k)
            )
            raise DataError(
                f"{path}: stale cache: data settings changed ({', '.join(changed)}); recompute it",
                "stale reference cache",
            )
        logps = {k: (float(c), float(r)) for k, (c, r) in zip(raw["keys"], raw["logps"].tolist(), strict=True)}
        record_keys = dict(zip(raw["keys"], raw["record_keys"], strict=True))
        cache = cls(fingerprint, settings, logps, record_keys=record_keys, media=raw["media"])
        cache.path = path
        return cache

    def check(self, dataset: RecordDataset, *, progress: bool = True) -> None:
        """Check every pair of `dataset` against the cache, before training; afterwards batches are looked up by
        their record keys.

        Raises:
            DataError: in one line, when any pair is not in the cache (a new or edited record, or an image or video
                whose content changed since `precompute-ref`): how many, and the first few by file:line.
        """
        keys = pair_keys(dataset, MediaDigests(self.media), progress=progress)
        missing = [(key, where) for key, pair, where in keys if pair not in self.logps]
        if missing:
            cached_records = set(self.record_keys.values())
            listed = ", ".join(
                f"{where} ({'image or video content changed' if key in cached_records else 'not in the cache'})"
                for key, where in missing[:_LISTED]
            )
            more = f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
            raise DataError(
                f"{self.path}: stale reference cache: {len(missing)} of {len(keys)} pairs do not match it: {listed}{more}; "
                "recompute it with `internvl-tune precompute-ref`",
                "stale reference cache",
            )
        self.by_record = {key: self.logps[pair] for key, pair, _ in keys}

    def idle(self, pad_token_id: int, dummy_tile: torch.Tensor, device) -> None:
        """Nothing to run: cached log-probs involve no other rank."""

    def __call__(self, batch: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.by_record is not None, "ReferenceCache.check(dataset) must run before training"
        values = [self.by_record[k] for k in batch["keys"]]
        if any(math.isnan(c) for c, _ in values):
            # Only a pair that failed to build when the cache was computed has NaN; it fails the same way now.
            raise DataError(
                "a pair skipped as bad when the reference cache was computed builds now; recompute it",
                "stale reference cache",
            )
        values = torch.tensor(values, dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]
