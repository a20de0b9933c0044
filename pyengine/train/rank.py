"""The entry point of a rank started by the launcher (launch.py): read the arguments, tie the
rank to the launcher, train, and leave an error file the launcher turns into one report."""
import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .launch import ENV_ARGS, ENV_ERROR, ENV_PARENT


def main() -> int:
    args = argparse.Namespace(**json.loads(Path(os.environ[ENV_ARGS]).read_text()))
    from .stop import StopFlag, die_with_parent
    from .worker import train

    stop = StopFlag()
    die_with_parent(int(os.environ[ENV_PARENT]), stop)
    try:
        return train(args, stop)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        return 130
    except BaseException as exc:
        err = {"rank": int(os.environ.get("RANK", 0)), "type": type(exc).__name__, "message": str(exc),
               "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__)}
        try:
            Path(os.environ[ENV_ERROR]).write_text(json.dumps(err))
        except OSError:
            traceback.print_exc()  # nowhere to leave it: say it here
        sys.stdout.flush()
        sys.stderr.flush()
        # Note: no interpreter shutdown: with a peer gone, the process group's teardown can
        # block on collectives that will never complete
        os._exit(1)
