"""Entry-point wrapper: a user's mistake (``src.errors.UserError``) ends in one line on stderr and
its exit code (2; 3 for a stopped run); any other exception is a bug and keeps its traceback.
Set ISQRT_COV_DEBUG=1 to see the traceback of user errors too."""
import os
import sys


def run_cli(main):
    from src.errors import UserError, first_line
    try:
        code = main()
    except UserError as exc:
        if os.environ.get("ISQRT_COV_DEBUG"):
            raise
        sys.stderr.write(f"error: {first_line(exc)}\n")
        sys.stderr.flush()
        code = exc.exit_code
    if "src.distributed" not in sys.modules:  # failed before any device or launcher was touched
        sys.exit(code or 0)
    sys.modules["src.distributed"].exit_process(code or 0)
