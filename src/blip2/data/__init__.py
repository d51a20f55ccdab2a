"""Datasets (Karpathy JSON, JSONL), the frozen-feature cache, procedural scenes and batching."""
