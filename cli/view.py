"""``fs view``: serve the local read-only web viewer of a store (``featurestore.viewer``).

``register(app)`` adds the command. The viewer never imports ``distill``; this module hands it the
``--runs`` as objects that compute a slide's attention with the run's own heads.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from featurestore.cli._common import StoreOpt, console, err_console, friendly
from featurestore.schemas import FsError, MissingDependencyError
from featurestore.store import Store

LOOPBACK = "127.0.0.1"


class RunAttention:
    """Per-tile attention of a ``fs train`` run: for each slide, the head of the first seed whose test fold held
    it (the model that never saw it), else the run's first head; computed once per slide."""

    def __init__(self, run_dir: Path, store: Store) -> None:
        from featurestore.distill.data import BagReader
        from featurestore.distill.predict import load_run, matching_set

        config, self._checkpoints = load_run(run_dir)
        self.name = run_dir.name
        es = matching_set(store, config["embedding_set"])
        self.tiling_id = es.tiling_id
        self._reader = BagReader(store.snapshot(), es)
        self._heads: list = []
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def attention(self, slide_id: str) -> np.ndarray:
        with self._lock:
            if slide_id not in self._cache:
                self._cache[slide_id] = self._compute(slide_id)
            return self._cache[slide_id]

    def _compute(self, slide_id: str) -> np.ndarray:
        import torch

        from featurestore.distill.data import grid_positions
        from featurestore.distill.runtime import load_checkpoint

        if not self._heads:
            self._heads = sorted((load_checkpoint(p) for p in self._checkpoints), key=lambda c: (c.seed, c.fold))
        ck = next((c for c in self._heads if slide_id in c.test), self._heads[0])
        x = torch.from_numpy(self._reader.features(slide_id))[None]
        coords = torch.from_numpy(grid_positions(self._reader.xy(slide_id)))[None] if ck.head.needs_coords else None
        with torch.inference_mode():
            out = ck.head(x, torch.ones(x.shape[:2], dtype=torch.bool), coords)
        return out.attention[0].float().numpy()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts, so a taken port is one line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        why = "is in use" if err.errno in (98, 48) else f"cannot be bound ({err.strerror})"
        raise FsError(f"{host}:{port} {why}; pass another --port (0 picks a free one)") from err
    sock.listen(128)
    return sock


@friendly
def view_cmd(
    store: StoreOpt,
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).", min=0, max=65535)] = 8000,
    runs: Annotated[list[Path] | None, typer.Option("--runs", help="fs train run directories whose attention the "
                                                                   "slide page can overlay; repeatable.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --allow-remote.")]
    = LOOPBACK,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Listen on a non-loopback --host: anyone "
                                                                      "who can reach it can read the store.")]
    = False,
    device: Annotated[str, typer.Option(help="Device that embeds uploaded query images: auto, cpu or cuda[:N].")]
    = "cpu",
) -> None:
    """Serve a read-only web viewer: cohort table, deep-zoom slides with overlays, similarity search."""
    try:
        import uvicorn

        from featurestore.viewer import ViewerConfig, create_app
    except ImportError as err:
        raise MissingDependencyError(f"fs view needs {err.name}: pip install 'featurestore-path[view]'") from err
    if not _is_loopback(host) and not allow_remote:
        raise FsError(f"--host {host} is not a loopback address; pass --allow-remote to serve the store to others "
                      f"on the network, or keep the default --host {LOOPBACK}")
    if not _is_loopback(host):
        err_console.print(f"[yellow]warning:[/yellow] listening on {host}: anyone who can reach this address can "
                          "read the store (slides, labels, embeddings)", highlight=False, soft_wrap=True)
    s = Store.open(store, read_only=True)
    loaded = tuple(RunAttention(Path(r), s) for r in runs or [])
    names = [r.name for r in loaded]
    if len(set(names)) != len(names):
        raise FsError(f"--runs: two run directories share a name ({', '.join(names)}); the slide page lists runs by "
                      "folder name, so rename one")
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    # Loopback: answer only requests addressed to this machine's own names (no DNS rebinding). Remote: the
    # user chose to serve the network, which reaches the server under names it cannot know.
    allowed = (LOOPBACK, "localhost") if _is_loopback(host) else ("*",)
    if device != "cpu":
        from featurestore.devices import resolve_device

        device = str(resolve_device(device))
    app = create_app(ViewerConfig(store=s.root, runs=loaded, device=device, allowed_hosts=allowed))
    console.print(f"serving {s.root} read-only at http://{host}:{bound}/ "
                  "(Ctrl-C stops)", highlight=False, soft_wrap=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


def register(app: typer.Typer) -> None:
    """Add ``view`` to the ``fs`` app."""
    app.command("view")(view_cmd)
