"""deploy/grafana-dashboard.json asks only for what lmcached really exports: every metric a query names is a
sample on a live daemon's /metrics (read with Prometheus' own parser), and every label it groups by is one of
that metric's labels. The vLLM half (`vllm:*`) is checked against a live vLLM in test_vllm_e2e."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmcached.client import AsyncKVClient
from lmcached.fleet.redis_servers import RedisServer, RedisUnavailable, free_port, redis_server_binary

from .conftest import CPU, INSTANCE, make_kv, serving, test_config
from .test_controller import _scrape

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(lmcached_[a-z_]+|vllm:[a-z_:]+)")
GROUPING = re.compile(r"\bby \(([^)]*)\)")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def check_queries(samples: dict[str, dict[tuple, float]], prefix: str) -> None:
    """Each query's metrics named `prefix…` are samples in `samples`, and its `by (…)` labels theirs."""
    checked = 0
    for expr in dashboard_queries():
        names = [n for n in METRIC.findall(expr) if n.startswith(prefix)]
        if not names:
            continue
        for name in names:
            assert samples.get(name), f"{name} (in {expr!r}) is not on /metrics"
        labels = {key for name in names for series in samples[name] for key, _ in series}
        for group in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in labels, f"{expr!r} groups by {label!r}, which {names} do not carry"
        checked += 1
    assert checked, f"no query names a {prefix} metric"


def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"  # the data source is chosen on import
    assert any(n.startswith("vllm:") for q in dashboard_queries() for n in METRIC.findall(q))


async def test_every_lmcached_query_names_a_metric_a_live_daemon_exports(tmp_path: Path) -> None:
    """A daemon with RAM, disk and a real Redis tier, after traffic that makes every family speak: stores past
    the RAM tier's size (evictions), lookups, retrieves, a compress (codec time)."""
    try:
        redis_server_binary()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    with RedisServer(free_port()) as redis:
        config = test_config(local_disk=str(tmp_path / "disk"), max_local_cpu_size=20000 / 1024**3, remote_url=redis.url)
        async with serving(config) as run:
            tokens = list(range(500, 560))
            kv = make_kv(60, layers=2, channels=16)
            async with AsyncKVClient(run.data) as client:
                await client.store(tokens, kv)
                await client.lookup(tokens)
                await client.retrieve(tokens)
                for i in range(8):
                    await client.store(list(range(1000 * (i + 1), 1000 * (i + 1) + 32)), make_kv(32, layers=2, channels=16, seed=i))
            _, answer = await run.post("/compress", {"instance_id": INSTANCE, "location": CPU, "tokens": list(range(8000, 8032)), "method": "cachegen"})
            await run.wait_event(answer["event_id"])
            samples = await _scrape(run, lambda s: bool(s.get("lmcached_evictions_total")) and bool(s.get("lmcached_codec_seconds_total")))
    check_queries(samples, "lmcached_")
