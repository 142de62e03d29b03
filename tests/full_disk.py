"""Running a `t5hooks` command on a "full disk": a child process under a file-size limit (RLIMIT_FSIZE), where a
write past the limit fails with EFBIG as one on a full disk fails with ENOSPC."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing the process
from t5hooks.apps.cli import main
args = sys.argv[1:]
limit = int(args.pop(0))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(args))
"""


def run_cli_on_a_full_disk(limit_bytes: int, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`t5hooks ARGS` in a child process that cannot write any file beyond `limit_bytes`."""
    cmd = [sys.executable, "-c", CHILD, str(limit_bytes), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
