"""Task-level inference on top of `Blip2.generate`: captioning, zero-shot VQA, closed-set answers.

Prompt templates are the paper's; decoding defaults are the paper's (captions: beam 5, 8-30 new
tokens; VQA: beam 5, at most 10 new tokens, length penalty -1 to favour short answers).
"""

from __future__ import annotations

import torch

from blip2.config import DecodeConfig
from blip2.llm import FrozenLM

VQA_TEMPLATES = {"decoder": "Question: {} Answer:", "encoder-decoder": "Question: {} Short answer:"}
CAPTION_DECODE = DecodeConfig(num_beams=5, max_new_tokens=30, min_new_tokens=8)
VQA_DECODE = DecodeConfig(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


def default_vqa_template(lm: FrozenLM) -> str:
    return VQA_TEMPLATES["encoder-decoder" if lm.is_encoder_decoder else "decoder"]


def vqa_prompt(lm: FrozenLM, question: str, template: str = "") -> str:
    return (template or default_vqa_template(lm)).format(question.strip())


@torch.no_grad()
def rank_options(model, image_feats: torch.Tensor, prompts: list[str], options: list[str]) -> torch.Tensor:
    """Closed-set answering: (B, O) log-likelihood of every option after each image's prompt.

    Scores are summed token log-probabilities of the option (+ eos) under the LLM, the same
    quantity stage 2 trains, so yes/no and multiple choice need no generation.
    """
    assert model.llm is not None, "this is a stage-1 model (no LLM)"
    return option_logprobs(model, model.soft_prompt(image_feats), prompts, options)


@torch.no_grad()
def option_logprobs(model, soft: torch.Tensor, prompts: list[str], options: list[str]) -> torch.Tensor:
    """(B, O) log-likelihood of every option after a given soft prompt (B, Q, H) and prompt.

    `rank_options` for soft prompts that come from no single image (e.g. calibration baselines).
    """
    lm, cfg = model.llm, model.cfg.llm
    prefix = lm.prefix(soft, lm.encode_prompts(prompts))  # each image and prompt once, for every option
    every = torch.arange(soft.shape[0], device=soft.device)
    scores = torch.empty(soft.shape[0], len(options))
    for j, option in enumerate(options):
        t_ids = lm.encode_targets(prompts, [option] * len(prompts), cfg.max_text_len)
        scores[:, j] = lm.continuation_logprob(prefix, every, t_ids).cpu()
    return scores


def chat_prompt(lm: FrozenLM, history: list[tuple[str, str]], question: str) -> str:
    """The LLM prompt for the next turn of a visual chat (the image is the soft prompt before it).

    Uses the tokenizer's chat template when it has one; otherwise the VQA template, turn after turn.
    """
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{vqa_prompt(lm, q)} {a}" for q, a in history]
    return " ".join([*turns, vqa_prompt(lm, question)])


def load_pixels(model, paths: list[str]) -> torch.Tensor:
    """Image files -> (B, 3, S, S) pixels with the encoder's eval preprocessing."""
    from blip2.vision.transforms import eval_transform, load_rgb

    if model.vision is None:
        raise RuntimeError("this model was built without its vision encoder")
    return torch.stack([eval_transform(load_rgb(p), model.vision.preprocess) for p in paths])


def image_features(model, paths: list[str]) -> torch.Tensor | list[torch.Tensor]:
    """Image files -> (B, N, C) frozen features with the encoder's eval preprocessing; for a
    Blip2Ensemble one such tensor per member, each through its own encoder and preprocessing."""
    from blip2.model import Blip2Ensemble

    if isinstance(model, Blip2Ensemble):
        return [image_features(m, paths) for m in model.members]  # type: ignore[misc]
    pixels = load_pixels(model, paths)
    with torch.no_grad():
        return model.image_features(pixels)
