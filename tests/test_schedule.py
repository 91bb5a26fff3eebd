"""The training schedule shared by stage two: its one validator, the CLI defaults read from it, field errors shown
as flags, the device helper, the run-directory writer and the fit loop's loss rule, early stopping and restore."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from featurestore.cli import distill as distill_cli
from featurestore.cli import train as train_cli
from featurestore.cli import xcohort as xcohort_cli
from featurestore.devices import DeviceError, amp_dtype, autocast, check_device, grad_scaler, resolve_device
from featurestore.distill.data import BagBatch
from featurestore.distill.errors import ConfigError, RunDirError
from featurestore.distill.fit import Fitted, Loss, fit
from featurestore.distill.mil import HeadOutput
from featurestore.distill.rundir import staged_run
from featurestore.distill.schedule import AMKD, AMKD_CV, KD, SLIDES, SLIDES_CV, TRAIN, TRAIN_CV, CrossValidation
from tests.test_xcohort_amkd import survival_store  # noqa: F401 (its survival cohort, as a fixture here)


@pytest.mark.parametrize(("record", "change", "message"), [
    (TRAIN, {"lr": 0.0}, "lr must be > 0, got 0.0"),
    (TRAIN, {"epochs": -1}, "epochs must be >= 0, got -1"),
    (TRAIN, {"weight_decay": -0.1}, "weight_decay must be >= 0"),
    (TRAIN, {"batch_size": 0}, "batch_size must be >= 1"),
    (TRAIN, {"group": " "}, "group must be a labels column or None"),
    (TRAIN, {"device": "gpu"}, "device must be auto, cpu or cuda[:N], got 'gpu'"),
    (TRAIN_CV, {"folds": 1}, "folds must be >= 2"),
    (TRAIN_CV, {"seeds": 0}, "seeds must be >= 1"),
    (TRAIN_CV, {"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
    (TRAIN_CV, {"patience": 0}, "patience must be >= 1"),
    (TRAIN_CV, {"max_tiles": 0}, "max_tiles must be >= 1, or None"),
    (TRAIN_CV, {"seeds": None}, "seeds must be >= 1, got None"),
])
def test_one_validator_names_fields_as_python_does(record, change, message):
    with pytest.raises((ConfigError, DeviceError)) as caught:
        replace(record, **change)
    assert str(caught.value).startswith(message) and caught.value.field == next(iter(change))


def test_every_config_nests_its_commands_defaults():
    from featurestore.distill.kd import DistillConfig
    from featurestore.distill.train import TrainConfig
    from featurestore.distill.xcohort import AmkdConfig, SlideDistillConfig

    defaults = {name: f.default for cls in (TrainConfig, SlideDistillConfig, AmkdConfig, DistillConfig)
                for name, f in [(f"{cls.__name__}.{f.name}", f) for f in cls.__dataclass_fields__.values()]}
    assert defaults["TrainConfig.schedule"] is TRAIN and defaults["TrainConfig.cv"] is TRAIN_CV
    assert defaults["SlideDistillConfig.schedule"] is SLIDES and defaults["SlideDistillConfig.cv"] is SLIDES_CV
    assert defaults["AmkdConfig.schedule"] is AMKD and defaults["AmkdConfig.cv"] is AMKD_CV
    assert defaults["DistillConfig.schedule"] is KD and "DistillConfig.cv" not in defaults
    schedule_fields = {"epochs", "lr", "weight_decay", "batch_size", "device", "group", "folds", "seeds",
                       "val_fraction", "patience", "max_tiles"}
    assert not {name.split(".")[1] for name in defaults} & schedule_fields, "a schedule field is declared twice"


@pytest.mark.parametrize(("command", "schedule", "cv"), [
    (train_cli.train_command, TRAIN, TRAIN_CV),
    (xcohort_cli.distill_slides_command, SLIDES, SLIDES_CV),
    (xcohort_cli.amkd_command, AMKD, AMKD_CV),
    (distill_cli.distill_command, KD, None),
])
def test_cli_defaults_are_the_librarys(command, schedule, cv):
    params = inspect.signature(command).parameters
    checked = 0
    for record in (schedule, cv):
        for name in (record.__dataclass_fields__ if record is not None else ()):
            if name not in params:
                continue
            expected = getattr(record, name)
            shown = params[name].default
            assert shown == (expected or 0 if name == "max_tiles" else expected), name
            checked += 1
    assert checked >= 5


def test_seeds_and_device_defaults_are_what_the_cli_showed():
    assert (SLIDES_CV.seeds, AMKD_CV.seeds, TRAIN_CV.seeds) == (5, 3, 1)
    assert (SLIDES.device, AMKD.device, KD.device, TRAIN.device) == ("auto", "auto", "auto", "auto")


def cli(register, *args: str):
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return CliRunner().invoke(app, list(args))


def test_cli_shows_field_errors_as_flags(tmp_path):
    common = ["-s", str(tmp_path / "none"), "-m", "synth"]
    result = cli(train_cli.register, "train", *common, "--label", "label", "--out", str(tmp_path / "run"), "--lr", "0")
    assert result.exit_code == 2 and "--lr must be > 0, got 0.0" in result.output and "Traceback" not in result.output
    result = cli(xcohort_cli.register, "amkd", *common, "--time", "t", "--event", "e", "--omics", "g",
                 "--batch-size", "2")
    assert result.exit_code == 2 and "--batch-size must be >= 4 (Cox compares" in result.output
    result = cli(distill_cli.register, "distill", "-s", str(tmp_path), "--teacher", "uni", "--student", "resnet18",
                 "--objective", "feature", "--out", str(tmp_path / "kd"), "--device", "tpu")
    assert result.exit_code == 2 and "--device must be auto, cpu or cuda[:N], got 'tpu'" in result.output
    result = cli(xcohort_cli.register, "distill-slides", *common, "--label", "y", "--objective", "nope")
    assert result.exit_code == 2 and "--objective must be one of task, triplet, clip, soft" in result.output


def test_amkd_refuses_a_taken_run_directory_before_any_work(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    result = cli(xcohort_cli.register, "amkd", "-s", str(tmp_path / "no-store"), "-m", "synth", "--time", "t",
                 "--event", "e", "--omics", "g", "--out", str(taken))
    assert result.exit_code == 2 and "run directory exists and is not empty" in result.output


def test_cli_starts_without_torch():
    code = "import sys, featurestore.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_devices():
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match="device must be auto, cpu or cuda"):
        check_device("cuda1")
    cpu = resolve_device("cpu")
    assert cpu == torch.device("cpu") and amp_dtype(cpu) is None and not grad_scaler(cpu).is_enabled()
    with autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="device 'cuda:0': no CUDA device is visible"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(DeviceError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_staged_run_is_whole_or_absent(tmp_path):
    out = tmp_path / "run"
    with staged_run(out, "id1") as staging:
        assert staging.name == ".run.partial-id1" and not out.exists()
        (staging / "config.json").write_text("{}")
    assert (out / "config.json").is_file() and not staging.exists()
    with pytest.raises(RunDirError, match="run directory exists and is not empty"), staged_run(out):
        pass
    failed = tmp_path / "failed"
    with pytest.raises(KeyboardInterrupt), staged_run(failed, "id2") as staging:
        (staging / "half").write_text("x")
        raise KeyboardInterrupt
    assert not failed.exists() and list(tmp_path.iterdir()) == [out]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="file: is a file"), staged_run(tmp_path / "file"):
        pass


def batch(n: int = 4) -> BagBatch:
    """What the fit loop and ``Loss`` read of a batch."""
    return cast(BagBatch, SimpleNamespace(x=torch.ones(n, 3, 2), y=torch.zeros(n, 2), index=torch.arange(n)))


def test_loss_mixes_clams_instance_loss_then_adds_the_auxiliary_term():
    logits = torch.tensor([[2.0], [1.0], [0.0], [-1.0]])
    out = HeadOutput(logits, torch.zeros(4, 3), torch.zeros(4, 3), aux_loss=torch.tensor(10.0))
    seen = []

    def aux(o: HeadOutput, b: BagBatch, rows: np.ndarray) -> torch.Tensor:
        seen.append(rows.tolist())
        return torch.tensor(100.0)

    loss = Loss(lambda b, rows, training: out, lambda z, y: z.mean(), instance_weight=0.3, aux=aux, weight=0.5)
    value = loss(batch(), np.array([7, 8, 9, 10]), True)
    assert value.item() == pytest.approx(0.7 * 0.5 + 0.3 * 10 + 0.5 * 100)
    assert seen == [[7, 8, 9, 10]]
    assert Loss(lambda b, r, t: out, lambda z, y: z.mean(), 0.3, aux, 0.0)(batch(), np.arange(4), True).item() \
        == pytest.approx(0.7 * 0.5 + 0.3 * 10)


class _Bags:
    """The one thing the fit loop asks of a dataset itself: which epoch it is (for fresh tile subsets)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def test_fit_keeps_the_best_epoch_and_stops_after_patience(monkeypatch):
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 0.0)
    signals = iter([3.0, 1.0, 2.0, 2.5, 0.5])
    weights_at = []

    def validate() -> float:
        weights_at.append(model.weight.item())
        return next(signals)

    def step(batch: BagBatch, rows: np.ndarray, training: bool) -> torch.Tensor:
        return -model.weight.sum()  # every step raises the weight by lr (Adam's first step is lr-sized)

    monkeypatch.setattr("featurestore.distill.fit.make_loader", lambda ds, *a, **k: [batch()])
    monkeypatch.setattr("featurestore.distill.fit.batches", lambda loader, device: iter(loader))
    schedule = replace(TRAIN, epochs=5, lr=0.1, weight_decay=0.0)
    result = fit(model, step, _Bags(), np.arange(4), validate, schedule, patience=2, device=torch.device("cpu"),
                 seed=0)
    assert isinstance(result, Fitted) and result.best_epoch == 1 and len(result.history) == 4
    assert [h["val_loss"] for h in result.history] == [3.0, 1.0, 2.0, 2.5]
    assert model.weight.item() == pytest.approx(weights_at[1]) and weights_at[3] > weights_at[1]
    assert not model.training

    untrained = fit(model, step, _Bags(), np.arange(4), validate, replace(schedule, epochs=0), 2,
                    torch.device("cpu"), 0)
    assert untrained == Fitted(-1, [])


def test_cross_validation_record_is_frozen():
    with pytest.raises(AttributeError):
        TRAIN_CV.folds = 3  # type: ignore[misc]
    assert CrossValidation(folds=2, seeds=1, max_tiles=None).max_tiles is None


def test_amkd_writes_a_run_directory_like_the_other_students(survival_store, tmp_path):  # noqa: F811
    import pyarrow.parquet as pq

    from featurestore.distill.rundir import check_new_run_dir
    from featurestore.distill.xcohort import AmkdConfig, amkd

    cfg = AmkdConfig(survival_store, "synth", "months", "event", ("gene_a",), schedule=replace(AMKD, epochs=1),
                     cv=replace(AMKD_CV, folds=2, seeds=1))
    result = amkd(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["c_index"]["student"] == result.student and metrics["c_index"]["teacher"] == result.teacher
    assert json.loads((tmp_path / "run" / "config.json").read_text())["schedule"]["epochs"] == 1
    predictions = pq.read_table(tmp_path / "run" / "predictions.parquet")
    assert predictions.equals(result.predictions) and predictions.num_rows == 4 * 90
    assert sorted(set(predictions.column("model").to_pylist())) == sorted(
        ("teacher", "teacher_no_omics", "baseline", "student"))
    with pytest.raises(RunDirError, match="not empty"):
        check_new_run_dir(tmp_path / "run")
