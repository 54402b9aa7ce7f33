"""The local labelling page of `alignpipe label`: a Starlette app over a `LabelStore` (labelling.py).

Plain HTML forms, POST then redirect to GET, so the page works with JavaScript off; a few lines of inline
script add the keyboard shortcuts (a/1 = A, b/2 = B, t = tie, s = skip, u = undo) by clicking the buttons.
Every text is escaped. Each form carries the id of the item it shows, so a double submit or a stale page
(back button, second tab) changes nothing instead of labelling the wrong item. The handlers are async and
never await between reading and writing the store, so requests cannot interleave inside one change.
"""

from __future__ import annotations

import html
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from alignpipe import AlignpipeError
from alignpipe.evaluation.labelling import CHOICES, LabelItem, LabelStore

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
header { display: flex; gap: 1.5em; align-items: baseline; border-bottom: 1px solid #ccc; padding-bottom: .5em; }
.note { color: #8a5a00; } .muted { color: #666; font-size: .9em; }
.turn { margin: .4em 0; padding: .5em .8em; border-radius: 6px; background: #f3f3f3; }
.turn.user { background: #eef4ff; } .role { font-size: .8em; color: #555; text-transform: uppercase; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin: 1em 0; }
.response { border: 1px solid #bbb; border-radius: 6px; padding: .6em .9em; }
.buttons { display: flex; gap: .6em; flex-wrap: wrap; } .buttons form { display: inline; }
button { font-size: 1em; padding: .45em 1.1em; cursor: pointer; }
kbd { font-size: .8em; border: 1px solid #999; border-radius: 3px; padding: 0 .3em; margin-left: .3em; }
"""

# Shortcuts click the buttons, so a key does exactly what the button does (same form, same hidden item id).
_SCRIPT = """
document.addEventListener("keydown", function (e) {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  var ids = {"a": "btn-a", "1": "btn-a", "b": "btn-b", "2": "btn-b", "t": "btn-tie", "s": "btn-skip",
             "u": "btn-undo"};
  var button = document.getElementById(ids[e.key.toLowerCase()]);
  if (button && !button.disabled) { e.preventDefault(); button.click(); }
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, body: str) -> HTMLResponse:
    doc = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
           '<link rel="icon" href="data:,">'  # no favicon request: a 404 would be a console error
           f"<style>{_STYLE}</style></head>\n<body>\n{body}\n<script>{_SCRIPT}</script>\n</body></html>\n")
    return HTMLResponse(doc, headers={"Cache-Control": "no-store"})


def _header(store: LabelStore) -> str:
    p = store.progress()
    skipped = f" ({p['skipped']} skipped)" if p["skipped"] else ""
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in store.source.notes)
    return (f"<header><strong>alignpipe label</strong><span>labeller: {_e(store.judge)}</span>"
            f'<span id="progress">{p["done"]} / {p["total"]} labelled{skipped}</span></header>\n'
            f'<p class="muted">{_e(store.source.description)}; labels: {_e(store.path)}</p>{notes}')


def _undo_form(store: LabelStore, item_id: str) -> str:
    disabled = "" if store.entries else " disabled"
    return (f'<form method="post" action="/undo"><input type="hidden" name="item" value="{_e(item_id)}">'
            f'<button type="submit" id="btn-undo"{disabled}>Undo last<kbd>u</kbd></button></form>')


def render_item(store: LabelStore, item: LabelItem) -> HTMLResponse:
    turns = "".join(f'<div class="turn {_e(m["role"])}"><div class="role">{_e(m["role"])}</div>'
                    f'<div class="text">{_e(m["content"])}</div></div>' for m in item.messages)
    left, right = store.shown(item)
    number = store.progress()["done"] + 1
    buttons = "".join(f'<button type="submit" name="choice" value="{c}" id="btn-{c.lower()}">{label}'
                      f"<kbd>{key}</kbd></button>"
                      for c, label, key in (("A", "A is better", "a"), ("tie", "Tie", "t"),
                                            ("B", "B is better", "b"), ("skip", "Skip", "s")))
    body = (f'{_header(store)}\n<h2 id="item-title">Item {number} of {len(store.items)}</h2>\n'
            f'<section id="prompt">{turns}</section>\n<div class="pair">'
            f'<section class="response"><h3>A</h3><div class="text" id="text-a">{_e(left.completion)}</div></section>'
            f'<section class="response"><h3>B</h3><div class="text" id="text-b">{_e(right.completion)}</div></section>'
            f'</div>\n<div class="buttons"><form method="post" action="/label" id="label-form">'
            f'<input type="hidden" name="item" value="{_e(item.id)}">{buttons}</form>'
            f"{_undo_form(store, item.id)}</div>")
    return _page(f"label {number} / {len(store.items)}", body)


def render_done(store: LabelStore) -> HTMLResponse:
    p = store.progress()
    body = (f'{_header(store)}\n<h2 id="done">All {p["total"]} items done</h2>\n'
            f"<p>{p['labelled']} labelled, {p['skipped']} skipped. Export them for an offline recipe with "
            f"<code>alignpipe label {_e(store.source.path)} --labeller {_e(store.judge.split(':', 1)[1])} "
            f"--export PATH</code>.</p>\n<div class=\"buttons\">{_undo_form(store, '')}</div>")
    return _page("labelling done", body)


def create_app(store: LabelStore) -> Starlette:
    """GET / shows the current item (or the done page); POST /label and POST /undo change the store and
    redirect back to GET /."""

    async def index(request: Request) -> Response:
        item = store.current()
        return render_item(store, item) if item else render_done(store)

    async def label(request: Request) -> Response:
        form = await request.form()
        choice = str(form.get("choice", ""))
        if choice not in CHOICES:
            return PlainTextResponse(f"unknown choice {choice!r}", status_code=400)
        store.label(str(form.get("item", "")), choice)  # None (stale page): nothing to do
        return RedirectResponse("/", status_code=303)

    async def undo(request: Request) -> Response:
        form = await request.form()
        store.undo(str(form.get("item", "")))
        return RedirectResponse("/", status_code=303)

    return Starlette(routes=[Route("/", index), Route("/label", label, methods=["POST"]),
                             Route("/undo", undo, methods=["POST"])])


def serve(store: LabelStore, port: int = 8765, host: str = "127.0.0.1", console: Any = None) -> None:
    """Serve the page on host:port (0: any free port) until Ctrl-C or SIGTERM; prints the URL first."""
    import socket
    import sys

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bound here rather than by uvicorn: the URL of port 0 is known before serving
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AlignpipeError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    url = f"http://{host}:{sock.getsockname()[1]}/"
    p = store.progress()
    message = (f"labelling {p['total']} items ({p['done']} done) at {url}\n"
               f"labels: {store.path}\nCtrl-C stops the server; run the same command again to continue")
    if console is None:
        print(message)
    else:
        console.print(message, highlight=False, soft_wrap=True)
    sys.stdout.flush()  # a parent process (a test, a script) waits for the URL line
    server = uvicorn.Server(uvicorn.Config(create_app(store), log_level="warning", lifespan="off"))
    try:
        server.run(sockets=[sock])  # uvicorn re-raises a caught Ctrl-C / SIGTERM once it has shut down
    finally:
        p = store.progress()
        print(f"stopped: {p['done']} / {p['total']} done, labels in {store.path}", flush=True)


def label_command(source: str, labeller: str, port: int = 8765, out: str | None = None, seed: int = 0,
                  limit: int | None = None, export: str | None = None, console: Any = None) -> None:
    """`alignpipe label PAIRS|RUN/round-NN [--labeller NAME] [--port N] [--out PATH] [--seed N] [--limit N]
    [--export PATH]`."""
    from alignpipe.evaluation.labelling import export_preferences, load_source

    src = load_source(source)
    if not src.items:
        raise AlignpipeError(f"{source}: nothing to label ({'; '.join(src.notes) or 'no pairs'})")
    store = LabelStore(src, labeller, out, seed=seed, limit=limit)
    if export:
        if not store.entries:
            raise AlignpipeError(f"no labels to export yet in {store.path}")
        n = export_preferences(src.items, store.entries, export)
        print(f"wrote {n['pairs']} preference pairs to {export} (dropped: {n['ties']} ties, {n['skipped']} skips)")
        return
    serve(store, port, console=console)
