"""Model directory round trip and strict, non-destructive loading."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2.config import Blip2Config, VisionConfig
from blip2.model import Blip2, cpu_identity, machine_info, native_half, warn_slow_half
from conftest import tiny_qformer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Blip2Config(vision=VisionConfig(image_size=64), qformer=tiny_qformer(vision_width=None))
    model = Blip2.build(cfg)
    d = tmp_path_factory.mktemp("m") / "model"
    model.save(d, {"itc_grad": "reference"})
    return model, d


def test_round_trip_is_exact(saved):
    model, d = saved
    loaded = Blip2.from_dir(d)
    a, b = model.trainable_state_dict(), loaded.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.meta["itc_grad"] == "reference"
    assert not any(k.startswith("vision.") for k in load_file(str(d / "model.safetensors")))
    x = torch.randn(2, 3, 64, 64)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(model.image_features(x))[1],
                                   loaded.encode_image(loaded.image_features(x))[1])
        torch.testing.assert_close(model.encode_text(["a cat"]), loaded.encode_text(["a cat"]))


def test_missing_or_extra_keys_refused_before_loading(saved, tmp_path):
    model, d = saved
    state = load_file(str(d / "model.safetensors"))
    target = Blip2.from_dir(d)
    before = {k: v.clone() for k, v in target.trainable_state_dict().items()}
    broken = dict(state)
    broken.pop("itm_head.weight")
    broken["qformer.extra"] = torch.zeros(1)
    broken["temp"] = torch.tensor(123.0)
    with pytest.raises(KeyError, match="1 missing keys.*itm_head.weight.*1 unexpected"):
        target.load_trainable(broken)
    wrong = dict(state)
    wrong["vision_proj.weight"] = torch.zeros(3, 3)
    wrong["temp"] = torch.tensor(123.0)
    with pytest.raises(ValueError, match="vision_proj.weight has shape"):
        target.load_trainable(wrong)
    after = target.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was overwritten


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a blip2 model directory"):
        Blip2.from_dir(tmp_path)


def test_corrupt_weights_file(saved, tmp_path):
    import shutil

    _, d = saved
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(Exception, match="(?i)safetensor|header|invalid|deserializ"):
        Blip2.from_dir(bad)


def test_save_is_atomic_on_failure(saved, tmp_path, monkeypatch):
    model, d = saved
    dest = tmp_path / "m"
    model.save(dest)
    original = (dest / "model.safetensors").read_bytes()
    import blip2.model as mm

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mm, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save(dest)
    assert (dest / "model.safetensors").read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["m"]



@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_text_embedding_pooling(tokenizer, pool):
    torch.manual_seed(0)
    model = Blip2(Blip2Config(qformer=tiny_qformer(text_pool=pool)), None, tokenizer).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = model.qformer(ids, mask, use_queries=False).hidden[0]  # (T, D)
        pooled = hidden[0] if pool == "cls" else hidden.mean(0)
        expect = torch.nn.functional.normalize(model.text_proj(pooled), dim=-1)
        got = model.text_itc_feats(ids, mask)[0]
        padded = model.text_itc_feats(torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                                      torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1))[0]
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded, got, atol=1e-5, rtol=1e-5)  # pads change nothing


def test_itm_probability_api(tiny_model):
    tiny_model.eval()
    feats = torch.randn(2, 5, 24)
    with torch.no_grad():
        p = tiny_model.itm(feats, ["a red circle", "two blue squares"])
        ids, mask = tiny_model.tokenize(["a red circle", "two blue squares"])
        logits = tiny_model.itm_logits(tiny_model.ln_vision(feats), ids, mask)
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(p, torch.sigmoid(logits[:, 1] - logits[:, 0]))


def test_query_diversity_by_hand(tiny_model):
    feats = torch.randn(3, 5, 24)
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosines 0, 1/sqrt2, 1/sqrt2
    tiny_model.qformer.forward = lambda *a, **k: type("O", (), {"hidden": hidden.expand(3, -1, -1)})()
    assert tiny_model.query_diversity(feats) == pytest.approx((2 * (0 + 2 * 2 ** -0.5)) / 6)


def test_precision_override_casts_only_the_frozen_parts(tmp_path, caplog):
    """from_dir(precision=...) (the inference commands' --precision) stores the frozen encoder and
    LLM in that dtype, keeps the Q-Former fp32, scores like the fp32 model to bf16 accuracy and is
    still recognised as the encoder the model was trained with."""
    from blip2.config import LLMConfig
    from conftest import save_tiny_llm

    torch.manual_seed(0)
    llm = LLMConfig(path=str(save_tiny_llm(tmp_path / "llm")), max_text_len=8)
    cfg = Blip2Config(vision=VisionConfig(image_size=64), qformer=tiny_qformer(vision_width=None), llm=llm)
    Blip2.build(cfg).save(tmp_path / "model")
    fp32 = Blip2.from_dir(tmp_path / "model")
    with caplog.at_level("WARNING"):
        bf16 = Blip2.from_dir(tmp_path / "model", precision="bf16")
    assert "differs from the one this model was trained with" not in caplog.text
    assert fp32.vision.fingerprint() != bf16.vision.fingerprint()  # feature caches are kept apart
    assert {p.dtype for p in bf16.vision.parameters()} == {p.dtype for p in bf16.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.qformer.parameters()} == {torch.float32}
    x = torch.randn(2, 3, 64, 64)
    scores = []
    for model in (fp32, bf16):
        with torch.no_grad():
            total, count = model.llm.loss_sum(model.soft_prompt(model.image_features(x)), [[], []],
                                              [[5, 6, 1], [7, 1]])
        scores.append(float(total / count))
    assert scores[1] == pytest.approx(scores[0], rel=0.02) and scores[1] != scores[0]
    with pytest.raises(ValueError, match="must be one of fp32, fp16, bf16"):
        Blip2.from_dir(tmp_path / "model", precision="int8")


@pytest.mark.parametrize("native", [True, False])
def test_half_precision_on_a_cpu_without_native_support_warns(native, monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: native)
    # oneDNN calls bf16 "supported" on any AVX-512 CPU, emulated or not: it must not decide
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="blip2.model"):
        assert warn_slow_half(cpu, ["none", "bf16", "fp32"]) is (not native)
        assert warn_slow_half(cpu, ["fp32", "none"]) is False  # full precision never warns
        assert warn_slow_half(torch.device("cuda"), ["bf16", "fp16"]) is False  # GPUs are not probed
    assert ("emulated" in caplog.text) is (not native)
    if not native:
        assert "bf16" in caplog.text and "fp32" in caplog.text  # names the problem and the fix


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags from Linux's /proc/cpuinfo")
def test_native_bf16_agrees_with_the_cpu_flags():
    # An independent reading of the same fact: the kernel's CPU flags name the bf16 instructions.
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert native_half("bf16") == bool({"avx512_bf16", "amx_bf16"} & flags)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        native_half("fp32")


# Two processors of a Zen 4 guest, abridged: only the first is read, and its "model" line is not
# confused with "model name".
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2596.146
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 hypervisor

processor\t: 1
cpu family\t: 99
model\t\t: 1
model name\t: Other
flags\t\t: fpu amx_tile
"""


def test_cpu_identity_tells_apart_cpus_that_share_a_name():
    assert cpu_identity(ZEN4) == {"name": "AMD EPYC", "cpu_id": "family 25 model 17", "mhz": 2596,
                                  "flags": ["avx512f", "avx512_bf16", "avx512_vnni"]}
    # An arm64 /proc/cpuinfo has none of these fields; no /proc/cpuinfo at all gives an empty text.
    assert cpu_identity("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n") == {}
    assert cpu_identity("") == {}


def test_machine_info_records_the_cpu_identity():
    info = machine_info(torch.device("cpu"))
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "cpu family" in cpuinfo.read_text():  # x86 Linux: the identity is recorded
        assert info["cpu_id"].startswith("family ")
        # the parsed flags and torch's own probe (native_half) agree on native bf16
        assert info["native_bf16"] == bool({"avx512_bf16", "amx_tile", "amx_bf16"} & set(info["flags"]))
