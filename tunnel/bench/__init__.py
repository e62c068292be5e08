"""The benchmark harness: ``python -m tunnel.bench``.

It compares, on loopback and on the same workloads, three paths to the same
servers: direct TCP, a plain two-hop uvloop byte relay (the Python limit for
this topology), and a tunnel pair in direct mode. Every side runs in its own
process: the servers, the two hops, and the client (this process).
"""
