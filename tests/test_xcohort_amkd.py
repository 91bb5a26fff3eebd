"""AMKD-style distillation on a survival store whose outcome is driven by an omics covariate that the
slides show only partly.

Each patient has a covariate c ~ N(0, 1) that sets the log-hazard (1.5 c). Its slide carries
signal tiles shifted along a fixed direction by s = ρ c + √(1 − ρ²) ε with ρ = 0.6, so the tiles
show c only partly. The omics vector is (c + noise, noise, noise); a fifth of the patients have no
omics at all. The teacher sees both, the student only tiles.

Measured (3 seeds, 3 folds, 90 patients, pooled held-out C-index): teacher 0.713 / 0.710 / 0.717,
the same teacher with the test patients' omics removed 0.623 / 0.637 / 0.632, pathology-only
baseline 0.546 / 0.689 / 0.542, distilled student 0.507 / 0.711 / 0.528. The distilled student did
NOT beat the baseline on average (nor with 150 patients: 0.617 vs 0.640), so that is not asserted;
what holds is asserted: the teacher uses the omics, and patients without omics are scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cli.xcohort import register
from distill.errors import ConfigError
from distill.xcohort import AmkdConfig, amkd
from featurestore.store import SlideCommit, Store, tiles_table
from schemas import TilingSpec
from tests.conftest import make_encoder, make_slide

DIM = 16
RHO = 0.6
MISSING = 0.2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def survival_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("amkd")
    store = Store.create(root / "store")
    tiling, encoder = TilingSpec(0.5, 224), make_encoder("synth", DIM)
    rng = np.random.default_rng(3)
    direction = np.zeros(DIM)
    direction[:4] = 1.0
    rows = []
    for p in range(90):
        c = rng.standard_normal()
        s = RHO * c + np.sqrt(1 - RHO**2) * rng.standard_normal()
        months = rng.exponential(60 * np.exp(-1.5 * c))
        event = int(rng.random() > 0.25)
        months = months if event else months * rng.uniform(0.3, 1.0)
        slide = make_slide(p)
        n = int(rng.integers(30, 60))
        cells = rng.permutation(12 * 12)[:n]
        emb = rng.standard_normal((n, DIM))
        emb[rng.random(n) < 0.3] += s * direction
        tiles = tiles_table(slide.slide_id, tiling.id, (cells % 12) * 448, (cells // 12) * 448, 0, 448, np.ones(n))
        store.commit_slide(SlideCommit(slide, tiling, tiles, {encoder: emb.astype(np.float32)}))
        omics = ["", "", ""] if rng.random() < MISSING else [f"{c + 0.1 * rng.standard_normal():.4f}",
                                                              f"{rng.standard_normal():.4f}",
                                                              f"{rng.standard_normal():.4f}"]
        rows.append(f"slide_{p}.svs,P{p:03d},{months:.3f},{event},{','.join(omics)}")
    csv = root / "labels.csv"
    csv.write_text("filename,patient,months,event,gene_a,gene_b,gene_c\n" + "\n".join(rows) + "\n")
    store.import_labels(csv)
    return root / "store"


def test_teacher_uses_omics_and_falls_back_without_them(survival_store):
    result = amkd(AmkdConfig(survival_store, "synth", "months", "event", ("gene_a", "gene_b", "gene_c"),
                             seeds=3, epochs=30))
    print(f"\nC-index per seed: teacher {np.round(result.teacher, 3)}, teacher without omics "
          f"{np.round(result.teacher_no_omics, 3)}, baseline {np.round(result.baseline, 3)}, "
          f"distilled {np.round(result.student, 3)}")
    assert np.all(np.isfinite(result.teacher_no_omics)), "patients without omics are scored through the fallback"
    assert np.mean(result.teacher) > np.mean(result.teacher_no_omics) > 0.55
    assert np.mean(result.teacher) > np.mean(result.baseline)
    assert np.all(np.isfinite(result.student))


def test_omics_from_a_parquet_file_and_missing_rows(survival_store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    patients = Store.open(survival_store, read_only=True).sql("SELECT patient, gene_a FROM labels")
    half = patients.slice(0, patients.num_rows // 2)
    pq.write_table(pa.table({"patient": half.column("patient"), "g": half.column("gene_a")}), tmp_path / "o.parquet")
    result = amkd(AmkdConfig(survival_store, "synth", "months", "event", omics_parquet=tmp_path / "o.parquet",
                             folds=2, epochs=2))
    assert len(result.student) == 1 and np.isfinite(result.student[0])


def test_config_and_cli_errors(survival_store):
    with pytest.raises(ConfigError, match="--omics"):
        AmkdConfig(survival_store, "synth", "months", "event")
    app = typer.Typer()
    register(app)
    run = CliRunner().invoke(app, ["amkd", "-s", str(survival_store), "-m", "synth", "--time", "months", "--event",
                                   "event", "--omics", "nope"])
    assert run.exit_code == 2 and "no omics column 'nope'" in run.output
