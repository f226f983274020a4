"""The Textual monitor driven headless against a real daemon, plus a fixed-size SVG snapshot."""

from __future__ import annotations

import asyncio
import html
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from lmcached.tui.app import Confirm, MonitorApp, SnapshotReceived
from lmcached.tui.state import LOST_KEEP_S, ChunkRow, MonitorState, memory_chart
from textual.widgets import DataTable, Static

from lmcached.client import AsyncKVClient
from lmcached.serve import Daemon

from .conftest import CPU as CPU_LOCATION
from .conftest import INSTANCE, SEED_TOKENS, make_kv, test_config

SNAPSHOTS = Path(__file__).parent / "snapshots"


async def wait_until(pilot: Any, predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await pilot.pause(0.05)


def cells(app: MonitorApp, table_id: str) -> list[list[str]]:
    table = app.query_one(table_id, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def first_chunk(app: MonitorApp) -> list[str]:
    """The chunks table's first row, or [] while the table is empty: a wait for a change must keep waiting then,
    not crash (a CI run once found the table empty for a moment while a pin was being reported)."""
    rows = cells(app, "#chunks")
    return rows[0] if rows else []


@pytest.fixture
async def daemon() -> Any:
    running = Daemon(test_config())
    await running.start()
    yield running
    await running.stop()


async def test_snapshot_events_and_an_action_against_a_real_daemon(daemon: Daemon) -> None:
    assert daemon.ports is not None
    app = MonitorApp(f"127.0.0.1:{daemon.ports.monitor}")
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, lambda: any(row[0] == INSTANCE for row in cells(app, "#instances")))
        assert app.connected and not app.query_one("#banner", Static).has_class("shown")

        async with AsyncKVClient(f"127.0.0.1:{daemon.ports.data}") as client:  # a store shows up live
            await client.store(SEED_TOKENS, make_kv(12))
        await wait_until(pilot, lambda: len(cells(app, "#chunks")) == 1)
        assert cells(app, "#chunks")[0][4] == "raw"
        assert any(row[1] == "admit" for row in cells(app, "#events"))

        app.query_one("#chunks", DataTable).focus()
        await pilot.press("c")
        await pilot.pause(0.2)
        await pilot.press("y")  # confirm: the command goes over the monitor connection
        await wait_until(pilot, lambda: first_chunk(app)[4:5] == ["cachegen"])
        await wait_until(pilot, lambda: any(row[1] == "compress" and row[4].startswith("finished") for row in cells(app, "#events")))
        ops = [e for e in daemon.controller.events.recent() if e.op == "compress"]
        assert ops and ops[-1].status == "finished" and ops[-1].num_tokens == 12

        await pilot.press("p")
        await pilot.press("y")
        await wait_until(pilot, lambda: first_chunk(app)[5:6] == ["yes"])

        app.query_one("#filter").focus()
        await pilot.press(*"pin")
        await wait_until(pilot, lambda: cells(app, "#events") and all(row[1] == "pin" for row in cells(app, "#events")))


async def test_connection_loss_shows_a_banner_and_reconnects() -> None:
    first = Daemon(test_config())
    ports = await first.start()
    app = MonitorApp(f"127.0.0.1:{ports.monitor}")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.connected)
        await first.stop()
        banner = app.query_one("#banner", Static)
        await wait_until(pilot, lambda: banner.has_class("shown") and "lost" in str(banner.render()))
        assert not app.connected
        second = Daemon(test_config(monitor_port=ports.monitor))
        await second.start()
        try:
            await wait_until(pilot, lambda: app.connected, timeout=15)
            assert not banner.has_class("shown")
        finally:
            await second.stop()


async def test_the_app_survives_garbage_from_the_daemon() -> None:
    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nnot a frame at all")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(liar, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app = MonitorApp(f"127.0.0.1:{port}")
    async with app.run_test(size=(120, 40)) as pilot:
        banner = app.query_one("#banner", Static)
        await wait_until(pilot, lambda: "lost" in str(banner.render()))
        assert app.is_running
    server.close()


def test_state_marks_lost_workers_and_filters_events() -> None:
    state = MonitorState()
    worker = {
        "worker_id": "w1",
        "data_address": "h:1",
        "locations": {
            "LocalCPUBackend": {"chunks": 2, "tokens": 300, "bytes": 100, "raw_bytes": 400, "compressed_chunks": 1, "capacity_bytes": 1000}
        },
    }
    state.apply_snapshot({"instances": {"i": {"workers": [worker], "locations": {}}}, "events": [], "time": 1.0})
    row = state.instance_rows()[0]
    assert row[0] == "i" and row[9] == "4.00x" and row[7] == "100 B / 1000 B"
    state.apply_event({"type": "worker_lost", "instance_id": "i", "worker_id": "w1", "reason": "no heartbeat", "time": 2.0})
    state.apply_snapshot({"instances": {}, "events": [], "time": 3.0})
    assert state.instance_rows()[0][3].startswith("lost at")
    state.apply_event(
        {"type": "operation", "op": "compress", "status": "failed", "error": "boom", "instance_id": "i", "num_tokens": 5, "created_at": 4.0}
    )
    assert [e.kind for e in state.event_rows("boom")] == ["compress"]
    assert [e.kind for e in state.event_rows()] == ["compress", "lost"]


FIXED_SNAPSHOT = {
    "time": 1_800_000_000.0,
    "instances": {
        INSTANCE: {
            "locations": {},
            "workers": [
                {
                    "worker_id": "worker-a",
                    "data_address": "127.0.0.1:8001",
                    "seconds_since_heartbeat": 0.5,
                    "alive": True,
                    "locations": {
                        "LocalCPUBackend": {
                            "chunks": 3,
                            "tokens": 523,
                            "bytes": 13_000_000,
                            "raw_bytes": 18_000_000,
                            "compressed_chunks": 1,
                            "capacity_bytes": 5 << 30,
                        },
                        "LocalDiskBackend": {
                            "chunks": 1,
                            "tokens": 11,
                            "bytes": 270_000,
                            "raw_bytes": 270_000,
                            "compressed_chunks": 0,
                            "capacity_bytes": 5 << 30,
                        },
                    },
                    "chunks": {
                        "LocalCPUBackend": [
                            [0xBED3F9CEC8DA59F4, 11, 80_140, "cachegen", True, 270_336],
                            [0x336D4E44848F0001, 256, 5_898_240, None, False, 5_898_240],
                            [0x74D12A748CCC0002, 256, 5_898_240, None, False, 5_898_240],
                        ],
                        "LocalDiskBackend": [[0xBED3F9CEC8DA59F4, 11, 270_336, None, False, 270_336]],
                    },
                }
            ],
        }
    },
    "events": [
        {
            "op": "compress",
            "status": "finished",
            "instance_id": INSTANCE,
            "num_tokens": 11,
            "created_at": 1_800_000_000.0,
            "finished_at": 1_800_000_001.0,
            "result": {"bytes_before": 270_336, "bytes_after": 80_140},
        },
        {
            "op": "pin",
            "status": "finished",
            "instance_id": INSTANCE,
            "num_tokens": 11,
            "created_at": 1_800_000_002.0,
            "finished_at": 1_800_000_002.0,
        },
    ],
}


@pytest.mark.parametrize(("size", "name"), [((150, 36), "monitor"), ((80, 24), "monitor-80x24")])
async def test_svg_snapshot_at_a_fixed_size(size: tuple[int, int], name: str) -> None:
    os.environ["TZ"] = "UTC"
    time.tzset()
    app = MonitorApp(address=None)
    async with app.run_test(size=size) as pilot:
        app.post_message(SnapshotReceived(FIXED_SNAPSHOT))
        # Wait until everything is drawn (tables and footer); a busy machine may need more than one refresh.
        for _ in range(100):
            await pilot.pause(0.1)
            svg = app.export_screenshot()
            if "Quit" in svg_text(svg) and "bed3f9cec8da" in svg_text(svg) and "pin" in svg_text(svg):
                break
        await pilot.pause(0.2)
        svg = app.export_screenshot()
    # The committed SVG is for people to look at; the test compares what is drawn (the SVG's text, line by
    # line), so a new Textual theme colour does not fail it but a changed table does.
    drawn = svg_text(svg)
    if os.environ.get("LMCACHED_WRITE_SNAPSHOTS") or not (SNAPSHOTS / f"{name}.txt").exists():
        (SNAPSHOTS / f"{name}.svg").write_text(svg)
        (SNAPSHOTS / f"{name}.txt").write_text(drawn)
    assert drawn == (SNAPSHOTS / f"{name}.txt").read_text()
    # Every column is there, uncut, at either size.
    assert "bed3f9cec8da" in drawn and "cachegen" in drawn and "1.38x" in drawn and "compr" in drawn and "ratio" in drawn
    assert "locati " not in drawn


async def test_actions_need_a_chosen_chunk_and_confirm_with_enter() -> None:
    app = MonitorApp(address=None)
    sent: list[tuple[str, dict[str, Any]]] = []
    app.send_command = lambda op, args: sent.append((op, args))  # type: ignore[method-assign]
    async with app.run_test(size=(80, 24)) as pilot:
        app.post_message(SnapshotReceived(FIXED_SNAPSHOT))
        await pilot.pause(0.2)
        assert app.focused is app.query_one("#instances")
        await pilot.press("p")  # focus on the instances table: no chunk was chosen, nothing happens
        await pilot.pause(0.1)
        assert not isinstance(app.screen, Confirm) and sent == []
        assert any("nothing chosen to pin" in str(n.message) for n in app._notifications)

        await pilot.press("space")  # Space outside the chunk table moves there instead of marking a row
        assert app.focused is app.query_one("#chunks") and app.marked == set()
        await pilot.press("down", "space")
        assert app.marked == {0x336D4E44848F0001}
        await pilot.press("c")
        await pilot.pause(0.1)
        assert isinstance(app.screen, Confirm) and "1 chunk(s) marked" in app.screen.question
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert sent == [
            ("compress", {"instance_id": INSTANCE, "location": CPU_LOCATION, "keys": [0x336D4E44848F0001], "method": "cachegen"})
        ]

        await pilot.press("x")  # nothing marked now: the row under the cursor, in the focused chunk table
        await pilot.pause(0.1)
        assert isinstance(app.screen, Confirm)
        question = app.screen.query_one("#question", Static)
        assert question.size.height >= 2  # a long question wraps instead of being cut
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert len(sent) == 1

        await pilot.press("question_mark")
        await pilot.pause(0.1)
        help_text = "\n".join(str(w.render()) for w in app.screen.query(Static))
        assert "question_mark" not in help_text and help_text.count("Space") == 1 and "?" in help_text


def test_lost_workers_age_out_one_row_per_instance() -> None:
    state = MonitorState()

    def snapshot(at: float, *worker_ids: str) -> None:
        workers = [{"worker_id": w, "data_address": "h:1", "locations": {}} for w in worker_ids]
        state.apply_snapshot({"instances": {"i": {"workers": workers}} if workers else {}, "events": [], "time": at})

    for restart, worker_id in enumerate(["w1", "w2", "w3"]):  # a daemon restarted three times: a new worker id each
        snapshot(1000.0 + restart, worker_id)
    snapshot(1010.0)
    assert [r[1] for r in state.instance_rows()] == ["w3"]  # the newest only, not a pile
    snapshot(1010.0 + LOST_KEEP_S + 1)
    assert state.instance_rows() == []  # aged out


def test_memory_chart_is_scaled_to_capacity_and_events_carry_their_note() -> None:
    assert memory_chart([7.0, 0.0, 500.0, 1000.0], capacity=1000.0, width=6) == "  ▁ ▄█"  # 0.7 % is a low bar, not a block
    assert memory_chart([1.0] * 50, capacity=10.0, width=4) == "▁▁▁▁" and memory_chart([1.0], 0.0, 4) == ""
    state = MonitorState()
    note = "already compressed with cachegen: 4 chunks skipped"
    row = state.apply_event(
        {"type": "operation", "op": "compress", "status": "finished", "instance_id": "i", "num_tokens": 0, "created_at": 1.0,
         "result": {"num_tokens": 0, "chunks": 0, "skipped": {"already compressed with cachegen": 4}, "message": note}}
    )
    assert row is not None and row.outcome == f"finished; {note}"
    chunk = ChunkRow("i", "w", "LocalCPUBackend", 1, 16, 100, None, False, 100, "cachegen")
    assert chunk.form == "raw (from cachegen)" and ChunkRow("i", "w", "L", 1, 16, 100, "kvtc", False, 100, "kvtc").form == "kvtc"


def test_state_tells_updates_from_admits_and_greys_out_while_disconnected() -> None:
    state = MonitorState()
    row = state.apply_event({"type": "chunks_reported", "instance_id": "i", "admitted": 0, "updated": 1, "evicted": 0})
    assert (row.kind, row.outcome) == ("update", "~1 update chunks")
    row = state.apply_event({"type": "chunks_reported", "instance_id": "i", "admitted": 2, "updated": 0, "evicted": 1})
    assert (row.kind, row.outcome) == ("admit/evict", "+2 admit, -1 evict chunks")
    state.apply_snapshot(FIXED_SNAPSHOT)
    assert state.instance_rows()[0][3] == "alive (0.5s)"
    state.connected = False
    assert {r[3] for r in state.instance_rows()} == {"unknown"}


def svg_text(svg: str) -> str:
    lines: dict[str, list[tuple[float, str]]] = {}
    for x, y, text in re.findall(r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]*)</text>', svg):
        lines.setdefault(y, []).append((float(x), html.unescape(text).replace("\xa0", " ")))
    return "\n".join("".join(t for _, t in sorted(parts)).rstrip() for _, parts in sorted(lines.items(), key=lambda i: float(i[0]))) + "\n"


def test_the_shared_remote_tier_shows_whether_it_is_up_and_its_hit_rate() -> None:
    state = MonitorState()
    remote = {"chunks": 6, "tokens": 1536, "bytes": 600, "raw_bytes": 3000, "compressed_chunks": 6, "capacity_bytes": 0}
    worker = {
        "worker_id": "w1",
        "data_address": "h:1",
        "locations": {
            "LocalCPUBackend": {"chunks": 2, "tokens": 512, "bytes": 100, "raw_bytes": 100, "compressed_chunks": 0, "capacity_bytes": 1000},
            "RemoteBackend": remote | {"up": True, "hits": 9, "misses": 1, "write_queue_bytes": 0},
        },
    }
    state.apply_snapshot({"instances": {"i": {"workers": [worker], "locations": {}}}, "events": [], "time": 1.0})
    rows = {r[4]: r for r in state.instance_rows()}
    assert rows["RemoteBackend"][3] == "up, hits 90%" and rows["RemoteBackend"][9] == "5.00x"
    assert rows["RemoteBackend"][7] == "600 B / -"  # Redis's capacity is its own
    assert state.total_bytes() == 100  # the fleet's own memory: Redis's is not counted
    worker["locations"]["RemoteBackend"] |= {"up": False, "write_queue_bytes": 2048}
    state.apply_snapshot({"instances": {"i": {"workers": [worker], "locations": {}}}, "events": [], "time": 2.0})
    assert {r[4]: r for r in state.instance_rows()}["RemoteBackend"][3] == "Redis DOWN, 2.0 KB queued"


async def test_the_help_screen_names_every_key_a_user_needs() -> None:
    app = MonitorApp(address=None)
    async with app.run_test(size=(150, 36)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        drawn = svg_text(app.export_screenshot())
        for needed in ("Compress", "Enter  on a tier row: go to its chunks", "y/Enter  in a confirmation: yes", "n/Esc  in a confirmation: no", "/  Filter the events", "Space  Mark"):
            assert needed in drawn, needed
        await pilot.press("escape", "slash")  # / goes to the event filter
        await pilot.pause(0.1)
        assert app.focused is not None and app.focused.id == "filter"
