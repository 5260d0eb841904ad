"""Fixtures of the unit tests that run the `tulle` command in this process."""

from __future__ import annotations

import io

import pytest

from tulle.cli.main import main
from tulle.lab.etcd_server import EtcdServer


class Tulle:
    """Runs `tulle ...` in this process against the test's etcd and prefix."""

    def __init__(self, url: str, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
        self.url, self.prefix, self.capsys, self.monkeypatch = url, prefix, capsys, monkeypatch

    def __call__(self, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            self.monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([*argv, "--datastore", self.url, "--prefix", self.prefix])
        out, err = self.capsys.readouterr()
        return int(info.value.code or 0), out, err

    def ok(self, *argv: str, stdin: str | None = None) -> str:
        code, out, err = self(*argv, stdin=stdin)
        assert code == 0, err
        return out


@pytest.fixture
def tulle(
    etcd_server: EtcdServer, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Tulle:
    return Tulle(etcd_server.url, prefix, capsys, monkeypatch)
