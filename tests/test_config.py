"""Recipe parsing: defaults, overrides, strictness and clear errors."""

import pydantic
import pytest

from edgekd.config import Recipe, apply_overrides, load_recipe, recipe_to_yaml
from edgekd.errors import EdgekdError


def test_defaults_validate_and_round_trip(tmp_path):
    r = load_recipe()
    assert r.teacher.model == "efficientnet_lite0" and r.student.model == "nano_cnn"
    p = tmp_path / "r.yaml"
    p.write_text(recipe_to_yaml(r))
    assert load_recipe(p) == r


def test_overrides_are_typed_and_nested():
    r = load_recipe(overrides=["student.train.epochs=3", "distill.losses=[kd,fitnet]", "data.train_subset=100", "deterministic=true"])
    assert r.student.train.epochs == 3 and r.distill.losses == ["kd", "fitnet"] and r.data.train_subset == 100 and r.deterministic is True


def test_toml_recipe(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('seed = 3\n[teacher]\ninput_size = 32\n[teacher.train]\nepochs = 1\n')
    r = load_recipe(p)
    assert r.seed == 3 and r.teacher.input_size == 32 and r.teacher.train.epochs == 1


@pytest.mark.parametrize(
    "text, needle",
    [
        ("teacher:\n  epochs: 3\n", "teacher.epochs: unknown key"),
        ("student:\n  train:\n    lr: -1\n", "student.train.lr"),
        ("distill:\n  losses: [kd, magic]\n", "distill.losses"),
        ("data: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(EdgekdError) as err:
        load_recipe(p)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(EdgekdError, match="not key=value"):
        load_recipe(overrides=["epochs"])
    with pytest.raises(EdgekdError, match="is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
    with pytest.raises(EdgekdError, match="config file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_recipe_forbids_unknown_top_level_key():
    with pytest.raises(pydantic.ValidationError, match="tacher"):
        Recipe.model_validate({"tacher": {}})
