"""The demo's ground truth: attribute accuracy of captions, and captions in clean text."""

import itertools
import json
import random

import pytest

from captune.demo import attributes, world
from captune.demo.base_model import build_tokenizer
from captune.model.load import demo_model_dir


def _every_scene():
    rng = random.Random(0)
    for shape, colour, size, count, pos in itertools.product(
        world.SHAPES, world.COLOURS, world.SIZES, world.COUNTS, world.POSITIONS
    ):
        yield world.Scene(shape, colour, size, count, pos, rng.randrange(2**31))


def _expected(scene):
    return {
        "count": str(scene.count),
        "size": scene.size,
        "colour": scene.colour,
        "shape": scene.shape,
        "position": scene.position,
    }


@pytest.mark.parametrize("style", world.STYLES)
def test_references_of_every_scene_give_back_its_attributes(style):
    for scene in _every_scene():
        refs = world.captions(scene, style)
        assert attributes.truth(refs) == _expected(scene), refs
        # The first reference of each style names all five, and is judged right on all.
        assert attributes.judge(refs[0], refs) == dict.fromkeys(attributes.ATTRIBUTES, True), refs[0]


def test_a_wrong_missing_or_conflicting_value_is_wrong():
    scene = world.Scene("triangle", "green", "small", 2, "top", 1)
    refs = world.captions(scene, "catalog")
    wrong = attributes.judge("pair of tiny emerald wedges near the right edge", refs)
    assert wrong == {"count": True, "size": True, "colour": True, "shape": True, "position": False}
    missing = attributes.judge("pair of emerald wedges", refs)
    assert not missing["size"] and not missing["position"] and missing["shape"]
    both = attributes.judge("pair of tiny emerald wedges near the upper edge, near the left edge", refs)
    assert not both["position"]
    # The plain words count the same as the catalog words.
    assert all(attributes.judge("two small green triangles on the top", refs).values())


def test_attribute_accuracy_shares_and_all_right():
    scene = world.Scene("circle", "red", "large", 1, "left", 1)
    refs = world.captions(scene, "plain")
    rows = [
        {"image_id": "a", "caption": "a large red circle on the left", "references": refs},
        {"image_id": "b", "caption": "a large red square on the left", "references": refs},
    ]
    acc = attributes.attribute_accuracy(rows)
    assert acc["share"] == {"count": 1.0, "size": 1.0, "colour": 1.0, "shape": 0.5, "position": 1.0}
    assert acc["all_right"] == 0.5 and acc["images"] == 2
    assert acc["per_image"]["b"]["shape"] is False


def test_compare_sides_reads_both_prediction_files(tmp_path):
    scene = world.Scene("square", "blue", "small", 3, "bottom", 1)
    for side, caption in (
        ("baseline", "three small blue squares on the top"),
        ("finetuned", "trio of tiny navy tiles near the lower edge"),
    ):
        (tmp_path / side).mkdir()
        row = {"image_id": "x", "caption": caption, "references": world.captions(scene, "catalog")}
        (tmp_path / side / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    out = attributes.compare_sides(tmp_path / "baseline", tmp_path / "finetuned")
    position = next(r for r in out["rows"] if r["attribute"] == "position")
    assert position == {"attribute": "position", "baseline": 0.0, "finetuned": 1.0, "change": 1.0}
    assert "| position | 0.00 | 1.00 | +1.00 |" in attributes.markdown(out)
    assert attributes.markdown(None) == "" and not attributes.applies("hub:x/y")


@pytest.mark.parametrize("seq2seq", [False, True])
def test_tokenizer_decodes_every_caption_style_as_written(seq2seq):
    tok = build_tokenizer(seq2seq)
    for scene in _every_scene():
        for style in world.STYLES:
            for cap in world.captions(scene, style):
                assert tok.decode(tok(cap).input_ids, skip_special_tokens=True) == cap


def test_shipped_tokenizer_decodes_punctuation_without_a_space_before_it():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir())
    for style in world.STYLES:
        for cap in world.captions(world.Scene("circle", "red", "small", 2, "left", 1), style):
            text = tok.decode(tok(cap + ".").input_ids, skip_special_tokens=True)
            assert text == cap + "." and " ," not in text and " ." not in text


def test_gallery_spread_shows_right_and_wrong_captions():
    per_image = {f"r{i}": dict.fromkeys(attributes.ATTRIBUTES, True) for i in range(20)}
    per_image.update({f"w{i}": {**dict.fromkeys(attributes.ATTRIBUTES, True), "position": False} for i in range(5)})
    picks = attributes.pick_spread(per_image, 8, seed=0)
    assert len(picks) == 8 and len({i for i, _ in picks}) == 8
    assert sum(why == "wrong position" for _, why in picks) == 4
    assert sum(why.startswith("right") for _, why in picks) == 4
    # Too few right captions: the wrong ones fill the gallery.
    only_wrong = {k: v for k, v in per_image.items() if k.startswith("w")}
    assert [why for _, why in attributes.pick_spread(only_wrong, 4, seed=0)] == ["wrong position"] * 4
