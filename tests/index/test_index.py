"""`vlmkit index build|search` and `SearchIndex`: exact search is brute force, builds resume, IVF-PQ, bad input."""
import json
import shutil

import numpy as np
import pytest

from vlmkit.cli import main
from vlmkit.errors import UserError
from vlmkit.index import SearchIndex
from vlmkit.index.build import build_index

from index_helpers import save_tiny_clip

QUERIES = ["a red circle", "a blue square on the left", "two objects"]


def _json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # exactly one JSON object on stdout
    return json.loads(lines[0])


def _records(path) -> list[dict]:
    from vlmkit.data.formats import read_records

    return read_records(path)


@pytest.fixture(scope="module")
def flat_index(clip_run, synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("flat") / "idx"
    assert main(["index", "build", "--model", str(clip_run), "--data", str(synth / "train.jsonl"), "--out", str(out),
                 "--chunk", "16", "--quiet"]) == 0
    return out


def test_exact_search_equals_brute_force(flat_index, clip_run, synth):
    import vlmkit

    model = vlmkit.load(clip_run)
    records = _records(synth / "train.jsonl")
    images = model.embed_images([record["image"] for record in records]).numpy()  # (N, D), unit rows
    queries = model.embed_texts(QUERIES).numpy()
    index = SearchIndex.load(flat_index)
    assert (index.dim, index.count, index.kind) == (images.shape[1], len(records), "flat")
    assert index.model_info["model"] == str(clip_run.resolve())
    k = 7
    hits = index.search(queries, k)
    scores = queries @ images.T  # (Q, N) cosine similarities
    for query_hits, query_scores in zip(hits, scores):
        expected = np.argsort(-query_scores, kind="stable")[:k]
        assert [hit["row"] for hit in query_hits] == expected.tolist()
        np.testing.assert_allclose([hit["score"] for hit in query_hits], query_scores[expected], atol=1e-5)
        for hit in query_hits:  # row i stands for record i (no image was skipped)
            assert hit["record"]["image"] == records[hit["row"]]["image"]
            assert hit["record"]["texts"] == records[hit["row"]]["texts"]


def test_cli_search_prints_the_same_hits(flat_index, capsys):
    assert main(["index", "search", str(flat_index), QUERIES[0], "-k", "3"]) == 0
    result = _json(capsys)
    assert result["query"] == QUERIES[0] and len(result["hits"]) == 3
    import vlmkit

    index = SearchIndex.load(flat_index)
    expected = index.search(vlmkit.load(index.model_info["model"]).embed_texts([QUERIES[0]]).numpy(), 3)[0]
    assert [hit["row"] for hit in result["hits"]] == [hit["row"] for hit in expected]
    assert set(result["hits"][0]) == {"row", "score", "record"}
    # an image query finds that image first (its own vector, cosine 1)
    image = index.record(5)["image"]
    assert main(["index", "search", str(flat_index), "--image", image, "-k", "2"]) == 0
    top = _json(capsys)["hits"][0]
    assert top["row"] == 5 and top["score"] == pytest.approx(1.0, abs=1e-4)


def test_k_larger_than_the_index_returns_every_row(flat_index):
    index = SearchIndex.load(flat_index)
    query = np.ones((1, index.dim), np.float32) / np.sqrt(index.dim)
    assert sorted(hit["row"] for hit in index.search(query, index.count + 10)[0]) == list(range(index.count))


def test_interrupted_build_resumes_where_it_stopped(clip_run, synth, flat_index, tmp_path, capsys):
    out = tmp_path / "idx"

    def interrupt(number):
        if number == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(clip_run, synth / "train.jsonl", out, chunk=16, progress=False, after_chunk=interrupt)
    chunk_file = out / "chunks" / "00000.safetensors"
    assert chunk_file.exists() and not (out / "chunks" / "00001.safetensors").exists()
    assert not (out / "index.json").exists()
    with pytest.raises(UserError, match="not a complete index"):
        SearchIndex.load(out)
    first_chunk = (chunk_file.stat().st_ino, chunk_file.stat().st_mtime_ns)

    assert main(["index", "build", "--model", str(clip_run), "--data", str(synth / "train.jsonl"), "--out", str(out),
                 "--quiet"]) == 0  # --chunk left out: the interrupted build's 16 is kept
    summary = _json(capsys)
    assert (summary["chunks"], summary["chunks_reused"], summary["chunks_embedded"]) == (3, 1, 2)
    assert (chunk_file.stat().st_ino, chunk_file.stat().st_mtime_ns) == first_chunk  # not embedded again
    resumed, whole = SearchIndex.load(out), SearchIndex.load(flat_index)
    queries = np.eye(resumed.dim, dtype=np.float32)[:4]
    assert [[hit["row"] for hit in hits] for hits in resumed.search(queries, 10)] == \
           [[hit["row"] for hit in hits] for hits in whole.search(queries, 10)]
    assert resumed.records == whole.records


def test_ivfpq_recall_against_exact_on_clustered_vectors():
    """The IVF-PQ the build writes finds the exact top 10 (400 clusters of 10 vectors, fixed seed, wide margin)."""
    import faiss

    from vlmkit.index.build import _faiss_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(400, 32)).astype(np.float32)
    vectors = np.repeat(centres, 10, axis=0) + 0.2 * rng.normal(size=(4000, 32)).astype(np.float32)
    vectors = np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    queries = np.ascontiguousarray(vectors[::40])
    exact_scores, exact = _faiss_index(vectors, None, None, 8).search(queries, 10)
    approximate_index = _faiss_index(vectors, 16, 8, 8)
    faiss.extract_index_ivf(approximate_index).nprobe = 4
    scores, approximate = approximate_index.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall > 0.9, recall  # measured 0.999; rows out of order or untrained lists give ~0
    assert np.abs(scores[:, 0] - exact_scores[:, 0]).max() < 0.1  # PQ's score error is small


def test_ivfpq_build_and_search(clip_run, synth, tmp_path, capsys):
    out = tmp_path / "ivf"
    assert main(["index", "build", "--model", str(clip_run), "--data", str(synth / "train.jsonl"), "--out", str(out),
                 "--ivf", "2", "--pq", "8", "--pq-bits", "4", "--quiet"]) == 0
    assert _json(capsys)["kind"] == "ivfpq"
    index = SearchIndex.load(out)
    info = json.loads((out / "index.json").read_text())
    assert (info["ivf"], info["pq"], info["pq_bits"], index.kind) == (2, 8, 4, "ivfpq")
    assert main(["index", "search", str(out), "a red circle", "-k", "5", "--nprobe", "2"]) == 0
    hits = _json(capsys)["hits"]
    assert len(hits) == 5 and len({hit["row"] for hit in hits}) == 5
    assert all(0 <= hit["row"] < index.count for hit in hits)


def test_corrupt_and_missing_images_are_skipped_and_counted(clip_run, synth, tmp_path, capsys):
    records = [json.loads(line) for line in (synth / "train.jsonl").read_text().splitlines()][:6]
    shutil.copytree(synth / "images", tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    records[2] = {**records[2], "image": "images/broken.png"}
    records[4] = {**records[4], "image": "images/missing.png"}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["index", "build", "--model", str(clip_run), "--data", str(data), "--out", str(tmp_path / "idx"),
                 "--chunk", "4", "--quiet"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["count"], summary["skipped"]) == (4, 2)
    assert captured.err.count("vlmkit: skipped:") == 2 and "broken.png" in captured.err
    index = SearchIndex.load(tmp_path / "idx")
    assert [record["image"].rsplit("/", 1)[1] for record in index.records] == \
           [records[i]["image"].rsplit("/", 1)[1] for i in (0, 1, 3, 5)]


def test_caption_rows(clip_run, synth, tmp_path, capsys):
    import vlmkit

    out = tmp_path / "texts"
    assert main(["index", "build", "--model", str(clip_run), "--data", str(synth / "test.jsonl"), "--out", str(out),
                 "--rows", "text", "--quiet"]) == 0
    records = _records(synth / "test.jsonl")
    captions = [text for record in records for text in record["texts"]]
    assert _json(capsys)["count"] == len(captions)
    index = SearchIndex.load(out)
    model = vlmkit.load(clip_run)
    hit = index.search(model.embed_texts([captions[3]]).numpy(), 1)[0][0]
    assert hit["record"]["text"] == captions[3] and hit["score"] == pytest.approx(1.0, abs=1e-4)


def _fails(capsys, argv: list[str], *phrases: str) -> str:
    """Run `argv`: exit 2, nothing on stdout, one line on stderr that holds every phrase."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("vlmkit: error: ") and captured.err.count("\n") == 1, captured.err
    for phrase in phrases:
        assert phrase in captured.err, captured.err
    return captured.err


def test_bad_inputs_are_one_line_exit_2(clip_run, synth, flat_index, tmp_path, capsys):
    data = str(synth / "train.jsonl")
    build = ["index", "build", "--model", str(clip_run), "--quiet"]
    other_model = save_tiny_clip(tmp_path / "other", seed=1)
    before = sorted(path.name for path in flat_index.iterdir())
    _fails(capsys, ["index", "build", "--model", str(other_model), "--data", data, "--out", str(flat_index)],
           "another model", "new --out")
    _fails(capsys, [*build, "--data", str(synth / "test.jsonl"), "--out", str(flat_index)], "another data")
    _fails(capsys, [*build, "--data", data, "--out", str(flat_index), "--chunk", "8"], "--chunk 16")
    assert sorted(path.name for path in flat_index.iterdir()) == before and (flat_index / "index.json").exists()

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    _fails(capsys, [*build, "--data", data, "--out", str(tmp_path / "taken")], "not an index folder")
    _fails(capsys, [*build, "--data", data, "--out", str(tmp_path / "a"), "--ivf", "4"], "--pq")
    _fails(capsys, [*build, "--data", data, "--out", str(tmp_path / "b"), "--ivf", "2", "--pq", "5", "--pq-bits", "4"],
           "divide", "32")
    _fails(capsys, [*build, "--data", data, "--out", str(tmp_path / "c"), "--ivf", "100", "--pq", "8"], "at least 256")
    assert not (tmp_path / "c").exists()  # refused before anything was embedded or written
    _fails(capsys, [*build, "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "d")], "none.jsonl")
    _fails(capsys, ["index", "build", "--model", str(tmp_path / "nomodel"), "--data", data, "--out", str(tmp_path / "e")],
           "nomodel")

    _fails(capsys, ["index", "search", str(tmp_path / "nothing"), "a red circle"], "does not exist")
    _fails(capsys, ["index", "search", str(tmp_path / "taken"), "a red circle"], "not a complete index")
    _fails(capsys, ["index", "search", str(flat_index), "a red circle", "--model", str(other_model)],
           "not the one", "--model")
    _fails(capsys, ["index", "search", str(flat_index)], "--image")
    _fails(capsys, ["index", "search", str(flat_index), "a red circle", "-k", "0"], "-k")
    _fails(capsys, ["index", "search", str(flat_index), "--image", str(tmp_path / "nope.png")], "nope.png")
    with pytest.raises(UserError, match="32-dimensional"):
        SearchIndex.load(flat_index).search(np.zeros((2, 16), np.float32), 3)
