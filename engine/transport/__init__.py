"""Delivery transports behind one small Protocol: pooled SMTP, and in-memory for tests.

Imports only policy and the leaves; never the queue or the API.
"""
