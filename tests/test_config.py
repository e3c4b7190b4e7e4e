import pytest

from captune.config import ConfigError, list_recipes, load_config, parse_override
from captune.errors import UserError


def test_builtin_recipes_load_and_check():
    assert {"demo", "coco5k", "coco5k-seed"} <= set(list_recipes())
    for name in list_recipes():
        cfg = load_config(name)
        assert cfg.name == name


def test_overrides_are_typed():
    cfg = load_config("demo", ["train.epochs=5", "train.lr=1e-3", "lora.target_modules=[q_proj]"])
    assert cfg.train.epochs == 5
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ["q_proj"]


def test_int_accepted_for_float_but_not_reverse():
    assert load_config("demo", ["eval.repetition_penalty=2"]).eval.repetition_penalty == 2.0
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config("demo", ["train.epochs=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=abc", "train.lr: expected a number, got 'abc'"),
        ("nosuch.key=1", "nosuch: unknown section"),
        ("train.nosuch=1", "train.nosuch: unknown key"),
        ("train.batch_size=0", "train.batch_size: must be 1 or more"),
        ("data.ratios=[0.5,0.5,0.5]", "data.ratios: must add up to 1"),
        ("train.schedule=exp", "train.schedule: expected one of"),
        ("lora.target_modules=everything", "lora.target_modules: must be a list"),
        ("train.epochs", "expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("demo", [override])


def test_unknown_recipe():
    with pytest.raises(UserError, match="unknown recipe 'nosuch'"):
        load_config("nosuch")


def test_recipe_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\ntrain:\n  epochs: 7\n")
    assert load_config(str(p)).train.epochs == 7
    p.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(p))


def test_parse_override_yaml_values():
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=") == ("a.b", "")
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_saved_config_round_trips():
    import yaml

    from captune.config import config_from_dict

    cfg = load_config("coco5k", ["train.epochs=3"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_coco_karpathy_recipe_reads_the_datasets_own_splits():
    cfg = load_config("coco-karpathy")
    assert cfg.data.source == "hub:jxie/coco_captions" and cfg.data.num_images == 0
    assert cfg.data.split == "train+validation+test" and cfg.data.split_column is None
    assert cfg.train.val_images == 1000 and cfg.eval.split == "test"
