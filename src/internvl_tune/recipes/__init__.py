"""The training loops, each whole and top to bottom: `sft.train(config)`, `mpo.train(config)`, and
`precompute_ref.precompute_reference(config)` for MPO with a precomputed reference."""

__all__ = ["sft", "mpo", "precompute_ref"]
