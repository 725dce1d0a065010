import csv
import json

import pytest

from refusalguard_kernels.integration.prompts import BUILTIN_SETS, builtin_prompts, load_prompts


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_builtin_sets_are_clean(name):
    prompts = builtin_prompts(name)
    assert 50 <= len(prompts) <= 100
    assert len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and p == p.strip() and 10 <= len(p) <= 200 for p in prompts)
    assert prompts == load_prompts(f"builtin:{name}")


def test_builtin_sets_are_disjoint_and_similar_in_shape():
    harmful, harmless = builtin_prompts("harmful"), builtin_prompts("harmless")
    assert not set(harmful) & set(harmless)
    mean_h = sum(map(len, harmful)) / len(harmful)
    mean_l = sum(map(len, harmless)) / len(harmless)
    assert 0.75 < mean_h / mean_l < 1.33
    assert abs(len(harmful) - len(harmless)) <= 10


def _words(text: str) -> set[str]:
    import re

    return set(re.findall(r"[a-z']+", text.lower()))


def test_evaluation_sets_are_held_out_from_the_extraction_sets():
    extraction = builtin_prompts("harmful") + builtin_prompts("harmless")
    evaluation = builtin_prompts("harmful_eval") + builtin_prompts("harmless_eval")
    assert len(evaluation) == 100 and len(set(evaluation)) == 100
    assert not set(evaluation) & set(extraction)
    # no near-duplicate either: every evaluation prompt shares under half its words with every extraction prompt
    closest = max(len(_words(a) & _words(b)) / len(_words(a) | _words(b)) for a in evaluation for b in extraction)
    assert closest < 0.5, closest
    harmful, harmless = builtin_prompts("harmful_eval"), builtin_prompts("harmless_eval")
    assert not set(harmful) & set(harmless)
    mean_h = sum(map(len, harmful)) / len(harmful)
    mean_l = sum(map(len, harmless)) / len(harmless)
    assert 0.75 < mean_h / mean_l < 1.33


def test_eval_defaults_to_the_held_out_sets():
    from refusalguard_kernels.cli import build_parser

    args = build_parser().parse_args(["eval", "some-model"])
    assert (args.harmful, args.benign) == ("builtin:harmful_eval", "builtin:harmless_eval")


def test_builtin_returns_a_fresh_list():
    prompts = builtin_prompts("harmful")
    prompts.clear()
    assert builtin_prompts("harmful")


def test_unknown_builtin():
    with pytest.raises(ValueError, match="harmful, harmless"):
        builtin_prompts("toxic")
    with pytest.raises(ValueError, match="unknown built-in"):
        load_prompts("builtin:toxic")


def test_list_is_stripped_and_limited():
    assert load_prompts(["  a b ", "c\n", "d"], limit=2) == ["a b", "c"]
    assert load_prompts(("x", "y")) == ["x", "y"]


@pytest.mark.parametrize(
    "bad, match",
    [([], "no prompts"), (["ok", "  "], "prompt 1 .* empty"), (["ok", 3], "prompt 1 .* int, not a string")],
)
def test_list_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        load_prompts(bad)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        load_prompts(["a"], limit=limit)


def test_bad_source_type():
    with pytest.raises(TypeError, match="source must be"):
        load_prompts(42)


def test_txt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt  \n", encoding="utf-8")
    assert load_prompts(path) == ["first prompt", "second prompt"]
    assert load_prompts(str(path), limit=1) == ["first prompt"]


def test_json_list_and_objects(tmp_path):
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["a", "b"]))
    assert load_prompts(strings) == ["a", "b"]
    objects = tmp_path / "o.json"
    objects.write_text(json.dumps([{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2}]))
    assert load_prompts(objects, column="prompt") == ["a", "b"]
    with pytest.raises(ValueError, match="pass column="):
        load_prompts(objects)
    with pytest.raises(ValueError, match="no field 'text'"):
        load_prompts(objects, column="text")
    nested = tmp_path / "n.json"
    nested.write_text(json.dumps({"prompts": ["x", "y"]}))
    assert load_prompts(nested, column="prompts") == ["x", "y"]
    scalar = tmp_path / "bad.json"
    scalar.write_text("3")
    with pytest.raises(ValueError, match="JSON list"):
        load_prompts(scalar)


def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"q": "one"}\n\n{"q": "two"}\n')
    assert load_prompts(path, column="q") == ["one", "two"]
    broken = tmp_path / "b.jsonl"
    broken.write_text('"ok"\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        load_prompts(broken)


def test_csv(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerow([1, "hello, there"])
        writer.writerow([2, "bye"])
    assert load_prompts(path, column="text") == ["hello, there", "bye"]
    with pytest.raises(ValueError, match="pass column="):
        load_prompts(path)
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(path, column="prompt")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts("no/such/prompts.txt")


def test_dataset_name_needs_column():
    with pytest.raises(ValueError, match="pass column="):
        load_prompts("someone/some-dataset")


def test_local_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"instruction": "alpha"}\n{"instruction": "beta"}\n')
    assert load_prompts(str(folder), column="instruction") == ["alpha", "beta"]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_prompts(str(folder), column="text")
