"""What a user sees from the CLI when the input is wrong: a one-line error naming it and exit
code 2 (bad input), never a traceback; and help that shows each option's default."""

from __future__ import annotations

from pathlib import Path

import pytest

from sectune.cli import build_parser, main

MANIFEST = """\
apiVersion: sectune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: triage}}
spec:
  baseModel: {{uri: "hf://org/model"}}
  dataset: {{train: "file://{data}"}}
  task: {{type: classification, labels: [benign, malicious]}}
"""


def _run(argv: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_data_check_with_a_missing_data_file_names_it(tmp_path: Path, capsys):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(MANIFEST.format(data=tmp_path / "missing.jsonl"))
    code, said = _run(["data", "check", str(manifest)], capsys)
    assert code == 2
    assert "missing.jsonl: no such file" in said and "Traceback" not in said


def test_fetch_adapters_with_a_missing_config_is_bad_input_like_serve(tmp_path: Path, capsys):
    missing = str(tmp_path / "serving.yaml")
    fetched, said = _run(["fetch-adapters", "--config", missing, "--out", str(tmp_path)], capsys)
    served, _ = _run(["serve", "--config", missing], capsys)
    assert fetched == served == 2 and "serving.yaml" in said


def test_finalize_and_rollback_together_are_refused_as_such(tmp_path: Path, capsys):
    code, said = _run(
        ["promote", "--to", str(tmp_path / "x.yaml"), "--adapter", "a", "--finalize", "--rollback"],
        capsys,
    )
    assert code == 2 and "--rollback: not allowed with argument --finalize" in said


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["serve"], "port to listen on (default: 8000)"),
        (["serve"], "(default: 16)"),
        (["evaluate"], "--key-file"),
    ],
)
def test_help_shows_defaults(command: list[str], shown: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(sub.choices[command[0]].format_help().split())
    assert shown in text
