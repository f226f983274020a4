"""The Textual monitor (`lmcached tui`): imported as lmcached.tui, never by the daemon."""

from __future__ import annotations


def run(address: str, auth_token: str | None = None, method: str = "cachegen", tls_ca: str | None = None) -> None:
    from lmcached.tui.app import MonitorApp

    MonitorApp(address, auth_token, method, tls_ca).run()
