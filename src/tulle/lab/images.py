"""Container images without a registry: OCI image tars made from locally built binaries.

No registry is reachable from the lab's machines, so the images a `--kubernetes` lab needs (the
pause container, agnhost for tests, CoreDNS) are written here from the binaries
scripts/build-kubernetes left in its cache: one OCI image layout (oci-layout, index.json, blobs)
per image, with one uncompressed layer, in a tar that `ctr -n k8s.io images import` takes. The
image keeps its upstream name (annotation `io.containerd.image.name`), so the kubelet and the
manifests that name `registry.k8s.io/...` find it without a pull.

The tars are written next to the binaries, in `images/` of the version's cache folder, and reused
when present: the name of each tar carries the digest of its binary, so a rebuilt binary gives a
new tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

KUBERNETES_VERSION = "v1.37.2"
COREDNS_VERSION = "v1.14.7"
CACHE_ROOT = os.environ.get("TULLE_CACHE", "/var/cache/tulle")

PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
AGNHOST_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
COREDNS_IMAGE = f"registry.k8s.io/coredns/coredns:{COREDNS_VERSION}"

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"

# What agnhost needs at run time besides itself: `agnhost` is static Go, but its `connect`,
# `netexec` and `porter` subcommands resolve names (an /etc/nsswitch.conf and /etc/hosts; the
# kubelet mounts its own /etc/hosts over ours), some subcommands fetch over HTTPS (the CA
# bundle), and e2e specs run `sh -c` and `nc` in it (busybox from busybox-static, if present).
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "nc", "cat", "echo", "ls", "sleep", "ip", "ping", "hostname", "wget", "test")


class ImageError(Exception):
    """An image cannot be written: a binary is missing."""


@dataclass(frozen=True)
class ImageSpec:
    """One image: its name, its files (path in the image -> file on this machine) and its command."""

    name: str
    files: dict[str, str]
    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    dirs: tuple[str, ...] = ("tmp",)
    links: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def cache_dir(version: str = KUBERNETES_VERSION) -> str:
    """The folder scripts/build-kubernetes builds `version` into."""
    return os.path.join(CACHE_ROOT, "kubernetes", version)


def bin_dir(version: str = KUBERNETES_VERSION) -> str:
    return os.path.join(cache_dir(version), "bin")


def specs(binaries: str) -> list[ImageSpec]:
    """The images a `--kubernetes` lab loads into each node's containerd."""
    etc = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/nsswitch.conf": "hosts: files dns\n",
        "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    }
    agnhost_files = {"agnhost": os.path.join(binaries, "agnhost")}
    links: dict[str, str] = {}
    if os.path.exists(CA_BUNDLE):
        agnhost_files["etc/ssl/certs/ca-certificates.crt"] = CA_BUNDLE
    if os.path.exists(BUSYBOX):
        agnhost_files["bin/busybox"] = BUSYBOX
        links = {f"bin/{applet}": "busybox" for applet in BUSYBOX_APPLETS}
    coredns_files = {"coredns": os.path.join(binaries, "coredns")}
    if os.path.exists(CA_BUNDLE):
        coredns_files["etc/ssl/certs/ca-certificates.crt"] = CA_BUNDLE
    return [
        ImageSpec(PAUSE_IMAGE, {"pause": os.path.join(binaries, "pause")}, ["/pause"]),
        ImageSpec(AGNHOST_IMAGE, agnhost_files, ["/agnhost"], dirs=("tmp", "root"), links=links, texts=etc),
        ImageSpec(COREDNS_IMAGE, coredns_files, ["/coredns"], texts=etc),
    ]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _add_dir(tar: tarfile.TarFile, name: str, seen: set[str]) -> None:
    parts = name.split("/")
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d and d not in seen:
            seen.add(d)
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)


def layer_bytes(spec: ImageSpec) -> bytes:
    """The image's one layer, an uncompressed tar with fixed owners and times (reproducible)."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in spec.dirs:
            _add_dir(tar, d, seen)
        for inside, outside in sorted(spec.files.items()):
            if not os.path.isfile(outside):
                raise ImageError(f"{spec.name}: {outside} is missing (run scripts/build-kubernetes)")
            _add_dir(tar, os.path.dirname(inside), seen)
            info = tarfile.TarInfo(inside)
            info.size = os.path.getsize(outside)
            info.mode = 0o755 if os.access(outside, os.X_OK) else 0o644
            with open(outside, "rb") as f:
                tar.addfile(info, f)
        for inside, text in sorted(spec.texts.items()):
            _add_dir(tar, os.path.dirname(inside), seen)
            data = text.encode()
            info = tarfile.TarInfo(inside)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for inside, target in sorted(spec.links.items()):
            _add_dir(tar, os.path.dirname(inside), seen)
            info = tarfile.TarInfo(inside)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            info.mode = 0o777
            tar.addfile(info)
    return buf.getvalue()


def image_blobs(spec: ImageSpec) -> tuple[dict[str, bytes], dict[str, object]]:
    """The blobs (digest -> bytes) of the image and the descriptor of its manifest for index.json."""
    layer = layer_bytes(spec)
    layer_digest = _digest(layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd or None,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "tulle.lab.images"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": _digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    tag = spec.name.rsplit(":", 1)[1]
    descriptor: dict[str, object] = {
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": _digest(manifest_bytes),
        "size": len(manifest_bytes),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": spec.name, "org.opencontainers.image.ref.name": tag},
    }
    blobs = {layer_digest: layer, _digest(config_bytes): config_bytes, _digest(manifest_bytes): manifest_bytes}
    return blobs, descriptor


def write_image_tar(spec: ImageSpec, path: str) -> None:
    """Write `spec` as an OCI image layout in a tar at `path` (atomically)."""
    blobs, descriptor = image_blobs(spec)
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [descriptor]}
    members: list[tuple[str, bytes]] = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, sort_keys=True).encode()),
    ]
    members += [(f"blobs/sha256/{d.split(':', 1)[1]}", data) for d, data in sorted(blobs.items())]
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def _tar_name(spec: ImageSpec) -> str:
    key = hashlib.sha256()
    for inside, outside in sorted(spec.files.items()):
        key.update(f"{inside}={_file_digest(outside)}\n".encode() if os.path.isfile(outside) else inside.encode())
    key.update(json.dumps([spec.entrypoint, spec.cmd, spec.dirs, spec.links, spec.texts], sort_keys=True).encode())
    safe = spec.name.replace("/", "_").replace(":", "_")
    return f"{safe}-{key.hexdigest()[:12]}.tar"


def ensure_images(version: str = KUBERNETES_VERSION, binaries: str | None = None) -> dict[str, str]:
    """The image tars for `version` (name -> tar path), written once and reused when present."""
    binaries = binaries or bin_dir(version)
    out = os.path.join(cache_dir(version), "images")
    os.makedirs(out, exist_ok=True)
    tars: dict[str, str] = {}
    for spec in specs(binaries):
        path = os.path.join(out, _tar_name(spec))
        if not os.path.exists(path):
            write_image_tar(spec, path)
        tars[spec.name] = path
    return tars


def main() -> None:
    """`python -m tulle.lab.images [VERSION]`: write the image tars, print one `NAME TAR` a line."""
    import sys

    version = sys.argv[1] if len(sys.argv) > 1 else KUBERNETES_VERSION
    try:
        for name, path in ensure_images(version).items():
            print(name, path)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
