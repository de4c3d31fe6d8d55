"""Deploying fedcycle across data centers: certificates and keys, the loopback topology."""
