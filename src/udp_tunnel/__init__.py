"""udp-tunnel: a reverse UDP tunnel for services behind carrier-grade NAT."""

__version__ = "3.0.0"
