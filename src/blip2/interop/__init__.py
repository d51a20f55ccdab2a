"""Checkpoint formats of other BLIP-2 implementations (transformers, LAVIS) and conversion to ours."""
