"""RunStore: the run directory on local disk and memory://; atomic manifest writes, merged uploads."""

from __future__ import annotations

import os
import pickle
import uuid

import fsspec
import pytest

from trainkit.errors import StorageError
from trainkit.storage import RunStore, download_tree, to_uri


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        s = RunStore(str(tmp_path / "results"), "run")
    else:
        s = RunStore(f"memory://trainkit-test-{uuid.uuid4().hex}/results", "run")
    s.ensure()
    yield s
    if not s.local:
        s.fs.rm(s.run_path, recursive=True)


def _local_tree(root, files):
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return root


def _read(store, rel):
    return store.read_bytes(rel)


def test_run_path_is_storage_path_slash_name(tmp_path):
    s = RunStore(str(tmp_path), "exp")
    assert s.run_path == str(tmp_path / "exp")
    assert s.local
    m = RunStore("memory://bucket/prefix", "exp")
    assert m.run_path.endswith("bucket/prefix/exp")
    assert not m.local
    assert m.uri.startswith("memory://")


def test_ensure_creates_the_run_directory(store):
    assert store.read_bytes(".trainkit_marker") == b"trainkit\n"


def test_write_json_atomic_round_trips_and_replaces(store):
    store.write_json_atomic("run_state.json", {"a": 1})
    store.write_json_atomic("run_state.json", {"a": 2, "b": [1, 2]})
    assert store.read_json("run_state.json") == {"a": 2, "b": [1, 2]}


def test_an_interrupted_local_json_write_leaves_the_old_manifest_intact(tmp_path, monkeypatch):
    s = RunStore(str(tmp_path), "run")
    s.ensure()
    s.write_json_atomic("run_state.json", {"version": 1})

    def crash(src, dst):
        raise OSError("power lost before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        s.write_json_atomic("run_state.json", {"version": 2, "big": "x" * 10_000})
    monkeypatch.undo()
    assert s.read_json("run_state.json") == {"version": 1}


def test_local_json_write_leaves_no_temp_files(tmp_path):
    s = RunStore(str(tmp_path), "run")
    s.ensure()
    for i in range(3):
        s.write_json_atomic("run_state.json", {"i": i})
    assert sorted(os.listdir(s.run_path)) == [".trainkit_marker", "run_state.json"]


def test_reading_a_missing_file_gives_none(store):
    assert store.read_bytes("nope.json") is None
    assert store.read_json("nope.json") is None


def test_reading_invalid_json_raises_storage_error_naming_the_file(store):
    store.write_bytes_atomic("run_state.json", b"{not json")
    with pytest.raises(StorageError, match="run_state.json"):
        store.read_json("run_state.json")


def test_append_text_appends(store):
    store.append_text("events.jsonl", "a\n")
    store.append_text("events.jsonl", "b\n")
    assert store.read_bytes("events.jsonl") == b"a\nb\n"


def test_upload_dir_copies_a_local_folder_and_returns_relative_names(store, tmp_path):
    src = _local_tree(str(tmp_path / "src"), {"model.pt": b"m", "sub/opt.pt": b"o"})
    files = store.upload_dir(fsspec.filesystem("file"), src, "checkpoint_1")
    assert sorted(files) == ["model.pt", os.path.join("sub", "opt.pt")]
    assert _read(store, "checkpoint_1/model.pt") == b"m"
    assert _read(store, "checkpoint_1/sub/opt.pt") == b"o"
    assert store.list_dirs() == ["checkpoint_1"]


def test_upload_dir_merges_folders_from_several_ranks(store, tmp_path):
    a = _local_tree(str(tmp_path / "a"), {"rank0.pt": b"0", "shared/meta0": b"x"})
    b = _local_tree(str(tmp_path / "b"), {"rank1.pt": b"1", "shared/meta1": b"y"})
    local = fsspec.filesystem("file")
    store.upload_dir(local, a, "checkpoint_2")
    store.upload_dir(local, b, "checkpoint_2")
    out = tmp_path / "down"
    download_tree(store.fs, store.path("checkpoint_2"), str(out))
    found = {os.path.relpath(os.path.join(r, n), out) for r, _d, ns in os.walk(out) for n in ns}
    assert found == {"rank0.pt", "rank1.pt", os.path.join("shared", "meta0"), os.path.join("shared", "meta1")}


def test_upload_dir_from_a_memory_folder(store, tmp_path):
    mem = fsspec.filesystem("memory")
    root = f"/trainkit-src-{uuid.uuid4().hex}"
    mem.pipe_file(f"{root}/w.bin", b"w")
    mem.pipe_file(f"{root}/d/x.bin", b"x")
    try:
        files = store.upload_dir(mem, root, "checkpoint_3")
    finally:
        mem.rm(root, recursive=True)
    assert sorted(f.replace(os.sep, "/") for f in files) == ["d/x.bin", "w.bin"]
    assert _read(store, "checkpoint_3/w.bin") == b"w"
    assert _read(store, "checkpoint_3/d/x.bin") == b"x"


def test_upload_dir_of_a_missing_folder_raises_file_not_found(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        store.upload_dir(fsspec.filesystem("file"), str(tmp_path / "missing"), "checkpoint_1")


def test_list_dirs_and_delete_dir(store, tmp_path):
    src = _local_tree(str(tmp_path / "src"), {"f": b"1"})
    local = fsspec.filesystem("file")
    for d in ("checkpoint_1", "checkpoint_2"):
        store.upload_dir(local, src, d)
    store.write_json_atomic("run_state.json", {})
    assert store.list_dirs() == ["checkpoint_1", "checkpoint_2"]
    store.delete_dir("checkpoint_1")
    store.delete_dir("checkpoint_404")  # missing folders are fine
    assert store.list_dirs() == ["checkpoint_2"]
    assert store.read_json("run_state.json") == {}


def test_ensure_on_an_unwritable_location_raises_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="not writable"):
        RunStore(str(blocker), "run").ensure()


def test_run_store_pickles_to_the_same_run_directory(store):
    store.write_json_atomic("run_state.json", {"x": 1})
    back = pickle.loads(pickle.dumps(store))
    assert back.run_path == store.run_path
    assert back.read_json("run_state.json") == {"x": 1}


def test_to_uri_spells_remote_paths_with_their_scheme():
    assert to_uri(fsspec.filesystem("file"), "/a/b") == "/a/b"
    assert to_uri(fsspec.filesystem("memory"), "/a/b") == "memory:///a/b"
