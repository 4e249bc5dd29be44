"""Precision chosen per device, bundle config values checked before a run, and a training budget that
is not wasted: the last epoch is validated, and validation counts against the wall-time limit."""

from __future__ import annotations

import logging
import subprocess
import time as _time

import pytest
import torch
from conftest import ENV, REPO_ROOT, bundle_cmd, bundle_parser
from ignite.engine import Engine, Events

import heatmark.training.precision as precision
from heatmark.bundle import check_config
from heatmark.training import FinalValidation, TimeLimit, choose_precision, cpu_info

SYNTHETIC = REPO_ROOT / "tests" / "bundles" / "synthetic_dots"


def _cpu(native: bool) -> precision.CpuInfo:
    return precision.CpuInfo("Test CPU", "AVX512" if native else "AVX2", native, ("amx_bf16",) if native else ())


def test_cpu_info_reports_model_capability_and_bf16():
    info = cpu_info()
    assert info.capability == str(torch.backends.cpu.get_cpu_capability())
    assert isinstance(info.native_bf16, bool) and info.model
    assert info.capability in info.describe()


@pytest.mark.parametrize("native", [True, False])
def test_auto_uses_bf16_only_on_cpus_that_have_it(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_info", lambda: _cpu(native))
    p = choose_precision("auto", "auto", "cpu")
    assert p.enabled is native and p.dtype == "bfloat16"
    assert ("native bf16" in p.reason) and (p.label() == ("bfloat16" if native else "float32"))


def test_forced_bf16_on_a_cpu_without_it_warns(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_info", lambda: _cpu(False))
    with caplog.at_level(logging.WARNING, logger="heatmark.training.precision"):
        p = choose_precision(True, "auto", "cpu")
    assert p.enabled and "10-30x slower" in caplog.text
    assert not choose_precision(False, "auto", "cpu").enabled


def test_cuda_keeps_mixed_precision():
    """No GPU needed to decide: fp16 (with a grad scaler in the trainer) by default, bf16 on request."""
    assert choose_precision("auto", "auto", "cuda", log=False).label() == "float16"
    assert choose_precision("auto", "bfloat16", "cuda", log=False).label() == "bfloat16"
    assert choose_precision(False, "auto", "cuda", log=False).label() == "float32"


@pytest.mark.parametrize("bad", ["false", "False", "yes", 1])
def test_amp_text_is_never_taken_as_true(bad):
    with pytest.raises(ValueError, match="amp must be true, false or auto"):
        choose_precision(bad, "auto", "cpu", log=False)


def test_check_config_names_every_bad_key():
    assert check_config(amp="auto", resume=False, max_epochs=3, spacing_mm=[1.0, 2.0], decode_method="quadratic")
    with pytest.raises(SystemExit) as e:
        check_config(amp="false", resume="False", max_epochs=0, spacing_mm=[1, -2], learning_rate="x",
                     decode_method="nearest", num_workers=1.5)
    text = str(e.value)
    for key in ("'amp'", "'resume'", "'max_epochs'", "'spacing_mm'", "'learning_rate'", "'decode_method'",
                "'num_workers'"):
        assert key in text
    assert "the text 'false'" in text and "True/False" in text


def test_the_base_config_checks_and_resolves_precision():
    parser = bundle_parser(SYNTHETIC, "training", dataset_dir=".")
    assert parser.get_parsed_content("config_check") is True
    chosen = parser.get_parsed_content("precision")
    assert chosen.enabled is False  # the synthetic bundle says amp: false
    trainer_amp = parser.get_parsed_content("train#trainer#amp")
    assert trainer_amp is False


def test_an_overlay_adds_its_own_keys_to_the_check():
    """cascade.yaml's fine_* keys go through the same check (config_check_more)."""
    parser = bundle_parser(SYNTHETIC, "training", ["cascade.yaml"], dataset_dir=".")
    assert "fine_search_radius_mm" in parser.get_parsed_content("config_check_more")
    assert parser.get_parsed_content("config_check") is True
    parser = bundle_parser(SYNTHETIC, "training", ["cascade.yaml"], dataset_dir=".")
    parser["fine_search_radius_mm"] = -2.0
    parser["fine_patches_per_case"] = "2"
    with pytest.raises(SystemExit) as e:
        parser.get_parsed_content("config_check")
    assert "'fine_search_radius_mm': -2.0, expected a value >= 0" in str(e.value)
    assert "'fine_patches_per_case': the text '2', expected an integer" in str(e.value)


def test_a_text_boolean_on_the_command_line_stops_the_run_in_one_line(tmp_path):
    """`--resume false` reaches MONAI as the text 'false' (truthy in Python): refused before training."""
    proc = subprocess.run(bundle_cmd(SYNTHETIC, "training", [], "--dataset_dir", str(tmp_path), "--resume", "false",
                                     "--bundle_root", str(tmp_path)),
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "config key 'resume': the text 'false'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "checkpoints").exists()


# ---- the budget ---------------------------------------------------------------------------------------

class _Validator(Engine):
    """Stands in for a MONAI evaluator: ``run(global_epoch)`` validates the trainer's epoch."""

    def __init__(self, seconds: float = 0.0, clock: list[float] | None = None):
        super().__init__(lambda e, b: None)
        self.epochs: list[int] = []
        self.seconds, self.clock = seconds, clock

    def run(self, global_epoch: int = 1):  # noqa: D102 - MONAI's Evaluator.run signature
        self.epochs.append(global_epoch)
        self._fire_event(Events.STARTED)
        if self.clock is not None:
            self.clock[0] += self.seconds
        self.state.epoch, self.state.iteration = global_epoch, self.state.iteration + 1
        self._fire_event(Events.COMPLETED)
        return self.state


def _trainer(validator: _Validator, interval: int) -> Engine:
    trainer = Engine(lambda e, b: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=interval), lambda e: validator.run(e.state.epoch))
    FinalValidation(validator).attach(trainer)
    return trainer


def test_final_validation_only_when_the_last_epoch_was_not_validated():
    v = _Validator()
    _trainer(v, interval=2).run(range(3), max_epochs=5)
    assert v.epochs == [2, 4, 5]
    v = _Validator()
    _trainer(v, interval=2).run(range(3), max_epochs=4)
    assert v.epochs == [2, 4]


def test_time_limit_keeps_time_for_the_final_validation(monkeypatch):
    """A 60 s budget, 5 s per iteration, validation every epoch (2 iterations) taking 20 s: without
    the reserve the run would stop at 60 s and then validate for 20 s more; with it, training stops
    so that the final validation ends within the budget."""
    clock = [0.0]
    monkeypatch.setattr(_time, "monotonic", lambda: clock[0])
    v = _Validator(seconds=20.0, clock=clock)
    trainer = Engine(lambda e, b: clock.__setitem__(0, clock[0] + 5.0))
    TimeLimit(minutes=1.0, validator=v).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: v.run(e.state.epoch))
    FinalValidation(v).attach(trainer)
    trainer.run(range(2), max_epochs=100)
    assert clock[0] <= 60.0, clock[0]
    assert v.epochs[-1] == trainer.state.epoch  # the last weights were validated
    assert len(v.epochs) >= 2


def test_ctrl_c_validates_the_latest_weights_before_stopping():
    """Ctrl-C in the middle of epoch 2: the trainer still validates epoch 2 (then exits with 130)."""
    from test_engines import make_trainer

    trainer, _ = make_trainer(max_epochs=5)
    v = _Validator()
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: v.run(e.state.epoch))
    FinalValidation(v).attach(trainer)

    def interrupt(engine):
        if engine.state.iteration == 6:  # 4 iterations per epoch: the middle of epoch 2
            raise KeyboardInterrupt

    trainer.add_event_handler(Events.ITERATION_COMPLETED, interrupt)
    with pytest.raises(SystemExit) as e:
        trainer.run()
    assert e.value.code == 130
    assert v.epochs == [1, 2]
