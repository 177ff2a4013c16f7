"""The image-embedding cache at scale: 100 k rows load fast, a crash keeps finished chunks and a re-run computes
only the rest, processes split the work with each image computed once, and the finetune's embeddings are the
image encoder's."""

import hashlib
import threading
import time

import numpy as np
import pytest
import torch
from test_finetune import make_real_set

from realfake.training.embeddings import EmbeddingCache, fill_cache

DIM = 8


def _keys(n: int) -> np.ndarray:
    return np.array([hashlib.sha256(str(i).encode()).hexdigest()[:24].encode() for i in range(n)], dtype="S24")


def _expected(indices: np.ndarray) -> np.ndarray:
    """A deterministic embedding per sample index."""
    return np.sin(np.asarray(indices)[:, None] * 0.001 + np.arange(DIM)[None, :]).astype(np.float32)


class Crash(Exception):
    pass


def _encoder(calls: list, crash_at: int | None = None):
    def encode(indices: np.ndarray) -> np.ndarray:
        if crash_at is not None and len(calls) == crash_at:
            raise Crash
        calls.append(indices.copy())
        return _expected(indices)

    return encode


def test_100k_cached_rows_load_fast(tmp_path):
    keys = _keys(100_000)
    cache = EmbeddingCache(tmp_path / "cache")
    calls: list = []
    fill_cache(cache, keys, _encoder(calls), batch=4096)
    assert sum(len(c) for c in calls) == 100_000
    assert len(list((tmp_path / "cache").glob("*.keys.npy"))) == 25  # 4096-row chunks, no entry per image

    order = np.random.default_rng(0).permutation(100_000)  # the samples in another order than computed
    calls.clear()
    t0 = time.perf_counter()
    embeds, computed = fill_cache(cache, keys[order], _encoder(calls))
    seconds = time.perf_counter() - t0
    assert computed == 0 and not calls
    assert seconds < 10, f"loading 100k cached rows took {seconds:.1f}s"
    assert len(embeds) == 100_000
    picks = [0, 1, 4095, 4096, 99_999, 31_337]
    torch.testing.assert_close(embeds[picks], torch.from_numpy(_expected(order[picks])), rtol=0, atol=0)


def test_crash_keeps_finished_chunks_and_rerun_computes_only_the_rest(tmp_path):
    keys = _keys(5000)
    cache = EmbeddingCache(tmp_path / "cache")
    calls: list = []
    with pytest.raises(Crash):  # 22 batches of 100 done: chunks of 1000 rows 0 and 1 are whole, chunk 2 is lost
        fill_cache(cache, keys, _encoder(calls, crash_at=22), batch=100, chunk_rows=1000)
    assert len(list((tmp_path / "cache").glob("*.keys.npy"))) == 2
    assert not list((tmp_path / "cache").glob(".*tmp"))  # no half-written file left behind

    calls.clear()
    embeds, computed = fill_cache(cache, keys, _encoder(calls), batch=100, chunk_rows=1000)
    done = np.concatenate(calls)
    assert computed == 3000 and len(done) == 3000 and np.array_equal(np.sort(done), np.arange(2000, 5000))
    torch.testing.assert_close(embeds[range(5000)], torch.from_numpy(_expected(np.arange(5000))), rtol=0, atol=0)


def test_processes_split_the_work_each_image_once(tmp_path):
    keys = _keys(1000)
    cache = EmbeddingCache(tmp_path / "cache")
    fill_cache(cache, keys[:300], _encoder([]))  # some rows already cached
    barrier = threading.Barrier(2)
    calls: dict[int, list] = {0: [], 1: []}
    results: dict[int, tuple] = {}

    def process(rank: int) -> None:
        results[rank] = fill_cache(cache, keys, _encoder(calls[rank]), rank=rank, world=2, barrier=barrier.wait)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mine = {r: np.concatenate(calls[r]) for r in (0, 1)}
    assert len(mine[0]) == len(mine[1]) == 350  # the 700 missing rows, half each
    assert np.array_equal(np.sort(np.concatenate([mine[0], mine[1]])), np.arange(300, 1000))
    for rank in (0, 1):
        embeds, computed = results[rank]
        assert computed == 700
        torch.testing.assert_close(embeds[range(1000)], torch.from_numpy(_expected(np.arange(1000))))


def test_finetune_embeddings_are_the_image_encoders(tiny_bundle, tmp_path):
    from realfake.core.classes import load_classes
    from realfake.core.images import clip_preprocess
    from realfake.training.data import collect_samples, load_rgb
    from realfake.training.finetune import _square, image_embeddings, load_models

    real = make_real_set(tmp_path / "real", per=3)
    samples = collect_samples(real, load_classes("cifar10"))
    models = load_models(tiny_bundle, with_image_encoder=True)
    lines: list[str] = []
    embeds = image_embeddings(models, tiny_bundle, real, samples, tmp_path / "cache", lines.append)
    again = image_embeddings(models, tiny_bundle, real, samples, tmp_path / "cache", lines.append)
    assert lines == [
        "guidance token: 9 image embeddings computed, 0 from cache",
        "guidance token: 0 image embeddings computed, 9 from cache",
    ]
    pixels = clip_preprocess(np.stack([_square(load_rgb(real / s.relpath)) for s in samples]), 32)
    with torch.no_grad():
        direct = models.image_encoder(pixel_values=torch.from_numpy(pixels)).image_embeds
    torch.testing.assert_close(embeds[range(9)], direct)
    assert torch.equal(again[range(9)], embeds[range(9)])


def test_chunks_other_processes_wrote_out_of_sight_is_one_clear_error(tmp_path):
    from realfake.core.errors import UserError

    with pytest.raises(UserError, match="500 image embeddings other processes computed are not in .*must be on a"):
        fill_cache(EmbeddingCache(tmp_path / "cache"), _keys(1000), _encoder([]), rank=0, world=2)
