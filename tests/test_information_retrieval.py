"""The information_retrieval evaluator on tiny CLIP runs (8 simulated devices): its metrics equal
the plain NumPy reference applied to the embeddings the task computes, for the built-in set
and for an MTEB-layout directory; the layout's errors name the file and the line."""

import json
import os

import jax
import numpy as np
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain.data import mteb_retrieval
from jaxtrain.evaluators import eval_config
from jaxtrain.evaluators.information_retrieval import heldout_set, mteb_set

from .test_lm_task import load_config
from .test_ranking_metrics import reference


def _trainer(arg: str, **ir) -> Trainer:
    c = load_config("clip", arg)
    with c.unlocked():
        c.evals.ir = eval_config("information_retrieval", **ir)
    return Trainer(c)


def _embed(trainer: Trainer, state, modality: str, rows: np.ndarray) -> np.ndarray:
    params, _ = trainer.task.eval_params(state.params, state.frozen)
    fn = jax.jit(lambda p, x: trainer.task.encode(p, modality, x))
    return np.asarray(fn(params, rows), np.float64)


def _expected(q: np.ndarray, d: np.ndarray, qrels: list[dict[int, int]]) -> dict[str, float]:
    return reference(q @ d.T, qrels)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["i2t", "t2i"])  # images as queries, then as documents
def test_builtin_set_equals_numpy_reference(mode):
    trainer = _trainer(f"runlocal,mode={mode}")
    state = trainer.init_state()
    trainer.check_data()
    got = trainer.evaluate(state, names=["ir"])
    # The reference: every held-out pair, identical rows merged by hand, embedded directly.
    queries, positives = [], []
    for b in trainer.task.heldout_batches(batch_size=64, process_index=0, process_count=1):
        queries.append(b["query"][b["valid"]])
        positives.append(b["positive"][b["valid"]])
    queries, positives = np.concatenate(queries), np.concatenate(positives)
    q_ids, d_ids = {}, {}
    qrels: list[dict[int, int]] = []
    for qrow, prow in zip(queries, positives, strict=True):
        qi = q_ids.setdefault(qrow.tobytes(), len(q_ids))
        di = d_ids.setdefault(prow.tobytes(), len(d_ids))
        if qi == len(qrels):
            qrels.append({})
        qrels[qi][di] = 1
    uq = np.stack([np.frombuffer(k, queries.dtype).reshape(queries.shape[1:]) for k in q_ids])
    ud = np.stack([np.frombuffer(k, positives.dtype).reshape(positives.shape[1:])
                   for k in d_ids])
    q_mod, d_mod = {"i2t": ("image", "text"), "t2i": ("text", "image")}[mode]
    want = _expected(_embed(trainer, state, q_mod, uq), _embed(trainer, state, d_mod, ud), qrels)
    for key, value in want.items():
        assert got[f"eval/ir/{key}"] == pytest.approx(value, abs=1e-6), key
    assert got["eval/ir/queries"] == len(uq) and got["eval/ir/documents"] == len(ud)
    assert set(got) == {f"eval/ir/{k}" for k in (*want, "queries", "documents")}


def _write_mteb(root, corpus, queries, qrels, split="test", header="query-id\tcorpus-id\tscore"):
    os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
    with open(os.path.join(root, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in corpus)
    with open(os.path.join(root, "queries.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in queries)
    with open(os.path.join(root, "qrels", f"{split}.tsv"), "w") as f:
        f.write(header + "\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return str(root)


COLOURS = ["red", "green", "blue", "yellow", "purple", "white"]  # the shapes vocabulary
SHAPES = ["circle", "square", "triangle", "cross"]
CORPUS = [{"_id": f"d{i}", "title": c if i % 3 else "", "text": f"a large {c} {s} at the top"}
          for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)]
QUERIES = [{"_id": "q0", "text": "red circle"}, {"_id": "q1", "text": "blue square"},
           {"_id": "q2", "text": "a purple cross"}, {"_id": 3, "text": "green"},
           {"_id": "q4", "text": "unused query, no judgments"}]
QRELS = [("q0", "d0", 2), ("q0", "d1", 1), ("q1", "d9", 1), ("q2", "d19", 3), ("q2", "d18", 0),
         ("3", "d4", 1), ("3", "d5", 1), ("3", "d6", 2), ("3", "d23", 0)]


def test_mteb_directory_t2t_equals_numpy_reference(tmp_path):
    root = _write_mteb(tmp_path / "set", CORPUS, QUERIES, QRELS)
    trainer = _trainer("runlocal,mode=t2t", data=root, max_documents=10)
    state = trainer.init_state()
    trainer.check_data()
    got = trainer.evaluate(state, names=["ir"])

    s = mteb_retrieval.load(root, "test", max_documents=10)
    assert s.query_ids == ["q0", "q1", "q2", "3"]  # q4 has no judgment: not evaluated
    judged = {"d0", "d1", "d9", "d19", "d18", "d4", "d5", "d6", "d23"}
    assert judged <= set(s.document_ids) and len(s.document_ids) == 10
    assert s.documents[s.document_ids.index("d1")] == "red a large red square at the top"
    assert s.documents[s.document_ids.index("d0")] == "a large red circle at the top"
    task = trainer.task
    q = _embed(trainer, state, "text", task.tokenize_texts(s.queries, "query"))
    d = _embed(trainer, state, "text", task.tokenize_texts(s.documents, "positive"))
    want = _expected(q, d, s.qrels)
    for key, value in want.items():
        assert got[f"eval/ir/{key}"] == pytest.approx(value, abs=1e-6), key
    assert got["eval/ir/documents"] == 10 and got["eval/ir/queries"] == 4


def test_mteb_limits_and_identical_ids(tmp_path):
    corpus = [{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}, {"_id": "c", "text": "z"}]
    queries = [{"_id": "a", "text": "x"}, {"_id": "q", "text": "y"}]
    root = _write_mteb(tmp_path, corpus, queries, [("q", "c", 1), ("a", "b", 1)])
    s = mteb_retrieval.load(root, max_queries=1, max_documents=1)
    assert s.query_ids == ["q"] and s.document_ids == ["c"] and s.qrels == [{0: 1}]
    s = mteb_retrieval.load(root, max_documents=2)
    assert s.document_ids == ["b", "c"] and s.qrels == [{1: 1}, {0: 1}]

    class Texts:  # tokenises a text as its length
        def tokenize_texts(self, texts, role):
            return np.array([[len(t), role == "query"] for t in texts], np.int32)

    config = eval_config("information_retrieval", data=root, ignore_identical_ids=True)
    e = mteb_set(Texts(), config, "evals.ir.data")
    assert e.exclude.tolist() == [-1, 0]  # query 'a' never ranks document 'a'
    assert e.modalities == ("text", "text") and e.queries[:, 1].tolist() == [1, 1]
    config.ignore_identical_ids = False
    assert mteb_set(Texts(), config, "evals.ir.data").exclude.tolist() == [-1, -1]


@pytest.mark.parametrize("files,split,match", [
    (dict(corpus="missing"), "test", "no corpus.jsonl"),
    (dict(queries="missing"), "test", "no queries.jsonl"),
    ({}, "dev", r"no qrels/dev.tsv .*Splits with qrels there: \['test'\]"),
    (dict(corpus='{"_id": "d0", "text": "a"}\n\n{"_id": "d1", "text": "b"\n'), "test",
     r"corpus.jsonl, line 3: not JSON"),
    (dict(corpus='{"_id": "d0", "text": "a"}\n{"_id": "d0", "text": "b"}\n'), "test",
     r"corpus.jsonl, line 2: _id 'd0' repeats the one of line 1"),
    (dict(corpus='{"_id": "d0", "body": "a"}\n'), "test",
     r"corpus.jsonl, line 1: no \['text'\] field"),
    (dict(queries='{"_id": "q0", "text": 5}\n'), "test", r"queries.jsonl, line 1: 'text' must"),
    (dict(qrels="query-id\tcorpus-id\tscore\nq0\td0\t1\nq0\td7\t1\n"), "test",
     r"test.tsv, line 3: corpus-id 'd7' is not an _id of corpus.jsonl"),
    (dict(qrels="query-id\tcorpus-id\tscore\nqx\td0\t1\n"), "test",
     r"test.tsv, line 2: query-id 'qx' is not an _id"),
    (dict(qrels="query-id\tcorpus-id\tscore\nq0\td0\thigh\n"), "test",
     r"test.tsv, line 2: score 'high' is not an integer"),
    (dict(qrels="query-id\tcorpus-id\tscore\nq0 d0 1\n"), "test",
     r"test.tsv, line 2: 1 tab-separated fields, not 3"),
    (dict(qrels="qid\tdid\trel\nq0\td0\t1\n"), "test", r"test.tsv, line 1: the header must"),
])
def test_bad_layout_errors_name_file_and_line(tmp_path, files, split, match):
    text = {"corpus": '{"_id": "d0", "text": "a"}\n', "queries": '{"_id": "q0", "text": "b"}\n',
            "qrels": "query-id\tcorpus-id\tscore\nq0\td0\t1\n", **files}
    os.makedirs(tmp_path / "qrels")
    for name, path in (("corpus", "corpus.jsonl"), ("queries", "queries.jsonl"),
                       ("qrels", "qrels/test.tsv")):
        if text[name] != "missing":
            (tmp_path / path).write_text(text[name])
    with pytest.raises((ConfigError, ValueError), match=match):
        mteb_retrieval.load(str(tmp_path), split, key="evals.ir.data")


def test_bad_directory_fails_before_compiling(tmp_path):
    trainer = _trainer("runlocal,mode=t2t", data=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"evals.ir.data = .*nowhere.* is not a directory"):
        trainer.check_data()
    with pytest.raises(ConfigError, match=r"'evals.ir.max_queries' must be >= 0"):
        _trainer("runlocal", max_queries=-1)


class _PairsTask:
    """Held-out pairs with repeats: query rows 0 and 2 are equal, positive rows 1 and 3 are."""

    query_modality, positive_modality = "text", "text"

    def heldout_batches(self, *, batch_size, process_index, process_count):
        query = np.array([[1, 1], [2, 2], [1, 1], [3, 3]], np.int32)
        positive = np.array([[7, 0], [8, 0], [9, 0], [8, 0]], np.int32)
        yield {"query": query, "positive": positive, "valid": np.ones(4, bool)}
        yield {"query": query[:1], "positive": positive[:1], "valid": np.zeros(1, bool)}


def test_builtin_set_merges_identical_rows():
    s = heldout_set(_PairsTask(), seed=3)
    np.testing.assert_array_equal(s.queries, [[1, 1], [2, 2], [3, 3]])
    assert sorted(map(tuple, s.documents)) == [(7, 0), (8, 0), (9, 0)]
    doc = {tuple(row): i for i, row in enumerate(s.documents)}
    # query [1, 1] has two relevant documents; document [8, 0] is relevant to two queries
    assert s.qrels == [{doc[(7, 0)]: 1, doc[(9, 0)]: 1}, {doc[(8, 0)]: 1}, {doc[(8, 0)]: 1}]
    limited = heldout_set(_PairsTask(), seed=3, max_queries=1, max_documents=1)
    assert len(limited.queries) == 1 and len(limited.documents) == 2  # judged ones are kept
