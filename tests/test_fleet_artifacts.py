"""The fleet's artifact store on every kind of location, without Ray: a directory, a file://
URL and object storage through fsspec (`memory://`, the same code path as s3:// or gs://).

Names are the sha256 of the bytes (checked against hashlib on random files), objects are
written once and atomically (a write that fails half-way leaves nothing under the final name),
reads are verified (a corrupt, truncated or oversized object never reaches the caller), URIs
outside the store are refused, and a scheme whose package is missing is named at start.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import uuid

import pytest
from pydantic import ValidationError

from server.fleet import artifacts
from server.fleet.artifacts import ArtifactStore, ArtifactStoreError, filesystem
from server.fleet.settings import FleetSettings

pytest.importorskip("fsspec")

BAD_URIS = (
    "../x.safetensors",
    "/etc/passwd",
    "sha256/../../x.safetensors",
    "sha256/" + "0" * 63 + ".safetensors",
    "sha256/" + "A" * 64 + ".safetensors",
    "s3://elsewhere/sha256/" + "0" * 64 + ".safetensors",
    "x",
    None,
)


@pytest.fixture(params=["dir", "file-url", "memory"])
def store(request, tmp_path):
    if request.param != "memory":
        where = tmp_path / "store"
        yield ArtifactStore(where if request.param == "dir" else f"file://{where}")
        return
    bucket = f"memory://lpi-test-{uuid.uuid4().hex}/prefix"  # one process-wide memory fs
    yield ArtifactStore(bucket, cache_dir=tmp_path / "cache", max_bytes=16 << 20)
    memory = artifacts.filesystem(bucket)()
    if memory.exists(bucket):
        memory.rm(bucket, recursive=True)


def objects(store: ArtifactStore) -> list[str]:
    """Every file under the store, relative to it (a directory's or the bucket's)."""
    if store.root is not None:
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    base = store.base.removeprefix("memory://").strip("/")
    found = store.fs.find(store.base) if store.fs.exists(store.base) else []
    return sorted(p.strip("/").removeprefix(base).strip("/") for p in found)


def random_file(folder, size: int = 4096):
    path = folder / f"{uuid.uuid4().hex}.safetensors"
    path.write_bytes(os.urandom(size))
    return path


def test_content_addressed_round_trip(store, tmp_path):
    sources = [random_file(tmp_path, size) for size in (1, 4096, 3 * artifacts.CHUNK + 7)]
    uris = [store.put(source) for source in sources]
    for source, uri in zip(sources, uris, strict=True):
        expected = hashlib.sha256(source.read_bytes()).hexdigest()  # the independent digest
        assert uri == f"sha256/{expected}.safetensors"
        assert store.path(uri).read_bytes() == source.read_bytes()
        assert store.put(source) == uri  # once: the name is the content
    assert objects(store) == sorted(uris)  # nothing else: no temporary object left


def test_uris_outside_the_store_are_refused(store):
    for bad in BAD_URIS:
        with pytest.raises(ArtifactStoreError) as refused:
            store.check_uri(bad)
        assert refused.value.field == "artifact"
        with pytest.raises(ArtifactStoreError):
            store.path(bad)


def test_a_link_out_of_a_directory_store_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    outside = random_file(tmp_path)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    (tmp_path / "store" / "sha256" / f"{digest}.safetensors").symlink_to(outside)
    with pytest.raises(ArtifactStoreError, match="leaves the artifact store"):
        store.path(f"sha256/{digest}.safetensors")


def overwrite(store: ArtifactStore, uri: str, data: bytes) -> None:
    """What a tampering hand or a broken disk does to a stored object."""
    if store.root is not None:
        (store.root / uri).write_bytes(data)
    else:
        store.fs.pipe_file(f"{store.base}/{uri}", data)


def test_corrupt_or_truncated_objects_are_refused(store, tmp_path):
    source = random_file(tmp_path)
    uri = store.put(source)
    for damaged in (os.urandom(4096), source.read_bytes()[:-1], b""):
        overwrite(store, uri, damaged)
        with pytest.raises(ArtifactStoreError, match="corrupt"):
            store.path(uri)
    if store.root is None:  # a refused download leaves no copy under the final name
        assert not (store.cache_dir / uri).exists()
    assert store.put(source) == uri  # a put repairs it
    assert store.path(uri).read_bytes() == source.read_bytes()


def test_a_put_repairs_a_damaged_object_behind_a_good_cached_copy(tmp_path):
    """The replica that published an object still holds a good cached copy of it: a put must
    check the remote object itself, or a damaged object would never be written again."""
    bucket = f"memory://lpi-test-{uuid.uuid4().hex}"
    store = ArtifactStore(bucket, cache_dir=tmp_path / "cache")
    source = random_file(tmp_path)
    uri = store.put(source)
    assert store.path(uri).read_bytes() == source.read_bytes()  # cached here, and good
    overwrite(store, uri, os.urandom(4096))
    assert store.put(source) == uri
    assert store.fs.cat_file(f"{store.base}/{uri}") == source.read_bytes()  # repaired remotely
    fresh = ArtifactStore(bucket, cache_dir=tmp_path / "empty-cache")
    assert fresh.path(uri).read_bytes() == source.read_bytes()


def test_missing_object(store):
    uri = f"sha256/{'ab' * 32}.safetensors"
    with pytest.raises(ArtifactStoreError, match="missing"):
        store.path(uri)


def test_a_failed_write_leaves_nothing_under_the_final_name(store, tmp_path, monkeypatch):
    source = random_file(tmp_path, 3 * artifacts.CHUNK)
    uri = f"sha256/{hashlib.sha256(source.read_bytes()).hexdigest()}.safetensors"
    original = artifacts._copy_hashing

    def half_then_fail(handle, target, limit=None):  # the writer dies mid-object
        target.write(handle.read(artifacts.CHUNK))
        raise OSError("connection reset")

    def half_then_fail_local(src, dst):
        with open(src, "rb") as handle, open(dst, "wb") as target:
            half_then_fail(handle, target)

    if store.root is None:
        monkeypatch.setattr(artifacts, "_copy_hashing", half_then_fail)
        monkeypatch.setattr(artifacts, "file_digest", lambda p: uri[7:-12])
    else:
        monkeypatch.setattr(artifacts.shutil, "copyfile", half_then_fail_local)
    with pytest.raises((OSError, ArtifactStoreError), match="connection reset"):
        store.put(source)
    monkeypatch.setattr(artifacts, "_copy_hashing", original)
    assert objects(store) == []  # neither the final name nor a temporary one
    with pytest.raises(ArtifactStoreError, match="missing"):
        store.path(uri)


def test_a_source_changed_while_copied_is_refused(store, tmp_path, monkeypatch):
    source, original = random_file(tmp_path), artifacts.file_digest
    calls = []

    def digest_then_change(path):  # another writer appends right after the source is hashed
        digest = original(path)
        if not calls:
            calls.append(path)
            with open(source, "ab") as handle:
                handle.write(b"appended")
        return digest

    monkeypatch.setattr(artifacts, "file_digest", digest_then_change)
    with pytest.raises(ArtifactStoreError, match="changed while it was copied"):
        store.put(source)
    assert objects(store) == []


def test_remote_reads_are_cached_and_checked(tmp_path):
    bucket = f"memory://lpi-test-{uuid.uuid4().hex}"
    store = ArtifactStore(bucket, cache_dir=tmp_path / "cache", max_bytes=8192)
    source = random_file(tmp_path)
    uri = store.put(source)
    local = store.path(uri)
    assert local.parent.parent == tmp_path / "cache" and local.read_bytes() == source.read_bytes()
    local.write_bytes(b"rot")  # the local copy decays: fetched again, not trusted
    assert store.path(uri).read_bytes() == source.read_bytes()
    big = random_file(tmp_path, 8193)  # a replica never downloads more than max_bytes
    overwrite(store, uri, big.read_bytes())
    (tmp_path / "cache" / uri).unlink()
    with pytest.raises(ArtifactStoreError, match="larger than 8192"):
        store.path(uri)


def test_concurrent_puts_of_one_artifact(tmp_path):
    """Two replicas publishing the same file at once: one object, whole."""
    bucket = f"memory://lpi-test-{uuid.uuid4().hex}"
    source = random_file(tmp_path, 2 * artifacts.CHUNK)
    stores = [ArtifactStore(bucket, cache_dir=tmp_path / f"c{i}") for i in range(4)]
    uris: list[str] = []
    threads = [threading.Thread(target=lambda s=s: uris.append(s.put(source))) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(uris)) == 1 and objects(stores[0]) == uris[:1]
    assert stores[3].path(uris[0]).read_bytes() == source.read_bytes()


def test_missing_packages_are_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # not installed, even where it is
    with pytest.raises(ValueError, match=r"needs the s3fs package.*pip install s3fs"):
        filesystem("s3://bucket/prefix")
    with pytest.raises(ValueError, match="no filesystem for nope://"):
        filesystem("nope://bucket")
    with pytest.raises(ValueError, match="names no bucket"):
        filesystem("zip://")
    monkeypatch.setitem(sys.modules, "fsspec", None)  # fsspec not installed
    with pytest.raises(ValueError, match="needs the fsspec package"):
        ArtifactStore("gs://bucket/prefix")
    source = random_file(tmp_path)  # a directory needs no fsspec
    assert ArtifactStore(tmp_path / "dir").path(ArtifactStore(tmp_path / "dir").put(source))


def test_fleet_settings_check_the_location(tmp_path):
    base = {"backbone": "tiny", "random_weights": True, "data_dir": tmp_path}
    default = FleetSettings(**base)
    assert default.artifact_store == str(tmp_path / "fleet" / "artifacts")
    assert FleetSettings(**base, artifacts=f"file://{tmp_path}/a").artifact_store.endswith("/a")
    with pytest.raises(ValidationError, match="one process's own"):
        FleetSettings(**base, artifacts="memory://shared")
    with pytest.raises(ValidationError, match="no filesystem for nope://"):
        FleetSettings(**base, artifacts="nope://bucket/prefix")
