"""Using a trained model: export → load, embed.py with Ray Data, search.py, evaluate.py's report."""

import html.parser
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from job_modules import load_job

from vcl_dist.config import dump_config, load_config
from vcl_dist.data.datasets import resolve_source
from vcl_dist.data.preprocess import Preprocessor
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.models import build_dual_encoder
from vcl_dist.models.export import ModelNotFoundError
from vcl_dist.retrieval import export_model, load_model
from vcl_dist.retrieval.embed import embedding_table
from vcl_dist.retrieval.search import Corpus, fixed_size_lists_to_numpy
from vcl_dist.train.checkpoint import load_checkpoint, save_checkpoint


def _val_rows(cfg, tokenizer) -> dict:
    source = resolve_source(cfg.data)
    table = pq.read_table(source.val)
    batch = {name: np.array(table[name].to_pylist(), dtype=object) for name in table.column_names}
    return Preprocessor(tokenizer, cfg.data.image_size, cfg.data.max_text_length, augment=False)(batch)


def test_export_then_load_gives_the_training_models_embeddings(tiny_shapes_overrides, repo_root, tmp_path):
    cfg = load_config(repo_root / "jobs/configs/default.yaml", tiny_shapes_overrides)
    tokenizer = train_wordpiece(["a red circle", "a small blue square at the top", "green star"], 200)
    torch.manual_seed(3)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id)
    for p in model.parameters():  # random, far from the initialisation
        p.data.add_(torch.randn_like(p) * 0.1)
    model.eval()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(checkpoint, model=model, criterion=torch.nn.Module(), optimizer=optimizer, scheduler=scheduler,
                    epoch=0, step=1, history=[{"epoch": 1, "train_loss": 0.5}], config_yaml=dump_config(cfg), tokenizer=tokenizer,
                    class_names=["red circle", "blue square"])

    exported = export_model(checkpoint, tmp_path / "export")
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "classes.txt", "config.json", "config.yaml", "history.json",
                                                          "model.safetensors", "tokenizer"]
    loaded = load_model(exported)
    assert loaded.class_names == ["red circle", "blue square"] and loaded.history == [{"epoch": 1, "train_loss": 0.5}]

    rows = _val_rows(cfg, tokenizer)
    images, ids, mask = (torch.from_numpy(rows[k]) for k in ("image", "input_ids", "attention_mask"))
    with torch.no_grad():
        expected_u, expected_v = model(images, ids, mask)
    torch.testing.assert_close(loaded.encode_pixels(images), expected_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.encode_tokens(ids, mask), expected_v, atol=1e-5, rtol=1e-5)
    captions = ["a red circle", "green star"]
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=cfg.data.max_text_length, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_texts(captions), model.encode_text(tokens["input_ids"], tokens["attention_mask"]))


def test_load_model_says_what_is_missing_in_one_line(tmp_path):
    for path in (tmp_path / "nothing", tmp_path):
        with pytest.raises(ModelNotFoundError) as err:
            load_model(path)
        assert "\n" not in str(err.value) and "no model at" in str(err.value)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load_model(tmp_path / "weights.bin")


def _small_export(cfg, folder: Path, step: int) -> Path:
    """A checkpoint of a random model, recorded at training step ``step``, exported to ``folder``."""
    tokenizer = train_wordpiece(["a red circle", "a small blue square at the top", "green star"], 200)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpoint = folder.parent / f"{folder.name}-checkpoint"
    checkpoint.mkdir(parents=True)
    save_checkpoint(checkpoint, model=model, criterion=torch.nn.Module(), optimizer=optimizer, scheduler=scheduler,
                    epoch=0, step=step, history=[{"epoch": 1, "step": step}], config_yaml=dump_config(cfg),
                    tokenizer=tokenizer)
    return export_model(checkpoint, folder)


def test_a_broken_model_file_is_one_line_naming_it_and_serving_refuses_to_start(tiny_shapes_overrides, repo_root, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from vcl_dist.models.export import BrokenModelError
    from vcl_dist.serving.app import build_app

    cfg = load_config(repo_root / "jobs/configs/default.yaml", tiny_shapes_overrides)
    good = _small_export(cfg, tmp_path / "good", step=1)
    cases = {}
    cut = shutil.copytree(good, tmp_path / "truncated")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases[cut] = "truncated or corrupt"
    missing = shutil.copytree(good, tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, missing / "model.safetensors", metadata={"format": "pt"})
    cases[missing] = f"the weights do not fit the model its config builds: missing keys {dropped}"
    other = shutil.copytree(good, tmp_path / "other-config")
    (other / "config.yaml").write_text(dump_config(load_config(repo_root / "jobs/configs/default.yaml",
                                                               [*tiny_shapes_overrides, "model.embed_dim=24"])))
    cases[other] = "the weights do not fit the model its config builds: size mismatch for"
    checkpoint = tmp_path / "good-checkpoint"
    (checkpoint / "model.pt").write_bytes((checkpoint / "model.pt").read_bytes()[:1000])
    cases[checkpoint] = "truncated or corrupt"
    for folder, expected in cases.items():
        with pytest.raises(BrokenModelError) as err:
            load_model(folder)
        message = str(err.value)
        assert expected in message and str(folder) in message and "\n" not in message, message
    with pytest.raises(BrokenModelError, match="truncated or corrupt"):
        build_app({"model": str(cut), "corpus": str(tmp_path / "no-corpus")})


def test_a_run_folder_loads_whichever_of_export_and_checkpoint_trained_longer(tiny_shapes_overrides, repo_root, tmp_path,
                                                                               capsys):
    import shutil

    cfg = load_config(repo_root / "jobs/configs/default.yaml", tiny_shapes_overrides)
    run = tmp_path / "run"
    _small_export(cfg, run / "model", step=40)
    assert load_model(run).history == [{"epoch": 1, "step": 40}]
    assert "the run's export of" in capsys.readouterr().out
    shutil.move(str(tmp_path / "run" / "model-checkpoint"), str(run / "checkpoint_2026-01-01_00-00-00.000000"))
    later = _small_export(cfg, tmp_path / "later", step=90)
    shutil.copytree(tmp_path / "later-checkpoint", run / "checkpoint_2026-02-01_00-00-00.000000")
    loaded = load_model(run)  # a resumed run trained on past its export: the newer checkpoint wins
    assert loaded.history == [{"epoch": 1, "step": 90}] and later.exists()
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert said == (f"vcl-dist: model: the checkpoint checkpoint_2026-02-01_00-00-00.000000 of {run}, training step 90; "
                    "its export holds step 40")


# --- with a trained run, on a local Ray --------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(retrieval_train_overrides, repo_root, tmp_path_factory):
    """One real 2-worker training run that learns the shapes classes well enough to search."""
    from vcl_dist.train.runner import run_training

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    cfg = load_config(repo_root / "jobs/configs/default.yaml",
                      [*retrieval_train_overrides, f"run.storage_path={tmp_path_factory.mktemp('runs')}", "run.name=retrieval"])
    outcome = run_training(cfg)
    yield cfg, outcome
    ray.shutdown()


def test_a_finished_run_exports_its_model(trained_run):
    cfg, outcome = trained_run
    export = Path(outcome.model_path)
    assert export == Path(outcome.run_path) / "model" and (export / "model.safetensors").stat().st_size > 0
    loaded = load_model(outcome.run_path)  # a run folder resolves to its export
    assert loaded.history == outcome.history and len(loaded.class_names) == 30


@pytest.fixture(scope="module")
def corpus(trained_run, tmp_path_factory):
    embed = load_job("embed")
    _, outcome = trained_run
    out = tmp_path_factory.mktemp("corpus") / "val"
    assert embed.main(["--model", outcome.run_path, "--out", str(out), "--batch-size", "48"]) == 0
    return out


def test_embed_writes_the_training_time_embeddings_of_every_val_row(trained_run, corpus):
    cfg, outcome = trained_run
    info = json.loads((corpus / "_corpus.json").read_text())
    assert info["rows"] == 2 * cfg.data.shapes.num_val and info["bad_rows"] == 0 and info["embed_dim"] == cfg.model.embed_dim

    table = pq.read_table(corpus).sort_by("key")
    assert table.num_rows == info["rows"] and len(set(table["key"].to_pylist())) == table.num_rows
    assert all(len(t) > 0 for t in table["thumbnail"].to_pylist())
    # The training-time model: the last checkpoint loaded the way the training loop loads it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(outcome.checkpoint_path) / "tokenizer")
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id)
    load_checkpoint(outcome.checkpoint_path, model=model)
    model.eval()
    rows = _val_rows(cfg, tokenizer)
    order = np.argsort(rows["key"].astype(str))
    with torch.no_grad():
        u, v = model(*(torch.from_numpy(rows[k][order]) for k in ("image", "input_ids", "attention_mask")))
    np.testing.assert_allclose(fixed_size_lists_to_numpy(table["image_embedding"]), u.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fixed_size_lists_to_numpy(table["text_embedding"]), v.numpy(), atol=1e-5, rtol=1e-5)


def test_embed_overwrite_replaces_a_corpus_whole_and_nothing_else(trained_run, corpus, tmp_path, capsys):
    import shutil

    embed = load_job("embed")
    _, outcome = trained_run
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")  # a mistyped --out
    assert embed.main(["--model", outcome.run_path, "--out", str(notes), "--overwrite"]) == 1
    assert "is no embedded corpus (no _corpus.json): refusing to replace it" in capsys.readouterr().err
    assert (notes / "thesis.txt").read_text() == "years of work"

    again = tmp_path / "corpus"
    shutil.copytree(corpus, again)
    (again / "stale.parquet").write_bytes((sorted(again.glob("*.parquet"))[0]).read_bytes())
    assert embed.main(["--model", outcome.run_path, "--out", str(again)]) == 1
    assert "is not empty: pass --overwrite" in capsys.readouterr().err
    assert embed.main(["--model", outcome.run_path, "--out", str(again), "--overwrite", "--batch-size", "48"]) == 0
    assert not (again / "stale.parquet").exists() and len(Corpus(str(again))) == len(Corpus(str(corpus)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "notes"]  # no staging folder left beside it


def test_search_by_caption_returns_images_of_its_class_first(trained_run, corpus, tmp_path, capsys):
    _, outcome = trained_run
    model = load_model(outcome.run_path)
    library = Corpus(str(corpus), scan_rows=50)  # several scan batches: the running top-k must merge them
    # The reference: every row scored at once in float64, one (best) row per image.
    table = pq.read_table(corpus)
    images = torch.from_numpy(fixed_size_lists_to_numpy(table["image_embedding"])).double()
    groups = table["image_group"].to_pylist()
    right = []
    for label, name in enumerate(model.class_names):
        query = model.encode_texts([f"a photo of a {name}"])[0]
        hits = library.search(query, model.similarity, k=5)
        scores = model.similarity(query.reshape(1, -1).double(), images)[0].tolist()
        best_per_image: dict = {}
        for row, score in enumerate(scores):
            best_per_image[groups[row]] = max(best_per_image.get(groups[row], -np.inf), score)
        expected = sorted(best_per_image.values(), reverse=True)[:5]
        np.testing.assert_allclose([h.score for h in hits], expected, rtol=1e-9, atol=1e-12)
        assert len({h.key.rsplit("-", 1)[0] for h in hits}) == 5  # distinct images, not one row per caption
        if hits[0].label == label:
            right.append(name)
    # Zero-shot from a prompt the model was not tuned to: chance is 1 in 30 (P(≥ 8 right by
    # chance) < 1e-5); trained runs measured 17–26 of 30 (18 after 6 epochs), as thread timing goes.
    assert len(right) >= 8, right

    search = load_job("search")
    sheet = tmp_path / "sheet.png"
    query = f"a photo of a {right[0]}"
    assert search.main(["--model", outcome.run_path, "--corpus", str(corpus), "--text", query, "-k", "3", "--sheet", str(sheet)]) == 0
    printed = capsys.readouterr().out
    first_row = next(line for line in printed.splitlines() if line.strip().startswith("│    1"))
    assert right[0] in first_row, printed
    from PIL import Image

    with Image.open(sheet) as image:
        assert image.width > 200 and image.height > 150


class _Sources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.sources += [value for name, value in attrs if name == "src"]


def test_evaluate_reproduces_the_runs_val_metrics_and_writes_a_report(trained_run, tmp_path):
    evaluate = load_job("evaluate")
    _, outcome = trained_run
    out = tmp_path / "report"
    assert evaluate.main(["--model", outcome.run_path, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    final = outcome.history[-1]
    # Same model, same split, same deterministic preprocessing: the same numbers as training's last eval.
    for key in ("i2t_r1", "t2i_r5", "t2i_class_r1", "rsum", "zero_shot_acc"):
        assert metrics[key] == pytest.approx(final[f"val_{key}"], abs=1e-6), key
    assert metrics["bad_rows"] == 0 and metrics["t2i_mean_rank"] >= metrics["t2i_median_rank"] >= 1

    page = (out / "report.html").read_text()
    parser = _Sources()
    parser.feed(page)
    assert len(parser.sources) >= 3 + 4 + 4  # three plots, four text and four image queries
    # Where each epoch's step time went: a stacked bar per epoch.
    assert "plots/step_time.png" in parser.sources and "Where the step time went" in page
    for source in parser.sources:
        assert (out / source).is_file() and (out / source).stat().st_size > 1000, source


def test_embed_and_evaluate_skip_and_count_hostile_rows(trained_run, tmp_path):
    import pyarrow as pa
    from hostile_inputs import plant_hostile_rows

    cfg, outcome = trained_run
    source = resolve_source(cfg.data)
    val = pq.read_table(source.val).to_pydict()
    val["label"] = [str(label) for label in val["label"]]  # text and bytes: one column holds every kind
    val["caption"] = [caption.encode() for caption in val["caption"]]
    plant_hostile_rows(val, list(range(0, 48, 3)))  # 16 rows, one of each kind
    shards = tmp_path / "hostile"
    shards.mkdir()
    pq.write_table(pa.table(val), shards / "val-hostile.parquet")
    overrides = ["data.source=parquet", f"data.train_path={shards}", f"data.val_path={shards}",
                 f"data.classes_path={Path(source.classes_path)}"]
    out = tmp_path / "corpus"
    assert load_job("embed").main(["--model", outcome.run_path, "--out", str(out), *overrides]) == 0
    info = json.loads((out / "_corpus.json").read_text())
    rows = len(val["key"])
    assert info["bad_rows"] == 16 and info["rows"] == rows - 16 == pq.read_table(out).num_rows
    report = tmp_path / "report"
    assert load_job("evaluate").main(["--model", outcome.run_path, "--out", str(report), *overrides]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["bad_rows"] == 16 and metrics["num_captions"] == rows - 16


def test_bad_inputs_end_in_one_line(trained_run, corpus, tmp_path, capsys):
    search = load_job("search")
    _, outcome = trained_run
    assert search.main(["--model", str(tmp_path / "missing"), "--corpus", str(corpus), "--text", "x"]) == 1
    assert "no model at" in capsys.readouterr().err

    (tmp_path / "not-an-image.jpg").write_bytes(b"\xff\xd8 truncated")
    assert search.main(["--model", outcome.run_path, "--corpus", str(corpus), "--image", str(tmp_path / "not-an-image.jpg")]) == 1
    assert "is not an image" in capsys.readouterr().err

    other = tmp_path / "other-corpus"
    other.mkdir()
    rows = {"key": ["a"], "caption": ["c"], "label": np.array([0]), "group": np.array([1]), "thumbnail": [b""]}
    pq.write_table(embedding_table(rows, np.ones((1, 3)), np.ones((1, 3))), other / "part.parquet")
    assert search.main(["--model", outcome.run_path, "--corpus", str(other), "--text", "a red circle"]) == 1
    err = capsys.readouterr().err  # without _corpus.json, how its vectors rank is unknown: never guessed
    assert f"{other} has no _corpus.json: an unfinished or foreign corpus" in err and len(err.strip().splitlines()) == 1
    (other / "_corpus.json").write_text(json.dumps({"rows": 1, "embed_dim": 3, "normalized": True}))
    assert search.main(["--model", outcome.run_path, "--corpus", str(other), "--text", "a red circle"]) == 1
    err = capsys.readouterr().err
    assert "holds 3-d embeddings" in err and len(err.strip().splitlines()) == 1


def test_evaluate_averages_the_test_splits_1k_folds(trained_run, tmp_path, capsys):
    cfg, outcome = trained_run
    source = resolve_source(cfg.data)
    val = pq.read_table(source.val)
    data = tmp_path / "data"
    for split in ("val", "test"):
        (data / split).mkdir(parents=True)
        pq.write_table(val, data / split / f"{split}-00000.parquet")
    image_ids = sorted(set(val.column("image_id").to_pylist()))
    half = len(image_ids) // 2
    (data / "test" / "folds.json").write_text(json.dumps({"protocol": "test-1k", "folds": [image_ids[:half], image_ids[half:]]}))
    overrides = ["data.source=parquet", f"data.train_path={data / 'val'}", f"data.val_path={data / 'val'}",
                 f"data.classes_path={Path(source.classes_path)}"]
    evaluate = load_job("evaluate")
    assert evaluate.main(["--model", outcome.run_path, "--out", str(tmp_path / "folds"), "--split", "test", "--protocol", "1k",
                          *overrides]) == 0
    folded = json.loads((tmp_path / "folds" / "metrics.json").read_text())
    whole = outcome.history[-1]
    assert folded["folds"] == 2 and folded["num_images"] == len(image_ids) / 2 and whole["val_num_images"] == len(image_ids)
    # Half the distractors per query: recall can only be as good or better, fold by fold.
    assert folded["t2i_r1"] >= whole["val_t2i_r1"] - 1e-9 and folded["i2t_r1"] >= whole["val_i2t_r1"] - 1e-9
    capsys.readouterr()
    assert evaluate.main(["--model", outcome.run_path, "--out", str(tmp_path / "x"), "--protocol", "1k", *overrides]) == 1
    assert "--protocol 1k: no folds.json in" in capsys.readouterr().err


def test_search_with_the_corpus_index_answers_as_the_exact_scan(trained_run, corpus, capsys):
    from vcl_dist.retrieval.ann_index import LoadedIndex

    _, outcome = trained_run
    assert load_job("index").main(["--corpus", str(corpus), "--kind", "flat"]) == 0
    assert "vcl-dist: built Flat (ip) over 120 image vectors" in capsys.readouterr().out
    model = load_model(outcome.run_path)
    library = Corpus(str(corpus))
    index = LoadedIndex(library, "image")
    for name in model.class_names[:10]:
        query = model.encode_texts([f"a photo of a {name}"])[0]
        exact, indexed = library.search(query, model.similarity, k=5), library.search(query, model.similarity, k=5, index=index)
        assert [h.key for h in indexed] == [h.key for h in exact]
        np.testing.assert_allclose([h.score for h in indexed], [h.score for h in exact], atol=1e-5)
    search = load_job("search")
    assert search.main(["--model", outcome.run_path, "--corpus", str(corpus), "--text", "a red circle", "--index",
                        "--sheet", ""]) == 0
    assert "answered by: Flat (ip) over 120 image vectors" in capsys.readouterr().out
    assert search.main(["--model", outcome.run_path, "--corpus", str(corpus), "--text", "a red circle", "--sheet", ""]) == 0
    assert "answered by: an exact scan of 240 rows" in capsys.readouterr().out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE_TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def served(trained_run, corpus, tmp_path_factory):
    """The search application on a real Ray Serve instance, bound to loopback, with a bearer
    token (read from a file) that every query must carry."""
    from ray import serve

    from vcl_dist.serving.app import build_app

    _, outcome = trained_run
    token_file = tmp_path_factory.mktemp("serve") / "token"
    token_file.write_text(SERVE_TOKEN + "\n")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": outcome.run_path, "corpus": str(corpus), "index": None,
                         "auth_token_file": str(token_file)}), name="vcl-dist", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _get(url: str, data: bytes | None = None, token: str | None = SERVE_TOKEN,
         headers: dict | None = None) -> tuple[int, dict | str]:
    import urllib.error
    import urllib.request

    headers = ({"Authorization": f"Bearer {token}"} if token else {}) | (headers or {})
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body, status, kind = response.read(), response.status, response.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        body, status, kind = err.read(), err.code, err.headers.get("content-type", "")
    return status, json.loads(body) if "json" in kind else body.decode()


def test_the_http_api_answers_as_search_py_and_refuses_bad_requests_with_a_4xx(served, trained_run, corpus, tmp_path):
    import io
    import urllib.parse

    from PIL import Image

    _, outcome = trained_run
    model = load_model(outcome.run_path)
    library = Corpus(str(corpus))
    status, health = _get(f"{served}/healthz", token=None)
    assert status == 200 and health["rows"] == 240 and health["index"] == "exact scan of 240 rows"
    assert str(corpus) not in json.dumps(health) and outcome.run_path not in json.dumps(health)  # public: no paths

    name = model.class_names[3]
    status, answer = _get(f"{served}/search?" + urllib.parse.urlencode({"text": f"a photo of a {name}", "k": 6}))
    expected = library.search(model.encode_texts([f"a photo of a {name}"])[0], model.similarity, k=6)
    assert status == 200 and [h["key"] for h in answer["hits"]] == [h.key for h in expected]
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h.score for h in expected], atol=1e-5)
    assert all(h["thumbnail"].startswith("data:image/jpeg;base64,") and h["class"] in model.class_names for h in answer["hits"])

    # An image query: the bytes of a validation picture, as search.py --image embeds them.
    picture = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(picture, format="PNG")
    status, answer = _get(f"{served}/search?k=4", data=picture.getvalue())
    expected = library.search(model.encode_images([picture.getvalue()])[0], model.similarity, k=4)
    assert status == 200 and [h["key"] for h in answer["hits"]] == [h.key for h in expected]

    # More like this: a result's own image comes first.
    first = answer["hits"][0]["key"]
    status, similar = _get(f"{served}/similar?" + urllib.parse.urlencode({"key": first, "k": 3}))
    assert status == 200 and similar["hits"][0]["key"].rsplit("-", 1)[0] == first.rsplit("-", 1)[0]

    huge = io.BytesIO()
    Image.new("1", (8000, 6000)).save(huge, format="PNG")  # 48 megapixels in a few kB
    bad = {
        "/search?text=x&k=0": 422, "/search?text=x&k=101": 422, "/search?k=5": 422, "/search?text=%20&k=5": 422,
        "/search?" + urllib.parse.urlencode({"text": "x" * 1001}): 422, "/search?text=x&k=abc": 422,
        "/similar?key=no-such-key": 404, "/nowhere": 404,
    }
    for path, code in bad.items():
        status, body = _get(f"{served}{path}")
        assert status == code and set(body) == {"error"} and "\n" not in body["error"], (path, status, body)
    for data, code in ((b"", 422), (b"\xff\xd8 not really a jpeg", 415), (huge.getvalue(), 413)):
        status, body = _get(f"{served}/search?k=3", data=data)
        assert status == code and set(body) == {"error"} and "Traceback" not in body["error"], (len(data), status, body)
    # A body declared larger than 10 MiB is refused before it is read (the client sends only the headers).
    import http.client

    host, port = served.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/search?k=3")
    connection.putheader("Authorization", f"Bearer {SERVE_TOKEN}")
    connection.putheader("Content-Length", str(10 * 2**20 + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read()) == {"error": f"the body is larger than {10 * 2**20} bytes"}
    connection.close()


def test_generated_requests_never_get_a_5xx_and_every_error_is_one_json_line(served):
    """schemathesis reads the server's own OpenAPI schema and generates requests for every
    operation (up to 80 each, edge cases included); none may get a 5xx, and every error is
    {"error": one line}. (Driven through hypothesis directly: its pytest plugin predates pytest 9.)"""
    import hypothesis
    import schemathesis

    auth = {"Authorization": f"Bearer {SERVE_TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json", headers=auth)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("GET", "/search"), ("POST", "/search"),
                                                                  ("GET", "/similar"), ("GET", "/healthz")}
    seen = []
    for operation in operations:
        @hypothesis.settings(max_examples=80, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy())
        def answers_in_one_json_line(case):
            response = case.call(headers=auth, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.path, case.query, response.status_code, response.text[:300])
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], body

        answers_in_one_json_line()
    assert len(seen) >= 200 and any(code >= 400 for code in seen) and any(code == 200 for code in seen)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width × height`` pixels in a few dozen bytes (no pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_the_server_answers_its_token_and_its_host_names_only(served):
    status, body = _get(f"{served}/search?text=x&k=3", token=None)
    assert status == 401 and body == {"error": "this server needs Authorization: Bearer <token>"}
    status, body = _get(f"{served}/search?text=x&k=3", token="not-the-token-at-all")
    assert status == 401 and body == {"error": "the bearer token is not this server's"}
    status, body = _get(f"{served}/similar?key=x", token=None, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert status == 401
    # DNS rebinding: a page of evil.example re-points its name at 127.0.0.1; the Host header gives it away.
    for path in ("/search?text=x&k=3", "/healthz", "/"):
        status, body = _get(f"{served}{path}", headers={"Host": "evil.example:8000"})
        assert status == 400 and set(body) == {"error"} and "evil.example" in body["error"], (path, body)
    status, page = _get(f"{served}/", token=None, headers={"Host": "localhost"})
    assert status == 200 and "<html" in page.lower()


def test_hostile_uploads_are_refused_from_their_header_and_deep_images_decode(served):
    import io

    from PIL import Image

    status, body = _get(f"{served}/search?k=3", data=_png_header_only(30_000, 30_000))  # past Pillow's own bomb limit
    assert status == 413 and "at most 25000000 pixels" in body["error"] and "\n" not in body["error"], body
    status, body = _get(f"{served}/search?k=3", data=_png_header_only(6000, 5000))  # 30 MP: over ours only
    assert status == 413 and "6000x5000" in body["error"], body
    status, body = _get(f"{served}/search?k=3", data=b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert status == 415 and set(body) == {"error"}, body
    deep = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 65536, (300, 400)).astype(np.uint16)).save(deep, format="PNG")
    status, answer = _get(f"{served}/search?k=3", data=deep.getvalue())
    assert status == 200 and len(answer["hits"]) == 3


def test_uploads_past_the_decode_queue_are_answered_503(trained_run):
    """At most ``max_concurrent_decodes`` uploads decode at once and ``max_waiting_uploads`` wait:
    the rest are refused with 503 at once, whatever their number, instead of costing memory."""
    import asyncio
    import io
    import time

    from PIL import Image

    from vcl_dist.serving.app import QueryEncoder, RequestError, ServeLimits

    _, outcome = trained_run
    limits = ServeLimits(max_concurrent_decodes=1, max_waiting_uploads=2)
    encoder = QueryEncoder.func_or_class(outcome.run_path, False, False, 1, 0.0, limits)
    decode = encoder.model._pixels
    encoder.model._pixels = lambda data: (time.sleep(0.3), decode(data))[1]
    picture = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(picture, format="PNG")

    async def many(n):
        return await asyncio.gather(*(encoder.pixels(picture.getvalue()) for _ in range(n)), return_exceptions=True)

    answers = asyncio.run(many(7))
    refused = [a for a in answers if isinstance(a, RequestError)]
    assert len(refused) == 4 and all(a.status == 503 and "busy" in str(a) for a in refused)
    assert sum(isinstance(a, np.ndarray) for a in answers) == 3 and encoder.waiting == 0
    assert asyncio.run(many(1))[0].shape == (3, 32, 32)  # free again


def test_nan_rows_are_never_answers_and_a_nan_query_is_a_4xx(trained_run, corpus, tmp_path):
    import shutil

    import pyarrow as pa

    from vcl_dist.serving.app import RequestError, Searcher

    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    first = sorted(broken.glob("*.parquet"))[0]
    table = pq.read_table(first)
    vectors = fixed_size_lists_to_numpy(table.column("image_embedding"))
    vectors[:5] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("image_embedding"), "image_embedding", column), first)
    searcher = Searcher.func_or_class(str(broken), None, "image")
    for k in (3, 240):
        hits = searcher.search(vectors[10], k=k)
        assert len(hits) >= min(k, 100) and all(np.isfinite(h["score"]) for h in hits) and json.dumps(hits, allow_nan=False)
    assert searcher.image_embedding(str(table.column("key")[7])).shape == (vectors.shape[1],)
    with pytest.raises(RequestError, match="NaN or infinite embedding") as err:
        searcher.search(np.full(vectors.shape[1], np.nan, dtype=np.float32), k=3)
    assert err.value.status == 422


def test_the_search_page_shows_results_in_a_real_browser(served, trained_run, repo_root, tmp_path):
    """Headless Chromium loads the page with a query: the grid holds k results, best score
    first, each thumbnail decoded by the browser; a screenshot is kept as a test artifact."""
    import shutil
    import subprocess
    import urllib.parse

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's)")
    _, outcome = trained_run
    name = load_model(outcome.run_path).class_names[5]
    # The token in the fragment: the page sends it with each query, and it never reaches the server's logs.
    url = f"{served}/?" + urllib.parse.urlencode({"q": f"a photo of a {name}"}) + f"#token={SERVE_TOKEN}"
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--window-size=1200,1400"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout

    class Cards(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.cards, self.images = [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "hit" in (attrs.get("class") or "").split():
                self.cards.append(float(attrs["data-score"]))
            if tag == "img":
                self.images.append(attrs)

    parsed = Cards()
    parsed.feed(dom)
    assert len(parsed.cards) == 12, dom[-3000:]
    assert parsed.cards == sorted(parsed.cards, reverse=True)
    assert all(img.get("data-loaded") == "true" and img["src"].startswith("data:image/jpeg;base64,") for img in parsed.images)
    assert "12 results" in dom

    shot = tmp_path / "search-page.png"
    subprocess.run([*browser, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    from PIL import Image

    with Image.open(shot) as image:
        shades = sum(count > 0 for count in image.convert("L").histogram())
        assert image.size == (1200, 1400) and shades > 50, shades  # not a blank page
    artifacts = repo_root / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "search-page.png")


def test_a_new_model_and_corpus_roll_in_without_dropping_requests(served, trained_run, corpus, tmp_path):
    import shutil
    import threading
    import urllib.parse

    from ray import serve

    from vcl_dist.serving.app import build_app

    _, outcome = trained_run
    model_copy, corpus_copy = tmp_path / "model", tmp_path / "corpus"
    shutil.copytree(outcome.model_path, model_copy)
    shutil.copytree(corpus, corpus_copy)
    assert load_job("index").main(["--corpus", str(corpus_copy), "--kind", "flat"]) == 0
    statuses: list[int] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            statuses.append(_get(f"{served}/search?" + urllib.parse.urlencode({"text": "a red circle", "k": 3}))[0])

    thread = threading.Thread(target=client)
    thread.start()
    try:
        serve.run(build_app({"model": str(model_copy), "corpus": str(corpus_copy), "index": "corpus"}), name="vcl-dist",
                  route_prefix="/")
        answered_before = len(statuses)
        while len(statuses) < answered_before + 5:
            stop.wait(0.1)
    finally:
        stop.set()
        thread.join()
    assert len(statuses) > 10 and set(statuses) == {200}, statuses
    status, health = _get(f"{served}/healthz")
    assert health["index"].startswith("Flat (ip) over 120 image vectors")  # the new corpus's own index

    # An index is refused, in one line, for a corpus it no longer covers or another model's embeddings.
    from vcl_dist.retrieval.ann_index import LoadedIndex

    with pytest.raises(FileNotFoundError, match="no index at .*_index/text: build one with jobs/index.py"):
        LoadedIndex(Corpus(str(corpus_copy)), "text")
    info = json.loads((corpus_copy / "_corpus.json").read_text())
    (corpus_copy / "_corpus.json").write_text(json.dumps({**info, "model": "runs/other/model"}))
    with pytest.raises(ValueError, match="built for another version of the corpus"):
        LoadedIndex(Corpus(str(corpus_copy)), "image")
    (corpus_copy / "_corpus.json").write_text(json.dumps(info))
    LoadedIndex(Corpus(str(corpus_copy)), "image")
    first = sorted(corpus_copy.glob("*.parquet"))[0]
    shutil.copy(first, corpus_copy / "more-rows.parquet")  # rows embedded since the index was built
    with pytest.raises(ValueError, match="rebuild it with jobs/index.py"):
        LoadedIndex(Corpus(str(corpus_copy)), "image")
