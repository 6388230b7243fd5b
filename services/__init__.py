"""Ciliate services: each a package with a pure core, a repository and a thin service.py."""
