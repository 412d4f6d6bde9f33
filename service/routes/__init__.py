"""The app's routers, one module each, found here rather than listed.

Every module of this package that defines `router` is mounted, in name order. One that also declares
`PROTOCOL` (a `service.protocols.Protocol`: prefix, error body key, prediction paths) is a front door:
the ASGI middleware, the error handlers and the Ray router read its declaration. So a new front door is
one new module here, parsing its protocol into the data plane (`service.inference.DataPlane`) and
encoding the answer; no other file changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

from fastapi import APIRouter

from service.protocols import Protocol


@cache
def route_modules() -> tuple[ModuleType, ...]:
    """This package's modules that define a `router`, by name."""
    names = sorted(module.name for module in pkgutil.iter_modules(__path__))
    found = (importlib.import_module(f"{__name__}.{name}") for name in names)
    return tuple(module for module in found if isinstance(getattr(module, "router", None), APIRouter))


def routers() -> list[APIRouter]:
    return [module.router for module in route_modules()]


def front_doors() -> tuple[Protocol, ...]:
    """Every protocol a route module declares."""
    declared = (getattr(module, "PROTOCOL", None) for module in route_modules())
    return tuple(protocol for protocol in declared if isinstance(protocol, Protocol))
