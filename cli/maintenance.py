"""Store maintenance: ``fs compact``, ``fs verify``, ``fs vacuum`` and ``fs migrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featurestore.cli._common import StoreOpt, console, err_console, friendly
from featurestore.store import Store, migrate


@friendly
def compact(store: StoreOpt) -> None:
    """Fold the store into a checkpoint now, with every table merged into one part.

    Writers also checkpoint automatically every 100 commits; compact is safe while they run.
    """
    r = Store.open(store).compact()
    console.print(f"checkpoint at version {r.version}: folded {r.commits_folded} commits; "
                  f"table parts {r.parts_before} → {r.parts_after}")


@friendly
def verify(store: StoreOpt,
           deep: Annotated[bool, typer.Option("--deep", help="Also re-hash every file (reads all data).")] = False,
           drop_damaged: Annotated[bool, typer.Option("--drop-damaged", help="Leave damaged commits out of "
                                                      "every later read; their slides can then be re-extracted.")]
           = False) -> None:
    """Check every live commit's files against its manifest (sizes; sha256 with --deep)."""
    s = Store.open(store, read_only=not drop_damaged)
    report = s.verify(deep=deep)
    how = f"{report.bytes_hashed / 2**20:.1f} MiB re-hashed" if deep else "sizes checked"
    console.print(f"version {report.version}: {report.commits} commits, {report.files} files, {how}")
    if not report.problems:
        console.print("no damage found")
        return
    for p in report.problems:
        slides = ", ".join(p.slides[:5]) + (" …" if len(p.slides) > 5 else "") or "no slide"
        err_console.print(f"[red]damaged[/red]: {p.path}: {p.problem} (commit {p.commit_id}, slides {slides})",
                          highlight=False, soft_wrap=True)
    if drop_damaged:
        version = s.drop_commits(sorted({p.commit_id for p in report.problems}))
        console.print(f"dropped {len({p.commit_id for p in report.problems})} commits at version {version}; "
                      "re-run `fs extract` to extract their slides again")
        return
    err_console.print(f"fix: {report.fix(store)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@friendly
def vacuum(store: StoreOpt,
           retention_hours: Annotated[float, typer.Option(help="Keep anything younger than this: a reader "
                                                          "or writer may still use it.")] = 168.0) -> None:
    """Delete staging leftovers, unpublished commits, replaced arrays, old checkpoints and orphaned index files."""
    from featurestore.index import vacuum as vacuum_indexes

    if retention_hours < 0:
        raise typer.BadParameter("--retention-hours must be ≥ 0")
    s = Store.open(store)
    r = s.vacuum(retention_hours * 3600)
    ix = vacuum_indexes(s, retention_hours * 3600)
    console.print(f"removed {r.staging} staging dirs, {r.unpublished_commits} unpublished commits, "
                  f"{r.superseded_arrays} replaced arrays, {r.checkpoints} old checkpoints, {r.parts} table "
                  f"parts, {ix.files} index files: {(r.bytes_freed + ix.bytes_freed) / 2**20:.1f} MiB freed")


@friendly
def migrate_store(store: Annotated[Path, typer.Argument(help="Store directory to upgrade in place.")]) -> None:
    """Upgrade an older store to this code's format, atomically (stop every writer first)."""
    r = migrate(store)
    if not r.changed:
        console.print(f"{store}: already current (format {r.to_version})")
        return
    logged = f", {r.commits_logged} commits logged" if r.commits_logged else ""
    folded = f", checkpoint at version {r.checkpoint}" if r.checkpoint is not None else ""
    console.print(f"{store}: format {r.from_version} → {r.to_version}{logged}{folded}")


def register(app: typer.Typer) -> None:
    app.command()(compact)
    app.command()(verify)
    app.command()(vacuum)
    app.command("migrate")(migrate_store)
