"""Parity with transformers' own BLIP-2 classes on tiny random checkpoints (fp32), in both directions."""

from __future__ import annotations

import shutil

import pytest
import torch

from blip2.config import DecodeConfig
from blip2.generate import generate_ids
from blip2.interop.hf import hf_key, is_hf_dir, save_hf
from blip2.model import Blip2
from conftest import tiny_llama, tiny_lm_tokenizer, tiny_opt, tiny_t5

Q = 4  # query tokens
IMAGE_ID = 30  # the <image> placeholder: the tiny tokenizer has 30 tokens, its LMs 32 embedding rows


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every weight (LayerNorms included) a distinct random value so no map error can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))


def _hf_configs(text_config, retrieval: bool, cross_freq: int = 2):
    import transformers as tf

    vision = tf.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=16, layer_norm_eps=1e-6)
    qformer = tf.Blip2QFormerConfig(vocab_size=30523, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=64, cross_attention_frequency=cross_freq,
                                    use_qformer_text_input=retrieval, max_position_embeddings=64)
    return tf.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                          text_config=text_config.to_dict(), num_query_tokens=Q, image_text_hidden_size=16,
                          image_token_index=None if retrieval else IMAGE_ID)


LMS = {"opt": tiny_opt, "llama": tiny_llama, "t5": tiny_t5}


def make_generation_dir(path, lm: str, seed: int = 0, cross_freq: int = 2):
    """A Blip2ForConditionalGeneration checkpoint + LM tokenizer (with <image>) saved by transformers."""
    import transformers as tf

    text_cfg = LMS[lm]().config
    model = tf.Blip2ForConditionalGeneration(_hf_configs(text_cfg, False, cross_freq)).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    tok = tiny_lm_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    tok.save_pretrained(path)
    return model


def make_retrieval_dir(path, seed: int = 0):
    import transformers as tf

    from blip2.text import load_tokenizer

    model = tf.Blip2ForImageTextRetrieval(_hf_configs(tiny_opt().config, True)).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    load_tokenizer("packaged", 30523).save_pretrained(path)
    return model


def _pixels(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _hf_ids(prompts: list[list[int]], targets: list[list[int]] | None = None) -> torch.Tensor:
    rows = [[IMAGE_ID] * Q + p + (targets[i] if targets else []) for i, p in enumerate(prompts)]
    assert len({len(r) for r in rows}) == 1
    return torch.tensor(rows)


@pytest.mark.parametrize("lm", ["opt", "llama", "t5"])
def test_generation_checkpoint_logits_match_transformers(tmp_path, lm):
    hf = make_generation_dir(tmp_path, lm)
    assert is_hf_dir(tmp_path)
    ours = Blip2.from_dir(tmp_path)
    assert not ours.cfg.qformer.text_branch and ours.llm is not None
    pixels = _pixels()
    with torch.no_grad():
        soft = ours.soft_prompt(ours.image_features(pixels))  # (B, Q, H)
        ref = hf.get_image_features(pixel_values=pixels).pooler_output
        assert torch.allclose(soft, ref, atol=1e-5, rtol=0), (soft - ref).abs().max()
        prompts, targets = [[3, 4], [5, 6], [7, 8]], [[9, 10, 11], [12, 13, 4], [5, 5, 6]]
        x = ours.llm.layout(soft, prompts, targets)
        if ours.llm.is_encoder_decoder:
            mine = ours.llm.model(inputs_embeds=x.embeds, attention_mask=x.mask, decoder_input_ids=x.decoder_ids).logits
            theirs = hf(pixel_values=pixels, input_ids=_hf_ids(prompts), decoder_input_ids=x.decoder_ids).logits
        else:
            mine = ours.llm.model(inputs_embeds=x.embeds, attention_mask=x.mask).logits
            theirs = hf(pixel_values=pixels, input_ids=_hf_ids(prompts, [t + [1] for t in targets])).logits
        assert mine.shape == theirs.shape
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=0), (mine - theirs).abs().max()


def _hf_generate(hf, pixels, prompts, cfg: DecodeConfig, lm, **extra) -> list[list[int]]:
    ids = _hf_ids(prompts)
    out = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                      length_penalty=cfg.length_penalty, early_stopping=False, eos_token_id=lm.eos_id,
                      pad_token_id=lm.pad_id, **extra)
    rows = out[:, 1:] if lm.is_encoder_decoder else out[:, ids.shape[1]:]
    # cut at eos only: a random T5 may emit its pad token (= decoder start) as a real token
    return [r[: r.index(lm.eos_id)] if lm.eos_id in r else r for r in rows.tolist()]


@pytest.mark.parametrize("lm", ["opt", "llama", "t5"])
@pytest.mark.parametrize("beams", [1, 4])
def test_generation_tokens_match_transformers(tmp_path, lm, beams):
    hf = make_generation_dir(tmp_path, lm, seed=3)
    ours = Blip2.from_dir(tmp_path)
    cfg = DecodeConfig(num_beams=beams, max_new_tokens=8, min_new_tokens=2, length_penalty=1.0)
    prompts = [[3, 4], [5, 6], [9, 7]]
    for seed in range(2):
        pixels = _pixels(seed=seed)
        mine = generate_ids(ours.llm, ours.soft_prompt(ours.image_features(pixels)), prompts, cfg)
        assert mine == _hf_generate(hf, pixels, prompts, cfg, ours.llm)
        assert any(mine)


def test_retrieval_checkpoint_itm_and_itc_match_transformers(tmp_path):
    hf = make_retrieval_dir(tmp_path)
    ours = Blip2.from_dir(tmp_path)
    assert ours.llm is None and ours.cfg.qformer.text_branch
    assert sorted(ours.meta["fresh"]) == sorted(k for k in ours.trainable_state_dict() if hf_key(k) is None)
    texts = ["a dog runs on the grass", "two cats", "a man sits on a bench near the water"]
    enc = ours.tokenizer(texts, padding="longest", return_tensors="pt")
    pixels = _pixels()
    with torch.no_grad():
        feats = ours.image_features(pixels)
        ids, mask = ours.tokenize(texts)
        assert torch.equal(ids, enc["input_ids"])
        itm = ours.itm_logits(ours.ln_vision(feats), ids, mask)
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        assert torch.allclose(itm, ref.logits_per_image, atol=1e-5, rtol=0)
        img = ours.encode_image(feats)[1]  # (B, Q, E)
        txt = ours.text_itc_feats(ids, mask)  # (B, E)
        sim = torch.einsum("iqe,te->itq", img, txt).amax(-1)  # (B_img, B_txt)
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        assert torch.allclose(sim, ref.logits_per_image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_export_round_trip_through_transformers(tmp_path, lm):
    import transformers as tf

    hf = make_generation_dir(tmp_path / "a", lm, seed=5, cross_freq=1)
    ours = Blip2.from_dir(tmp_path / "a")
    with torch.no_grad():  # make it ours: change the trainable weights
        ours.llm_proj.weight.mul_(1.5)
        ours.qformer.query_tokens.add_(0.2)
    assert save_hf(ours, tmp_path / "b") == "Blip2ForConditionalGeneration"
    back = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
    again = Blip2.from_dir(tmp_path / "b")
    pixels = _pixels()
    with torch.no_grad():
        soft = ours.soft_prompt(ours.image_features(pixels))
        assert torch.allclose(back.get_image_features(pixel_values=pixels).pooler_output, soft, atol=1e-5, rtol=0)
        assert torch.equal(again.soft_prompt(again.image_features(pixels)), soft)
        assert not torch.allclose(hf.get_image_features(pixel_values=pixels).pooler_output, soft, atol=1e-3)
    cfg = DecodeConfig(num_beams=3, max_new_tokens=6, min_new_tokens=1)
    prompts = [[3, 4], [5, 6], [9, 7]]
    mine = generate_ids(ours.llm, soft, prompts, cfg)
    assert mine == _hf_generate(back, pixels, prompts, cfg, ours.llm)
    assert generate_ids(again.llm, soft, prompts, cfg) == mine


def test_retrieval_export_round_trip(tmp_path):
    import transformers as tf

    make_retrieval_dir(tmp_path / "a", seed=2)
    ours = Blip2.from_dir(tmp_path / "a")
    assert save_hf(ours, tmp_path / "b") == "Blip2ForImageTextRetrieval"
    back = tf.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "b").eval()
    ids, mask = ours.tokenize(["a red square", "two dogs on the grass"])
    pixels = _pixels(2)
    with torch.no_grad():
        itm = ours.itm_logits(ours.ln_vision(ours.image_features(pixels)), ids, mask)
        ref = back(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    assert torch.allclose(itm, ref.logits_per_image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lm", ["opt", "llama", "t5"])
def test_any_encoder_runs_inside_transformers_classes(lm, tokenizer):
    """A non-ViT encoder has no transformers format, but `to_transformers(any_encoder=True)` runs
    transformers' own Q-Former, projection, LM and generate() on its features: same soft prompt,
    same greedy and beam tokens as ours."""
    from blip2.config import Blip2Config, LLMConfig
    from blip2.interop.hf import EncoderAsVisionModel, to_transformers
    from blip2.llm import FrozenLM
    from conftest import TinyEncoder, tiny_qformer

    model = LMS[lm]()
    if lm == "t5":  # transformers 5 always ties T5's embeddings and head: an untied one is refused
        llm = FrozenLM(model, tiny_lm_tokenizer(), LLMConfig())
        ours = Blip2(Blip2Config(qformer=tiny_qformer(num_queries=Q), llm=LLMConfig()), TinyEncoder(), tokenizer, llm)
        with pytest.raises(ValueError, match="shared.weight changes"):
            to_transformers(ours, any_encoder=True)
        with torch.no_grad():
            model.shared.weight.copy_(model.lm_head.weight)
    llm = FrozenLM(model, tiny_lm_tokenizer(), LLMConfig())
    ours = Blip2(Blip2Config(qformer=tiny_qformer(num_queries=Q), llm=LLMConfig()), TinyEncoder(), tokenizer,
                 llm).eval()
    for i, part in enumerate((ours.qformer, ours.ln_vision, ours.llm_proj)):
        _randomise(part, seed=10 + i)
    hf, tok = to_transformers(ours, any_encoder=True)
    assert isinstance(hf.vision_model, EncoderAsVisionModel) and tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    pixels = _pixels()
    with torch.no_grad():
        soft = ours.soft_prompt(ours.image_features(pixels))
        assert torch.allclose(hf.get_image_features(pixel_values=pixels).pooler_output, soft, atol=1e-5, rtol=0)
    prompts = [[3, 4], [5, 6], [9, 7]]
    for beams in (1, 4):
        cfg = DecodeConfig(num_beams=beams, max_new_tokens=6, min_new_tokens=1)
        mine = generate_ids(ours.llm, soft, prompts, cfg)
        assert mine == _hf_generate(hf, pixels, prompts, cfg, ours.llm) and any(mine)
    with pytest.raises(ValueError, match="any_encoder=True"):
        to_transformers(ours)


def test_export_refuses_what_transformers_cannot_represent(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="blip_2_vision_model"):
        save_hf(tiny_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_truncated_or_mismatched_checkpoints_are_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    make_generation_dir(tmp_path / "good", "opt")
    weights = tmp_path / "good" / "model.safetensors"

    bad = tmp_path / "truncated"
    shutil.copytree(tmp_path / "good", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Blip2.from_dir(bad)

    extra = tmp_path / "extra"
    shutil.copytree(tmp_path / "good", extra)
    state = load_file(str(weights))
    state["qformer.encoder.layer.0.mystery.weight"] = torch.zeros(2)
    save_file(state, str(extra / "model.safetensors"))
    with pytest.raises(KeyError, match="mystery"):
        Blip2.from_dir(extra)

    no_lm = tmp_path / "no_lm"
    shutil.copytree(tmp_path / "good", no_lm)
    state = load_file(str(weights))
    del state["language_model.model.decoder.layers.1.fc1.weight"]
    save_file(state, str(no_lm / "model.safetensors"))
    with pytest.raises(KeyError, match=r"layers\.1\.fc1\.weight"):
        Blip2.from_dir(no_lm)

    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "good", wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["num_query_tokens"] = Q + 1
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="query_tokens has shape"):
        Blip2.from_dir(wrong)

    # a failed export leaves an existing output directory as it was
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    model = Blip2.from_dir(tmp_path / "good")
    model.llm_proj = None  # an inconsistent model: export must fail before writing
    with pytest.raises(Exception):  # noqa: B017
        save_hf(model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_our_own_model_exports_to_transformers(tmp_path):
    """A model built here (ViT tower with its last layer dropped, Q-Former with a text branch and
    mean pooling, an LM whose tokenizer has no <image> token) -> transformers -> same outputs."""
    import json

    import transformers as tf

    from blip2.config import Blip2Config, LLMConfig, VisionConfig
    from conftest import tiny_qformer

    vcfg = tf.Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=16)
    tower = tf.Blip2VisionModel(vcfg).eval()
    _randomise(tower, 7)
    tower.save_pretrained(tmp_path / "vit")
    torch.manual_seed(0)
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                            eos_token_id=1, pad_token_id=0, bos_token_id=None))
    lm.save_pretrained(tmp_path / "lm")
    tiny_lm_tokenizer().save_pretrained(tmp_path / "lm")
    cfg = Blip2Config(vision=VisionConfig(name="hf", path=str(tmp_path / "vit"), drop_last_layers=1),
                      qformer=tiny_qformer(vision_width=None, text_pool="mean", num_layers=3, ln_vision_eps=1e-6),
                      llm=LLMConfig(path=str(tmp_path / "lm")))
    ours = Blip2.build(cfg)
    _randomise(ours.qformer, 8)
    _randomise(ours.llm_proj, 9)
    _randomise(ours.ln_vision, 10)
    ours.eval()
    save_hf(ours, tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["vision_config"]["num_hidden_layers"] == 2  # the dropped layer is not exported
    assert exported["image_token_index"] == 30 and exported["text_config"]["vocab_size"] == 31  # grown by one
    back = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert back.generation_config.suppress_tokens == [30]
    pixels = _pixels()
    prompts = [[3, 4], [5, 6], [9, 7]]
    with torch.no_grad():
        soft = ours.soft_prompt(ours.image_features(pixels))
        assert torch.allclose(back.get_image_features(pixel_values=pixels).pooler_output, soft, atol=1e-5, rtol=0)
        x = ours.llm.layout(soft, prompts, [[8, 9], [10, 11], [12, 13]])
        mine = ours.llm.model(inputs_embeds=x.embeds, attention_mask=x.mask).logits  # (B, L, 30)
        ids = torch.tensor([[30] * Q + p + t + [1] for p, t in zip(prompts, [[8, 9], [10, 11], [12, 13]], strict=True)])
        theirs = back(pixel_values=pixels, input_ids=ids).logits  # (B, L, 31)
    assert torch.allclose(theirs[..., :30], mine, atol=1e-5, rtol=0)
    cfg = DecodeConfig(num_beams=4, max_new_tokens=8, min_new_tokens=2)
    mine = generate_ids(ours.llm, soft, prompts, cfg)
    assert mine == _hf_generate(back, pixels, prompts, cfg, ours.llm)
    again = Blip2.from_dir(tmp_path / "hf")  # and back into ours: the placeholder is never generated
    assert again.llm.suppress == [30]
    assert generate_ids(again.llm, soft, prompts, cfg) == mine


def test_cli_convert_both_ways_and_inference_on_a_transformers_dir(tmp_path, capsys):
    import transformers as tf

    from blip2.cli import main
    from conftest import write_images

    make_generation_dir(tmp_path / "hf", "opt", seed=4)
    assert main(["convert", "--from", "hf", "--to", "ours", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert main(["convert", "--from", "ours", "--to", "hf", str(tmp_path / "ours"), str(tmp_path / "hf2")]) == 0
    with pytest.raises(SystemExit, match="use --from hf"):
        main(["convert", "--from", "ours", "--to", "hf", str(tmp_path / "hf"), str(tmp_path / "x")])
    a = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    b = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf2").eval()
    pixels = _pixels()
    with torch.no_grad():
        fa = a.get_image_features(pixel_values=pixels).pooler_output
        fb = b.get_image_features(pixel_values=pixels).pooler_output
    assert torch.equal(fa, fb)
    # inference commands take the transformers directory as --model directly
    image = write_images(tmp_path / "img", 1, size=32)[0]
    capsys.readouterr()
    assert main(["caption", "--model", str(tmp_path / "hf"), image, "--max-new-tokens", "4", "--min-new-tokens", "4",
                 "--num-beams", "1"]) == 0
    line = capsys.readouterr().out.strip()
    from blip2.tasks import image_features

    direct = Blip2.from_dir(tmp_path / "hf2")  # the converted copy gives the same caption
    want = direct.generate(image_features(direct, [image]), [""],
                           DecodeConfig(num_beams=1, max_new_tokens=4, min_new_tokens=4))[0]
    assert line == f"{image}\t{want}" and want


def test_cli_retrieve_on_a_transformers_retrieval_dir(tmp_path, capsys):
    import json

    from blip2.cli import main
    from blip2.retrieval import embed_gallery, itc_similarity
    from blip2.tasks import image_features
    from conftest import write_images

    make_retrieval_dir(tmp_path / "hf", seed=9)
    images = write_images(tmp_path / "img", 2, size=32)
    texts = ["a dog on the grass", "two red squares", "a man on a bench"]
    capsys.readouterr()
    assert main(["retrieve", "--model", str(tmp_path / "hf"), "--images", *images, "--texts", *texts,
                 "--k", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = Blip2.from_dir(tmp_path / "hf")
    g = embed_gallery(model, image_features(model, images), texts)
    sim = itc_similarity(g.image_itc, g.text_itc)
    for i, path in enumerate(images):  # ITC order, best first
        assert [t for t, _ in out["texts_for_image"][path]] == [texts[j] for j in sim[i].argsort(descending=True)]
    assert main(["retrieve", "--model", str(tmp_path / "hf"), "--images", *images, "--texts", *texts,
                 "--k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(len(v) == 2 for v in out["texts_for_image"].values())  # ITM re-ranked the top 2


def test_preprocessing_matches_the_exported_blip_image_processor(tmp_path):
    """Pixels we feed a converted model equal what transformers' processor gives its users."""
    import transformers as tf
    from PIL import Image

    from blip2.vision.transforms import Preprocess, eval_transform
    from conftest import write_images

    path = write_images(tmp_path, 1, size=57)[0]
    img = Image.open(path).convert("RGB")
    pre = Preprocess(size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    proc = tf.BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=list(pre.mean),
                                 image_std=list(pre.std), do_convert_rgb=True)
    theirs = proc(images=img, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(eval_transform(img, pre), theirs, atol=1e-5, rtol=0)
