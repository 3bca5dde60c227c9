"""The probe's own child processes (not a user command; blues-probe starts them):

    python -m blues.probe coordinator OPTIONS_JSON   one rank's coordinator (RANK, WORLD_SIZE, MASTER_* set)
    python -m blues.probe trial SPEC_JSON            one rank of one trial
"""
import json
import sys

from blues.common import EXIT_USAGE
from blues.probe.search import Coordinator, ProbeOptions
from blues.probe.trial import TrialSpec, run_trial


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("coordinator", "trial"):
        print("usage: python -m blues.probe coordinator|trial JSON (started by blues-probe)", file=sys.stderr)
        return EXIT_USAGE
    payload = json.loads(argv[1])
    if argv[0] == "trial":
        return run_trial(TrialSpec(**payload))
    return Coordinator(ProbeOptions(**payload)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
