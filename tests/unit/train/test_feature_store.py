"""The locked image tower's feature store: written once per read unit, read back by row in place of pictures."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vcl_dist.config import load_config
from vcl_dist.data.epoch_plan import RowRead
from vcl_dist.data.feature_store import mark_complete, missing_units, read_unit_features, unit_file, write_unit_features
from vcl_dist.data.images import ImageGeometry
from vcl_dist.data.preprocess import Preprocessor
from vcl_dist.data.shard_format import SHARD_SCHEMA
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.data.train_stream import TrainUnit, run_read
from vcl_dist.models import build_dual_encoder
from vcl_dist.train.locked_features import UnitFeatures, feature_towers


def write_shard(path, count: int, corrupt: int) -> list[str]:
    rng = np.random.default_rng(0)
    keys, images = [f"k{i}" for i in range(count)], []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(b"broken" if i == corrupt else buffer.getvalue())
    pq.write_table(pa.table({"key": keys, "image": images, "caption": [f"a red circle {i}" for i in range(count)],
                             "label": [i % 3 for i in range(count)], "image_id": keys}, schema=SHARD_SCHEMA), path)
    return keys


def test_features_are_computed_per_unit_and_read_back_in_place_of_pictures_and_tokens(tmp_path):
    shard = tmp_path / "train-00000.parquet"
    keys = write_shard(shard, 10, corrupt=4)
    units = [TrainUnit("parquet", str(shard), 10, (0,))]
    cfg = load_config(None, ["model.image.width=8", "model.embed_dim=8", "model.image.lock=true", "data.augment=false",
                             "model.text.lock=true", "data.image_size=16", "model.text.hidden_size=16",
                             "model.text.intermediate_size=32", "model.text.num_heads=2", "model.text.num_layers=1"])
    assert feature_towers(cfg) == ("image", "text")
    assert feature_towers(load_config(None, ["model.image.lock=true"])) == ()  # augmented pictures: every step
    assert feature_towers(load_config(None, ["model.image.lock=true", "model.text.lock=true"])) == ("text",)
    assert feature_towers(load_config(None, ["model.image.lock=true", "model.image.unlocked_groups=1",
                                             "data.augment=false"])) == ()
    assert feature_towers(load_config(None, ["model.text.lock=true", "train.cache_locked_features=false"])) == ()
    tokenizer = train_wordpiece(["a red circle"], 64)
    model = build_dual_encoder(cfg.model, len(tokenizer), 8).eval()
    fs, folder = pafs.LocalFileSystem(), str(tmp_path / "features")
    fs.create_dir(folder)
    assert missing_units(fs, folder, 1) == [0]
    geometry = ImageGeometry.of(cfg.data)
    computed = UnitFeatures(model, fs, fs, folder, units, ("image", "text"), geometry, tokenizer, 8, batch_size=4,
                            use_amp=False)({"unit": np.array([0])})
    assert computed["rows"].tolist() == [10] and missing_units(fs, folder, 1) == []
    mark_complete(fs, folder, 1, ["image", "text"])

    stored = read_unit_features(fs, folder, 0, np.arange(10))
    assert stored["key"].tolist() == keys and stored["image_valid"].tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]
    assert stored["text_valid"].tolist() == [1] * 10
    rows = Preprocessor(tokenizer, geometry, 8, augment=False)(pq.read_table(shard))
    pixels, ids, mask = (torch.from_numpy(rows[c]) for c in ("image", "input_ids", "attention_mask"))
    good = [0, 1, 2, 3, 5]
    with torch.no_grad():
        tower = model.image_features((pixels.float() / 255 - model.image_mean) / model.image_std)
        assert torch.allclose(torch.from_numpy(stored["image"][good]), tower[good], atol=1e-5)
        assert torch.allclose(torch.from_numpy(stored["text"]), model.text_features(ids, mask), atol=1e-5)
        # The model takes the towers' [B, F] outputs in place of pictures and tokens and runs only the projections.
        assert torch.allclose(model.encode_image(torch.from_numpy(stored["image"])), model.encode_image(pixels), atol=1e-5)
        assert torch.allclose(model.encode_text(torch.from_numpy(stored["text"]), mask), model.encode_text(ids, mask), atol=1e-5)

    # A training read of rows 7, 2 (stream positions 0, 1) of the unit, with features: no picture decoded.
    read = RowRead(0, np.array([2, 7]), np.array([1, 0]))

    def make_preprocessor():
        return Preprocessor(tokenizer, geometry, 8, augment=False, decode_images=False)

    block = pa.concat_tables(list(run_read(fs, units[0], read, 64, make_preprocessor, folder)))
    assert block.column("key").to_pylist() == ["k2", "k7"] and block.column("position").to_pylist() == [1, 0]
    assert np.array_equal(np.stack(block.column("image").to_numpy(zero_copy_only=False)), stored["image"][[2, 7]])
    assert np.array_equal(np.stack(block.column("input_ids").to_numpy(zero_copy_only=False)), stored["text"][[2, 7]])
    bad = pa.concat_tables(list(run_read(fs, units[0], RowRead(0, np.array([4]), np.array([0])), 64, make_preprocessor, folder)))
    assert bad.column("valid").to_pylist() == [0]  # the undecodable picture stays a bad row

    # Features of other rows (the shard was rewritten): one line, not a silent mix-up.
    write_unit_features(fs, folder, 0, [f"other{i}" for i in range(10)], {"image": (stored["image_valid"], stored["image"])})
    with pytest.raises(ValueError, match=r"the features of unit 0 are not of .*train-00000.parquet's rows"):
        list(run_read(fs, units[0], read, 64, make_preprocessor, folder))
    assert not (tmp_path / "features" / (unit_file("", 0)[1:] + ".partial")).exists()
