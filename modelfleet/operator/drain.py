"""The worker pod's preStop hook: let the replica finish its in-flight requests, then let the pod go.

`python -m modelfleet.operator.drain --timeout N`:
1. asks Ray to drain this node (preemption with a deadline), so Serve starts a replacement
   replica elsewhere when there is room and stops this one gracefully: it takes no new
   requests and finishes the ones it holds;
2. waits until the replica has stopped (its ready file is gone) or the timeout passes.
The kubelet then stops the container; terminationGracePeriodSeconds leaves room for both.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from modelfleet.operator.pods import READY_FILE


def request_drain(deadline: int) -> str:
    """Ask the GCS to drain this node; returns what happened, never raises."""
    command = [
        "ray",
        "drain-node",
        "--reason",
        "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message",
        "pod is terminating",
        "--deadline-remaining-seconds",
        str(deadline),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, input="y\n")
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"drain request failed: {err}"
    return (
        "drain requested" if done.returncode == 0 else f"drain request failed: {done.stderr.strip()[-300:]}"
    )


def wait_until_stopped(ready_file: str, timeout: float, poll: float = 1.0) -> bool:
    """True when the replica removed its ready file before the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(ready_file):
            return True
        time.sleep(poll)
    return not os.path.exists(ready_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelfleet.operator.drain", description=__doc__)
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for in-flight requests")
    parser.add_argument("--ready-file", default=os.environ.get("MODELFLEET_READY_FILE", READY_FILE))
    args = parser.parse_args(argv)
    if not os.path.exists(args.ready_file):
        print("no replica serves here; nothing to drain", file=sys.stderr)
        return 0
    print(request_drain(int(args.timeout)), file=sys.stderr)
    stopped = wait_until_stopped(args.ready_file, args.timeout)
    print("replica stopped" if stopped else f"replica still running after {args.timeout}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
