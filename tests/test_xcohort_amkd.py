"""AMKD-style distillation on a survival store whose outcome is driven by an omics covariate that the
slides show only partly.

Each patient has a covariate c ~ N(0, 1) that sets the log-hazard (1.5 c). Its slide carries
signal tiles shifted along a fixed direction by s = ρ c + √(1 − ρ²) ε with ρ = 0.6, so the tiles
show c only partly. The omics vector is (c + noise, noise, noise); a fifth of the patients have no
omics at all. The teacher sees both, the student only tiles.

Measured (5 seeds, 3 folds, 90 patients, pooled held-out C-index): teacher 0.713 / 0.710 / 0.717 /
0.773 / 0.685, the same teacher with the test patients' omics removed 0.623 / 0.637 / 0.632 / 0.681 /
0.560, pathology-only baseline 0.546 / 0.689 / 0.542 / 0.692 / 0.569 (mean 0.608), distilled student
0.575 / 0.711 / 0.626 / 0.696 / 0.609 (mean 0.643): better on every seed, Wilcoxon p = 0.0625 (the
smallest two-sided p five pairs allow).

Before, the student kept the epoch with the lowest validation *Cox* loss on ~12 patients, a criterion
so noisy that some splits kept epoch 0; it matched the baseline (0.582 vs 0.592 over 3 seeds). Now
each model keeps the epoch where its own training objective (Cox + λ·KD for the student) is lowest on
the validation patients, whose teacher risks are out of sample (docs/amkd.md).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from featurestore.cli.xcohort import register
from featurestore.distill.data import BagReader
from featurestore.distill.errors import ConfigError
from featurestore.distill.schedule import AMKD, AMKD_CV
from featurestore.distill.tasks import TaskSpec
from featurestore.distill.train import load_cohort
from featurestore.distill.xcohort import AmkdConfig, amkd, wilcoxon_p
from featurestore.distill.xcohort.amkd import read_omics
from featurestore.schemas import TilingSpec
from featurestore.store import SlideCommit, Store, tiles_table
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


@pytest.mark.slow
def test_distilled_student_beats_pathology_baseline_and_teacher_falls_back(survival_store):
    result = amkd(AmkdConfig(survival_store, "synth", "months", "event", ("gene_a", "gene_b", "gene_c"),
                             schedule=replace(AMKD, epochs=30), cv=replace(AMKD_CV, seeds=5)))
    p = wilcoxon_p(np.array(result.student), np.array(result.baseline))
    print(f"\nC-index per seed: teacher {np.round(result.teacher, 3)}, teacher without omics "
          f"{np.round(result.teacher_no_omics, 3)}, baseline {np.round(result.baseline, 3)}, "
          f"distilled {np.round(result.student, 3)}; Wilcoxon distilled vs baseline p = {p:.3g}")
    assert min(result.teacher_no_omics) > 0.5, "patients without omics are ranked through the fallback"
    assert np.mean(result.teacher) > np.mean(result.teacher_no_omics) > 0.55
    assert np.mean(result.teacher) > np.mean(result.baseline)
    assert np.mean(result.student) > np.mean(result.baseline)


def test_the_teacher_ranks_by_the_omics_and_falls_back_without_them(survival_store):
    """The default tier's run of the slow comparison's code, on one seed: the omics hold the hazard's
    covariate almost noise-free, so the teacher that sees them must rank clearly better than chance and
    lose C-index when they are taken away (it still answers: the fallback)."""
    result = amkd(AmkdConfig(survival_store, "synth", "months", "event", ("gene_a", "gene_b", "gene_c"),
                             schedule=replace(AMKD, epochs=10), cv=replace(AMKD_CV, seeds=1)))
    assert [len(r) for r in (result.teacher, result.teacher_no_omics, result.baseline, result.student)] == [1] * 4
    assert result.teacher[0] > 0.65 and result.teacher[0] > result.teacher_no_omics[0] + 0.03, result


def test_omics_from_a_parquet_file_and_missing_rows(survival_store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    patients = Store.open(survival_store, read_only=True).sql("SELECT patient, gene_a FROM labels")
    half = patients.slice(0, patients.num_rows // 2)
    pq.write_table(pa.table({"patient": half.column("patient"), "g": half.column("gene_a")}), tmp_path / "o.parquet")
    cfg = AmkdConfig(survival_store, "synth", "months", "event", omics_parquet=tmp_path / "o.parquet",
                     schedule=replace(AMKD, epochs=2), cv=replace(AMKD_CV, folds=2, seeds=1))
    store = Store.open(survival_store, read_only=True)
    cohort = load_cohort(store, BagReader(store, store.embedding_set("synth")),
                         TaskSpec("survival", "months", event="event"), "patient", None)
    given = dict(zip(half.column("patient").to_pylist(), half.column("gene_a").to_pylist(), strict=True))
    expected = [[np.nan if given.get(p) is None else given[p]] for p in cohort.labels.column("patient").to_pylist()]
    np.testing.assert_array_equal(read_omics(cfg, store, cohort), expected)
    assert np.isnan(expected).sum() > len(expected) / 2, "patients outside the file and without omics are missing"
    result = amkd(cfg)
    assert [len(r) for r in (result.teacher, result.teacher_no_omics, result.baseline, result.student)] == [1] * 4


def test_config_and_cli_errors(survival_store):
    with pytest.raises(ConfigError, match="--omics"):
        AmkdConfig(survival_store, "synth", "months", "event")
    app = typer.Typer()
    register(app)
    run = CliRunner().invoke(app, ["amkd", "-s", str(survival_store), "-m", "synth", "--time", "months", "--event",
                                   "event", "--omics", "nope"])
    assert run.exit_code == 2 and "no omics column 'nope'" in run.output
