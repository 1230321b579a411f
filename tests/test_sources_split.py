"""data.split (with slicing), data.eval_split and data.subset on local multi-config datasets."""

import json

import datasets
import pytest

from jaxtrain.data import chat, preference, sources, text
from jaxtrain.errors import ConfigError

README = """---
configs:
- config_name: en
  data_files:
  - split: train_sft
    path: en/train_sft.jsonl
  - split: test_sft
    path: en/test_sft.jsonl
- config_name: de
  data_files:
  - split: train_sft
    path: de/train_sft.jsonl
  - split: test_sft
    path: de/test_sft.jsonl
---
"""


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _text_rows(subset, split, n):
    return [{"text": f"{subset} {split} {i}"} for i in range(n)]


@pytest.fixture
def configs_dir(tmp_path):
    """A local dataset of two configs (README.md metadata), splits train_sft / test_sft."""
    root = tmp_path / "mc"
    for subset in ("en", "de"):
        _write(root / subset / "train_sft.jsonl", _text_rows(subset, "train_sft", 20))
        _write(root / subset / "test_sft.jsonl", _text_rows(subset, "test_sft", 5))
    (root / "README.md").write_text(README)
    return root


def test_subset_and_split_of_readme_configs(configs_dir):
    docs = text.load_documents(str(configs_dir), split="train_sft", subset="de")
    assert docs == [f"de train_sft {i}" for i in range(20)]
    assert text.load_documents(str(configs_dir), split="test_sft", subset="en")[0] == \
        "en test_sft 0"


def test_slices_match_datasets_split_syntax(configs_dir):
    for spec in ("train_sft[:10%]", "train_sft[3:7]", "train_sft[-25%:]",
                 "train_sft[:3]+test_sft[-1:]"):
        ours = text.load_documents(str(configs_dir), split=spec, subset="en")
        theirs = datasets.load_dataset(str(configs_dir), "en", split=spec)["text"]
        assert ours == list(theirs), spec


def test_missing_subset_lists_the_subsets(configs_dir):
    with pytest.raises(ConfigError, match=r"set data.subset to one of \['en', 'de'\]"):
        text.load_documents(str(configs_dir), split="train_sft")
    with pytest.raises(ConfigError, match=r"'fr' is not a subset.*\['en', 'de'\]"):
        text.load_documents(str(configs_dir), split="train_sft", subset="fr")


def test_unknown_split_lists_the_splits(configs_dir):
    with pytest.raises(ValueError, match=r"Unknown split 'train'.*train_sft.*test_sft"):
        text.load_documents(str(configs_dir), split="train", subset="en")
    with pytest.raises(ConfigError, match="not a split spec"):
        text.load_documents(str(configs_dir), split="train_sft[", subset="en")


def test_subset_folders_and_saved_dataset_dict(tmp_path):
    root = tmp_path / "c4"
    _write(root / "en" / "train.jsonl", _text_rows("en", "train", 8))
    _write(root / "en" / "validation.jsonl", _text_rows("en", "validation", 2))
    datasets.DatasetDict({
        "train_sft": datasets.Dataset.from_list(_text_rows("x", "train_sft", 6)),
        "test_sft": datasets.Dataset.from_list(_text_rows("x", "test_sft", 3)),
    }).save_to_disk(str(root / "saved"))
    assert sources.local_subsets(str(root)) == ["en", "saved"]
    assert text.load_documents(str(root), split="validation", subset="en") == \
        ["en validation 0", "en validation 1"]
    assert text.load_documents(str(root), split="train_sft[1:3]", subset="saved") == \
        ["x train_sft 1", "x train_sft 2"]
    with pytest.raises(ConfigError, match=r"'xx' is not a subset.*\['en', 'saved'\]"):
        text.load_documents(str(root), subset="xx")
    with pytest.raises(ConfigError, match="has no subsets"):
        text.load_documents(str(root / "en" / "train.jsonl"), subset="en")


def test_undivided_source_slices_after_the_held_out_rule(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write(path, _text_rows("u", "all", 200))
    train = text.load_documents(str(path), split="train")
    assert len(train) == 196  # rows 49, 99, 149, 199 held out
    assert text.load_documents(str(path), split="train[:10%]") == train[:20]
    assert text.load_documents(str(path), split="validation[1:3]") == ["u all 99", "u all 149"]


def test_split_source_reads_split_and_eval_split():
    import ml_collections

    d = ml_collections.ConfigDict(dict(source="s", eval_source="", split="train_sft[:5%]",
                                       eval_split="test_sft", subset="en"))
    assert sources.split_source(d, "train") == ("s", "train_sft[:5%]")
    assert sources.split_source(d, "validation") == ("s", "test_sft")
    assert sources.subset_of(d, "s") == "en"
    d.eval_split = ""
    assert sources.split_source(d, "validation") == ("s", "validation")
    d.eval_source = "e.jsonl"
    assert sources.split_source(d, "validation") == ("e.jsonl", "all")
    assert sources.subset_of(d, "e.jsonl") == ""


def test_chat_and_preference_read_split_and_subset(tmp_path):
    root = tmp_path / "ultra"
    turn = lambda i: {"messages": [{"role": "user", "content": f"q{i}"},  # noqa: E731
                                   {"role": "assistant", "content": f"a{i}"}]}
    _write(root / "default" / "train_sft.jsonl", [turn(i) for i in range(10)])
    _write(root / "default" / "test_sft.jsonl", [turn(100 + i) for i in range(3)])
    got = chat.load_chat_examples(str(root), split="train_sft[2:4]", subset="default")
    assert [m["messages"][0]["content"] for m in got] == ["q2", "q3"]
    pref = lambda i: {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}  # noqa: E731
    _write(root / "prefs" / "train_prefs.jsonl", [pref(i) for i in range(10)])
    got = preference.load_preference_examples(str(root), split="train_prefs[-2:]",
                                              subset="prefs")
    assert len(got) == 2 and got == preference.load_preference_examples(
        str(root / "prefs"), split="train_prefs[8:]")
    assert "c8" in str(got[0]) and "c9" in str(got[1])


def test_pair_data_reads_split_specs_and_subsets(tmp_path):
    from jaxtrain.data import pair_config, pair_sources

    root = tmp_path / "pairs"
    rows = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(12)]
    _write(root / "en" / "train.jsonl", rows)
    _write(root / "en" / "test.jsonl", rows[:4])
    d = pair_config.default_data_config()
    d.name, d.subset, d.split, d.eval_split = str(root), "en", "train[2:10]", "test[:50%]"
    kw = dict(mode="t2t", num_negatives=0, image_size=8, seed=0)
    train = pair_sources.load_part(d, "train", **kw)
    assert [e["query"] for e in sources.to_dicts(train.examples)] == [f"q{i}" for i in range(2, 10)]
    held = pair_sources.load_part(d, "eval", **kw)
    assert [e["query"] for e in sources.to_dicts(held.examples)] == ["q0", "q1"]
    d.subset = "xx"
    with pytest.raises(ConfigError, match=r"'xx' is not a subset.*\['en'\]"):
        pair_sources.load_part(d, "train", **kw)
