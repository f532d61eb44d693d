"""bench/train_step_bench.py on the CPU at tiny size: its configurations and their numerical comparisons."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "train_step_bench.py"


def run_bench(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, dict]:
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--tiny", *args])
    runpy.run_path(str(BENCH), run_name="__main__")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return {line["config"]: line for line in lines if "config" in line}


def test_selective_checkpointing_repeats_the_baseline_loss_curve_and_int8_stays_close(monkeypatch, capsys) -> None:
    results = run_bench(monkeypatch, capsys, "--steps", "3", "--warmup", "0",
                        "--variants", "default+sac,default+sac1+int8")
    assert list(results) == ["baseline", "default+sac", "default+sac1+int8"]
    assert results["default+sac"]["attention_kept_blocks"] == 2  # 'sac' on the CPU: every block
    assert results["default+sac"]["max_loss_gap_to_baseline"] == 0.0  # exact in eager mode
    assert 0 < results["default+sac1+int8"]["max_loss_gap_to_baseline"] < 1e-2
    assert results["default+sac1+int8"]["quantization"] == "int8-quanto"
    assert all(len(r["losses"]) == 3 and r["median_step_s"] > 0 for r in results.values())


def test_gradient_check_compares_lora_gradients_with_the_baseline(monkeypatch, capsys) -> None:
    results = run_bench(monkeypatch, capsys, "--grad-check", "--variants", "default+sac,default+fp8")
    assert results["baseline"]["grad_gap_to_baseline"] == 0.0
    assert results["default+sac"]["grad_gap_to_baseline"] == 0.0
    assert 0 < results["default+fp8"]["grad_gap_to_baseline"] < 0.1
    assert results["baseline"]["grad_norm"] > 0


def test_quantized_variants_must_come_last(monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit, match="quantized variants come last"):
        run_bench(monkeypatch, capsys, "--variants", "default+int8,default")


def test_offloaded_blocks_repeat_the_baseline_loss_curve(monkeypatch, capsys) -> None:
    results = run_bench(monkeypatch, capsys, "--steps", "3", "--warmup", "0",
                        "--variants", "default+sac1,default+offload,default+sac1+offload")
    assert [r["offload"] for r in results.values()] == [False, False, True, True]
    assert results["default+sac1+offload"]["attention_kept_blocks"] == 1
    assert all(results[name]["max_loss_gap_to_baseline"] == 0.0 for name in list(results)[1:])  # exact: eager


def test_offload_comes_last_and_not_with_quantization(monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit, match="come last"):
        run_bench(monkeypatch, capsys, "--variants", "default+offload,default")
    with pytest.raises(SystemExit, match="not with fp8 or int8"):
        run_bench(monkeypatch, capsys, "--variants", "default+offload+int8")
