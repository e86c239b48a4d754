"""``nnunet-mixsup demo`` is the benchmark's ``demo`` preset: one seed, lower / MixSupTrainer / upper."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nnunet_mixsup.lab.benchmark import add_arguments, config_from_args
from nnunet_mixsup.lab.demo import demo_arguments


def _cfg(args: list[str]):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(args))


@pytest.mark.parametrize("dataset,preset", [("mni152", "demo"), ("inia19", "inia19-cpu")])
def test_demo_is_one_seed_of_a_benchmark_preset(dataset, preset, tmp_path):
    cfg = _cfg(demo_arguments(tmp_path / "w", dataset))
    assert cfg.preset == preset and cfg.seeds == [0] and cfg.trainers == ["MixSupTrainer"] and cfg.upper
    assert cfg.budgets == [0.1] and cfg.configuration == "2d" and cfg.workdir == Path(tmp_path / "w")
    same = _cfg(["--preset", preset, "--seeds", "0", "--workdir", str(tmp_path / "w")])
    assert (cfg.epochs, cfg.iterations, cfg.small_plans) == (same.epochs, same.iterations, same.small_plans)
    cpu_mini = _cfg(["--preset", "cpu-mini", "--seeds", "0", "--workdir", str(tmp_path / "w")])
    assert cfg.small_plans == cpu_mini.small_plans
    assert not _cfg(demo_arguments(tmp_path / "w", dataset, ["--no-upper"])).upper


def test_results_page_carries_command_machine_and_summary(tmp_path, monkeypatch):
    from nnunet_mixsup.lab.benchmark.report import results_page

    monkeypatch.setattr("sys.argv", ["nnunet-mixsup", "benchmark", "--preset", "demo", "--workdir", "w x"])
    page = results_page("| run | Dice |\n|---|---|\n| lower | 0.8 |\n", _cfg(demo_arguments(tmp_path)))
    assert page.startswith("## `demo` preset, ")
    assert "Command: `nnunet-mixsup benchmark --preset demo --workdir 'w x'`" in page
    assert "Machine: " in page and "cores" in page and "torch" in page
    assert page.endswith("| lower | 0.8 |\n")
