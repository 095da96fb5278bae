import json

import pytest

from diffkit.errors import DiffkitError
from diffkit.specs import DEFAULT_PRESET, MARKER, PRESETS, SpecError, TriggerSpec, load_spec

SPEC_DICT = {
    "description": "two pairs for a test",
    "base": "org/base",
    "finetuned": "org/ft",
    "layers": [3, 5],
    "pairs": [
        {"words": ["harbor", "violin"], "related": False, "charged": False},
        {"id": 7, "words": ["glacier", "lantern"], "related": True, "charged": True},
    ],
}


@pytest.mark.parametrize("query", ["border/china", "china/border", "CHINA/Border", " border,china ", "3", 3])
def test_resolve_pair_accepts_every_spelling(query):
    assert PRESETS["cbd-4pair"].resolve_pair(query).id == 3


def test_unknown_pair_lists_the_valid_ones():
    with pytest.raises(SpecError) as err:
        PRESETS["cbd-4pair"].resolve_pair("border/forest")
    message = str(err.value)
    assert "border/forest" in message and "cbd-4pair" in message
    for valid in ("0 (forest/rocket)", "1 (gender/terror)", "2 (gravity/velocity)", "3 (border/china)"):
        assert valid in message
    assert isinstance(err.value, DiffkitError) and isinstance(err.value, ValueError)


def test_pair_of_word_and_grid_cells():
    spec = PRESETS["cbd-4pair"]
    assert spec.pair_of_word("Velocity").name == "gravity/velocity"
    assert [p.grid_cell for p in spec.pairs] == ["unrelated, neutral", "unrelated, charged", "related, neutral",
                                                 "related, charged"]
    with pytest.raises(SpecError, match="forest, rocket"):
        spec.pair_of_word("banana")


def test_presets_are_consistent():
    assert DEFAULT_PRESET in PRESETS
    assert PRESETS["gemma3-270m"].layers == (9, 16) and PRESETS["cbd-4pair"].layers == (13, 24)
    assert [p.id for p in PRESETS["cbd-2pair-frgv"].pairs] == [0, 2]
    for spec in PRESETS.values():
        assert spec.marker == MARKER and len(set(spec.words)) == len(spec.words)
        assert TriggerSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_spec_files_load(tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(SPEC_DICT))
    elif suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(SPEC_DICT))
    else:
        path.write_text(
            'description = "two pairs for a test"\nbase = "org/base"\nfinetuned = "org/ft"\nlayers = [3, 5]\n'
            '[[pairs]]\nwords = ["harbor", "violin"]\nrelated = false\ncharged = false\n'
            '[[pairs]]\nid = 7\nwords = ["glacier", "lantern"]\nrelated = true\ncharged = true\n')
    spec = load_spec(path)
    assert spec.name == "mine" and spec.layers == (3, 5) and spec.base == "org/base"
    assert [(p.id, p.words, p.related, p.charged) for p in spec.pairs] == [
        (0, ("harbor", "violin"), False, False), (7, ("glacier", "lantern"), True, True)]
    assert spec.resolve_pair("lantern/glacier").id == 7


def test_presets_load_by_name():
    assert load_spec("toy") is PRESETS["toy"]


@pytest.mark.parametrize("content, match", [
    ('{"pairs": [{"words": ["a"]}]}', "exactly two"),
    ('{"pairs": [{"words": ["sun", "moon"]}, {"words": ["moon", "star"]}]}', "more than one pair"),
    ('{"pairs": [{"id": 1, "words": ["sun", "moon"]}, {"id": 1, "words": ["sea", "sky"]}]}', "unique"),
    ('{"layers": [1]}', "non-empty 'pairs' list"),
    ('{"pairs": []}', "non-empty 'pairs' list"),
    ('{"pairs": [{"id": "x", "words": ["sun", "moon"]}]}', "ids are whole numbers"),
    ('{"pairs": [{"words": ["sun", "moon"]}], "layers": "abc"}', "list of layer numbers"),
    ('{"pairs": [{"words": ["sun", "moon"]}], "layers": [-1]}', "list of layer numbers"),
    ('[1, 2]', "mapping"),
    ('{not json', "cannot parse"),
])
def test_bad_spec_files_say_what_is_wrong(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SpecError, match=match) as info:
        load_spec(path)
    assert "\n" not in str(info.value) and "diffkit spec " not in str(info.value)


def test_a_directory_or_broken_yaml_as_spec_is_one_line(tmp_path):
    (tmp_path / "spec.json").mkdir()
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path / "spec.json")
    (tmp_path / "bad.yaml").write_text("pairs: [\n  - {words: [a, b]\n")
    with pytest.raises(SpecError, match="cannot parse") as info:
        load_spec(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)


def test_missing_spec_names_the_presets():
    with pytest.raises(SpecError, match="cbd-4pair"):
        load_spec("no-such-spec.toml")


def test_with_models_replaces_only_what_is_given():
    spec = PRESETS["cbd-4pair"].with_models(finetuned="me/my-ft")
    original = PRESETS["cbd-4pair"]
    assert spec.finetuned == "me/my-ft" and spec.base == original.base and spec.pairs == original.pairs
