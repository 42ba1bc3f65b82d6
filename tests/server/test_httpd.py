"""Connection accounting of the HTTPS front end (pure)."""

from __future__ import annotations

import logging

import pytest

from stapinit.server.httpd import ConnectionCounter, DropLog, client_key


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_clients_are_counted_by_address_and_ipv6_by_64(host: str, key: str) -> None:
    assert client_key(host) == key


def test_per_client_and_total_limits() -> None:
    counter = ConnectionCounter(limit=3, per_client=2)
    assert counter.enter("a") is None
    assert counter.enter("a") is None
    assert counter.enter("a") == "2 connections from a already open"
    assert counter.enter("b") is None
    assert counter.enter("c") == "3 connections already open"
    counter.leave("a")
    assert counter.enter("c") is None
    for key in ("a", "b", "c"):
        counter.leave(key)
    assert counter.enter("a") is None and counter.enter("a") is None


def test_refusals_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    drops = DropLog(interval=3600)
    with caplog.at_level(logging.INFO, logger="stap-server"):
        for _ in range(50):
            drops.dropped("a", "a:1", "too many")
        drops.dropped("b", "b:1", "too many")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ['client=a:1 note="dropped: too many"', 'client=b:1 note="dropped: too many"']
    drops.interval = 0
    with caplog.at_level(logging.INFO, logger="stap-server"):
        drops.dropped("a", "a:1", "too many")
    assert caplog.records[-1].getMessage().endswith('(49 more not logged)"')
