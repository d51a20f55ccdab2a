"""Evaluation entry points (retrieval now; caption metrics and VQA accuracy come with stage 2)."""
