"""The console command: groups listed, user errors are one line with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from facekd.cli import GROUPS, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facekd", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_group():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for group, _ in GROUPS:
        assert group in proc.stdout


def test_bad_override_is_one_line_exit_2(tmp_path):
    recipe = tmp_path / "some.yaml"
    recipe.write_text("method:\n  name: none\n")
    proc = run_cli("distill", str(recipe), "bogus.key=1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown key 'bogus'" in lines[0] and "Traceback" not in proc.stderr


def test_missing_recipe_file(tmp_path):
    assert main(["distill", str(tmp_path / "nope.yaml")]) == 2


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "distill", str(tmp_path / "nope.yaml"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("group", [g for g, _ in GROUPS])
def test_each_group_has_help(group):
    with pytest.raises(SystemExit) as exc:
        main([group, "--help"])
    assert exc.value.code == 0


def test_one_spelling_per_option_with_the_old_ones_hidden(capsys):
    from facekd.cli import build_parser

    parser = build_parser()
    for cmd in (["teacher", "cache", "t.pt", "data", "out"], ["teacher", "centres", "t.pt",
                                                              "data", "out.npy"]):
        new = parser.parse_args([*cmd, "--workers", "3", "--save-every", "7"])
        assert (new.workers, new.save_every) == (3, 7)
        old = parser.parse_args([*cmd, "--num-workers", "3"])
        assert old.workers == 3 and old.save_every == 50
    assert parser.parse_args(["teacher", "cache", "t", "d", "o", "--chunk-batches", "9"]
                             ).save_every == 9
    assert parser.parse_args(["eval", "ijb", "m.pt", "ijb", "--no-flip"]).no_flip_test
    assert parser.parse_args(["eval", "ijb", "m.pt", "ijb", "--no-flip-test"]).no_flip_test
    assert not parser.parse_args(["eval", "ijb", "m.pt", "ijb"]).no_flip_test
    for cmd in (["teacher", "cache"], ["teacher", "centres"], ["eval", "ijb"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*cmd, "--help"])
        text = capsys.readouterr().out
        assert "--num-workers" not in text and "--chunk-batches" not in text
        assert "--no-flip-test" not in text
