"""Stage one then stage two on generated slides with the real EfficientNet-Lite0 teacher.

The cohort's labels come from drawn morphology (larger, denser tumour nuclei), so a head that scores
well on held-out slides has learned it from real teacher features, not from the label column.
"""

from __future__ import annotations

import json
from dataclasses import replace

from featurestore.distill.mil import HeadConfig
from featurestore.distill.predict import predict, read_predictions
from featurestore.distill.schedule import TRAIN, TRAIN_CV
from featurestore.distill.tasks import TaskSpec
from featurestore.distill.train import TrainConfig, train
from featurestore.pipelines.demo import make_cohort
from featurestore.pipelines.extract import ExtractOptions, run_extract
from featurestore.schemas import TilingSpec
from featurestore.store import Store


def test_abmil_on_real_teacher_features_classifies_held_out_slides(tmp_path):
    cohort = make_cohort(tmp_path / "cohort", 16, size=2048, seed=5)
    store_path = tmp_path / "store"
    report = run_extract([cohort.root / "slides"], store_path,
                         ExtractOptions(models=("efficientnet-lite0",), tiling=TilingSpec(0.5, 224), device="cpu"))
    assert not report.failed
    Store.open(store_path).import_labels(cohort.labels_csv)
    run = train(TrainConfig(store=store_path, model="efficientnet-lite0", out=tmp_path / "run",
                            task=TaskSpec(kind="classification", label="label"),
                            head=HeadConfig(name="abmil", hidden=128, attention_dim=64),
                            schedule=replace(TRAIN, epochs=30, device="cpu"), cv=replace(TRAIN_CV, folds=2)))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["summary"]["auroc"]["pooled"] >= 0.9, metrics["summary"]["auroc"]
    predict(tmp_path / "run", store_path, device="cpu")
    predictions = read_predictions(Store.open(store_path), run.run_id)
    assert predictions.num_rows == 16 * 2 and set(predictions.column("held_out").to_pylist()) == {True, False}
