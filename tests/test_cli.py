import subprocess
import sys

from moefuse.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "demo" in out


def test_info_prints_versions_and_kernels(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in (
        "moefuse",
        "torch",
        "transformers",
        "device",
        "backend",
        "experts on cpu",
        "'moefuse' registered",
        "under torch.compile",
    ):
        assert key in out


def test_info_names_the_forced_backend(capsys, monkeypatch):
    monkeypatch.setenv("MOEFUSE_BACKEND", "torch")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch (MOEFUSE_BACKEND" in out and "PyTorch: torch.nn.functional.grouped_mm" in out


def test_demo_agrees_with_eager(capsys):
    assert main(["demo", "--steps", "1", "--warmup", "0", "--batch-size", "1", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "-> OK" in out and "tokens/s" in out


def test_console_script_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "moefuse.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: moefuse" in result.stdout
