import pytest

from blip2.cli import RECIPES
from blip2.config import (
    PipelineRecipe,
    QFormerConfig,
    Stage1LossConfig,
    Stage1Recipe,
    Stage2Recipe,
    from_dict,
    load_recipe,
    to_dict,
)

KINDS = {"flickr8k-stage1": Stage1Recipe, "quickstart-stage1": Stage1Recipe, "quickstart-stage2": Stage2Recipe,
         "flickr8k-cpu": PipelineRecipe}


def test_packaged_recipes_parse():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == set(KINDS)
    for name, cls in KINDS.items():
        recipe = load_recipe(RECIPES / f"{name}.yaml", None, cls)
        assert isinstance(recipe, cls)
        if cls is not Stage1Recipe:
            s2 = recipe if cls is Stage2Recipe else recipe.stage2
            # the CPU-budget recipes boost the soft-prompt ends (query tokens, llm_proj) over the Q-Former body
            assert s2.model.llm is not None and s2.stage2.prompt_lr_mult > 1.0


def test_overrides_are_typed_and_nested(tmp_path):
    r = load_recipe(RECIPES / "quickstart-stage1.yaml", ["train.steps=7", "train.lr=3e-4",
                                                         "loss.itc_grad=full", "model.qformer.num_queries=5"])
    assert (r.train.steps, r.train.lr, r.loss.itc_grad, r.model.qformer.num_queries) == (7, 3e-4, "full", 5)
    assert isinstance(r.train.lr, float)


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="train.stepz"):
        load_recipe(None, ["train.stepz=3"])


def test_wrong_type_is_named():
    with pytest.raises(TypeError, match="train.steps"):
        load_recipe(None, ["train.steps=many"])


@pytest.mark.parametrize("kw,msg", [
    (dict(hidden_size=30, num_heads=4), "divisible"),
    (dict(num_queries=0), "num_queries"),
    (dict(temp_init=2.0), "temp_init"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
])
def test_qformer_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        QFormerConfig(**kw)


def test_loss_validation():
    with pytest.raises(ValueError, match="itc_grad"):
        Stage1LossConfig(itc_grad="half")
    with pytest.raises(ValueError, match="needs loss.itc"):
        Stage1LossConfig(itc=False)


@pytest.mark.parametrize("sets,msg", [
    (["train.grad_clip=-1"], "grad_clip must be >= 0"),
    (["train.grad_clip=5", "train.grad_clip_from=-1"], "grad_clip_from must be >= 0"),
    (["train.grad_clip_from=100"], "no clip to start"),
])
def test_clip_validation(sets, msg):
    with pytest.raises(ValueError, match=msg):
        load_recipe(None, sets)


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_token_drop_validation(value):
    msg = rf"data.token_drop is a fraction of the image tokens in \[0, 1\), got {value}"
    with pytest.raises(ValueError, match=msg):
        load_recipe(None, [f"data.token_drop={value}"])


def test_round_trip():
    r = load_recipe(RECIPES / "flickr8k-stage1.yaml")
    assert from_dict(Stage1Recipe, to_dict(r)) == r
