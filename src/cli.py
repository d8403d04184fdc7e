"""Entry-point wrapper: a user's mistake ends in one line on stderr and exit code 2, not a traceback.
Set ISQRT_COV_DEBUG=1 to see the traceback anyway."""
import os
import sys


def run_cli(main):
    try:
        code = main()
    except (ValueError, RuntimeError, OSError) as exc:
        from src.distributed import DeviceError
        from src.engine import TrainingStopped
        user_error = isinstance(exc, (ValueError, DeviceError, TrainingStopped, FileNotFoundError))
        if os.environ.get("ISQRT_COV_DEBUG") or not user_error:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(f"error: {msg}\n")
        sys.exit(2 if not isinstance(exc, TrainingStopped) else 3)
    from src.distributed import exit_process
    exit_process(code or 0)
