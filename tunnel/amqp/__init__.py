"""AMQP 1.0 through proton's engine: the only package that touches proton's C binding (cffi).

:mod:`tunnel.amqp.engine` is one connection's protocol state, sans-IO;
:mod:`tunnel.amqp.handles` are the typed links and deliveries the rest of
the code works with.
"""
