"""Deployment over gRPC: the coordinator daemon and the site daemon."""
