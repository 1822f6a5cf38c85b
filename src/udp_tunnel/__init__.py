"""udp-tunnel: a reverse UDP tunnel for services behind carrier-grade NAT."""

__version__ = "2.0.0"
