import pytest

from blip2.cli import build_parser, main, resolve_recipe


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("train", "eval", "quickstart", "scenes", "caption", "ask", "chat"):
        assert sub in out


@pytest.mark.parametrize("argv", [["train", "stage1", "--help"], ["train", "stage2", "--help"],
                                  ["eval", "retrieval", "--help"], ["eval", "caption", "--help"],
                                  ["eval", "vqa", "--help"], ["eval", "compare", "--help"], ["caption", "--help"],
                                  ["ask", "--help"],
                                  ["chat", "--help"], ["quickstart", "--help"], ["scenes", "--help"]])
def test_each_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: blip2" in capsys.readouterr().out


def test_retrieval_contract_flags():
    args = build_parser().parse_args(["eval", "retrieval", "--model", "m", "--data", "d.json", "--images", "i",
                                      "--split", "val", "--json"])
    assert (args.model, args.data, args.images, args.split, args.json, args.k) == ("m", "d.json", "i", "val", True, 128)


def test_generation_contract_flags():
    p = build_parser()
    a = p.parse_args(["train", "stage2", "--recipe", "r", "--init", "s1", "--out", "o"])
    assert (a.recipe, a.init, a.out) == ("r", "s1", "o")
    a = p.parse_args(["eval", "caption", "--model", "m", "--data", "d.json", "--images", "i", "--split", "val",
                      "--json"])
    assert (a.model, a.data, a.images, a.split, a.json) == ("m", "d.json", "i", "val", True)
    a = p.parse_args(["eval", "vqa", "--model", "m", "--data", "q.json", "--images", "i", "--json"])
    assert (a.model, a.data, a.json) == ("m", "q.json", True)
    a = p.parse_args(["ask", "--model", "m", "img.jpg", "what is it?"])
    assert (a.image, a.question) == ("img.jpg", "what is it?")
    assert p.parse_args(["caption", "--model", "m", "a.jpg", "b.jpg"]).images == ["a.jpg", "b.jpg"]


def test_decode_flags_reach_the_decode_config():
    from blip2.cli import _decode_cfg
    from blip2.config import DecodeConfig

    a = build_parser().parse_args(["caption", "--model", "m", "a.jpg", "--static-cache", "on", "--num-beams", "3"])
    cfg = _decode_cfg(a, DecodeConfig())
    assert (cfg.static_cache, cfg.num_beams, cfg.max_new_tokens) == ("on", 3, DecodeConfig().max_new_tokens)
    assert _decode_cfg(build_parser().parse_args(["caption", "--model", "m", "a.jpg"]), DecodeConfig()).static_cache \
        == "auto"


def test_every_command_that_loads_a_model_takes_device_and_precision():
    p = build_parser()
    for argv in (["caption", "--model", "m", "a.jpg"], ["ask", "--model", "m", "a.jpg", "q"],
                 ["chat", "--model", "m", "a.jpg"], ["eval", "caption", "--model", "m", "--data", "d"],
                 ["eval", "vqa", "--model", "m", "--data", "d"], ["eval", "retrieval", "--model", "m", "--data", "d"],
                 ["capfilt", "--model", "m", "--data", "d", "--out", "o"],
                 ["retrieve", "--model", "m", "--images", "a.jpg", "--texts", "t"]):
        a = p.parse_args([*argv, "--device", "cuda", "--precision", "bf16"])
        assert (a.device, a.precision) == ("cuda", "bf16"), argv
        assert p.parse_args(argv).precision is None  # default: as saved
    with pytest.raises(SystemExit):
        p.parse_args(["caption", "--model", "m", "a.jpg", "--precision", "int8"])


def test_unknown_recipe_lists_packaged_ones():
    with pytest.raises(SystemExit, match="flickr8k-stage1"):
        resolve_recipe("no-such-recipe")


def test_quickstart_seed_reaches_both_stages(monkeypatch, tmp_path, capsys):
    import blip2.quickstart

    seen = {}

    def fake(out, **kw):
        seen.update(kw)
        return {"retrieval": {}, "generation": {}}

    monkeypatch.setattr(blip2.quickstart, "run_quickstart", fake)
    assert main(["quickstart", "--out", str(tmp_path), "--seed", "7"]) == 0
    assert seen["extra"] == ("train.seed=7",) and seen["extra_stage2"] == ("train.seed=7",)
    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    assert seen["extra"] == () and seen["extra_stage2"] == ()  # the recipes' own seed
