"""lens_model.feature_cache: the prompt-feature cache of the text-encode node and the batch job
(key, LRU in memory, folder of safetensors files)."""

import pytest
import torch

from lens_model.batch_store import OutputStore
from lens_model.feature_cache import FeatureFolder, FeatureMemory, PromptFeatures, feature_key

IDENTITY = ("/models/te.safetensors", 1234, 5678)


def _features(tokens: int, width: int = 8, dtype=torch.float32):
    ctx = torch.arange(tokens * width, dtype=torch.float32).reshape(1, tokens, width).to(dtype)
    return ctx, torch.ones(1, tokens, dtype=torch.bool)


def test_memory_is_bounded_by_count_and_bytes():
    def entry(tokens):  # fp32 features [1, S, 11520] + bool mask [1, S]
        return (torch.zeros(1, tokens, 11520), torch.ones(1, tokens, dtype=torch.bool))

    one = 100 * 11520 * 4 + 100  # bytes of a 100-token entry
    cache = FeatureMemory(capacity=3, max_bytes=2 * one)
    cache.put("a", entry(100))
    cache.put("b", entry(100))
    assert len(cache) == 2 and cache.nbytes == 2 * one
    cache.put("c", entry(100))  # over the byte budget: the oldest goes
    assert cache.get("a") is None and cache.get("b") is not None and len(cache) == 2
    cache.put("b", entry(100))  # replacing a key does not double-count it
    assert cache.nbytes == 2 * one
    cache.put("huge", entry(1000))  # larger than the whole budget: kept alone
    assert len(cache) == 1 and cache.get("huge") is not None
    small = FeatureMemory(capacity=2, max_bytes=10**12)
    for k in "xyz":
        small.put(k, entry(1))
    assert len(small) == 2 and small.get("x") is None and "z" in small
    small.clear()
    assert len(small) == 0 and small.nbytes == 0


def test_key_covers_every_input():
    base = dict(text="a cat", date="2026-05-23", identity=IDENTITY, dtype=torch.float32,
                device="cpu", strip_markers=True)
    key = feature_key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert feature_key(**base) == key
    assert feature_key(**dict(base, device=torch.device("cpu"))) == key  # only the kind counts
    changes = dict(text="a dog", date="2026-05-24", identity=(IDENTITY[0], 1234, 5679),
                   dtype=torch.bfloat16, device="cuda", strip_markers=False)
    others = {feature_key(**dict(base, **{k: v})) for k, v in changes.items()}
    assert key not in others and len(others) == len(changes)


def test_folder_round_trip_and_format(tmp_path):
    from safetensors import safe_open

    folder = FeatureFolder(tmp_path / "f")
    ctx, mask = _features(3, dtype=torch.bfloat16)
    mask[0, 2] = False
    assert "k1" not in folder and folder.get("k1") is None
    folder.put("k1", ctx, mask)
    assert "k1" in folder
    got_ctx, got_mask = folder.get("k1")
    assert got_ctx.dtype == torch.bfloat16 and torch.equal(got_ctx, ctx)
    assert got_mask.dtype == torch.bool and got_mask.tolist() == [[True, True, False]]
    path = tmp_path / "f" / "k1.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"key": "k1"} and f.get_tensor("mask").dtype == torch.uint8
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["k1.safetensors"]  # no temp file


def test_folder_unreadable_file_is_a_miss_with_a_warning(tmp_path, caplog):
    folder = FeatureFolder(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert folder.get("bad") is None
    assert "ignoring unreadable text-feature cache file" in caplog.text and "bad" in caplog.text


def test_folder_failed_write_leaves_nothing(tmp_path, caplog):
    """A write that fails after the bytes went to the temporary file (here: the final move) leaves
    neither a file under the final name nor the temporary one; it raises, or with best_effort
    logs a warning."""
    fsspec = pytest.importorskip("fsspec")
    pafs = pytest.importorskip("pyarrow.fs")

    class FullDisk(pafs.FSSpecHandler):
        def move(self, src, dest):
            raise OSError(28, "No space left on device")

    fs = pafs.PyFileSystem(FullDisk(fsspec.filesystem("file")))
    root = tmp_path / "f"
    with pytest.raises(OSError, match="No space left"):
        FeatureFolder(OutputStore(root.as_posix(), fs)).put("k", *_features(2))
    assert list(root.iterdir()) == []
    FeatureFolder(OutputStore(root.as_posix(), fs), best_effort=True).put("k", *_features(2))
    assert "could not write the text-feature cache" in caplog.text
    assert list(root.iterdir()) == []


def test_prompt_features_memory_first_then_folder(tmp_path):
    memory = FeatureMemory()
    folder = FeatureFolder(tmp_path)
    cache = PromptFeatures(IDENTITY, torch.float32, "cpu", None, memory=memory, folder=folder)
    assert cache.date == "2026-05-23"  # None: the default template date
    ctx, mask = _features(4)
    assert "a fox" not in cache and cache.get("a fox") is None
    with pytest.raises(KeyError, match="a fox"):
        cache["a fox"]
    cache.put("a fox", ctx, mask)
    assert "a fox" in cache and torch.equal(cache["a fox"][0], ctx)
    assert len(memory) == 1 and (tmp_path / f"{cache.key('a fox')}.safetensors").is_file()

    # another process: empty memory, same folder; the folder hit is kept in memory
    fresh = FeatureMemory()
    other = PromptFeatures(IDENTITY, torch.float32, "cpu", "2026-05-23", memory=fresh,
                           folder=FeatureFolder(tmp_path))
    assert torch.equal(other["a fox"][0], ctx) and len(fresh) == 1
    # another device kind or strip flag is another entry
    assert "a fox" not in PromptFeatures(IDENTITY, torch.float32, "cuda", folder=folder)
    assert "a fox" not in PromptFeatures(IDENTITY, torch.float32, "cpu", strip_markers=False,
                                         folder=folder)
    # memory only: nothing is written
    only = PromptFeatures(IDENTITY, torch.float32, "cpu", memory=FeatureMemory())
    only.put("an owl", *_features(2))
    assert "an owl" in only and len(list(tmp_path.iterdir())) == 1
