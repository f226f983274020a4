"""`lmcached tui`: a Textual monitor of instances, chunks and live events, with actions on chunks.

Network I/O happens only in Textual workers, which post typed messages; widgets render from MonitorState.
Losing the daemon shows a banner and the worker reconnects with backoff; nothing the daemon sends can crash
the app (a bad frame counts as a lost connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from lmcached.tui.state import ChunkRow, MonitorState, clock, human_bytes, memory_chart
from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Header, Input, Label, Static

from lmcached.errors import LmcachedError

#: Reconnection waits grow to this (seconds).
MAX_BACKOFF_S = 5.0
#: After chunk or operation events, a fresh snapshot is asked for at most this often (seconds).
REFRESH_S = 0.5
#: Below this many columns the layout is compact: stacked tables, fewer and narrower columns (fits 80x24).
COMPACT_BELOW = 120
INSTANCE_COLUMNS = ("instance", "worker", "address", "state", "location", "chunks", "tokens", "used / capacity", "compressed", "ratio")
COMPACT_INSTANCE_COLUMNS = ("instance", "worker", "state", "tier", "chunks", "used", "compr", "ratio")
CHUNK_COLUMNS = (" ", "key", "tokens", "size", "form", "pinned", "worker")
COMPACT_CHUNK_COLUMNS = (" ", "key", "tokens", "size", "form", "pin")
EVENT_COLUMNS = ("time", "event", "instance", "tokens", "outcome")
TIERS = {"LocalCPUBackend": "RAM", "LocalDiskBackend": "Disk", "RemoteBackend": "Redis"}


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def compact_instance_row(row: tuple[str, ...]) -> tuple[str, ...]:
    """A full instance row (see MonitorState.instance_rows) cut down to COMPACT_INSTANCE_COLUMNS."""
    instance, worker, _address, state, location, chunks, _tokens, used, compressed, ratio = row
    return (
        shorten(instance, 14),
        shorten(worker, 10),
        state.split(" (")[0],
        TIERS.get(location, location),
        chunks,
        used.split(" / ")[0],
        compressed,
        ratio,
    )


W = TypeVar("W", bound=Widget)


def skipped_while_closing(handler: Callable[..., None]) -> Callable[..., None]:
    """A message from the network that arrives while the app is closing (its widgets already gone) is dropped."""

    @functools.wraps(handler)
    def guarded(self: Any, message: Any) -> None:
        with contextlib.suppress(NoMatches, IndexError):
            handler(self, message)

    return guarded


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
    """Yes or no, before an action changes the cache (Enter or y confirms, Escape or n cancels)."""

    BINDINGS: ClassVar = [Binding("y,enter", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="question", markup=False)  # a Static wraps; a long id never gets cut
            yield Static("[b]Enter[/b]/[b]y[/b] yes    [b]Esc[/b]/[b]n[/b] no")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


#: Keys as a person names them, for the help screen and the footer.
KEY_NAMES = {"question_mark": "?", "space": "Space", "tab": "Tab", "escape": "Esc", "enter": "Enter", "slash": "/"}


class Help(ModalScreen[None]):
    BINDINGS: ClassVar = [Binding("escape,question_mark,q", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        rows = [(KEY_NAMES.get(b.key, b.key), b.description) for b in MonitorApp.BINDINGS if isinstance(b, Binding) and b.description]
        rows += [
            ("Tab", "next table (and the event filter)"),
            ("Enter", "on a tier row: go to its chunks"),
            ("y/Enter", "in a confirmation: yes"),
            ("n/Esc", "in a confirmation: no"),
        ]
        lines = [f"[b]{key:>7}[/b]  {description}" for key, description in rows]
        with Vertical(id="dialog"):
            yield Label("[b]lmcached tui[/b] — keys")
            yield Static("\n".join(lines))
            yield Label("Esc closes")


class MonitorApp(App[None]):
    TITLE = "lmcached"
    # Every action has its own key; the palette's footer entry would push Help off an 80-column footer.
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #banner { background: $error; color: $text; padding: 0 1; display: none; }
    #banner.shown { display: block; }
    #instances { height: auto; max-height: 12; }
    #bottom { height: 1fr; }
    #left { width: 1fr; }
    #right { width: 1fr; }
    #chunks { height: 1fr; }
    #events { height: 1fr; }
    #memory { height: 2; }
    .title { background: $boost; padding: 0 1; text-style: bold; }
    #dialog { width: 70; max-width: 90%; height: auto; border: thick $accent; background: $surface; padding: 1 2; }
    #dialog Static { width: 100%; }
    /* Narrow terminals (under 120 columns): chunks above events, no memory chart, compact columns. */
    .compact #bottom { layout: vertical; }
    .compact #left, .compact #right { width: 100%; }
    .compact #memory, .compact #memory-title, .compact #filter { display: none; }
    .compact #instances { max-height: 6; }
    Confirm, Help { align: center middle; }
    """
    BINDINGS: ClassVar = [
        Binding("c", "act('compress')", "Compress"),
        Binding("d", "act('decompress')", "Decompress"),
        Binding("p", "act('pin')", "Pin"),
        Binding("u", "act('unpin')", "Unpin"),
        Binding("x", "act('clear')", "Clear"),
        Binding("space", "mark", "Mark / unmark the chunk under the cursor", show=False),
        Binding("r", "refresh", "Refresh"),
        Binding("slash", "filter", "Filter the events", show=False),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self, address: str | None = "127.0.0.1:9001", auth_token: str | None = None, method: str = "cachegen", tls_ca: str | None = None
    ) -> None:
        super().__init__()
        self.address = address
        self.auth_token = auth_token
        self.tls_ca = tls_ca  # a TLS controller's CA file (None: plain TCP)
        self.method = method
        self.state = MonitorState()
        self.client: Any = None
        self.connected = False
        self.selected: tuple[str, str] | None = None  # (instance_id, location) whose chunks are shown
        self.marked: set[int] = set()
        self.chunk_rows: list[ChunkRow] = []
        self._refresh_pending = False
        self.compact: bool | None = None  # decided by the first resize

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
                yield Static("", id="memory")
                yield Static("Events (newest first)", classes="title")
                yield Input(placeholder="filter events…", id="filter")
                yield DataTable(id="events", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.set_layout(self.size.width < COMPACT_BELOW)
        if self.address is not None:
            self.set_banner(f"connecting to {self.address}…")
            self.watch_daemon()

    # ------------------------------------------------------------------ network (workers only)
    @work(exclusive=True, group="connection")
    async def watch_daemon(self) -> None:
        from lmcached.control.monitor import MonitorClient
        from lmcached.wire.tls import client_context

        delay = 0.5
        while True:
            client = MonitorClient(self.address or "", self.auth_token, ssl_context=client_context(self.tls_ca) if self.tls_ca else None)
            try:
                await client.connect()
                self.client = client
                self.post_message(ConnectionChanged(True, f"connected to {client.connected_to or self.address}"))
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

    def part(self, selector: str, kind: type[W]) -> W:
        """A widget of the main screen, whichever screen (a dialog, the help) is on top of it."""
        return self.screen_stack[0].query_one(selector, kind)

    # ------------------------------------------------------------------ messages
    @skipped_while_closing
    def on_snapshot_received(self, message: SnapshotReceived) -> None:
        self.state.apply_snapshot(message.snapshot)
        self.render_all()

    @skipped_while_closing
    def on_event_received(self, message: EventReceived) -> None:
        row = self.state.apply_event(message.event)
        self.render_events()
        if row.kind not in ("register",) and not self._refresh_pending:
            self._refresh_pending = True
            self.request_snapshot()

    @skipped_while_closing
    def on_connection_changed(self, message: ConnectionChanged) -> None:
        self.connected = message.connected
        self.state.connected = message.connected
        self.set_banner("" if message.connected else message.detail)
        self.sub_title = message.detail if message.connected else "disconnected"
        self.render_instances()  # the worker rows turn grey and "unknown" until the daemon answers again

    def on_resize(self, event: events.Resize) -> None:
        self.set_layout(event.size.width < COMPACT_BELOW)

    def set_layout(self, compact: bool) -> None:
        if compact == self.compact:
            return
        self.compact = compact
        self.set_class(compact, "compact")
        for table_id, columns in (
            ("#instances", COMPACT_INSTANCE_COLUMNS if compact else INSTANCE_COLUMNS),
            ("#chunks", COMPACT_CHUNK_COLUMNS if compact else CHUNK_COLUMNS),
            ("#events", EVENT_COLUMNS),
        ):
            table = self.part(table_id, DataTable)
            table.clear(columns=True)
            table.add_columns(*columns)
        self.render_all()

    def on_command_done(self, message: CommandDone) -> None:
        self.notify(message.detail, title=message.op, severity="information" if message.ok else "error")

    # ------------------------------------------------------------------ rendering
    def set_banner(self, text: str) -> None:
        banner = self.part("#banner", Static)
        banner.update(text)
        banner.set_class(bool(text), "shown")

    def render_all(self) -> None:
        self.render_instances()
        self.render_chunks()
        self.render_events()
        used, capacity = self.state.total_bytes(), self.state.capacity_bytes()
        share = f" of {human_bytes(capacity)} ({100 * used / capacity:.1f} %)" if capacity else ""
        self.part("#memory-title", Static).update(f"Memory used: {human_bytes(used)}{share}")
        memory = self.part("#memory", Static)
        width = max(memory.size.width, 10)
        chart = memory_chart(list(self.state.memory), capacity, width)
        scale = f"0 … {human_bytes(capacity)} (capacity), newest on the right" if capacity else "no capacity reported yet"
        memory.update(Text(chart + "\n") + Text(scale, style="dim"))

    def render_instances(self) -> None:
        table = self.part("#instances", DataTable)
        cursor = table.cursor_row
        table.clear()
        rows = self.state.instance_rows()
        for row in rows:
            cells = compact_instance_row(row) if self.compact else row
            # Rows from before a lost connection are only the last known state: greyed out.
            table.add_row(*(cells if self.connected or self.address is None else [Text(c, style="dim") for c in cells]))
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
            if self.selected is None:
                self.selected = (rows[0][0], rows[0][4])

    def render_chunks(self) -> None:
        table = self.part("#chunks", DataTable)
        cursor = table.cursor_row
        table.clear()
        instance, location = self.selected if self.selected else (None, None)
        self.chunk_rows = self.state.chunk_rows(instance, location)
        self.marked &= {c.key for c in self.chunk_rows}  # a chunk that left cannot stay marked
        for chunk in self.chunk_rows:
            cells = [
                "*" if chunk.key in self.marked else "",
                f"{chunk.key:016x}"[:12],
                str(chunk.num_tokens),
                human_bytes(chunk.nbytes),
                chunk.form,
                "yes" if chunk.pinned else "",
            ]
            table.add_row(*(cells if self.compact else [*cells, chunk.worker_id]))
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
        where = f"{instance} / {TIERS.get(location or '', location) if self.compact else location}" if instance else "no instance"
        self.part("#chunks-title", Static).update(f"Chunks of {where} ({len(self.chunk_rows)}, {len(self.marked)} marked)")

    def render_events(self) -> None:
        table = self.part("#events", DataTable)
        table.clear()
        for event in self.state.event_rows(self.part("#filter", Input).value)[:200]:
            instance = shorten(event.instance_id, 14) if self.compact else event.instance_id
            table.add_row(clock(event.time), event.kind, instance, "" if event.tokens is None else str(event.tokens), event.outcome)

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
    @on(DataTable.RowSelected, "#instances")
    def instance_chosen(self) -> None:
        self.part("#chunks", DataTable).focus()  # Enter on a tier goes to its chunks

    def action_mark(self) -> None:
        table = self.part("#chunks", DataTable)
        if not table.has_focus:
            table.focus()
            self.notify("Space marks chunks in the chunk table: moved there", severity="information")
            return
        if 0 <= table.cursor_row < len(self.chunk_rows):
            key = self.chunk_rows[table.cursor_row].key
            self.marked.symmetric_difference_update({key})
            self.render_chunks()

    def target_chunks(self) -> list[ChunkRow]:
        """What an action applies to: the marked chunks, else the row under the cursor when the chunk table
        has focus; nothing otherwise (a cursor the user never put there chooses nothing)."""
        marked = [c for c in self.chunk_rows if c.key in self.marked]
        if marked:
            return marked
        table = self.part("#chunks", DataTable)
        row = table.cursor_row
        return [self.chunk_rows[row]] if table.has_focus and 0 <= row < len(self.chunk_rows) else []

    def action_act(self, op: str) -> None:
        chunks = self.target_chunks()
        if not chunks or self.selected is None:
            self.notify(
                f"nothing chosen to {op}: Tab to the chunk table and put the cursor on a chunk (Space marks several)", severity="warning"
            )
            return
        instance, location = self.selected
        tokens = sum(c.num_tokens for c in chunks)
        args: dict[str, Any] = {"instance_id": instance, "location": location, "keys": [c.key for c in chunks]}
        if op in ("compress", "decompress"):
            args["method"] = self.method
        what = "marked" if self.marked else "under the cursor"
        question = f"{op} {len(chunks)} chunk(s) {what}, {tokens} tokens, of {instance} / {location}?"

        def confirmed(answer: bool | None) -> None:
            if answer:
                self.marked.clear()
                self.send_command(op, args)

        self.push_screen(Confirm(question), confirmed)

    def action_refresh(self) -> None:
        self.request_snapshot()

    def action_filter(self) -> None:
        if self.compact:  # the filter is hidden on a narrow terminal
            self.notify("the event filter needs a terminal of 120 columns or more", severity="warning")
            return
        self.part("#filter", Input).focus()

    def action_help(self) -> None:
        self.push_screen(Help())
