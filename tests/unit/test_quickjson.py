"""The plugin's JSON (`tulle.cni.quickjson`) reads and writes exactly what `json` does, errors
included, and the plugin binary starts without importing the packages it exists to avoid."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tulle.cni import quickjson

from ..conftest import CNI_BIN_DIR

DOCUMENTS: list[Any] = [
    {"cniVersion": "1.1.0", "name": "tulle", "type": "tulle", "mtu": 1450, "ipMasq": True, "x": None},
    {"nested": {"list": [1, -2, 3.5, 1e100, -0.0, "", "ü", "\u2028", "tab\t", 'quote"'], "empty": {}}},
    [],
    "just a string",
    42,
    {"prevResult": {"ips": [{"address": "10.244.1.5/32"}, {"address": "fd00::5/128"}]}},
]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_round_trip_is_jsons(doc: Any) -> None:
    assert quickjson.dumps(doc) == json.dumps(doc)
    text = json.dumps(doc)
    assert quickjson.loads(text.encode()) == json.loads(text)
    assert quickjson.loads(f"\n  {text} \r\n") == doc


@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"{", b'{"a": 1,}', b"{'a': 1}", b'{"a": 1} {"b": 2}', b"[1, 2", b'"unterminated', b"nul"],
)
def test_what_is_not_json_gets_jsons_own_error(raw: bytes) -> None:
    with pytest.raises(ValueError) as expected:
        json.loads(raw)
    with pytest.raises(ValueError) as got:
        quickjson.loads(raw)
    assert str(got.value) == str(expected.value)


def test_bytes_that_are_not_utf8_get_jsons_answer() -> None:
    utf16 = json.dumps({"a": "b"}).encode("utf-16")
    assert quickjson.loads(utf16) == {"a": "b"}  # json detects UTF-16 and so do we, through it
    with pytest.raises(ValueError):
        quickjson.loads(b'{"a": "\xff"}')


def test_what_json_cannot_print_is_refused_as_json_refuses_it() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        quickjson.dumps({"a": {1, 2}})


def test_the_plugin_runs_without_json_re_socket_enum_or_typing() -> None:
    """~10 ms of every ADD and DEL: these imports are what a plugin start would otherwise cost.
    Reading a config and printing a result must take the fast path, not fall back to json."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import tulle.cni.plugin; "
        "from tulle.cni import quickjson; "
        'conf = quickjson.loads(b\'{"cniVersion": "1.1.0", "name": "n", "type": "tulle", "mtu": 1450}\'); '
        'out = quickjson.dumps({"cniVersion": conf["cniVersion"], "ips": [{"address": "10.0.0.5/32"}], "x": None}); '
        "print(' '.join(m for m in ('json', 're', 'socket', 'enum', 'typing') if m in sys.modules))"
    )
    done = subprocess.run(
        ["/usr/bin/python3", "-S", "-c", probe, f"{CNI_BIN_DIR}/tulle"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""
