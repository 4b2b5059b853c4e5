"""What every command line here shares: UserError, the one JSON reader, argparse whose errors are one line, --help
with defaults, the entry point that turns a UserError into one line and exit status 2, and atomic_write for the
files the commands write."""
import argparse
import json
import os
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (file, folder, row, flag): the CLIs print one line, exit 2 (run_cli)."""


def read_json(path, expect: type = dict, fix: str = ""):
    """The one reader of the JSON files the code reads (config.json, tokenizer_config.json, args.json, latest.json,
    meta.json...): the value, which must be an `expect`; a missing, unreadable, non-UTF-8, invalid (a file cut in
    half) or wrong-typed file is a UserError naming it, one line, ending with `fix` (how to repair it)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file{fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"{path}: not valid JSON ({where}); the file is damaged or cut short{fix}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}){fix}") from None
    if not isinstance(value, expect):
        raise UserError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, got "
                        f"{type(value).__name__}{fix}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `prog: error: ... (see --help)`, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and ends each flag's help with its default, unless the help
    already states it (per-loss defaults)."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def run_cli(main) -> None:
    """A CLI's entry point: main(); a UserError becomes one line `<script>: error: ...` on stderr and exit status 2
    (argparse's code for usage errors), with no traceback."""
    try:
        main()
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def atomic_write(path: Path, write) -> None:
    """write(tmp) to a temp file in the same folder, fsync, then os.replace: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
