"""The dialects a TCP connection travels in over AMQP, each a carrier behind one interface.

- :mod:`~tunnel.dialects.link_route`: skupper-proxy's link pair (Qpid Dispatch, direct mode);
- :mod:`~tunnel.dialects.tcp_adaptor`: skupper-router 3.x's streaming deliveries.

:mod:`~tunnel.dialects.carrier` is the interface between a carrier and its connection.
"""
