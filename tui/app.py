"""`lmcached tui`: a Textual monitor of instances, chunks and live events, with actions on chunks.

Network I/O happens only in Textual workers, which post typed messages; widgets render from MonitorState.
Losing the daemon shows a banner and the worker reconnects with backoff; nothing the daemon sends can crash
the app (a bad frame counts as a lost connection).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from lmcached.tui.state import ChunkRow, MonitorState, clock, human_bytes
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Input, Label, Sparkline, Static

from lmcached.errors import LmcachedError

#: Reconnection waits grow to this (seconds).
MAX_BACKOFF_S = 5.0
#: After chunk or operation events, a fresh snapshot is asked for at most this often (seconds).
REFRESH_S = 0.5


class SnapshotReceived(Message):
    def __init__(self, snapshot: dict[str, Any]) -> None:
        super().__init__()
        self.snapshot = snapshot


class EventReceived(Message):
    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__()
        self.event = event


class ConnectionChanged(Message):
    def __init__(self, connected: bool, detail: str) -> None:
        super().__init__()
        self.connected = connected
        self.detail = detail


class CommandDone(Message):
    def __init__(self, op: str, ok: bool, detail: str) -> None:
        super().__init__()
        self.op = op
        self.ok = ok
        self.detail = detail


class Confirm(ModalScreen[bool]):
    """Yes or no, before an action changes the cache."""

    BINDINGS: ClassVar = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            yield Label("[b]y[/b] yes    [b]n[/b] no")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class Help(ModalScreen[None]):
    BINDINGS: ClassVar = [Binding("escape,question_mark,q", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        lines = [f"[b]{b.key:>7}[/b]  {b.description}" for b in MonitorApp.BINDINGS if isinstance(b, Binding) and b.description]
        with Vertical(id="dialog"):
            yield Label("[b]lmcached tui[/b] — keys")
            yield Static("\n".join(lines + ["  space  mark / unmark the chunk under the cursor", "    tab  next table"]))
            yield Label("escape closes")


class MonitorApp(App[None]):
    TITLE = "lmcached"
    CSS = """
    #banner { background: $error; color: $text; padding: 0 1; display: none; }
    #banner.shown { display: block; }
    #instances { height: auto; max-height: 12; }
    #bottom { height: 1fr; }
    #left { width: 1fr; }
    #right { width: 1fr; }
    #chunks { height: 1fr; }
    #events { height: 1fr; }
    #memory { height: 3; }
    .title { background: $boost; padding: 0 1; text-style: bold; }
    #dialog { width: 60; height: auto; border: thick $accent; background: $surface; padding: 1 2; }
    Confirm, Help { align: center middle; }
    """
    BINDINGS: ClassVar = [
        Binding("c", "act('compress')", "Compress"),
        Binding("d", "act('decompress')", "Decompress"),
        Binding("p", "act('pin')", "Pin"),
        Binding("u", "act('unpin')", "Unpin"),
        Binding("x", "act('clear')", "Clear"),
        Binding("space", "mark", "Mark", show=False),
        Binding("r", "refresh", "Refresh"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, address: str | None = "127.0.0.1:9001", auth_token: str | None = None, method: str = "cachegen") -> None:
        super().__init__()
        self.address = address
        self.auth_token = auth_token
        self.method = method
        self.state = MonitorState()
        self.client: Any = None
        self.connected = False
        self.selected: tuple[str, str] | None = None  # (instance_id, location) whose chunks are shown
        self.marked: set[int] = set()
        self.chunk_rows: list[ChunkRow] = []
        self._refresh_pending = False

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("", id="banner")
        yield Static("Instances and workers", classes="title")
        yield DataTable(id="instances", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="bottom"):
            with Vertical(id="left"):
                yield Static("Chunks", classes="title", id="chunks-title")
                yield DataTable(id="chunks", cursor_type="row", zebra_stripes=True)
            with Vertical(id="right"):
                yield Static("Memory used", classes="title", id="memory-title")
                yield Sparkline([], id="memory")
                yield Static("Events (newest first)", classes="title")
                yield Input(placeholder="filter events…", id="filter")
                yield DataTable(id="events", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#instances", DataTable).add_columns(
            "instance", "worker", "address", "state", "location", "chunks", "tokens", "used / capacity", "compressed", "ratio"
        )
        self.query_one("#chunks", DataTable).add_columns(" ", "key", "tokens", "size", "form", "pinned", "worker")
        self.query_one("#events", DataTable).add_columns("time", "event", "instance", "tokens", "outcome")
        if self.address is not None:
            self.set_banner(f"connecting to {self.address}…")
            self.watch_daemon()

    # ------------------------------------------------------------------ network (workers only)
    @work(exclusive=True, group="connection")
    async def watch_daemon(self) -> None:
        from lmcached.monitor import MonitorClient

        delay = 0.5
        while True:
            client = MonitorClient(self.address or "", self.auth_token)
            try:
                await client.connect()
                self.client = client
                self.post_message(ConnectionChanged(True, f"connected to {self.address}"))
                delay = 0.5
                async for frame in client.frames():
                    self.post_message(SnapshotReceived(frame.header) if frame.kind.name == "SNAPSHOT" else EventReceived(frame.header))
            except (OSError, LmcachedError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as exc:
                self.client = None
                self.post_message(ConnectionChanged(False, f"lost {self.address}: {exc or type(exc).__name__}; retrying in {delay:.0f}s"))
            finally:
                await client.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    @work(group="commands")
    async def send_command(self, op: str, args: dict[str, Any]) -> None:
        client = self.client
        if client is None:
            self.post_message(CommandDone(op, False, "not connected to the daemon"))
            return
        try:
            result = await client.command(op, **args)
        except (OSError, LmcachedError, asyncio.TimeoutError) as exc:
            self.post_message(CommandDone(op, False, str(exc)))
            return
        self.post_message(CommandDone(op, True, f"{op}: {result['num_tokens']} tokens (event {result['event_id']})"))

    @work(group="refresh")
    async def request_snapshot(self) -> None:
        await asyncio.sleep(REFRESH_S)
        self._refresh_pending = False
        if self.client is not None:
            try:
                await self.client.request_snapshot()
            except (OSError, LmcachedError):
                pass  # the connection worker notices and reports the loss

    # ------------------------------------------------------------------ messages
    def on_snapshot_received(self, message: SnapshotReceived) -> None:
        self.state.apply_snapshot(message.snapshot)
        self.render_all()

    def on_event_received(self, message: EventReceived) -> None:
        row = self.state.apply_event(message.event)
        self.render_events()
        if row.kind not in ("register",) and not self._refresh_pending:
            self._refresh_pending = True
            self.request_snapshot()

    def on_connection_changed(self, message: ConnectionChanged) -> None:
        self.connected = message.connected
        self.set_banner("" if message.connected else message.detail)
        self.sub_title = message.detail if message.connected else "disconnected"

    def on_command_done(self, message: CommandDone) -> None:
        self.notify(message.detail, title=message.op, severity="information" if message.ok else "error")

    # ------------------------------------------------------------------ rendering
    def set_banner(self, text: str) -> None:
        banner = self.query_one("#banner", Static)
        banner.update(text)
        banner.set_class(bool(text), "shown")

    def render_all(self) -> None:
        self.render_instances()
        self.render_chunks()
        self.render_events()
        memory = self.query_one("#memory", Sparkline)
        memory.data = list(self.state.memory)
        self.query_one("#memory-title", Static).update(f"Memory used: {human_bytes(self.state.total_bytes())}")

    def render_instances(self) -> None:
        table = self.query_one("#instances", DataTable)
        cursor = table.cursor_row
        table.clear()
        for row in self.state.instance_rows():
            table.add_row(*row)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
            if self.selected is None:
                first = self.state.instance_rows()[0]
                self.selected = (first[0], first[4])

    def render_chunks(self) -> None:
        table = self.query_one("#chunks", DataTable)
        cursor = table.cursor_row
        table.clear()
        instance, location = self.selected if self.selected else (None, None)
        self.chunk_rows = self.state.chunk_rows(instance, location)
        for chunk in self.chunk_rows:
            form = chunk.method or "raw"
            table.add_row(
                "*" if chunk.key in self.marked else "",
                f"{chunk.key:016x}"[:12],
                str(chunk.num_tokens),
                human_bytes(chunk.nbytes),
                form,
                "yes" if chunk.pinned else "",
                chunk.worker_id,
            )
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
        where = f"{instance} / {location}" if instance else "no instance"
        self.query_one("#chunks-title", Static).update(f"Chunks of {where} ({len(self.chunk_rows)})")

    def render_events(self) -> None:
        table = self.query_one("#events", DataTable)
        table.clear()
        for event in self.state.event_rows(self.query_one("#filter", Input).value)[:200]:
            table.add_row(
                clock(event.time), event.kind, event.instance_id, "" if event.tokens is None else str(event.tokens), event.outcome
            )

    @on(DataTable.RowHighlighted, "#instances")
    def instance_highlighted(self, event: DataTable.RowHighlighted) -> None:
        rows = self.state.instance_rows()
        if 0 <= event.cursor_row < len(rows):
            row = rows[event.cursor_row]
            if self.selected != (row[0], row[4]):
                self.selected = (row[0], row[4])
                self.marked.clear()
                self.render_chunks()

    @on(Input.Changed, "#filter")
    def filter_changed(self) -> None:
        self.render_events()

    # ------------------------------------------------------------------ actions
    def action_mark(self) -> None:
        table = self.query_one("#chunks", DataTable)
        if 0 <= table.cursor_row < len(self.chunk_rows):
            key = self.chunk_rows[table.cursor_row].key
            self.marked.symmetric_difference_update({key})
            self.render_chunks()

    def target_chunks(self) -> list[ChunkRow]:
        marked = [c for c in self.chunk_rows if c.key in self.marked]
        if marked:
            return marked
        row = self.query_one("#chunks", DataTable).cursor_row
        return [self.chunk_rows[row]] if 0 <= row < len(self.chunk_rows) else []

    def action_act(self, op: str) -> None:
        chunks = self.target_chunks()
        if not chunks or self.selected is None:
            self.notify("select a chunk first (tab to the chunks table, space marks several)", severity="warning")
            return
        instance, location = self.selected
        tokens = sum(c.num_tokens for c in chunks)
        args: dict[str, Any] = {"instance_id": instance, "location": location, "keys": [c.key for c in chunks]}
        if op in ("compress", "decompress"):
            args["method"] = self.method
        question = f"{op} {len(chunks)} chunk(s), {tokens} tokens, of {instance} / {location}?"

        def confirmed(answer: bool | None) -> None:
            if answer:
                self.marked.clear()
                self.send_command(op, args)

        self.push_screen(Confirm(question), confirmed)

    def action_refresh(self) -> None:
        self.request_snapshot()

    def action_help(self) -> None:
        self.push_screen(Help())
