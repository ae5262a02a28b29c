"""Approximate indexes against exact search on clustered corpora: a flat index returns the exact
scan's hits, HNSW and IVF-PQ keep recall, an image index holds one vector per image, and
``jobs/index.py`` builds what ``auto`` picks and refuses a bad budget."""

import numpy as np
import pytest
import torch
from job_modules import load_job

from corpora import clustered, exact_top, write_corpus
from vcl_dist.evaluate import similarity
from vcl_dist.retrieval.ann_index import LoadedIndex, build_index
from vcl_dist.retrieval.search import Corpus


@pytest.mark.e2e  # the suite checks flat = exact on a trained model's corpus (tests/unit/retrieval/test_retrieval.py)
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


@pytest.mark.e2e  # (the refusals themselves: tests/unit/retrieval/test_retrieval.py, on a trained model's corpus)
def test_index_py_builds_what_auto_picks_and_refuses_a_bad_budget(local_ray, tmp_path, capsys):
    rng = np.random.default_rng(3)
    images = clustered(rng, 500, 8, 5)
    folder = write_corpus(tmp_path / "corpus", images, images, normalized=True)
    assert load_job("index").main(["--corpus", str(folder), "--kind", "auto"]) == 0
    assert "vcl-dist: built Flat (ip) over 500 image vectors in " in capsys.readouterr().out
    LoadedIndex(Corpus(str(folder)), "image")  # loads
    assert load_job("index").main(["--corpus", str(folder), "--memory-gb", "-1"]) == 1
    assert capsys.readouterr().err.strip() == "vcl-dist: error: --memory-gb must be positive"
