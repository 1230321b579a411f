"""Data passed in code (`jaxtrain.train(config, workdir, train_data=..., eval_data=...)`): each
task trained from rows in memory equals the same rows read from a file (losses step by step,
and the held-out evaluation); a Dataset, a list of dicts and a DataFrame give the same rows;
bad containers and missing columns are errors naming the type and the columns; `init_params`
reaches the engine; `num_train_examples` counts each task's rows per epoch."""

import io
import json
import math

import datasets
import jax
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import jaxtrain
from jaxtrain import ConfigError, Trainer
from jaxtrain.data import memory_source
from jaxtrain.tasks.lm import LMTask
from tests.test_lm_task import load_config

ONE = jax.devices()[:1]  # the runs compared: one device (compiles faster than 8)

WORDS = ("the cat sat on a mat while red foxes ran past seven quiet hills and blue rivers "
         "sang of kings who lost their crowns at dawn").split()


def documents(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, int(rng.integers(8, 30))))} for _ in range(n)]


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def preferences(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.",
                     "rejected": f"It is {a + b + int(rng.integers(1, 9))}."})
    return rows


def image_pairs(n: int, seed: int = 0) -> list[dict]:
    """uint8 [16, 16, 3] images with captions of the shapes vocabulary."""
    rng = np.random.default_rng(seed)
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    rows = []
    for i in range(n):
        name = list(colors)[i % 3]
        image = np.clip(np.asarray(colors[name]) + rng.integers(-20, 20, (16, 16, 3)), 0, 255)
        rows.append({"image": image.astype(np.uint8), "text": f"a {name} circle"})
    return rows


def drop_eval(config, name: str) -> None:
    with config.unlocked():
        del config.evals[name]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def short(config, steps: int = 2):
    """`steps` steps, every step logged, evaluated at the end, one device set for both runs."""
    config.train.steps = steps
    config.train.log_every = 1
    config.optim.warmup_steps = 1
    config.eval.every = steps
    config.checkpoint.every = 0
    config.checkpoint.async_save = False
    return config


def stacked(rows) -> dict[str, np.ndarray]:
    """Random-access rows (in memory or a token store) as [rows, ...] arrays."""
    return {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in rows[0]}


def history(result) -> dict[int, dict[str, float]]:
    """step -> every metric logged at it that is not a timing."""
    out: dict[int, dict[str, float]] = {}
    for record in result.metrics:
        out.setdefault(int(record["step"]), {}).update(
            {k: v for k, v in record.items()
             if k.startswith(("train/loss", "eval/")) and "time" not in k and "/s" not in k})
    return out


def assert_same_run(a, b) -> None:
    ha, hb = history(a), history(b)
    assert ha.keys() == hb.keys() and ha
    assert any("train/loss" in v for v in ha.values())
    assert any(k.startswith("eval/") for v in ha.values() for k in v)
    for step in ha:
        assert ha[step].keys() == hb[step].keys(), step
        for k in ha[step]:
            np.testing.assert_allclose(ha[step][k], hb[step][k], rtol=1e-6, err_msg=f"{step} {k}")


# ------------------------------------------------------------------------------------------------
# Each task: in memory == the same rows in a file


@pytest.mark.slow
def test_lm_text_from_a_list_equals_the_files(tmp_path):
    train, evals = documents(60), documents(12, seed=1)
    c = short(load_config("lm", "runlocal", data__max_documents=0))
    file_cfg = c.copy_and_resolve_references()
    file_cfg.data.source = write_jsonl(tmp_path / "train.jsonl", train)
    file_cfg.data.split = "all"  # every row trains: as with eval_data
    file_cfg.data.eval_source = write_jsonl(tmp_path / "eval.jsonl", evals)
    from_file = jaxtrain.train(file_cfg, str(tmp_path / "file"), devices=ONE)
    trainer = Trainer(c, str(tmp_path / "mem"), train_data=train, eval_data=evals,
                      devices=ONE)
    assert memory_source.is_in_memory_name(trainer.config.data.source)
    assert trainer.config.data.token_store == "memory"
    assert c.data.source == "shakespeare"  # the caller's config is not changed
    assert_same_run(from_file, trainer.train())
    assert trainer.task.num_train_examples() == len(trainer.task._train_rows())


def test_lm_text_containers_give_the_same_rows_and_the_file_hold_out(tmp_path):
    """A Dataset, a list and a DataFrame give the same training rows; without eval_data every
    50th row is held out, as from a file."""
    docs = documents(250)  # 5 held out
    c = load_config("lm", "runlocal", data__max_documents=0)
    file_cfg = c.copy_and_resolve_references()
    file_cfg.data.source = write_jsonl(tmp_path / "docs.jsonl", docs)
    ref = Trainer(file_cfg, str(tmp_path / "f")).task
    for data in (docs, pd.DataFrame(docs), datasets.Dataset.from_list(docs)):
        task = Trainer(c, str(tmp_path / "m"), train_data=data).task
        for split in ("train", "validation"):
            a, b = stacked(ref._row_source(split)), stacked(task._row_source(split))
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split} {k}")
        assert task.num_train_examples() == len(ref._row_source("train"))
    # train.epochs counts the in-memory rows: steps = ceil(epochs * rows / batch)
    c.train.steps = LMTask.default_config().train.steps
    c.train.epochs = 1.5
    trainer = Trainer(c, str(tmp_path / "e"), train_data=docs)
    rows = len(ref._row_source("train"))
    assert trainer.config.train.steps == math.ceil(1.5 * rows / c.train.batch_size)


@pytest.mark.slow
def test_sft_chat_from_a_dataframe_equals_the_file(tmp_path):
    rows = chats(40)
    c = short(load_config("sft", "runlocal", data__seq_len=64, train__batch_size=8))
    drop_eval(c, "generation")
    file_cfg = c.copy_and_resolve_references()
    file_cfg.data.source = write_jsonl(tmp_path / "chats.jsonl", rows)
    from_file = jaxtrain.train(file_cfg, str(tmp_path / "file"), devices=ONE)
    # rows as parquet gives them back: messages as numpy object arrays
    frame = pd.read_parquet(io.BytesIO(pd.DataFrame(rows).to_parquet()))
    assert isinstance(frame["messages"][0], np.ndarray)
    assert_same_run(from_file, jaxtrain.train(c, str(tmp_path / "mem"), train_data=frame,
                                              devices=ONE))


@pytest.mark.slow
def test_dpo_from_a_dataset_equals_the_files(tmp_path):
    train, evals = preferences(24), preferences(8, seed=1)
    c = short(load_config("dpo", "runlocal", init_from="", train__batch_size=8,
                          eval__batch_size=8, data__max_length=32, data__max_prompt_length=24))
    c.model.update(dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=64))
    file_cfg = c.copy_and_resolve_references()
    file_cfg.data.source = write_jsonl(tmp_path / "train.jsonl", train)
    file_cfg.data.split = "all"
    file_cfg.data.eval_source = write_jsonl(tmp_path / "eval.jsonl", evals)
    from_file = jaxtrain.train(file_cfg, str(tmp_path / "file"), devices=ONE)
    trainer = Trainer(c, str(tmp_path / "mem"), train_data=datasets.Dataset.from_list(train),
                      eval_data=evals, devices=ONE)
    assert trainer.task.num_train_examples() == 24
    assert_same_run(from_file, trainer.train())


def clip_config(**overrides):
    c = load_config("clip", "runlocal", train__batch_size=8, eval__batch_size=8,
                    data__tokenizer="gpt2", model__vocab_size=50304, **overrides)
    drop_eval(c, "zero_shot")
    return short(c)


@pytest.mark.slow
def test_clip_image_arrays_equal_png_files(tmp_path):
    """uint8 arrays in memory == the same pixels as PNG files named in a jsonl file (held-out
    pairs: the eval split there, eval_data here)."""
    train, evals = image_pairs(24), image_pairs(12, seed=1)
    folder, images = tmp_path / "data", tmp_path / "images"
    folder.mkdir()
    images.mkdir()
    for split, rows in (("train", train), ("validation", evals)):
        listed = []
        for i, row in enumerate(rows):
            Image.fromarray(row["image"]).save(images / f"{split}{i}.png")
            listed.append({"image": f"../images/{split}{i}.png", "text": row["text"]})
        write_jsonl(folder / f"{split}.jsonl", listed)
    c = clip_config()
    file_cfg = c.copy_and_resolve_references()
    file_cfg.data.name = str(folder)  # splits 'train' and 'validation' from the file names
    from_file = jaxtrain.train(file_cfg, str(tmp_path / "file"), devices=ONE)
    trainer = Trainer(c, str(tmp_path / "mem"), train_data=train, eval_data=evals,
                      devices=ONE)
    assert trainer.task.num_train_examples() == 24
    assert_same_run(from_file, trainer.train())


def test_clip_containers_give_the_same_batches(tmp_path):
    """Arrays in a list, PIL images in a DataFrame and a Dataset with an Image column give the
    same batches; without eval_data the last data.eval_fraction of train_data is held out."""
    rows = image_pairs(20)
    pil = [{"image": Image.fromarray(r["image"]), "text": r["text"]} for r in rows]
    c = clip_config(data__eval_fraction=0.25)
    batches = []
    for data in (rows, pd.DataFrame(pil), datasets.Dataset.from_list(pil)):
        task = Trainer(c, str(tmp_path), train_data=data).task
        assert task.num_train_examples() == 15
        it = task.train_iterator(seed=0, batch_size=8, process_index=0, process_count=1)
        held = list(task.heldout_batches(batch_size=8, process_index=0, process_count=1))
        batches.append((next(it), held[0]))
    for other in batches[1:]:
        for a, b in zip(batches[0], other, strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert batches[0][1]["valid"].sum() == 5  # rows 15-19 held out


def test_text_pairs_with_negatives_equal_the_file(tmp_path):
    """The text embedder's rows (query / positive / negatives lists) in memory give the batches
    of the same rows in a jsonl file, held-out split included."""
    rng = np.random.default_rng(0)
    rows = [{"query": " ".join(rng.choice(WORDS, 4)), "positive": " ".join(rng.choice(WORDS, 6)),
             "negatives": [" ".join(rng.choice(WORDS, 5)) for _ in range(3)]} for _ in range(20)]
    c = clip_config(contrastive__mode="t2t", contrastive__num_negatives=2,
                    data__eval_fraction=0.2)
    file_cfg = c.copy_and_resolve_references()
    file_cfg.data.name = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tasks = [Trainer(file_cfg, str(tmp_path)).task, Trainer(c, str(tmp_path), train_data=rows).task]
    got = []
    for task in tasks:
        assert task.num_train_examples() == 16
        it = task.train_iterator(seed=0, batch_size=8, process_index=0, process_count=1)
        got.append([next(it), next(it), *task.heldout_batches(batch_size=8, process_index=0,
                                                              process_count=1)])
    assert got[0][0]["negatives"].shape[:2] == (8, 2)
    for a, b in zip(*got, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Errors


def test_bad_containers_and_columns_are_errors_naming_them(tmp_path):
    c = load_config("lm", "runlocal")
    with pytest.raises(TypeError, match=r"train_data is a builtins.str; expected a "
                       r"datasets.Dataset, a list of dicts or a pandas DataFrame with the "
                       r"columns the 'lm' task reads: \['text'\]"):
        Trainer(c, str(tmp_path), train_data="docs.jsonl")
    with pytest.raises(TypeError, match=r"train_data\[1\] is a str, not a dict"):
        Trainer(c, str(tmp_path), train_data=[{"text": "a"}, "b"])
    with pytest.raises(TypeError, match=r"DatasetDict \(splits \['train'\]\): pass one split"):
        splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(documents(3))})
        Trainer(c, str(tmp_path), train_data=splits)
    with pytest.raises(ValueError, match=r"eval_data lacks the column\(s\) \['text'\].*Its "
                       r"columns are \['body'\]"):
        Trainer(c, str(tmp_path), eval_data=pd.DataFrame({"body": ["x"]}))
    with pytest.raises(ValueError, match=r"Row 2 of train_data lacks the column\(s\) \['text'\]"):
        Trainer(c, str(tmp_path), train_data=[{"text": "a"}, {"text": "b"}, {"txt": "c"}])
    with pytest.raises(ValueError, match="train_data has no rows"):
        Trainer(c, str(tmp_path), train_data=[])
    pairs = clip_config()
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['image'\].*contrastive.mode "
                       r"'i2t'.*Its columns are \['picture', 'text'\]"):
        Trainer(pairs, str(tmp_path), train_data=[{"picture": b"", "text": "a"}])
    with pytest.raises(ValueError, match=r"Row 1 of train_data: the image in column 'image': "
                       r"an image array must be"):
        Trainer(pairs, str(tmp_path), train_data=[{"image": np.zeros((4, 4, 3), np.uint8),
                                                   "text": "a"},
                                                  {"image": np.zeros((4, 4, 7)), "text": "b"}])
    with pytest.raises(ValueError, match=r"train_data: row 1 holds a int in column 'text'"):
        Trainer(pairs, str(tmp_path), train_data=[{"image": b"x", "text": "a"},
                                                  {"image": b"y", "text": 3}])


def test_row_errors_name_the_row_and_the_in_memory_source(tmp_path):
    """The file path's checks, with the row's index: a non-string text (LM), a text cell
    that is not a string (pairs)."""
    c = load_config("lm", "runlocal")
    docs = documents(5)
    docs[3] = {"text": 7}
    with pytest.raises(ValueError, match=r"Row 3 of '<in-memory[^']*>' \(split 'train'\).*"
                       r"holds a int"):
        Trainer(c, str(tmp_path), train_data=docs).task.num_train_examples()
    with pytest.raises(ValueError, match=r"positive column 'text' of '<in-memory[^']*>' \(split "
                       r"'train_data'\) holds Value\('int64'\), not text"):
        Trainer(clip_config(data__eval_fraction=0.0), str(tmp_path),
                train_data=[{"image": b"x", "text": 3}]).task.num_train_examples()


def test_a_config_naming_gone_in_memory_data_says_to_pass_it_again(tmp_path):
    c = load_config("lm", "runlocal")
    config = Trainer(c, str(tmp_path), train_data=documents(5)).config
    import gc

    gc.collect()  # the trainer, the only holder of the source, is gone
    with pytest.raises(ConfigError, match=r"'<in-memory[^']*>' is in-memory data passed to "
                       r"jaxtrain.train.*Pass the data again"):
        Trainer(config, str(tmp_path)).task.num_train_examples()
    with pytest.raises(ConfigError, match="data.streaming=False"):
        Trainer(load_config("lm", "runlocal", data__streaming=True), str(tmp_path),
                train_data=documents(5))
    with pytest.raises(ConfigError, match="eval_data without train_data"):
        Trainer(clip_config(), str(tmp_path), eval_data=image_pairs(2))


def test_two_trainers_keep_their_own_data(tmp_path):
    c = load_config("lm", "runlocal", data__max_documents=0)
    a = Trainer(c, str(tmp_path / "a"), train_data=documents(60))
    b = Trainer(c, str(tmp_path / "b"), train_data=documents(60, seed=5))
    assert a.config.data.source != b.config.data.source
    assert stacked(a.task._row_source("train"))["inputs"].tolist() != \
        stacked(b.task._row_source("train"))["inputs"].tolist()
    assert memory_source.lookup(a.config.data.source) is a.in_memory_data


def test_init_params_reaches_the_engine(tmp_path):
    """`init_params` is handed to the engine trainer (which places it: its own tests);
    `eval_data` alone replaces only the held-out set."""
    c = load_config("lm", "runlocal")
    params = {"embed": {"embedding": np.zeros((3, 4), np.float32)}}
    trainer = Trainer(c, str(tmp_path), init_params=params, eval_data=documents(12))
    assert trainer.init_params is params
    assert trainer.config.data.source == "shakespeare"
    assert memory_source.is_in_memory_name(trainer.config.data.eval_source)
    assert len(trainer.task._row_source("validation")) > 0


def test_num_train_examples_of_streaming_and_synthetic_data(tmp_path):
    assert Trainer(load_config("lm", "runlocal", data__streaming=True),
                   str(tmp_path)).task.num_train_examples() is None
    synthetic = load_config("lm", "runlocal", data__kind="synthetic", data__train_examples=48)
    assert Trainer(synthetic, str(tmp_path)).task.num_train_examples() == 48
