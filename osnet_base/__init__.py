"""The lowest layer: the project's errors, the serving contract, and the `tritonserver` process.

It imports nothing heavy (no torch, no tritonclient) and nothing of ours from a higher layer, so
every other package, the load generator's processes and the python-backend models can read it.
"""
