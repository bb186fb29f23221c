"""The shard store behind the latent cache: few files, crash-safe, nothing trusted blindly."""

import os

import torch

from chroma_pipeline.shards import ShardStore


def _entry(value: float) -> dict[str, torch.Tensor]:
    return {"mean": torch.full((4, 8, 8), value), "std": torch.ones(4, 8, 8)}


def test_entries_share_a_few_files_and_survive_reopening(tmp_path):
    store = ShardStore(tmp_path, max_shard_bytes=10_000)  # about 4 entries per shard
    for i in range(10):
        store.put(f"key{i}", _entry(i))
    store.flush()
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    reopened = ShardStore(tmp_path)
    assert torch.equal(reopened.get("key7", ("mean", "std"))["mean"], torch.full((4, 8, 8), 7.0))
    assert reopened.get("never-written", ("mean",)) is None


def test_nothing_is_visible_before_flush_and_a_lost_shard_reads_as_missing(tmp_path):
    store = ShardStore(tmp_path)
    store.put("a", _entry(1))
    assert ShardStore(tmp_path).get("a", ("mean",)) is None  # a crash here loses only unflushed work
    store.flush()
    (shard,) = tmp_path.glob("*.safetensors")
    shard.unlink()
    assert ShardStore(tmp_path).get("a", ("mean",)) is None


def test_compact_keeps_live_entries_and_removes_dead_and_orphan_shards(tmp_path):
    store = ShardStore(tmp_path)
    for key in "abc":
        store.put(key, _entry(ord(key)))
    store.flush()
    (tmp_path / "orphan.safetensors").write_bytes(b"from a run that died before writing the map")
    os.utime(tmp_path / "orphan.safetensors", (0, 0))  # long ago
    (tmp_path / "young.safetensors").write_bytes(b"a run may be about to map this one")
    removed, freed = ShardStore(tmp_path).compact({"a", "c"}, ("mean", "std"))
    assert removed == 2 and freed > 0  # the old shard (b was dead in it) and the orphan
    after = ShardStore(tmp_path)
    assert after.get("b", ("mean",)) is None
    assert torch.equal(after.get("c", ("mean",))["mean"], torch.full((4, 8, 8), float(ord("c"))))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors") if p.name != "young.safetensors") != []
    assert (tmp_path / "young.safetensors").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_two_writers_on_one_store_keep_each_others_entries(tmp_path):
    first, second = ShardStore(tmp_path), ShardStore(tmp_path)  # e.g. two runs encoding at once
    first.put("from-first", _entry(1))
    second.put("from-second", _entry(2))
    first.flush()
    second.flush()
    reader = ShardStore(tmp_path)
    assert reader.get("from-first", ("mean",)) is not None and reader.get("from-second", ("mean",)) is not None
