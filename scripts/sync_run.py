"""Send what a training run kept on disk while its tracking server was away, and end the run:

    python scripts/sync_run.py outputs/unsent/<run id> [--tracking-uri URI] [--wait SECONDS]

Training prints this command when the server stayed away past tracking.outage_limit_s.
"""

import argparse
import sys

if __name__ == "__main__":
    from histo_transfer.config.errors import UserError
    from histo_transfer.tracking.runs import sync_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="<output_dir>/unsent/<run id>, as training printed it")
    parser.add_argument("--tracking-uri", help="default: the store the run was recorded in")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for a server that does not answer yet")
    args = parser.parse_args()
    try:
        run_id = sync_run(args.folder, args.tracking_uri, args.wait)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"run {run_id}: everything sent, the run is ended")
