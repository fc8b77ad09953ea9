"""Training-step caches: text features per caption, the device sample pool, exact resume with both."""

from __future__ import annotations

import pytest
import torch

from sanaflow.config import load_config
from sanaflow.errors import ConfigError
from sanaflow.training import TrainConfig, build_task, list_checkpoints
from sanaflow.training.cache import SamplePool, TextFeatureCache
from sanaflow.training.data import ShapesSource, collate
from test_training import losses, run, tiny_config, tree_digest, write_yaml


@pytest.fixture(scope="module")
def minilm():
    from sanaflow.models.text_encoders import SentenceTextEncoder

    return SentenceTextEncoder.from_package(max_length=16)


def test_cached_text_features_equal_fresh_ones(minilm):
    caps = ["a red circle", "two blue squares", "a red circle", "a green star left of a yellow cross", "a red circle"]
    cache = TextFeatureCache(minilm, "cpu", max_entries=100, block=4)
    hidden, mask = cache.encode(caps)
    assert hidden.shape == (5, 16, 384) and mask.shape == (5, 16) and mask.dtype == torch.long
    assert len(cache) == 3 and (cache.hits, cache.misses) == (2, 3)
    fresh_h, fresh_m = minilm.encode(caps, dtype=torch.float32)
    assert torch.equal(mask, fresh_m)
    torch.testing.assert_close(hidden, fresh_h, rtol=1e-5, atol=1e-5)
    # A later batch: all hits, the very same rows; padded tokens are masked out like fresh ones.
    again_h, again_m = cache.encode(["a red circle", "two blue squares"])
    assert (cache.hits, cache.misses) == (4, 3)
    assert torch.equal(again_h[0], hidden[0]) and torch.equal(again_h[1], hidden[1])
    # Block-shape invariance: a caption's features do not depend on the captions sharing its block.
    other = TextFeatureCache(minilm, "cpu", max_entries=100, block=4)
    other.encode(["two blue squares", "a small purple triangle", "a green star left of a yellow cross"])
    h2, _ = other.encode(["a green star left of a yellow cross", "two blue squares"])
    assert torch.equal(h2[0], hidden[3]) and torch.equal(h2[1], hidden[1])
    assert not h2.is_inference()  # usable by autograd in the training step


def test_text_cache_limit_still_encodes_misses(minilm):
    cache = TextFeatureCache(minilm, "cpu", max_entries=2, block=4)
    caps = ["a", "b", "c", "a", "d"]
    hidden, _ = cache.encode(caps)
    assert len(cache) == 2
    fresh, _ = minilm.encode(caps, dtype=torch.float32)
    torch.testing.assert_close(hidden, fresh, rtol=1e-5, atol=1e-5)
    assert torch.equal(hidden[0], hidden[3]) and not hidden.is_inference()


def test_sample_pool_window_and_draws():
    stream = iter(range(1000))

    def chunk():
        k = next(stream)
        return {"x": torch.full((2, 1), float(k)), "k": torch.full((2,), k)}

    torch.manual_seed(0)
    pool = SamplePool(chunk, size=8, chunk=2, batch_size=3, start=0)
    assert sorted(pool.store["k"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    seen = set()
    for step in range(6):
        batch = pool.next_batch()
        assert batch["x"].shape == (3, 1) and torch.equal(batch["x"][:, 0].long(), batch["k"])
        assert all(step <= k < step + 4 for k in batch["k"].tolist())  # drawn from the live window
        seen |= set(batch["k"].tolist())
    # Built at chunk 6 (a resumed run), the pool holds what the running one holds, slot for slot.
    stream = iter(range(6, 1000))
    resumed = SamplePool(chunk, size=8, chunk=2, batch_size=3, start=6)
    assert torch.equal(resumed.store["k"], pool.store["k"])
    with pytest.raises(ValueError, match="multiple of the chunk"):
        SamplePool(chunk, size=7, chunk=2, batch_size=3)


def test_collate_gives_channels_last_images():
    src = ShapesSource(32, seed=0, batch_size=3)
    items = [src[i] for i in range(3)]
    batch = collate(items)
    assert batch["image"].shape == (3, 3, 32, 32)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch["image"], torch.stack([it["image"] for it in items]))


def pool_config(out):
    return tiny_config(out, data={"pool_size": 8, "reuse": 2}, train={"batch_size": 4})


def test_pool_run_resumes_exactly(tmp_path):
    ref = write_yaml(tmp_path / "ref.yaml", pool_config(tmp_path / "ref"))
    run(ref)
    cfg = write_yaml(tmp_path / "cut.yaml", pool_config(tmp_path / "cut"))
    run(cfg, "train.max_steps=2")
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_0000002"]
    run(cfg, resume=True)
    assert losses(tmp_path / "ref") == losses(tmp_path / "cut")
    for sub in ("model", "ema"):
        assert tree_digest(tmp_path / "ref" / "checkpoints" / "step_0000004" / sub) == \
            tree_digest(tmp_path / "cut" / "checkpoints" / "step_0000004" / sub)


@pytest.mark.parametrize(("data", "match"), [
    ({"pool_size": 8, "reuse": 3}, "must be >= 1 and divide"),
    ({"pool_size": 5, "reuse": 2}, "multiple of"),
    ({"pool_size": 0, "reuse": 2}, "needs a sample pool"),
])
def test_bad_pool_settings(tmp_path, data, match):
    cfg = write_yaml(tmp_path / "bad.yaml", tiny_config(tmp_path / "run", data=data, train={"batch_size": 4}))
    with pytest.raises(ConfigError, match=match):
        build_task(load_config(cfg, TrainConfig))
