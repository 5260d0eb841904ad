"""The network configuration list (conflist) a host's runtime reads: tulle first, portmap after it."""

from __future__ import annotations

import json
import os
from typing import Any

from tulle.cni.files import write_atomically


def conflist(network: str, socket_path: str, state_dir: str, cni_version: str = "1.0.0") -> dict[str, Any]:
    """The network configuration list: tulle first, portmap after it (chained)."""
    return {
        "cniVersion": cni_version,
        "name": network,
        "plugins": [
            {"type": "tulle", "agentSocket": socket_path, "stateDir": state_dir},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def write_conflist(conf_dir: str, data: dict[str, Any], filename: str = "10-tulle.conflist") -> str:
    os.makedirs(conf_dir, exist_ok=True)
    path = os.path.join(conf_dir, filename)
    write_atomically(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o644)
    return path
