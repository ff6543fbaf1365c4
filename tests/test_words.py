"""The core speaks its API's words, the command line its flags (issue "One clear boundary").

No core module's string literal names a `--flag`; every structured error kind has a library
wording and a command-line wording; each wording is what its reader types.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

from fashion_func import checkpoint, data, safeio
from fashion_func.cli import words
from fashion_func.loop import RunError
from fashion_func.loop.errors import NOTES

PKG = Path(__file__).resolve().parents[1] / "fashion_func"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# the command line's own modules: they own every flag
APP = ("cli/", "__main__.py")
# the library's errors with kinds, each kind's library wording
LIBRARY_WORDS = {
    RunError: RunError.WORDS,
    data.DataError: data.DataError.WORDS,
    checkpoint.CheckpointError: checkpoint.CheckpointError.WORDS,
    safeio.FileError: safeio.FileError.WORDS,
}


def _core_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if not p.relative_to(PKG).as_posix().startswith(APP))


def test_the_scan_sees_the_core_and_not_the_app():
    names = {p.relative_to(PKG).as_posix() for p in _core_modules()}
    assert {"loop/rundir.py", "loop/fit.py", "data.py", "safeio.py", "interop/weights_file.py"} <= names
    assert not any(n.startswith("cli/") for n in names) and "__main__.py" not in names
    assert FLAG.findall("pass --out DIR or --resume auto; not a-b--c, x--y") == ["--out", "--resume"]


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: p.relative_to(PKG).as_posix())
def test_no_core_string_names_a_flag(path: Path):
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"line {node.lineno}: {flag}" for flag in FLAG.findall(node.value)]
    assert not found, f"{path.name} names command-line flags: {found}"


def _kinds() -> list[str]:
    kinds = [k for table in LIBRARY_WORDS.values() for k in table] + list(NOTES)
    return kinds


def test_kinds_are_unique_across_the_library():
    kinds = _kinds()
    assert len(kinds) == len(set(kinds))


def _fields(template: str) -> dict[str, str]:
    import string

    return {name: f"<{name}>" for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("kind", sorted(RunError.WORDS))
def test_every_run_error_kind_has_both_wordings(kind: str):
    fields = _fields(RunError.WORDS[kind])
    err = RunError(kind=kind, **fields)
    assert kind in words.WORDS, f"the command line has no words for RunError kind {kind!r}"
    assert set(_fields(words.WORDS[kind])) <= set(fields), "the CLI wording uses fields the error lacks"
    library, cli = str(err), words.message(err)
    assert not FLAG.findall(library)
    assert "\n" not in library and "\n" not in cli
    for value in fields.values():
        assert value in library


@pytest.mark.parametrize("kind", _kinds())
def test_every_kind_in_the_library_is_worded_by_the_command_line(kind: str):
    assert kind in words.WORDS
    assert set(words.WORDS) <= set(_kinds()), "the CLI words a kind no library error has"


@pytest.mark.parametrize(
    ("kind", "fields", "library", "cli"),
    [
        ("holds_run", {"out": Path("r")}, 'pass resume="auto" to continue it or overwrite=True',
         "pass --resume auto to continue it or --overwrite"),
        ("in_use", {"out": Path("r"), "pid": "7"}, "use another run_dir", "use another --out"),
        ("not_a_directory", {"out": Path("r")}, "run_dir r exists", "--out r exists"),
        ("no_checkpoint", {"resume": "x.st"}, "resume=x.st: no such", "--resume x.st: no such"),
        ("overwrite_resumed", {"resume": "x"}, "overwrite=True would delete x", "--overwrite would delete x"),
    ],
)  # fmt: skip
def test_each_reader_gets_its_own_words(kind, fields, library, cli):
    err = RunError(kind=kind, **fields)
    assert library in str(err) and cli in words.message(err)
    assert cli not in str(err) and library not in words.message(err)


def test_data_error_speaks_data_dir_to_python_and_the_flag_to_the_cli(tmp_path: Path):
    with pytest.raises(data.DataError) as info:
        data.locate(tmp_path / "missing")
    assert str(info.value).startswith(f"data_dir {tmp_path / 'missing'} does not exist")
    assert "--" not in str(info.value)
    assert words.message(info.value).startswith(f"--data-dir {tmp_path / 'missing'} does not exist")
    assert "pass --data-dir DIR" in words.message(info.value)


def test_check_output_speaks_overwrite_true_and_the_cli_its_flag(tmp_path: Path):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"x")
    with pytest.raises(safeio.FileError) as info:
        safeio.check_output(target, overwrite=False)
    assert str(info.value) == f"output {target} exists; pass overwrite=True to replace it"
    with pytest.raises(safeio.FileError) as info:
        safeio.check_output(target, overwrite=False, what="--out")
    assert words.message(info.value) == f"--out {target} exists; pass --overwrite to replace it"


def test_a_plain_error_reads_the_same_everywhere():
    err = RunError("cannot write to run directory r: disk full")
    assert err.kind is None and words.message(err) == str(err)
    with pytest.raises(TypeError):
        RunError()


def test_the_cli_rewords_the_loops_notes_in_its_logs(caplog: pytest.LogCaptureFixture):
    log = words.reword_log(logging.getLogger("fashion_func.test_words"))
    words.reword_log(log)  # twice: one filter
    assert log.filters.count(words.REWORD) == 1
    note = safeio.Note(NOTES, "interrupted", out=Path("r"), path=Path("r/checkpoints/last.safetensors"))
    assert (
        str(note) == 'interrupted: resume with fit(..., run_dir=r, resume="auto") '
        "(or resume=r/checkpoints/last.safetensors)"
    )
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info(note)
    assert caplog.messages == [
        "interrupted: resume with --resume auto --out r (or --resume r/checkpoints/last.safetensors)"
    ]
