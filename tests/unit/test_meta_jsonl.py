import json

import pytest

from internvl_tune.data.errors import DataError
from internvl_tune.data.jsonl import JsonlFile
from internvl_tune.data.meta import load_meta, repeat_indices


def test_repeat_time_integer_part_repeats_every_line():
    assert repeat_indices(3, 1, seed=0) == [0, 1, 2]
    assert repeat_indices(3, 2.0, seed=0) == [0, 1, 2, 0, 1, 2]


def test_repeat_time_fraction_is_a_seeded_random_subset():
    half = repeat_indices(10, 0.5, seed=1)
    assert len(half) == 5 and len(set(half)) == 5
    assert half == repeat_indices(10, 0.5, seed=1)
    assert half != list(range(5)) or repeat_indices(10, 0.5, seed=2) != list(range(5))  # not a head slice
    two_and_half = repeat_indices(10, 2.5, seed=1)
    assert len(two_and_half) == 25
    assert two_and_half[:20] == list(range(10)) * 2
    assert two_and_half[20:] == half  # same seed, same extra subset
    assert repeat_indices(3, 0.1, seed=0) == []  # floor(0.3) = 0 lines


def test_repeat_time_rejects_non_positive():
    with pytest.raises(ValueError):
        repeat_indices(3, 0, seed=0)


def _meta(tmp_path, **spec):
    (tmp_path / "a.jsonl").write_text("{}\n")
    base = {"root": "img", "annotation": "a.jsonl", "data_augment": False, "repeat_time": 1}
    base.update(spec)
    base = {k: v for k, v in base.items() if v is not None}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"ds": base}))
    return path


def test_meta_resolves_paths_against_the_meta_folder(tmp_path):
    [entry] = load_meta(_meta(tmp_path, max_dynamic_patch=6, repeat_time=0.5))
    assert entry.annotation == tmp_path / "a.jsonl"
    assert entry.resolve("x/y.jpg") == str(tmp_path / "img" / "x" / "y.jpg")
    assert entry.max_dynamic_patch == 6 and entry.repeat_time == 0.5


def test_meta_s3_root_is_concatenated(tmp_path):
    [entry] = load_meta(_meta(tmp_path, root="s3://bucket/imgs/"))
    assert entry.resolve("a.jpg") == "s3://bucket/imgs/a.jpg"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"data_augment": None}, "'data_augment' (true or false) is required"),
        ({"annotation": "a.json"}, "must be a .jsonl file"),
        ({"annotation": "missing.jsonl"}, "not found"),
        ({"repeat_time": 0}, "'repeat_time' must be a number > 0"),
        ({"repeat_time": "2"}, "'repeat_time' must be a number > 0"),
        ({"max_dynamic_patch": 0}, "'max_dynamic_patch' must be an integer"),
        ({"root": None}, "field 'root' is required"),
    ],
)
def test_meta_errors_name_the_file_and_dataset(tmp_path, spec, message):
    path = _meta(tmp_path, **spec)
    with pytest.raises(DataError) as e:
        load_meta(path)
    assert message in str(e.value) and str(path) in str(e.value) and "'ds'" in str(e.value)


def test_meta_data_augment_optional_for_preference_data(tmp_path):
    [entry] = load_meta(_meta(tmp_path, data_augment=None), require_data_augment=False)
    assert entry.data_augment is False


def test_meta_invalid_json_names_line(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{\n  "ds": {,\n}')
    with pytest.raises(DataError, match=r"meta.json:2: invalid JSON"):
        load_meta(path)


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1}\n\n   \n{"id": 2}\n{"id": 3}')  # no trailing newline on the last line
    f = JsonlFile(path)
    assert len(f) == 3
    assert f[1] == ({"id": 2}, f"{path}:4")
    assert f[2][0] == {"id": 3}


@pytest.mark.parametrize("line", ['{"id": 1,}', "[1, 2]", "\xff\xfe"])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": 0}\n' + line.encode("latin-1") + b"\n")
    f = JsonlFile(path)
    with pytest.raises(DataError) as e:
        f[1]
    assert f"{path}:2:" in str(e.value) and e.value.kind == "malformed JSON"
