"""Scripts can trust the CLI: operations wait for their event, fail with its error, and say what they skipped."""

from __future__ import annotations

import asyncio
import json
import sys

from lmcached.client import KVClient
from lmcached.wire.chunks import chunk_spans

from .conftest import SEED_TOKENS, ServeProcess, make_kv, serving, test_config
from .test_e2e import cli, post, wait_for
from .test_faults import fake_worker

TOKENS = ",".join(map(str, SEED_TOKENS))


def stored(server: ServeProcess) -> None:
    with KVClient(server.data) as client:
        client.store(SEED_TOKENS, make_kv(12))
    wait_for(lambda: post(server, "/lookup", {"tokens": SEED_TOKENS})["layout_info"])


def test_operations_wait_for_their_event_and_report_what_happened(serve_process: ServeProcess) -> None:
    server = serve_process
    stored(server)
    done = cli(server, "compress", "--tokens", TOKENS)
    assert done.returncode == 0, done.stderr
    event = json.loads(done.stdout)
    assert event["status"] == "finished" and event["result"]["chunks"] == 1  # finished before the command returned

    again = cli(server, "compress", "--tokens", TOKENS)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)["result"]
    assert result["chunks"] == 0 and result["skipped"] == {"already compressed with cachegen": 1}
    assert "note: already compressed with cachegen: 1 chunk skipped" in again.stderr

    # A lossy chunk re-encoded losslessly would only grow: the smaller one stays, and the CLI says so.
    before = post(server, "/query_worker_info", {"instance_id": "all"})["worker_infos"][0]["locations"]["LocalCPUBackend"]["bytes"]
    lossless = cli(server, "compress", "--method", "lossless", "--tokens", TOKENS)
    assert lossless.returncode == 0, lossless.stderr
    assert json.loads(lossless.stdout)["result"]["skipped"] == {"kept cachegen, smaller than lossless": 1}
    after = post(server, "/query_worker_info", {"instance_id": "all"})["worker_infos"][0]["locations"]["LocalCPUBackend"]["bytes"]
    assert after == before

    no_wait = cli(server, "pin", "--tokens", TOKENS, "--no-wait")
    assert no_wait.returncode == 0 and set(json.loads(no_wait.stdout)) == {"event_id", "num_tokens"}


def test_a_location_the_instance_lacks_is_refused_up_front(serve_process: ServeProcess) -> None:
    server = serve_process  # no --local-disk: this instance has RAM only
    stored(server)
    for args in (
        ["move", "--tokens", TOKENS, "--to-location", "LocalDiskBackend", "--copy"],
        ["clear", "--location", "LocalDiskBackend"],
        ["compress", "--tokens", TOKENS, "--location", "LocalDiskBackend"],
        ["pin", "--tokens", TOKENS, "--location", "LocalDiskBackend"],
    ):
        done = cli(server, *args)
        assert done.returncode == 1, (args, done.stdout)
        assert done.stderr.startswith("error: 404: instance 'lmcache_default_instance' has no LocalDiskBackend"), done.stderr
        assert "--local-disk" in done.stderr and done.stdout == ""
    # Nothing was touched.
    assert post(server, "/lookup", {"tokens": SEED_TOKENS})["layout_info"] == {"lmcache_default_instance": ["LocalCPUBackend", 12]}


def test_an_unknown_target_instance_is_refused_up_front(serve_process: ServeProcess) -> None:
    server = serve_process
    stored(server)
    done = cli(server, "move", "--tokens", TOKENS, "--to-location", "LocalCPUBackend", "--to-instance", "ghost")
    assert done.returncode == 1 and "unknown instance 'ghost'" in done.stderr


async def test_a_failed_event_exits_non_zero_with_its_error() -> None:
    """A worker that never answers: the operation is accepted, its event fails, and the CLI exits 1 saying why."""
    async with serving(test_config(command_timeout=0.5, heartbeat_timeout=30.0)) as run:
        key = chunk_spans(SEED_TOKENS, 16)[0].key
        _, writer = await fake_worker(run.daemon.controller.hub.port, "mute-instance", key)
        try:
            await run.wait_cached(SEED_TOKENS, 12)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lmcached", "compress", "--tokens", TOKENS, "--instance-id", "mute-instance",
                "--controller", run.base, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 1 and out == b""
            assert err.decode().startswith("error: compress failed: worker mute did not answer"), err
        finally:
            writer.close()


def test_boolean_flags_in_help_match_the_parser(serve_process: ServeProcess) -> None:
    helped = cli(serve_process, "move", "--help")
    assert "--copy / --no-copy" in helped.stdout and "<bool>" not in helped.stdout
    assert "--wait / --no-wait" in helped.stdout and "--timeout" in helped.stdout
