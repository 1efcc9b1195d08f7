"""This process's connection to Ray: a private local Ray or an existing cluster.

A local Ray that fedlearn starts lives in its own temp dir (short: Ray's socket paths
must fit a Unix socket's 107 bytes), authenticates with a token of this process's own,
has no dashboard, sends no usage statistics and keeps worker logs out of the terminal;
closing the session stops it. A cluster (``address``) is joined and left running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from fedlearn.errors import ConfigError

INSTALL_HINT = "pip install 'fedlearn[ray]'"
TEMP_PREFIX = "fl-ray-"
"""Prefix of a private Ray temp dir (short: Ray's socket paths must stay under ~107 bytes)."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"backend.kind = 'ray' needs the ray extra: {INSTALL_HINT}") from exc
    return ray


def check_ray(address: str | None) -> None:
    """Before a run starts (without importing Ray): Ray is installed, and ``address``,
    when given, answers."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"backend.kind = 'ray' needs the ray extra: {INSTALL_HINT}")
    if address is not None:
        check_address(address)


def check_address(address: str, timeout: float = 3.0) -> None:
    """Raise ConfigError unless ``host:port`` accepts a TCP connection (a Ray head's GCS);
    Ray itself would retry for a long while before giving up."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"backend.address {address!r}: expected host:port of a Ray head")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(
            f"backend.address {address}: no Ray head answers there ({exc}); start one with "
            "`ray start --head --port PORT` or leave backend.address unset for a local Ray"
        ) from exc


@contextlib.contextmanager
def _keep_sigterm() -> Iterator[None]:
    """``ray.init`` replaces the SIGTERM handler; fedlearn's (stop at a clean point) stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def use_private_token() -> None:
    """Token authentication with a secret of this process's own, unless the environment
    already says how Ray authenticates. Call it before ``import ray``: Ray reads these
    settings once, at import.

    A local Ray listens on every interface; its token keeps others out. Ray would write
    one shared token to ``~/.ray/auth_token``; this one lives in the environment
    (``RAY_AUTH_TOKEN``, which the Ray processes started from here inherit) and stays
    set for the life of the process, so every Ray it starts or joins agrees on it.
    """
    if not any(key in os.environ for key in AUTH_VARIABLES):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """While a local Ray starts: its workers import what this process imports (its
    ``sys.path`` first, ahead of site-packages)."""
    saved = os.environ.get("PYTHONPATH")
    paths = (os.path.abspath(p) for p in sys.path if p and os.path.isdir(p))
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _short_temp_root() -> str:
    """The temp root for a private Ray: the usual one if its path is short, else ``/tmp``
    (Ray's socket paths under it must stay within the 107 bytes a Unix socket allows)."""
    root = tempfile.gettempdir()
    return root if len(root) <= 32 or not os.path.isdir("/tmp") else "/tmp"


class RaySession:
    """This process's connection to Ray, made by fedlearn or found already made.

    ``address=None`` starts a private local Ray (``num_cpus`` CPUs, default all) in a
    fresh temp dir; ``address="host:port"`` joins that cluster. If this process is
    already connected (``ray.is_initialized()``), that connection is used and ``close``
    leaves it alone. Otherwise ``close`` disconnects, which stops a local Ray it started
    and removes its temp dir.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        if address is None and "ray" not in sys.modules:
            use_private_token()  # before Ray reads its settings, at import
        self.ray = import_ray()
        self.owned = False
        self.temp_dir: str | None = None
        if self.ray.is_initialized():
            return
        if address is not None:
            check_address(address)
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        with _keep_sigterm(), _worker_environment():
            if address is None:
                self.temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=_short_temp_root())
                try:
                    self.ray.init(
                        address="local", num_cpus=num_cpus, _temp_dir=self.temp_dir, **options
                    )
                except BaseException:
                    shutil.rmtree(self.temp_dir, ignore_errors=True)
                    raise
            else:
                del options["include_dashboard"]  # the cluster's own choice
                try:
                    self.ray.init(address=address, **options)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise ConfigError(f"backend.address {address}: {exc}") from exc
        self.owned = True

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (``CPU``, ``GPU``, ...)."""
        return {k: float(v) for k, v in self.ray.cluster_resources().items()}

    def close(self) -> None:
        """Disconnect if this session connected (stopping a local Ray it started)."""
        if not self.owned:
            return
        self.owned = False
        with _keep_sigterm():
            self.ray.shutdown()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
