"""The toy world: deterministic scenes, captions that parse back, an exact pixel scorer that
rejects wrong captions, and the folder and ArrayRecord outputs the trainer reads."""

import dataclasses
import json

import numpy as np
import pytest

from ella_jax.train import data
from toyworld import scenes
from toyworld.scenes import (
    CELLS,
    COLOURS,
    LAYOUTS,
    RELATIONS,
    SHAPES,
    Scene,
    caption,
    generate,
    parse_caption,
    render,
    sample_scene,
    scene_spec,
)
from toyworld.score import find_objects, score, score_many

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def world() -> list[tuple[Scene, np.ndarray, str]]:
    """(scene, image, caption) of 500 seeds, one generator each."""
    out = []
    for seed in range(500):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng)
        out.append((scene, render(scene), caption(scene, rng)))
    return out


def test_generate_is_deterministic_in_the_seed():
    first, again, other = generate(7, 20), generate(7, 20), generate(8, 20)
    assert [c for _, c in first] == [c for _, c in again]
    for (a, _), (b, _) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [c for _, c in first] != [c for _, c in other]
    assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(first, other, strict=True))
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image, _ in first)


def test_scenes_cover_every_layout_colour_shape_cell_and_relation(world):
    assert {s.layout for s, _, _ in world} == set(LAYOUTS)
    assert {o.colour for s, _, _ in world for o in s.objects} == set(COLOURS)
    assert {o.shape for s, _, _ in world for o in s.objects} == set(SHAPES)
    assert {s.cell for s, _, _ in world if s.layout == "position"} == set(CELLS)
    assert {s.relation for s, _, _ in world if s.layout == "relation"} == set(RELATIONS)
    counts = {len(s.objects) for s, _, _ in world if s.layout == "count"}
    assert counts == {1, 2, 3}


def test_objects_fit_apart_inside_the_image(world):
    for scene, _, _ in world:
        for i, a in enumerate(scene.objects):
            assert 32 / 4 <= a.size <= 32 / 3
            assert a.cx - a.size / 2 >= 1 and a.cx + a.size / 2 <= 31
            assert a.cy - a.size / 2 >= 1 and a.cy + a.size / 2 <= 31
            for b in scene.objects[i + 1 :]:
                reach = (a.size + b.size) / 2 + 2
                assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def test_every_caption_parses_back_to_its_scene(world):
    for scene, _, text in world:
        assert parse_caption(text) == scene_spec(scene), text
    texts = [text for _, _, text in world]
    for words in ("an image of", "on a black background", "corner", "on the left of", "under"):
        assert any(words in text for text in texts), words


@pytest.mark.parametrize(
    "text",
    [
        "a purple square",
        "two red square",
        "a red squares",
        "a red square in the top left to the left of a blue circle",
        "two red squares above a blue circle",
        "red square",
        "",
    ],
)
def test_other_text_does_not_parse(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_rendered_scenes_score_perfectly(world):
    accuracy = score_many([image for _, image, _ in world], [text for _, _, text in world])
    assert accuracy == {name: 1.0 for name in accuracy}
    _, image, text = world[0]
    assert score(image.astype(np.float32) / 255, text) == score(image, text)


def test_64_pixel_scenes_score_perfectly():
    pairs = generate(3, 60, size=64)
    assert all(image.shape == (64, 64, 3) for image, _ in pairs)
    accuracy = score_many([image for image, _ in pairs], [text for _, text in pairs])
    assert accuracy == {name: 1.0 for name in accuracy}


def _recolour(scene: Scene, rng: np.random.Generator) -> Scene:
    absent = [c for c in COLOURS if c not in {o.colour for o in scene.objects}]
    colour = absent[rng.integers(len(absent))]
    changed = range(len(scene.objects)) if scene.layout == "count" else [0]
    return dataclasses.replace(
        scene,
        objects=tuple(
            dataclasses.replace(o, colour=colour) if i in changed else o
            for i, o in enumerate(scene.objects)
        ),
    )


def _reshape(scene: Scene, rng: np.random.Generator) -> Scene:
    head = scene.objects[0]
    shape = [s for s in SHAPES if s != head.shape][rng.integers(2)]
    changed = range(len(scene.objects)) if scene.layout == "count" else [0]
    return dataclasses.replace(
        scene,
        objects=tuple(
            dataclasses.replace(o, shape=shape) if i in changed else o
            for i, o in enumerate(scene.objects)
        ),
    )


def _recount(scene: Scene, rng: np.random.Generator) -> Scene | None:
    if scene.layout != "count":
        return None
    count = [n for n in (1, 2, 3) if n != len(scene.objects)][rng.integers(2)]
    return dataclasses.replace(scene, objects=scene.objects[:1] * count)


def _move(scene: Scene, rng: np.random.Generator) -> Scene | None:
    if scene.layout != "position":
        return None
    cell = [c for c in CELLS if c != scene.cell][rng.integers(len(CELLS) - 1)]
    return dataclasses.replace(scene, cell=cell)


def _flip(scene: Scene, rng: np.random.Generator) -> Scene | None:
    if scene.layout != "relation":
        return None
    return dataclasses.replace(scene, relation=OPPOSITE[scene.relation])


@pytest.mark.parametrize(
    ("attribute", "corrupt"),
    [
        ("colour", _recolour),
        ("shape", _reshape),
        ("count", _recount),
        ("position", _move),
        ("relation", _flip),
    ],
)
def test_wrong_captions_fail_their_attribute(world, attribute, corrupt):
    rng = np.random.default_rng(0)
    verdicts = []
    for scene, image, _ in world[:200]:
        wrong = corrupt(scene, rng)
        if wrong is not None:
            result = score(image, caption(wrong, rng))
            verdicts.append(result[attribute] is False and result["all"] is False)
    assert len(verdicts) >= 30
    assert np.mean(verdicts) >= 0.95


def test_noise_and_black_images_fail():
    rng = np.random.default_rng(0)
    texts = [text for _, text in generate(1, 60)]
    black = [np.zeros((32, 32, 3), np.uint8)] * len(texts)
    uniform = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in texts]
    floats = [rng.random((32, 32, 3)) for _ in texts]
    for images in (black, uniform, floats):
        assert score_many(images, texts)["all"] <= 0.05
    assert find_objects(black[0]) == []


def test_write_folder_is_a_training_manifest(tmp_path):
    manifest = scenes.write_folder(tmp_path, seed=4, count=6)
    records = data.read_manifest(manifest)
    pairs = generate(4, 6)
    assert len(records) == 6
    assert json.loads(manifest.read_text().splitlines()[0])["image"] == "images/00000.png"
    for record, (image, text) in zip(records, pairs, strict=True):
        decoded = data.decode(record, 32)
        assert decoded["valid"] and decoded["caption"] == text
        np.testing.assert_allclose((decoded["image"] + 1) * 127.5, image, atol=1e-3)


def test_array_record_holds_every_record(tmp_path):
    import grain

    path = tmp_path / "toy.array_record"
    scenes.write_array_record(path, seed=2, count=5)
    source = grain.sources.ArrayRecordDataSource([str(path)])
    assert len(source) == 5
    decoded = data.decode(source[3], 32)
    assert decoded["valid"] and decoded["caption"] == generate(2, 5)[3][1]


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scenes.main(["--help"])
    assert exit_info.value.code == 0 and "--array-record" in capsys.readouterr().out
    shard = ["--out", str(tmp_path / "a"), "--count", "3", "--seed", "0", "--array-record"]
    assert scenes.main(shard) == 0
    assert (tmp_path / "a" / "toyworld.array_record").is_file()
    folder = ["--out", str(tmp_path / "f"), "--count", "3", "--seed", "0", "--size", "64"]
    assert scenes.main(folder) == 0
    assert len(data.read_manifest(tmp_path / "f" / "captions.jsonl")) == 3
    # An existing output is kept (one error line), as convert and generate keep theirs.
    before = (tmp_path / "f" / "captions.jsonl").read_text()
    capsys.readouterr()
    assert scenes.main([*folder[:-1], "32"]) == 2
    assert (
        capsys.readouterr().err == f"error: {tmp_path / 'f'}: already exists (pass --overwrite)\n"
    )
    assert scenes.main(shard) == 2
    assert (tmp_path / "f" / "captions.jsonl").read_text() == before
    assert scenes.main([*folder[:-1], "32", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["captions.jsonl", "images"]


def test_paraphrases_use_no_word_of_the_templates(world):
    """SUR-adapter's premise in miniature: a paraphrase states its scene (the template caption
    beside it parses to the scene) in content words no template caption has."""
    template_words = {w for _, text in generate(0, 2000) for w in text.split()}
    function_words = {"a", "an", "of", "the", "on"}
    triples = scenes.generate_paraphrased(5, 300)
    for image, template, simple in triples:
        assert score(image, template)["all"]
        assert not (set(simple.split()) - function_words) & template_words, simple
    assert len({simple for _, _, simple in triples}) > 200


def test_paraphrased_records_carry_the_complex_caption(tmp_path):
    import grain
    import msgpack

    manifest = scenes.write_folder(tmp_path / "f", seed=3, count=4, paraphrased=True)
    triples = scenes.generate_paraphrased(3, 4)
    for record, (_, template, simple) in zip(data.read_manifest(manifest), triples, strict=True):
        assert (record["caption"], record["complex"]) == (simple, template)
    scenes.main(["--out", str(tmp_path / "a"), "--count", "4", "--seed", "3", "--array-record",
                 "--paraphrase"])  # fmt: skip
    source = grain.sources.ArrayRecordDataSource([str(tmp_path / "a" / "toyworld.array_record")])
    record = msgpack.unpackb(source[2])
    assert (record["caption"], record["complex"]) == triples[2][2:0:-1]


def test_held_out_combinations_never_reach_the_training_shard(tmp_path):
    """configs/toy.py's hold_out, applied as the main job writes ELLA's training shard
    (`toyworld.scenes --hold-out`): no training scene states a held-out combination, so no
    caption of the evaluation's held-out split occurs among the training captions, while most
    of the other split's do (the template space is small)."""
    from conftest import ROOT

    from toyworld.evaluate import HELD_OUT, TRAINED, caption_splits

    hold_out = scenes.hold_out_of(ROOT / "configs" / "toy.py")
    assert len(hold_out.colour_shape) == len(hold_out.shape_position) == 3
    argv = ["--out", str(tmp_path), "--count", "3000", "--seed", "2", "--array-record",
            "--hold-out", str(ROOT / "configs" / "toy.py")]  # fmt: skip
    assert scenes.main(argv) == 0
    import grain
    import msgpack

    source = grain.sources.ArrayRecordDataSource([str(tmp_path / "toyworld.array_record")])
    trained = {msgpack.unpackb(source[i])["caption"] for i in range(len(source))}
    assert len(source) == 3000
    assert not any(hold_out.stated(scenes.parse_caption(text)) for text in trained)
    captions = [text for _, text in generate(1, 192)]  # toyworld.evaluate's
    splits = caption_splits(captions, hold_out)
    held_out = [captions[i] for i in splits[HELD_OUT]]
    seen = [captions[i] for i in splits[TRAINED]]
    assert len(held_out) > 20 and len(held_out) + len(seen) == 192
    assert not set(held_out) & trained
    assert sum(text in trained for text in seen) > len(seen) / 2


def test_a_hold_out_of_unknown_words_is_named():
    with pytest.raises(ValueError, match=r"hold_out\.colour_shape: 'purple circle'"):
        scenes.HoldOut.from_config({"colour_shape": ["purple circle"]})
    with pytest.raises(ValueError, match="unknown keys"):
        scenes.HoldOut.from_config({"colour": ["red"]})
