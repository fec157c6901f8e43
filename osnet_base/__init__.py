"""The lowest layer: the project's errors, the serving contract, and the `tritonserver` process with
its supervisor, its truthful health check and the key of its administrative APIs.

It imports nothing heavy at import time (no torch; tritonclient and NumPy only inside the functions
that talk to a server) and nothing of ours from a higher layer, so every other package, the load
generator's processes and the python-backend models can read it.
"""
import os

# gRPC's fork handlers restart its pollers in a forked child. A tritonserver started (fork, preexec_fn,
# exec) by a process with gRPC clients aborted once that way before its exec ("epoll_wait error: Bad
# file descriptor", status -6). Nothing of ours forks to go on using gRPC: off, before gRPC loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
