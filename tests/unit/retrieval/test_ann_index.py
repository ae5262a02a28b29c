"""Approximate indexes over an embedded corpus: a flat index answers as the exact scan, HNSW and
IVF-PQ keep recall@10 against exact search on a clustered synthetic corpus, image indexes hold
one vector per image, and an index is refused for a corpus or model it was not built for."""


import numpy as np
import pytest
from job_modules import load_job

from corpora import clustered, write_corpus
from vcl_dist.retrieval.ann_index import EXACT_BELOW, LoadedIndex, build_index, choose_index
from vcl_dist.retrieval.search import Corpus


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
