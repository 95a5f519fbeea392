"""Run jobs on the Coop network from Python.

Usage: python scripts/examples/submit_jobs.py [DATA_DIR]

DATA_DIR is the data dir of a running node (`node start`); default: $COOP_HOME, else ~/.local/share/coop.
"""

import os
import sys
import tempfile
from pathlib import Path

from node.client import Client, JobFailed

SCRIPT = """\
words = open("words.txt").read().split()
open("counts.txt", "w").write(f"{len(words)} words, {len(set(words))} distinct\\n")
print("counted", len(words), "words")
"""


def main() -> int:
    arg = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("COOP_HOME")
    with Client.from_data_dir(Path(arg) if arg else None) as client:
        # One job with an input file (sent by path) and a script (sent as bytes); fetch the output it writes.
        with tempfile.TemporaryDirectory() as tmp:
            words = Path(tmp) / "words.txt"
            words.write_text("the quick brown fox jumps over the lazy dog\n")
            job = client.submit(
                ["python3", "count.py"],
                inputs={"words.txt": words, "count.py": SCRIPT.encode()},
                outputs=["counts.txt"],
                memory="256MiB",
                timeout=60,
            )
            print(f"submitted {job.job_id}, waiting…")
            try:
                result = job.result(timeout=300)
            except JobFailed as exc:  # nobody took it, or every attempt failed: exc.error says why
                print(f"job failed: {exc.error}")
                return 1
        print(f"exit {result.exit_code} on {result.provider}, cost {result.cost} milli-credits")
        print(f"stdout: {result.stdout.decode().strip()}")
        print(f"counts.txt: {result.outputs['counts.txt'].decode().strip()}")

        # Five small jobs at once; results come back in input order, failed ones included.
        commands = [["python3", "-c", f"print({n} ** 2)"] for n in range(5)]
        results = client.map(commands, memory="128MiB", timeout=60)
        for n, r in enumerate(results):
            print(f"{n}² = {r.stdout.decode().strip()}" if r.ok else f"{n}: {r.state} {r.error or r.exit_code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
