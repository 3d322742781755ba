"""What a command sees of its process (``python -m tests.forked_probe EXIT_STATUS|sleep``), printed as JSON: for
``tests/test_forked.py``, which compares a forked command with a fresh one."""

import json
import os
import sys
import time

if __name__ == "__main__":
    seen = {
        "argv": sys.argv[1:],
        "argv0": os.path.relpath(sys.argv[0]),
        "name": __spec__.name,
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "probe": os.environ.get("PYTEST_PROBE"),
        "session_leader": os.getsid(0) == os.getpid(),
        "stdin": sys.stdin.read(),
    }
    print(json.dumps(seen), flush=True)
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "sleep":
        time.sleep(300)
    sys.exit(int(sys.argv[1]))
