"""LAVIS-layout checkpoints, written here by hand from transformers' tiny BLIP-2 models, import to ours
and reproduce transformers' outputs (the LAVIS and transformers layouts describe the same network)."""

from __future__ import annotations

import fractions

import pytest
import torch
from test_hf_checkpoints import _hf_configs, _pixels, _randomise, make_generation_dir

from blip2.interop.lavis import convert_lavis


def _lavis_state(hf, stage2: str | None = None) -> dict[str, torch.Tensor]:
    """The LAVIS names for every weight of a transformers BLIP-2 model (EVA ViT + Q-Former + heads)."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    out = {"query_tokens": sd["query_tokens"]}
    vm = "vision_model."
    out["visual_encoder.cls_token"] = sd[vm + "embeddings.class_embedding"]
    out["visual_encoder.pos_embed"] = sd[vm + "embeddings.position_embedding"]
    out["visual_encoder.patch_embed.proj.weight"] = sd[vm + "embeddings.patch_embedding.weight"]
    out["visual_encoder.patch_embed.proj.bias"] = sd[vm + "embeddings.patch_embedding.bias"]
    n_vis = hf.config.vision_config.num_hidden_layers
    for i in range(n_vis):
        src, dst = f"{vm}encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
        bias = sd[src + "self_attn.qkv.bias"]
        q, k, v = bias.chunk(3)
        assert torch.all(k == 0)
        out[dst + "attn.q_bias"], out[dst + "attn.v_bias"] = q, v
        out[dst + "attn.qkv.weight"] = sd[src + "self_attn.qkv.weight"]
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[dst + a + ".weight"], out[dst + a + ".bias"] = sd[src + b + ".weight"], sd[src + b + ".bias"]
    out["ln_vision.weight"], out["ln_vision.bias"] = sd[vm + "post_layernorm.weight"], sd[vm + "post_layernorm.bias"]
    out["Qformer.bert.embeddings.LayerNorm.weight"] = sd["qformer.layernorm.weight"]
    out["Qformer.bert.embeddings.LayerNorm.bias"] = sd["qformer.layernorm.bias"]
    for k, v in sd.items():
        if k.startswith("qformer.encoder.layer."):
            name = k[len("qformer.encoder.layer."):].replace("attention.attention.", "attention.self.")
            out["Qformer.bert.encoder.layer." + name] = v
    if stage2 is None:  # stage 1: text branch, heads, ITG head tied to the word embeddings
        words = sd["embeddings.word_embeddings.weight"]
        out["Qformer.bert.embeddings.word_embeddings.weight"] = words
        out["Qformer.bert.embeddings.position_embeddings.weight"] = sd["embeddings.position_embeddings.weight"]
        out["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
        g = torch.Generator().manual_seed(5)
        d = words.shape[1]
        out["Qformer.cls.predictions.transform.dense.weight"] = torch.randn(d, d, generator=g)
        out["Qformer.cls.predictions.transform.dense.bias"] = torch.randn(d, generator=g)
        out["Qformer.cls.predictions.transform.LayerNorm.weight"] = torch.randn(d, generator=g)
        out["Qformer.cls.predictions.transform.LayerNorm.bias"] = torch.randn(d, generator=g)
        out["Qformer.cls.predictions.bias"] = torch.randn(words.shape[0], generator=g)
        out["Qformer.cls.predictions.decoder.weight"] = words
        out["Qformer.cls.predictions.decoder.bias"] = out["Qformer.cls.predictions.bias"]
        for a, b in (("vision_proj", "vision_projection"), ("text_proj", "text_projection"), ("itm_head", "itm_head")):
            out[a + ".weight"], out[a + ".bias"] = sd[b + ".weight"], sd[b + ".bias"]
        out["temp"] = torch.tensor(0.05)
    else:
        out[f"{stage2}_proj.weight"] = sd["language_projection.weight"]
        out[f"{stage2}_proj.bias"] = sd["language_projection.bias"]
    return out


def _llm_dir(hf, path) -> str:
    """The LM of a transformers BLIP-2 model and its tokenizer, saved alone (LAVIS files lack it)."""
    from transformers import AutoTokenizer

    hf.language_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(path.parent / "hf").save_pretrained(path)
    return str(path)


def _zero_k_bias(hf) -> None:
    """EVA has no key bias: make the transformers model representable in LAVIS's layout."""
    with torch.no_grad():
        for layer in hf.vision_model.encoder.layers:
            b = layer.self_attn.qkv.bias
            b[b.shape[0] // 3: 2 * b.shape[0] // 3] = 0


def test_stage1_checkpoint_imports_with_same_outputs(tmp_path):
    import transformers as tf

    from conftest import tiny_opt

    hf = tf.Blip2ForImageTextRetrieval(_hf_configs(tiny_opt().config, True)).eval()
    _randomise(hf, 11)
    _zero_k_bias(hf)
    # transformers' tiny ViT has 4 heads of width 8; ours are read off shapes unless told
    torch.save({"model": _lavis_state(hf)}, tmp_path / "blip2_pretrained.pth")
    ours = convert_lavis(tmp_path / "blip2_pretrained.pth", tmp_path / "out", vision_heads=4, qformer_heads=4)
    assert ours.cfg.qformer.text_branch and ours.cfg.qformer.num_layers == 3 and ours.cfg.qformer.num_queries == 4
    assert ours.temp.item() == pytest.approx(0.05)
    pixels = _pixels()
    ids, mask = ours.tokenize(["a dog on the grass", "two red squares", "a man"])
    with torch.no_grad():
        feats = ours.image_features(pixels)
        query, itc = ours.encode_image(feats)
        image_embeds = hf.vision_model(pixels).last_hidden_state
        ref_query = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1),
                               encoder_hidden_states=image_embeds).last_hidden_state
        assert torch.allclose(query, ref_query, atol=1e-5, rtol=0)
        itm = ours.itm_logits(ours.ln_vision(feats), ids, mask)
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        assert torch.allclose(itm, ref.logits_per_image, atol=1e-5, rtol=0)
        # the ITG head came through too: [DEC] logits use the tied word embeddings + LAVIS bias
        w = ours.qformer.embeddings.word_embeddings.weight
        assert torch.equal(ours.qformer.lm_head.bias, _lavis_state(hf)["Qformer.cls.predictions.bias"])
        assert w.shape[0] == 30523


def test_stage2_opt_checkpoint_needs_and_uses_the_llm(tmp_path):
    hf = make_generation_dir(tmp_path / "hf", "opt", seed=6)
    _zero_k_bias(hf)
    llm = _llm_dir(hf, tmp_path / "opt")
    torch.save({"model": _lavis_state(hf, "opt")}, tmp_path / "blip2_opt.pth")
    with pytest.raises(ValueError, match="--llm"):
        convert_lavis(tmp_path / "blip2_opt.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ours = convert_lavis(tmp_path / "blip2_opt.pth", tmp_path / "out", llm=llm, vision_heads=4,
                         qformer_heads=4)
    assert not ours.cfg.qformer.text_branch and ours.cfg.llm.prompt_special_tokens
    pixels = _pixels()
    with torch.no_grad():
        soft = ours.soft_prompt(ours.image_features(pixels))
        ref = hf.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(soft, ref, atol=1e-5, rtol=0)


def test_unsafe_or_broken_lavis_files_are_refused(tmp_path):
    from blip2.interop.lavis import read_checkpoint

    torch.save({"model": {"query_tokens": torch.zeros(1, 2, 4)}, "config": fractions.Fraction(1, 3)},
               tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(tmp_path / "pickled.pth")
    torch.save({"model": {"query_tokens": torch.zeros(1, 2, 4)}}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        read_checkpoint(tmp_path / "cut.pth")
    from blip2.interop.lavis import map_qformer

    with pytest.raises(KeyError, match="no known LAVIS"):
        map_qformer({"query_tokens": torch.zeros(1, 2, 4), "Qformer.bert.pooler.dense.weight": torch.zeros(4, 4)})


def test_cli_converts_lavis_to_transformers(tmp_path):
    import transformers as tf

    from blip2.cli import main

    hf = make_generation_dir(tmp_path / "hf", "t5", seed=8)
    _zero_k_bias(hf)
    llm = _llm_dir(hf, tmp_path / "t5")
    torch.save({"model": _lavis_state(hf, "t5")}, tmp_path / "blip2_t5.pth")
    assert main(["convert", "--from", "lavis", "--to", "hf", str(tmp_path / "blip2_t5.pth"), str(tmp_path / "out"),
                 "--llm", llm, "--vision-heads", "4", "--qformer-heads", "4"]) == 0
    back = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    pixels = _pixels()
    with torch.no_grad():
        a = back.get_image_features(pixel_values=pixels).pooler_output
        b = hf.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_stage1_checkpoint_without_vit_takes_the_eva_weight_file(tmp_path):
    """LAVIS saves only trained weights; the EVA file it downloads has one more block and a final norm."""
    import transformers as tf

    from conftest import tiny_opt

    hf = tf.Blip2ForImageTextRetrieval(_hf_configs(tiny_opt().config, True)).eval()
    _randomise(hf, 12)
    _zero_k_bias(hf)
    state = _lavis_state(hf)
    eva = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    trained = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    n = hf.config.vision_config.num_hidden_layers
    for k in [k for k in eva if k.startswith("blocks.0.")]:  # an extra last block LAVIS does not use
        eva[k.replace("blocks.0.", f"blocks.{n}.")] = torch.randn_like(eva[k])
    eva["norm.weight"], eva["norm.bias"] = torch.ones(32), torch.zeros(32)
    torch.save(eva, tmp_path / "eva_vit.pth")
    torch.save({"model": trained}, tmp_path / "blip2_pretrained.pth")
    with pytest.raises(ValueError, match="--vision"):
        convert_lavis(tmp_path / "blip2_pretrained.pth", tmp_path / "out")
    ours = convert_lavis(tmp_path / "blip2_pretrained.pth", tmp_path / "out", vision=str(tmp_path / "eva_vit.pth"),
                         vision_heads=4, qformer_heads=4)
    pixels = _pixels()
    ids, mask = ours.tokenize(["a dog", "two red squares", "a man on a bench"])
    with torch.no_grad():
        itm = ours.itm_logits(ours.ln_vision(ours.image_features(pixels)), ids, mask)
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    assert torch.allclose(itm, ref.logits_per_image, atol=1e-5, rtol=0)
