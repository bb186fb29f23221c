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


def test_compact_keeps_live_entries_and_removes_dead_entries_and_every_leftover(tmp_path):
    store = ShardStore(tmp_path)
    for key in "abc":
        store.put(key, _entry(ord(key)))
    store.flush()
    # A writer maps its shard under the store's lock, which compact holds: whatever is unmapped
    # now was left by a process that died, however recently.
    (tmp_path / "orphan.safetensors").write_bytes(b"from a run that died before writing the map")
    (tmp_path / ".shards.parquet.host.123.abc.tmp").write_bytes(b"a map write cut short")
    removed, freed = ShardStore(tmp_path).compact({"a", "c"}, ("mean", "std"))
    assert removed == 3 and freed > 0  # the old shard (b was dead in it), the orphan, the half-written map
    after = ShardStore(tmp_path)
    assert after.get("b", ("mean",)) is None
    assert torch.equal(after.get("c", ("mean",))["mean"], torch.full((4, 8, 8), float(ord("c"))))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob(".*.tmp"))


def test_a_dry_run_counts_what_the_real_compaction_removes_and_frees(tmp_path):
    store = ShardStore(tmp_path, max_shard_bytes=1500)  # one entry per shard
    for key in "abcd":
        store.put(key, _entry(ord(key)))
    store.put("e", _entry(0.0), flush_when_full=False)
    store.put("f", _entry(1.0))  # e and f share a shard: f stays, e goes, so that shard is rewritten
    (tmp_path / "orphan.safetensors").write_bytes(b"x" * 100)
    predicted = ShardStore(tmp_path).compact({"a", "f"}, ("mean", "std"), dry_run=True)
    assert len(list(tmp_path.glob("*.safetensors"))) == 6  # touched nothing
    removed, freed = ShardStore(tmp_path).compact({"a", "f"}, ("mean", "std"))
    assert predicted[0] == removed == 5  # b, c, d, the e+f shard (rewritten as f alone) and the orphan
    assert abs(predicted[1] - freed) < 1000  # the rewritten shard's new header is the only difference


def test_shards_written_after_the_index_are_kept_for_the_run_that_will_resume(tmp_path):
    store = ShardStore(tmp_path)
    store.put("indexed", _entry(1))
    store.flush()
    (shard,) = tmp_path.glob("*.safetensors")
    os.utime(shard, (1000, 1000))
    indexed_at = 2000.0  # the index was written after that shard...
    store.put("made-by-a-killed-run", _entry(2))
    store.flush()  # ...and this one after the index: its run never got to write one
    removed, _ = ShardStore(tmp_path).compact({"indexed"}, ("mean", "std"), keep_newer_than=indexed_at)
    assert removed == 0
    assert ShardStore(tmp_path).get("made-by-a-killed-run", ("mean",)) is not None


def test_a_slow_run_commits_its_entries_without_waiting_for_a_full_shard(tmp_path):
    store = ShardStore(tmp_path, chunk_seconds=0)  # every entry is a chunk
    store.put("a", _entry(1))
    assert store.pending == 0 and ShardStore(tmp_path).get("a", ("mean",)) is not None
    patient = ShardStore(tmp_path / "patient", chunk_seconds=3600)
    patient.put("b", _entry(1))
    assert patient.pending == 1  # neither a full shard nor an old chunk yet


def test_two_writers_on_one_store_keep_each_others_entries(tmp_path):
    first, second = ShardStore(tmp_path), ShardStore(tmp_path)  # e.g. two runs encoding at once
    first.put("from-first", _entry(1))
    second.put("from-second", _entry(2))
    first.flush()
    second.flush()
    reader = ShardStore(tmp_path)
    assert reader.get("from-first", ("mean",)) is not None and reader.get("from-second", ("mean",)) is not None
