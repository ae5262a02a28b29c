"""Approximate indexes over an embedded corpus: a flat index answers as the exact scan, HNSW and
IVF-PQ keep recall@10 against exact search on a clustered synthetic corpus, image indexes hold
one vector per image, and an index is refused for a corpus or model it was not built for."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from job_modules import load_job

from vcl_dist.evaluate import similarity
from vcl_dist.retrieval.ann_index import EXACT_BELOW, LoadedIndex, build_index, choose_index
from vcl_dist.retrieval.embed import embedding_table
from vcl_dist.retrieval.search import Corpus


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def clustered(rng: np.random.Generator, rows: int, dim: int, clusters: int, spread: float = 0.35) -> np.ndarray:
    """Vectors around ``clusters`` random centres: what embeddings of a real corpus look like
    (uniform random vectors are the worst case no index is built for)."""
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(0, clusters, rows)] + spread * rng.standard_normal((rows, dim))).astype(np.float32)


def write_corpus(folder: Path, images: np.ndarray, texts: np.ndarray, *, normalized: bool, groups=None, files: int = 3,
                 model: str = "runs/m/model") -> Path:
    folder.mkdir(parents=True)
    rows = len(images)
    groups = np.arange(rows) if groups is None else groups
    for part, index in enumerate(np.array_split(np.arange(rows), files)):
        table = embedding_table({"key": [f"k{i}" for i in index], "caption": [f"caption {i}" for i in index],
                                 "label": (index % 7).tolist(), "group": groups[index].tolist(),
                                 "thumbnail": [b"" for _ in index]}, images[index], texts[index])
        pq.write_table(table, folder / f"part-{part}.parquet")
    (folder / "_corpus.json").write_text(json.dumps({"rows": rows, "embed_dim": images.shape[1], "normalized": normalized,
                                                     "model": model}))
    return folder


def exact_top(corpus_images: np.ndarray, queries: np.ndarray, k: int, normalized: bool) -> np.ndarray:
    scores = similarity(torch.from_numpy(queries).double(), torch.from_numpy(corpus_images).double(), normalized)
    return torch.topk(scores, k, dim=1).indices.numpy()


def test_auto_picks_exact_then_hnsw_then_ivfpq_as_memory_allows():
    assert choose_index("auto", EXACT_BELOW - 1, 128, True, 4.0).kind == "flat"
    assert choose_index("auto", 1_000_000, 128, True, 4.0).kind == "hnsw"
    ivfpq = choose_index("auto", 100_000_000, 128, False, 8.0)
    assert ivfpq.kind == "ivfpq" and ivfpq.metric == "l2" and ivfpq.pq_m == 64 and ivfpq.refine == 30
    assert ivfpq.nlist == 40_000 and ivfpq.bytes_per_vector() * 100_000_000 <= 8 * 2**30
    with pytest.raises(ValueError, match="divisible by 4"):
        choose_index("ivfpq", 1000, 30, True, 1.0)
    with pytest.raises(ValueError, match="more than --memory-gb 0.01"):
        choose_index("flat", 1_000_000, 128, True, 0.01)
    with pytest.raises(ValueError, match="--kind must be one of"):
        choose_index("annoy", 10, 8, True, 1.0)


@pytest.mark.e2e  # the suite checks flat = exact on a trained model's corpus (tests/test_retrieval.py)
def test_a_flat_index_returns_the_exact_scans_hits(local_ray, tmp_path):
    normalized = True  # (squared distance: the image-index test of the e2e checks)
    rng = np.random.default_rng(1)
    images, texts = clustered(rng, 3000, 16, 20), clustered(rng, 3000, 16, 20)
    folder = write_corpus(tmp_path / "corpus", images, texts, normalized=normalized)
    corpus = Corpus(str(folder), scan_rows=700)
    info = build_index(corpus, "image", "flat", log=lambda line: None)
    assert info.vectors == 3000 and info.params.metric == ("ip" if normalized else "l2")
    index = LoadedIndex(corpus, "image")
    assert index.description.startswith("Flat (")

    def rank(queries, items):
        return similarity(queries, items, normalized)

    for query in torch.from_numpy(texts[:20]):
        exact = corpus.search(query, rank, k=10)
        indexed = corpus.search(query, rank, k=10, index=index)
        assert [h.key for h in indexed] == [h.key for h in exact]
        np.testing.assert_allclose([h.score for h in indexed], [h.score for h in exact], rtol=1e-4, atol=1e-4)


@pytest.mark.e2e  # four index builds: the suite keeps the flat one and the refusals
def test_hnsw_and_ivfpq_keep_recall_against_exact_search(local_ray, tmp_path):
    """Text queries against 20,000 clustered image vectors (64-d): recall@10 of each index
    against the exact top 10, and the IVF-PQ index's size against the raw vectors'."""
    both = clustered(np.random.default_rng(0), 20_200, 64, 50)  # queries from the same clusters, not in the corpus
    images, queries = both[:20_000], both[20_000:]
    folder = write_corpus(tmp_path / "corpus", images, images.copy(), normalized=True)
    corpus = Corpus(str(folder))
    truth = exact_top(images, queries, 10, True)
    for kind, floor in (("hnsw", 0.95), ("ivfpq", 0.9)):
        info = build_index(corpus, "image", kind, log=lambda line: None)
        _, rows = LoadedIndex(corpus, "image").search(queries, 10)
        recall = np.mean([len(set(found) & set(expected)) / 10 for found, expected in zip(rows, truth)])
        assert recall >= floor, (kind, recall)
        if kind == "ivfpq":  # 4-bit codes and ids in memory (the re-rank vectors are a float16 file on disk);
            # 39 vectors a list here, and fast-scan pads lists to blocks of 32 (benchmarks/ann_index.py: a million)
            assert info.trained_on == 20_000 and info.size_bytes <= images.nbytes / 4, info
            assert info.extra["rerank_file_bytes"] < images.nbytes / 2 + 1000


@pytest.mark.e2e
def test_an_image_index_holds_one_vector_per_image_and_finds_distinct_images(local_ray, tmp_path):
    """A VCRL-style corpus (ranked by squared distance) of three captions per image."""
    rng = np.random.default_rng(2)
    pictures = clustered(rng, 400, 8, 10)
    groups = np.repeat(np.arange(400), 3)  # three captions per image, rows of one image share its vector
    order = rng.permutation(1200)  # and they are not adjacent in the files
    folder = write_corpus(tmp_path / "corpus", pictures[groups][order], clustered(rng, 1200, 8, 10), normalized=False,
                          groups=groups[order])
    corpus = Corpus(str(folder))
    info = build_index(corpus, "image", "hnsw", log=lambda line: None)
    assert info.vectors == 400 and info.params.metric == "l2"
    index = LoadedIndex(corpus, "image")
    query = torch.from_numpy(pictures[7])

    def rank(queries, items):
        return similarity(queries, items, False)

    exact = corpus.search(query, rank, k=8)
    indexed = corpus.search(query, rank, k=8, index=index)
    assert len({h.key for h in indexed}) == 8 and [h.score for h in indexed] == pytest.approx([h.score for h in exact], abs=1e-5)
    # Text indexes keep every row.
    assert build_index(corpus, "text", "flat", log=lambda line: None).vectors == 1200


@pytest.mark.e2e  # (the refusals themselves: tests/test_retrieval.py, on a trained model's corpus)
def test_index_py_builds_what_auto_picks_and_refuses_a_bad_budget(local_ray, tmp_path, capsys):
    rng = np.random.default_rng(3)
    images = clustered(rng, 500, 8, 5)
    folder = write_corpus(tmp_path / "corpus", images, images, normalized=True)
    assert load_job("index").main(["--corpus", str(folder), "--kind", "auto"]) == 0
    assert "vcl-dist: built Flat (ip) over 500 image vectors in " in capsys.readouterr().out
    LoadedIndex(Corpus(str(folder)), "image")  # loads
    assert load_job("index").main(["--corpus", str(folder), "--memory-gb", "-1"]) == 1
    assert capsys.readouterr().err.strip() == "vcl-dist: error: --memory-gb must be positive"


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_a_failed_build_refuses_nan_embeddings_and_leaves_no_staging_folder(local_ray, tmp_path, monkeypatch, kind):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    images = clustered(np.random.default_rng(5), 400, 8, 4)
    images[123, 2] = np.nan
    folder = write_corpus(tmp_path / "corpus", images, images, normalized=False)
    with pytest.raises(ValueError, match="the corpus holds NaN or infinite embeddings: embed it again"):
        build_index(Corpus(str(folder)), "image", kind=kind)
    assert list(scratch.iterdir()) == [] and not (folder / "_index").exists()


def test_the_serve_config_file_is_a_valid_serve_deploy_config_of_this_app(repo_root):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from vcl_dist.serving.app import ServeArgs, build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((repo_root / "jobs/configs/serve.yaml").read_text()))
    [app] = config.applications
    module, name = app.import_path.split(":")
    assert (module, name) == ("vcl_dist.serving.app", "build_app") and build_app.__module__ == module
    assert config.http_options.host == "127.0.0.1"
    ServeArgs.model_validate(app.args)
    with pytest.raises(ValueError, match="serve args: limits.max_k: Input should be less than or equal to 10000"):
        build_app({**app.args, "limits": {"max_k": 10**6}})
    assert load_job("serve").main(["--model", "m", "--corpus", "c", "--port", "0"]) == 1


def test_index_py_refuses_settings_it_does_not_use_in_one_line(capsys):
    """Only ``s3.*`` settings apply to an index build: any other override is refused, not ignored."""
    assert load_job("index").main(["--corpus", "nowhere", "train.epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vcl-dist: config error: 'train.epochs=3': jobs/index.py takes only s3.* settings"


def test_a_non_finite_query_is_refused_in_one_line_by_an_index(tmp_path):
    """A NaN query is named as the query's, not blamed on the corpus."""
    import faiss

    from vcl_dist.retrieval.ann_index import IndexInfo, IndexParams

    index = LoadedIndex.__new__(LoadedIndex)
    index.info = IndexInfo(IndexParams("flat", "ip", 4), "image", 3, "v", "m", normalized=True)
    index.index, index.vectors, index.rows = faiss.IndexFlatIP(4), None, np.arange(3)
    index.index.add(np.eye(3, 4, dtype=np.float32))
    assert index.search(np.array([1.0, 0, 0, 0]), 1)[1].tolist() == [[0]]
    with pytest.raises(ValueError, match=r"^the query holds NaN or infinite embeddings$"):
        index.search(np.array([np.nan, 0, 0, 0]), 1)
