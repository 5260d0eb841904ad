"""JSON for the plugin binary without the start-up cost of the `json` package.

`import json` pulls in `re`, and `re` pulls in `enum`, `functools` and `collections`: ~10 ms of
a plugin start that is ~20 ms without them, paid on every ADD and DEL. The parsing and printing
are done by CPython's C accelerator `_json` either way (json's pure-Python layer only sets it
up), so this module sets it up the same way without the imports. Anything the fast path does
not take as it is (a decode error, bytes that are not UTF-8, an object it cannot print) goes to
the `json` package itself, so that errors and edge cases are json's own, word for word.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # another Python: json's own pure-Python path
    _json = None  # type: ignore[assignment]

_WHITESPACE = " \t\n\r"


class _ScannerContext:
    """The attributes `_json.make_scanner` reads, set as `json.JSONDecoder()` sets them."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return float(name)  # NaN, Infinity, -Infinity, as json accepts them


def _slow_loads(raw: bytes | str) -> Any:
    import json

    return json.loads(raw)


def _slow_dumps(obj: Any) -> str:
    import json

    return json.dumps(obj)


def loads(raw: bytes | str) -> Any:
    """As `json.loads`: the document's value, or json's ValueError for what is not JSON.

    >>> loads(b'{"cniVersion": "1.1.0", "mtu": 1450, "ok": true}')
    {'cniVersion': '1.1.0', 'mtu': 1450, 'ok': True}
    """
    if _json is None:
        return _slow_loads(raw)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        start = len(text) - len(text.lstrip(_WHITESPACE))
        scan = _json.make_scanner(_ScannerContext())  # type: ignore[arg-type]  # typeshed names no protocol
        value, end = scan(text, start)
    except Exception:
        return _slow_loads(raw)  # raises json's own error (or reads what only json reads, e.g. UTF-16)
    if text[end:].strip(_WHITESPACE):
        return _slow_loads(raw)  # "Extra data"
    return value


def _refuse(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: Any) -> str:
    """As `json.dumps(obj)` with its defaults (ASCII, ", " and ": ").

    >>> dumps({"code": 7, "msg": "bad", "ok": None, "mtu": 1.5})
    '{"code": 7, "msg": "bad", "ok": null, "mtu": 1.5}'
    """
    if _json is None:
        return _slow_dumps(obj)
    encode = _json.make_encoder({}, _refuse, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    try:
        return "".join(encode(obj, 0))
    except Exception:
        return _slow_dumps(obj)
