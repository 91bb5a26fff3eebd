"""tiles/s of ``fs extract`` and of peer tools on the same slides with the same network, in paired rounds.

    python -m benchmarks.peers [--tools lazyslide,trident] [--slides DIR] [--envs DIR] [--rounds 3]
                               [--trident-src PATH] [--peer-workers N] [--peer-channels-last]

Each peer is installed on request into its own venv under ``--envs`` (kept for the next run; delete the
folder to start afresh). The venv sees this project's environment after its own packages, so every tool
runs on the same torch build and the same EfficientNet-Lite0 weights package, and a peer's own
dependencies win where it pins them. Every round runs each tool once, in a fresh process, in an order
that alternates; each tool keeps its fastest round, and the table gives ``fs``'s tiles/s over each peer's.

TRIDENT (mahmoodlab) is not on PyPI (the ``trident`` there simulates UV spectra): point ``--trident-src``
or ``FS_PEERS_TRIDENT_SRC`` at a checkout of its repository and it is pip-installed from there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAZYSLIDE = "lazyslide==0.13.0"
TRIDENT_ENV = "FS_PEERS_TRIDENT_SRC"
PEERS = ("lazyslide", "trident")


@dataclass(frozen=True)
class Result:
    tool: str
    tiles: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tiles / self.seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--tools", default=",".join(PEERS), help=f"comma-separated peers from {', '.join(PEERS)}")
    parser.add_argument("--slides", type=Path, help="folder of slides (default: 5 generated 4096² demo slides)")
    parser.add_argument("--envs", type=Path, default=Path(tempfile.gettempdir()) / "fs-peers",
                        help="where the peers' venvs, the generated slides and the outputs go")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--peer-workers", type=int, default=0,
                        help="reader processes a peer's DataLoader uses (0: its default, reading in the main process)")
    parser.add_argument("--peer-channels-last", action="store_true",
                        help="feed the peers' batches to the network channels-last, as fs does")
    parser.add_argument("--trident-src", type=Path, default=os.environ.get(TRIDENT_ENV) or None,
                        help=f"a checkout of mahmoodlab/TRIDENT (or set {TRIDENT_ENV})")
    args = parser.parse_args(argv)
    args.tools = [t for t in args.tools.split(",") if t]
    unknown = sorted(set(args.tools) - set(PEERS))
    if unknown:
        parser.error(f"--tools: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be at least 1")
    return args


def install_spec(tool: str, args: argparse.Namespace) -> list[str] | None:
    """What pip installs for ``tool``, or None (with the reason printed) when it cannot be installed."""
    if tool == "lazyslide":
        return [LAZYSLIDE]
    if args.trident_src is None:
        print(f"trident: skipped — TRIDENT is not on PyPI; clone mahmoodlab/TRIDENT and pass --trident-src PATH "
              f"(or set {TRIDENT_ENV})")
        return None
    if not (args.trident_src / "pyproject.toml").exists() and not (args.trident_src / "setup.py").exists():
        raise SystemExit(f"--trident-src {args.trident_src}: no pyproject.toml or setup.py there; pass the root of "
                         "a TRIDENT checkout")
    return [str(args.trident_src.resolve())]


def ensure_env(tool: str, spec: list[str], envs: Path) -> Path:
    """The python of ``tool``'s venv, created and installed on first use (and again when ``spec`` changes)."""
    env = envs / tool
    python = env / "bin" / "python"
    marker = env / "installed.txt"
    if marker.exists() and marker.read_text() == " ".join(spec):
        return python
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(env)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Appended after the venv's own site-packages (and its .pth files processed), so featurestore, torch and
    # the weights package come from this project while the peer's own pins take precedence.
    ours = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "zz_featurestore_project.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    print(f"{tool}: installing {' '.join(spec)} into {env}", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *spec], check=True)
    marker.write_text(" ".join(spec))
    return python


def drive(python: Path, tool: str, slides: Path, out: Path, args: argparse.Namespace) -> Result:
    cmd = [str(python), "-m", "benchmarks.peers._drive", tool, "--slides", str(slides), "--out", str(out),
           "--batch", str(args.batch)]
    if tool != "fs":
        cmd += ["--workers", str(args.peer_workers)] + (["--peer-channels-last"] if args.peer_channels_last else [])
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tool} failed:\n{done.stderr[-3000:]}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    return Result(tool, line["tiles"], line["seconds"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.envs.mkdir(parents=True, exist_ok=True)
    pythons = {"fs": Path(sys.executable)}
    for tool in args.tools:
        spec = install_spec(tool, args)
        if spec is not None:
            pythons[tool] = ensure_env(tool, spec, args.envs)
    slides = args.slides
    if slides is None:
        from featurestore.pipelines.demo import make_cohort

        slides = args.envs / "slides"
        if not any(slides.glob("*.tiff")):
            make_cohort(args.envs / "cohort", 5, size=4096, seed=3)
            (args.envs / "cohort" / "slides").rename(slides)
    best: dict[str, Result] = {}
    tools = list(pythons)
    for r in range(args.rounds):
        for tool in tools if r % 2 == 0 else tools[::-1]:
            with tempfile.TemporaryDirectory(dir=args.envs) as out:
                result = drive(pythons[tool], tool, slides, Path(out), args)
            print(f"round {r + 1}: {tool:<10} {result.tiles:>6} tiles {result.seconds:8.2f} s "
                  f"{result.rate:8.2f} tiles/s", flush=True)
            if tool not in best or result.rate > best[tool].rate:
                best[tool] = result
    fs = best["fs"].rate
    print(f"\nbest of {args.rounds} rounds, batch {args.batch}, slides {slides}")
    print(f"{'tool':<10} {'tiles':>6} {'seconds':>8} {'tiles/s':>8} {'fs ÷ tool':>9}")
    for tool, res in best.items():
        print(f"{tool:<10} {res.tiles:>6} {res.seconds:8.2f} {res.rate:8.2f} {fs / res.rate:9.2f}")
    out = REPO / "bench-results" / "peers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                               "best": {t: vars(r) for t, r in best.items()}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
