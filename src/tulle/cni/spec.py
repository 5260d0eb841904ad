"""The CNI specification 1.1.0 as code: versions, error codes, results, arguments.

Standard library only: the plugin binary imports this module and must start fast.
The agent imports it too, so both sides speak one definition of the spec.
"""

from __future__ import annotations

import posixpath  # os imports it at every start: free

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~2.5 ms at start; the plugin does not need it at run time
    from typing import Any

SPEC_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

# Well-known error codes (spec section "Error"); 100 and above are ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENVIRONMENT = 4
ERR_IO_FAILURE = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_PLUGIN_NOT_AVAILABLE_LIMITED = 51
# Tulle's own codes.
ERR_CHECK_MISMATCH = 100  # CHECK found state that differs from prevResult
ERR_IPAM_EXHAUSTED = 101  # no address left for this node
ERR_INTERNAL = 102  # the agent failed while doing the work

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# Spec section 2 "Parameters": a container ID starts with a letter or digit, then [A-Za-z0-9_.-];
# section "Configuration format" gives a network's name the same form.
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_CONTAINER_ID_CHARS = _ALNUM | frozenset("_.-")
# The spec sets no length; ours keeps every IPAM handle (network/container/ifname), which each
# IPAMBlock object stores once per address, small enough that a block always fits in etcd.
# Runtimes' IDs are 64 hex digits; a network name becomes an object name in Multus (253).
MAX_NAME_LENGTH = 253
PATH_MAX = 4095  # Linux's, less the final NUL


class CniError(Exception):
    """An error the plugin reports with the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str = SPEC_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CniError:
        return cls(int(data.get("code", ERR_INTERNAL)), str(data.get("msg", "")), str(data.get("details", "")))


def version_tuple(version: str) -> tuple[int, int, int]:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(version)
    return int(parts[0]), int(parts[1]), int(parts[2])


def check_version(version: Any, command: str) -> str:
    """Return the request's cniVersion if this plugin can serve `command` in it."""
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, "network configuration has no cniVersion", "field: cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {shown(version)}",
            f"this plugin supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    needed = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}.get(command)
    if needed and version_tuple(version) < version_tuple(needed):
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"{command} needs cniVersion {needed} or later, the configuration says {version}",
            f"set cniVersion to {needed} or later in the network configuration",
        )
    return version


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS: 'K1=V1;K2=V2' (spec section 2)."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for part in raw.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENVIRONMENT, f"CNI_ARGS has a malformed pair {shown(part)}", "expected K=V;K=V")
        out[key] = value
    return out


def shown(value: str, limit: int = 80) -> str:
    """A value for an error message: quoted, and cut short if long (a 100 KB value is no message).

    >>> shown("a" * 100, limit=5)
    "'aaaaa'... (100 characters)"
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _is_spec_name(value: str) -> bool:
    return bool(value) and value[0] in _ALNUM and set(value) <= _CONTAINER_ID_CHARS and len(value) <= MAX_NAME_LENGTH


def path_problem(path: str, max_bytes: int = PATH_MAX) -> str:
    """Why `path` is not an absolute, normalized path of at most `max_bytes` bytes; "" if it is one.

    >>> path_problem("/run/tulle/../../etc")
    "it has a '..' segment"
    >>> path_problem("/run/tulle/agent.sock")
    ''
    """
    if "\0" in path:
        return "it contains a NUL byte"
    if not path.startswith("/"):
        return "it is not an absolute path"
    if "/../" in f"{path}/":
        return "it has a '..' segment"
    if posixpath.normpath(path) != path:
        return f"it is not normalized (it would be {shown(posixpath.normpath(path))})"
    if len(path.encode("utf-8", "surrogateescape")) > max_bytes:
        return f"it is longer than {max_bytes} bytes"
    return ""


def validate_container_id(container_id: str) -> None:
    if not container_id:
        raise CniError(ERR_INVALID_ENVIRONMENT, "CNI_CONTAINERID is missing or empty")
    if not _is_spec_name(container_id):
        raise CniError(
            ERR_INVALID_ENVIRONMENT,
            f"CNI_CONTAINERID {shown(container_id)} is not valid",
            f"it must start with a letter or digit, followed by letters, digits, '_', '.' or '-', "
            f"{MAX_NAME_LENGTH} characters at most",
        )


def validate_config_name(field: str, value: str) -> None:
    """The configuration's `name` (spec section "Configuration format") or `type` (a file name in
    CNI_PATH): error 7 naming the field if it is not a name of that form."""
    if not _is_spec_name(value):
        raise CniError(
            ERR_INVALID_CONFIG,
            f"the network configuration's {field} {shown(value)} is not valid",
            f"field: {field}; it must start with a letter or digit, followed by letters, digits, '_', '.' or '-', "
            f"{MAX_NAME_LENGTH} characters at most",
        )


def validate_ifname(ifname: str) -> None:
    if not ifname:
        raise CniError(ERR_INVALID_ENVIRONMENT, "CNI_IFNAME is missing or empty")
    if len(ifname) > 15 or ifname in (".", "..") or any(c in "/:\0" or c.isspace() for c in ifname):
        raise CniError(
            ERR_INVALID_ENVIRONMENT,
            f"CNI_IFNAME {shown(ifname)} is not a valid interface name",
            "at most 15 characters, not '.' or '..', and no '/', ':', NUL or white space",
        )


def convert_result(result: dict[str, Any], version: str) -> dict[str, Any]:
    """Convert a result in the 1.1.0 form into the form of `version`.

    1.1.0 added interface mtu/socketPath/pciID and route mtu/advmss/priority/table/scope;
    1.0.0 dropped the per-address 'version' field that 0.3.x and 0.4.0 carry.
    """
    out: dict[str, Any] = {"cniVersion": version}
    legacy = version_tuple(version) < (1, 0, 0)
    modern = version_tuple(version) >= (1, 1, 0)
    interfaces = []
    for iface in result.get("interfaces", []):
        keep = ("name", "mac", "sandbox") + (("mtu", "socketPath", "pciID") if modern else ())
        interfaces.append({k: v for k, v in iface.items() if k in keep and v not in (None, "")})
    if interfaces:
        out["interfaces"] = interfaces
    ips = []
    for ip in result.get("ips", []):
        entry = {k: v for k, v in ip.items() if k in ("address", "gateway", "interface")}
        if legacy:
            entry["version"] = "6" if ":" in ip["address"] else "4"
        ips.append(entry)
    out["ips"] = ips
    routes = []
    for route in result.get("routes", []):
        keep = ("dst", "gw") + (("mtu", "advmss", "priority", "table", "scope") if modern else ())
        routes.append({k: v for k, v in route.items() if k in keep})
    if routes:
        out["routes"] = routes
    out["dns"] = dict(result.get("dns", {}))
    return out


def result_addresses(result: dict[str, Any]) -> list[str]:
    """The addresses (without prefix) a result lists, in any result version."""
    import ipaddress  # not at the top: the plugin never needs it and must start fast

    out = []
    for ip in result.get("ips", []):
        out.append(str(ipaddress.ip_interface(ip["address"]).ip))
    return out
