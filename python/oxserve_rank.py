"""Runs a worker program as one rank under torchrun, tied to the life of torchrun.

    python -m torch.distributed.run ... oxserve_rank.py <worker.py> --sock-type unix ...

torchrun starts each rank in a session of its own, so killing torchrun's process group does not
reach the ranks, and a torchrun killed outright (as it is when the server dies) cannot stop them.
This wrapper asks the kernel to SIGKILL the rank when its parent (torchrun) dies, then runs the
worker program (oxserve_worker.py or TorchServe's ts/model_service_worker.py) exactly as
`python <worker.py> args...` would. Standard library only.
"""

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main():
    if len(sys.argv) < 2:
        print("usage: oxserve_rank.py <worker.py> [args...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print("prctl(PR_SET_PDEATHSIG) failed: errno %d" % ctypes.get_errno(), file=sys.stderr)
            return 1
        if os.getppid() != parent:
            # torchrun died before the request took effect.
            return 1
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    # As if the worker program were run directly: its own folder first on the path (this one
    # holds oxserve's `ts` shim, which must not hide TorchServe's own package from its worker).
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
