"""The aiohttp application base: auth, problems, limits, health, metrics, OpenAPI."""

from ciliate.api.app import (
    READINESS_KEY,
    REGISTRY_KEY,
    STATUS_KEY,
    make_app,
    read_json,
    read_object,
)
from ciliate.api.openapi import route
from ciliate.api.problems import Problem, field_problem, problem

__all__ = [
    "READINESS_KEY",
    "REGISTRY_KEY",
    "STATUS_KEY",
    "Problem",
    "field_problem",
    "make_app",
    "problem",
    "read_json",
    "read_object",
    "route",
]
