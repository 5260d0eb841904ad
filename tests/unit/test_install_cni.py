"""`tulle install-cni` puts the plugin and a conflist on a host (here: into temporary folders)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tulle.cli.main import main

from ..conftest import CNI_BIN_DIR


def test_install_cni_copies_the_plugin_and_writes_a_conflist(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    try:
        main(["install-cni", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--socket", "/run/x.sock"])
    except SystemExit as exc:
        assert exc.code == 0
    plugin = bin_dir / "tulle"
    assert os.access(plugin, os.X_OK)
    assert plugin.read_bytes() == Path(CNI_BIN_DIR, "tulle").read_bytes()
    conf = json.loads((conf_dir / "10-tulle.conflist").read_text())
    assert conf["cniVersion"] == "1.0.0" and conf["name"] == "tulle"
    assert [p["type"] for p in conf["plugins"]] == ["tulle", "portmap"]
    assert conf["plugins"][0]["agentSocket"] == "/run/x.sock"
    # the installed copy runs on its own
    out = subprocess.run([str(plugin)], input=b"{}", env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True)
    assert "1.1.0" in json.loads(out.stdout)["supportedVersions"]
