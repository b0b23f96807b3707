"""The fan-out benchmark harness (`make bench-fanout`, `python -m bench.harness`): jmap-push-gateway side by side
with nchan, a Node `ws` server, a Python `websockets` server and the syscall floor, in one run on one machine.

See bench/README.md, section "Fan-out harness", for what it measures and how to read the results.
"""
