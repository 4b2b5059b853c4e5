"""What every command line here shares: UserError, argparse whose errors are one line, --help with defaults, the entry
point that turns a UserError into one line and exit status 2, and atomic_write for the files the commands write."""
import argparse
import os
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (file, folder, row, flag): the CLIs print one line, exit 2 (run_cli)."""


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
