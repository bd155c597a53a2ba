"""Storage every node reaches: the same operations on a local directory and on an
S3-compatible object store (moto's server on 127.0.0.1), and training that resumes from the
object store's newest checkpoint on a scratch directory that never saw the first attempt."""
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.store import storage


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """A fresh storage location: a local directory, or a prefix in the S3 server's bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return f"s3://moie/test-{uuid.uuid4().hex[:8]}"


def test_a_directory_round_trips_through_the_storage_byte_for_byte(location, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    np.save(src / "tokens.npy", np.arange(1000, dtype=np.uint16))
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (src / "sub" / "model.json").write_text('{"a": 1}')
    storage.upload(src, storage.join(location, "dir"))
    assert storage.kind(storage.join(location, "dir")) == "directory"
    assert storage.names(storage.join(location, "dir")) == ["model.safetensors", "tokens.npy"]
    assert storage.npy_length(storage.join(location, "dir", "tokens.npy")) == 1000
    assert storage.sha256(storage.join(location, "dir", "tokens.npy")) == storage.sha256(str(src / "tokens.npy"))
    back = storage.download(storage.join(location, "dir"), tmp_path / "back")
    for f in src.rglob("*"):
        if f.is_file():
            assert (back / f.relative_to(src)).read_bytes() == f.read_bytes(), f
    copy = storage.local_copy(storage.join(location, "dir", "tokens.npy"), tmp_path / "scratch")
    assert np.array_equal(np.load(copy, mmap_mode="r"), np.arange(1000))
    assert storage.is_remote(location) == (copy.parent.parent == tmp_path / "scratch")  # local: read in place


def test_a_moved_directory_is_gone_from_its_old_location(location, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.json").write_text("{}")
    storage.upload(tmp_path / "d", storage.join(location, "old"))
    storage.move(storage.join(location, "old"), storage.join(location, "new"))
    assert not storage.exists(storage.join(location, "old"))
    assert storage.names(storage.join(location, "new")) == ["x.json"]


def test_a_missing_location_names_itself_and_what_to_do(location, tmp_path):
    missing = storage.join(location, "nothing-here")
    with pytest.raises(storage.StageError, match=rf"storage {missing} does not exist.*run that stage again"):
        storage.download(missing, tmp_path / "x")


def _train(model, tokens, ckpt_dir, stop_at=None, on_checkpoint=None):
    from experts.trainer import TrainConfig, train

    cfg = TrainConfig(max_tokens=40 * 4 * 16, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, ckpt_every=10,
                      keep_checkpoints=2, log_every=10, seed=0)
    return train(model, tokens, None, cfg, ckpt_dir=ckpt_dir, stop_at=stop_at, on_checkpoint=on_checkpoint)


def test_training_resumed_from_the_object_stores_newest_checkpoint_on_a_fresh_node_ends_as_if_uninterrupted(
        s3_env, tmp_path):
    from experts.checkpoint import build_model

    arch = {"arch": "gpt", "vocab_size": 259, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    torch.manual_seed(1)
    whole = build_model(arch)
    init = {k: v.clone() for k, v in whole.state_dict().items()}
    _train(whole, tokens, tmp_path / "uninterrupted")

    location = f"s3://moie/resume-{uuid.uuid4().hex[:8]}/expert-0"
    first = storage.CheckpointMirror(location, tmp_path / "node-a", keep=2)
    model = build_model(arch)
    model.load_state_dict(init)
    _train(model, tokens, first.dir, stop_at=30, on_checkpoint=first.push)  # the node is lost after step 30
    assert storage.checkpoint_steps(location) == [20, 30]  # older ones deleted from the store

    second = storage.CheckpointMirror(location, tmp_path / "node-b", keep=2)  # another node: nothing local
    assert sorted(p.name for p in second.dir.iterdir()) == ["step-00000030.json", "step-00000030.safetensors"]
    resumed = build_model(arch)
    result = _train(resumed, tokens, second.dir, on_checkpoint=second.push)
    assert result.resumed_from == 30
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(a, b), name
    assert storage.checkpoint_steps(location) == [30, 40]


def test_a_local_location_is_used_in_place_without_copies(tmp_path):
    mirror = storage.CheckpointMirror(str(tmp_path / "ck"), tmp_path / "scratch")
    assert mirror.dir == (tmp_path / "ck").resolve() and not (tmp_path / "scratch").exists()
    assert Path(storage.join(str(tmp_path), "a", "b")) == tmp_path / "a" / "b"


@pytest.mark.parametrize("tracking, artifacts, where, refused", [
    ("sqlite:////home/u/.moie/mlflow.db", "file:///home/u/.moie/artifacts", "/home/u/.moie/checkpoints",
     ["MLflow tracking store", "artifact store", "storage"]),
    ("/home/u/mlruns", "/home/u/mlruns/1", "s3://b/moie", ["MLflow tracking store", "artifact store"]),
    ("http://mlflow:5000", "mlflow-artifacts:/1", "/shared/moie", ["storage"]),
    ("postgresql://db/mlflow", "s3://b/mlflow", "s3://b/moie", []),
    ("https://mlflow.example", "mlflow-artifacts:/3", "gs://b/moie", []),
])
def test_only_stores_on_one_machines_disk_are_refused_on_a_cluster(tracking, artifacts, where, refused):
    from pipeline.ray_runtime import single_machine_stores

    found = single_machine_stores(tracking, artifacts, where)
    assert len(found) == len(refused) and all(what in line for what, line in zip(refused, found)), found


def test_a_damaged_newest_checkpoint_in_the_object_store_is_passed_over_for_the_one_before(s3_env, tmp_path):
    from experts.checkpoint import build_model

    arch = {"arch": "gpt", "vocab_size": 259, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    location = f"s3://moie/damaged-{uuid.uuid4().hex[:8]}/expert-0"
    first = storage.CheckpointMirror(location, tmp_path / "node-a", keep=2)
    _train(build_model(arch), tokens, first.dir, stop_at=30, on_checkpoint=first.push)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\0" * 100)
    storage.upload(damaged, storage.join(location, "step-00000030.safetensors"))
    second = storage.CheckpointMirror(location, tmp_path / "node-b", keep=2)
    assert sorted(p.name for p in second.dir.iterdir()) == ["step-00000020.json", "step-00000020.safetensors"]
    assert _train(build_model(arch), tokens, second.dir).resumed_from == 20
    storage.upload(damaged, storage.join(location, "step-00000040.safetensors"))
    storage.upload(damaged, storage.join(location, "step-00000020.safetensors"))
    storage.remove(storage.join(location, "step-00000030.json"))
    with pytest.raises(storage.StageError, match=rf"every checkpoint in {location} is damaged"):
        storage.CheckpointMirror(location, tmp_path / "node-c", keep=2)


# --- token files read by blocks ---------------------------------------------------------------------


def token_file(location, tmp_path, n=5000, block_bytes=256, seed=0):
    """n random tokens as a token file of small blocks at location/tokens.npy: (location, tokens, index)."""
    from pipeline.store.tokens import put_token_file

    tokens = np.random.default_rng(seed).integers(0, 259, n).astype(np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    where = storage.join(location, "tokens.npy")
    return where, tokens, put_token_file(tmp_path / "t.npy", where, block_bytes=block_bytes)


def test_a_token_file_read_by_blocks_equals_the_array_it_was_written_from(location, tmp_path):
    from pipeline.store.tokens import TokenBlocks

    where, tokens, index = token_file(location, tmp_path, block_bytes=48)
    reader = TokenBlocks(where, pin=storage.sha256(where + ".blocks.json"), cache_bytes=4 * 48)
    assert len(reader) == len(tokens) and len(index["blocks"]) > 200  # many blocks, the header across three
    rng = np.random.default_rng(1)
    for start in [0, 1, 64, 127, len(tokens) - 1, *rng.integers(0, len(tokens), 200)]:
        stop = start + int(rng.integers(0, 400))  # windows within a block, across two and more
        assert np.array_equal(reader[start:stop], tokens[start:stop]), (start, stop)
    assert np.array_equal(np.asarray(reader), tokens) and reader[-1] == tokens[-1]
    assert np.array_equal(np.asarray(reader, dtype=np.int64)[:10], tokens[:10].astype(np.int64))


def test_a_token_file_on_an_object_store_is_read_by_ranged_reads_of_the_blocks_asked_for_within_the_cache_bound(
        s3_env, tmp_path):
    from pipeline.store.tokens import TokenBlocks

    where, tokens, index = token_file(f"s3://moie/test-{uuid.uuid4().hex[:8]}", tmp_path, n=20_000)
    file_bytes, block = index["file_bytes"], index["block_bytes"]
    reader = TokenBlocks(where, cache_bytes=8 * block)
    assert reader.fetched_bytes == block  # the header's block, to know the tokens' length
    window = reader[9000:9100]  # bytes [128 + 18000, 128 + 18200): two blocks
    assert np.array_equal(window, tokens[9000:9100])
    assert reader.reads == 3 and reader.fetched_bytes == 3 * block  # no copy of the file, only the blocks read
    reader[9000:9100]
    assert reader.reads == 3  # cached
    for start in range(0, len(tokens), 50):  # the whole file, in windows
        assert np.array_equal(reader[start:start + 50], tokens[start:start + 50])
        assert len(reader.cache) * block <= 8 * block  # never more than the bound held
    assert reader.fetched_bytes >= file_bytes and reader.reads == len(index["blocks"]) + 3 - 1


@pytest.mark.parametrize("damage", ["block", "truncated", "index", "index deleted"])
def test_a_token_file_changed_after_it_was_written_is_refused_naming_the_file(location, tmp_path, damage):
    from artifacts import ChecksumError
    from pipeline.store.catalog import check_token_files
    from pipeline.store.tokens import TokenBlocks, load_tokens

    where, tokens, index = token_file(location, tmp_path)
    pin = storage.sha256(where + ".blocks.json")
    with open(tmp_path / "t.npy", "r+b") as f:  # change the copy, and put it in place of the file
        if damage == "truncated":
            f.truncate(index["file_bytes"] - 2)
        else:
            f.seek(128 + 2 * 3000)  # token 3000: block (128 + 6000) // 256 = 23
            f.write(b"\x07\x01")
    if damage == "index deleted":  # not read as a file written before block indexes: the pin says it has one
        storage.remove(where + ".blocks.json")
        with pytest.raises(ChecksumError, match=rf"token file {where} has no block index"):
            load_tokens(where, tmp_path / "scratch", {where: pin})
        with pytest.raises(ChecksumError, match=rf"train tokens of x at {where} changed .* has no block index"):
            check_token_files("x", {"moie.sha256.tokens.train.blocks": pin}, {"train": where})
        return
    if damage == "index":  # the file and an index that matches it, both replaced: the pin sees it
        token_file(location, tmp_path, n=5000, seed=1)
        with pytest.raises(ChecksumError, match=rf"block index {where}.blocks.json has sha256 .* not the {pin}"):
            TokenBlocks(where, pin=pin)
        return
    storage.upload(tmp_path / "t.npy", where)
    if damage == "truncated":
        with pytest.raises(ChecksumError, match=rf"token file {where} has {index['file_bytes'] - 2} bytes"):
            TokenBlocks(where, pin=pin)
        return
    reader = TokenBlocks(where, pin=pin)
    assert np.array_equal(reader[:2800], tokens[:2800])  # the blocks before it read as written
    with pytest.raises(ChecksumError, match=rf"block 23 \(bytes 5888-6143\) of token file {where} does not match"):
        reader[2990:3010]


def test_training_on_a_token_file_read_by_ranged_reads_equals_training_on_its_array_and_fetches_each_batch_at_once(
        s3_env, tmp_path):
    from experts.checkpoint import build_model
    from experts.trainer import TrainConfig, train
    from pipeline.store.tokens import TokenBlocks

    where, tokens, index = token_file(f"s3://moie/test-{uuid.uuid4().hex[:8]}", tmp_path, n=20_000, block_bytes=512)
    reader = TokenBlocks(where, cache_bytes=64 * 512)  # a twelfth of the file's 79 blocks at once
    arch = {"arch": "gpt", "vocab_size": 259, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16}
    cfg = TrainConfig(max_tokens=8 * 32 * 6, batch_size=8, seq_len=32, warmup_steps=2, eval_every=0, seed=3,
                      precision="fp32", compile=False)
    batches, prefetch = [], reader.prefetch
    reader.prefetch = lambda starts, length: (batches.append(len(starts)), prefetch(starts, length))
    losses = []
    for data in (tokens, reader):
        torch.manual_seed(0)
        losses.append(train(build_model(arch), data, None, cfg).train_loss)
    assert losses[0] == losses[1]  # the same windows, the same model
    assert batches == [8] * 6  # each batch's blocks asked for at once, before its windows are read
    assert 0 < reader.reads <= 6 * 8 * 2 + 1 and reader.fetched_bytes < index["file_bytes"]
    rng = np.random.default_rng(5)
    starts = rng.integers(0, len(tokens) - 33, 8).tolist()
    reader.prefetch(starts, 33)
    before = reader.reads
    assert all(np.array_equal(reader[s:s + 33], tokens[s:s + 33]) for s in starts)
    assert reader.reads == before  # the batch's blocks came in the one parallel fetch


def test_a_token_file_written_before_block_indexes_is_checked_whole_and_still_read(location, tmp_path):
    from artifacts import ChecksumError
    from pipeline.store.catalog import check_token_files, token_tags
    from pipeline.store.tokens import load_tokens

    tokens = np.arange(3000, dtype=np.uint16)
    np.save(tmp_path / "old.npy", tokens)
    where = storage.join(location, "old.npy")
    storage.upload(tmp_path / "old.npy", where)  # no .blocks.json beside it
    tags = token_tags({"train": where})
    assert tags == {"moie.sha256.tokens.train": storage.sha256(where)}  # pinned whole, as before
    assert check_token_files("old", tags, {"train": where}) == {}  # accepted; no block pin to hand on
    assert np.array_equal(load_tokens(where, tmp_path / "scratch"), tokens)
    np.save(tmp_path / "old.npy", tokens[::-1])
    storage.upload(tmp_path / "old.npy", where)
    with pytest.raises(ChecksumError, match=rf"train tokens of old at {where} changed since they were recorded"):
        check_token_files("old", tags, {"train": where})
