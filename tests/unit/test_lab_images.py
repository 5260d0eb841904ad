"""The OCI image tars the `--kubernetes` lab loads into containerd, from stand-in binaries."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from tulle.lab import images


def _binaries(tmp_path: Path) -> str:
    binaries = tmp_path / "bin"
    binaries.mkdir()
    for name in ("pause", "agnhost", "coredns"):
        (binaries / name).write_bytes(b"\x7fELF " + name.encode())
        (binaries / name).chmod(0o755)
    return str(binaries)


def _members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_image_tar_is_an_oci_layout_with_one_layer_and_the_upstream_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "CACHE_ROOT", str(tmp_path / "cache"))
    tars = images.ensure_images("v0.0.1", _binaries(tmp_path))
    assert set(tars) == {images.PAUSE_IMAGE, images.AGNHOST_IMAGE, images.COREDNS_IMAGE}
    members = _members(tars[images.PAUSE_IMAGE])
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (descriptor,) = json.loads(members["index.json"])["manifests"]
    assert descriptor["annotations"]["io.containerd.image.name"] == images.PAUSE_IMAGE
    for name, data in members.items():  # every blob is named by its digest
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    manifest = json.loads(members["blobs/sha256/" + descriptor["digest"].split(":")[1]])
    (layer,) = manifest["layers"]
    config = json.loads(members["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]
    assert config["config"]["Entrypoint"] == ["/pause"]


def test_images_are_reused_and_remade_when_a_binary_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "CACHE_ROOT", str(tmp_path / "cache"))
    binaries = _binaries(tmp_path)
    first = images.ensure_images("v0.0.1", binaries)
    mtime = os.stat(first[images.AGNHOST_IMAGE]).st_mtime_ns
    assert images.ensure_images("v0.0.1", binaries) == first
    assert os.stat(first[images.AGNHOST_IMAGE]).st_mtime_ns == mtime
    Path(binaries, "agnhost").write_bytes(b"\x7fELF agnhost 2")
    second = images.ensure_images("v0.0.1", binaries)
    assert second[images.AGNHOST_IMAGE] != first[images.AGNHOST_IMAGE]
    assert second[images.PAUSE_IMAGE] == first[images.PAUSE_IMAGE]


def test_a_missing_binary_says_to_build_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "CACHE_ROOT", str(tmp_path / "cache"))
    with pytest.raises(images.ImageError, match="build-kubernetes"):
        images.ensure_images("v0.0.1", str(tmp_path / "nothing"))
