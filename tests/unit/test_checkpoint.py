"""Checkpoint on local and memory:// filesystems: folders in and out, metadata, no implicit path use, pickling."""

from __future__ import annotations

import os
import pickle
import uuid

import fsspec
import pytest

from trainkit import Checkpoint


def _write_tree(root):
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    with open(os.path.join(root, "model.pt"), "wb") as f:
        f.write(b"weights")
    with open(os.path.join(root, "sub", "optim.pt"), "wb") as f:
        f.write(b"state")


def _read_tree(root):
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _in_memory(ckpt):
    proto = ckpt.filesystem.protocol
    return "memory" in ((proto,) if isinstance(proto, str) else proto)


_EXPECTED = {"model.pt": b"weights", os.path.join("sub", "optim.pt"): b"state"}


@pytest.fixture(params=["local", "memory"])
def checkpoint(request, tmp_path):
    """A checkpoint holding model.pt and sub/optim.pt, on a local folder or in memory://."""
    src = tmp_path / "src"
    _write_tree(str(src))
    if request.param == "local":
        yield Checkpoint.from_directory(src)
        return
    uri = f"memory://trainkit-test-{uuid.uuid4().hex}/ckpt"
    fs = fsspec.filesystem("memory")
    fs.put(str(src) + "/", uri.split("://", 1)[1] + "/", recursive=True)
    yield Checkpoint(uri)
    fs.rm(uri.split("://", 1)[1], recursive=True)


def test_from_directory_points_at_the_folder_without_copying(tmp_path):
    src = tmp_path / "src"
    _write_tree(str(src))
    ckpt = Checkpoint.from_directory(src)
    assert ckpt.path == str(src)
    assert ckpt.filesystem.protocol[0] in ("file", "local")
    with ckpt.as_directory() as d:
        assert d == str(src)


def test_to_directory_copies_every_file(checkpoint, tmp_path):
    out = checkpoint.to_directory(tmp_path / "out")
    assert out == str(tmp_path / "out")
    assert _read_tree(out) == _EXPECTED


def test_to_directory_without_a_path_makes_a_new_temp_folder(checkpoint):
    out = checkpoint.to_directory()
    try:
        assert os.path.isdir(out)
        assert _read_tree(out) == _EXPECTED
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def test_as_directory_yields_a_local_folder_with_the_files(checkpoint):
    with checkpoint.as_directory() as d:
        assert os.path.isdir(d)
        assert _read_tree(d) == _EXPECTED
    if not _in_memory(checkpoint):
        assert os.path.isdir(d)  # the checkpoint's own folder is left alone
    else:
        assert not os.path.exists(d)  # the downloaded copy is removed


def test_metadata_get_set_and_update(checkpoint):
    assert checkpoint.get_metadata() == {}
    checkpoint.set_metadata({"epoch": 1, "note": "first"})
    assert checkpoint.get_metadata() == {"epoch": 1, "note": "first"}
    checkpoint.update_metadata({"epoch": 2, "lr": 0.1})
    assert checkpoint.get_metadata() == {"epoch": 2, "note": "first", "lr": 0.1}
    checkpoint.set_metadata({"only": True})
    assert checkpoint.get_metadata() == {"only": True}


def test_metadata_that_json_cannot_hold_is_rejected_before_anything_is_written(checkpoint):
    checkpoint.set_metadata({"kept": 1})
    with pytest.raises(TypeError):
        checkpoint.set_metadata({"obj": object()})
    assert checkpoint.get_metadata() == {"kept": 1}


def test_using_a_checkpoint_as_a_path_raises_type_error(checkpoint):
    with pytest.raises(TypeError, match="as_directory"):
        os.fspath(checkpoint)
    with pytest.raises(TypeError):
        open(checkpoint)  # noqa: SIM115


def test_checkpoint_pickles_with_its_path_and_filesystem(checkpoint):
    checkpoint.set_metadata({"k": "v"})
    back = pickle.loads(pickle.dumps(checkpoint))
    assert back.path == checkpoint.path
    assert type(back.filesystem) is type(checkpoint.filesystem)
    assert back.get_metadata() == {"k": "v"}
    with back.as_directory() as d:
        assert _read_tree(d)["model.pt"] == b"weights"


def test_checkpoint_from_a_memory_uri_keeps_the_uri(checkpoint):
    if _in_memory(checkpoint):
        assert checkpoint.uri.startswith("memory://")
    else:
        assert checkpoint.uri == checkpoint.path
