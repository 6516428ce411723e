"""Pretraining with a compact vocabulary (the same model, fewer rows stepped) and the backbone
cache keyed by the recipe's content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lpi.backbone import Backbone
from lpi.config import load_preset
from lpi.continual import pretraining
from lpi.continual.compact_vocab import compact_vocabulary, used_tokens
from lpi.continual.data import synthetic
from lpi.continual.pretraining import CacheMismatch, PretrainConfig, cached_backbone
from lpi.tokenizer import tokenize


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain-data")
    synthetic.generate(out, 1, 4, 2, 24, 32, 0)
    return out / "pretrain.jsonl"


def _config(manifest: Path, out: Path, **changes) -> PretrainConfig:
    fields = dict(preset="tiny", epochs=1, batch_size=8, device="cpu", seed=1)
    return PretrainConfig(manifest=manifest, out=out, **(fields | changes))


def test_compact_vocabulary_trains_the_same_model(data, tmp_path):
    """Rows never used get zero gradients and no weight decay, so AdamW leaves them alone:
    stepping only the used rows must give the same weights (float32 on one CPU: the same
    operations in the same order, so equal up to 1e-6 of accumulated rounding)."""
    full = pretraining.run_pretraining(
        _config(data, tmp_path / "full.safetensors", compact_vocabulary=False)
    )
    compact = pretraining.run_pretraining(_config(data, tmp_path / "compact.safetensors"))
    a, b = load_file(full.path), load_file(compact.path)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    torch.manual_seed(1)  # run_pretraining's seed: the initial weights
    initial = Backbone(load_preset("tiny"))
    changed = (b["token_embedding.weight"] != initial.token_embedding.weight).any(1)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    used = used_tokens((c for r in records if r["split"] == "train" for c in r["captions"]), 77)
    assert set(changed.nonzero().flatten().tolist()) <= set(used.tolist())
    assert changed.sum() > 0.5 * len(used)


def test_compact_embedding_looks_up_the_full_rows_and_writes_back():
    torch.manual_seed(0)
    backbone = Backbone(load_preset("tiny"))
    tokens = tokenize(["a red circle", "a blue star on the left"])
    before = backbone.encode_text(tokens)
    used = used_tokens(["a red circle", "a blue star on the left"], 77)
    with compact_vocabulary(backbone, used) as compact:
        assert compact.weight.shape == (len(used), backbone.config.text.width)
        torch.testing.assert_close(backbone.encode_text(tokens), before, rtol=0, atol=0)
        with torch.no_grad():
            compact.weight += 1.0
        with pytest.raises(ValueError, match="outside the compact vocabulary"):
            backbone.encode_text(tokenize(["a green hexagon"]))
    full = backbone.token_embedding.weight
    assert isinstance(backbone.token_embedding, torch.nn.Embedding)
    assert full.shape[0] == backbone.config.text.vocab_size
    torch.manual_seed(0)
    fresh = Backbone(load_preset("tiny")).token_embedding.weight
    torch.testing.assert_close(full[used], fresh[used] + 1.0)
    others = torch.ones(len(full), dtype=torch.bool)
    others[used] = False
    assert torch.equal(full[others], fresh[others])


def test_cached_backbone_builds_once_and_refuses_tampering(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = cached_backbone(_config(data, tmp_path / "ignored.safetensors"), cache)
    assert path.parent.parent == cache and path.parent.name.startswith("tiny-")
    record = json.loads((path.parent / "recipe.json").read_text())
    assert record["recipe"]["epochs"] == 1 and len(record["recipe"]["data"]) == 64
    assert not (tmp_path / "ignored.safetensors").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not pretrain")

    monkeypatch.setattr(pretraining, "run_pretraining", no_training)
    assert cached_backbone(_config(data, tmp_path / "other.safetensors", workers=0), cache) == path
    with pytest.raises(AssertionError, match="must not pretrain"):  # another recipe: new folder
        cached_backbone(_config(data, tmp_path / "x.safetensors", lr=1e-3), cache)

    edited = dict(record, recipe=dict(record["recipe"], epochs=2))  # recipe no longer hashes
    (path.parent / "recipe.json").write_text(json.dumps(edited))
    with pytest.raises(CacheMismatch, match=r"recipe\.json: its recorded recipe hash"):
        cached_backbone(_config(data, tmp_path / "x.safetensors"), cache)
    (path.parent / "recipe.json").write_text(json.dumps(record))
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(CacheMismatch, match=r"backbone\.safetensors: missing or its sha256"):
        cached_backbone(_config(data, tmp_path / "x.safetensors"), cache)


def test_recipe_hash_follows_the_data_content(tmp_path):
    synthetic.generate(tmp_path / "data", 1, 2, 2, 4, 16, 0)
    data = tmp_path / "data" / "pretrain.jsonl"
    config = _config(data, tmp_path / "a.safetensors")
    first = pretraining.recipe_hash(pretraining.recipe_of(config))
    assert first == pretraining.recipe_hash(pretraining.recipe_of(config))
    image = json.loads(data.read_text().splitlines()[0])["image"]
    target = data.parent / image
    target.write_bytes(target.read_bytes() + b"\0")  # a changed image: a different recipe
    assert pretraining.recipe_hash(pretraining.recipe_of(config)) != first
