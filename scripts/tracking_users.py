"""Users and permissions of a tracking server started with `scripts/tracking_server.sh --auth`, as its admin:

    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=...   # the admin's account
    python scripts/tracking_users.py --uri https://mlflow.internal:5000 add alice --password-file alice.pw
    python scripts/tracking_users.py --uri https://mlflow.internal:5000 grant alice histo-transfer EDIT
    python scripts/tracking_users.py --uri https://mlflow.internal:5000 grant bob tumour-classifier READ --model

Permissions (MLflow's basic-auth app): READ sees runs and models, EDIT also records runs (what training
needs), MANAGE also grants others and deletes; DENY hides the experiment. A user who creates an experiment
manages it; granting on an experiment nobody has recorded into yet creates it. The password is read
from a file (or typed), never taken on the command line. Exit 2 on any refusal, with one line.
"""

import argparse
import getpass
import os
import sys

if __name__ == "__main__":
    from mlflow.exceptions import MlflowException

    from histo_transfer.config.errors import UserError
    from histo_transfer.tracking import access

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
                        help="the tracking server (default: MLFLOW_TRACKING_URI, else http://127.0.0.1:5000)")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a user")
    add.add_argument("user")
    add.add_argument("--password-file", help="a file whose first line is the password (default: typed)")
    give = commands.add_parser("grant", help="set a user's permission on an experiment or registered model")
    give.add_argument("user")
    give.add_argument("name", help="the experiment's name (tracking.experiment), or the model's with --model")
    give.add_argument("permission", choices=access.PERMISSIONS)
    give.add_argument("--model", action="store_true", help="NAME is a registered model")
    args = parser.parse_args()
    try:
        access.check_server(args.uri)
        if args.command == "add":
            if args.password_file:
                with open(args.password_file) as file:
                    password = file.readline().rstrip("\r\n")
            else:
                password = getpass.getpass(f"password for {args.user}: ")
            access.add_user(args.uri, args.user, password)
            print(f"user {args.user} added")
        else:
            now = access.grant(args.uri, args.user, args.name, args.permission, args.model)
            print(f"{args.user} has {now} on {'registered model' if args.model else 'experiment'} {args.name}")
    except (UserError, OSError, MlflowException) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
