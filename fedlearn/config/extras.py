"""Optional install extras: which one a feature needs, and a clear message when it is missing.

The core install (``pip install fedlearn``, the same as ``fedlearn[site]``) runs a site
daemon and a coordinator. The rest is in extras, each checked here without importing it:

========== ================================= =============================================
extra      modules                           needed by
========== ================================= =============================================
serve      starlette, uvicorn, scipy         ``fedlearn serve`` (scipy: drift KS p-values),
                                             the serving check of ``fedlearn simulate``,
                                             the live page (``--ui``)
report     matplotlib                        the PNG plots of a report (JSON/CSV need none)
datasets   sklearn                           the digits, breast_cancer and wine datasets
privacy    dp_accounting, opacus             ``[privacy]``: the accountant (coordinator),
                                             DP-SGD in ``TorchClientApp`` (sites)
flower     flwr                              Flower apps (``simulate --flower-app``, a
                                             site's ``client.flower_app``)
========== ================================= =============================================
"""

from __future__ import annotations

import importlib.util

from fedlearn.errors import ConfigError, FedlearnError

#: The modules each extra provides (the ones fedlearn imports).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("starlette", "uvicorn", "scipy"),
    "report": ("matplotlib",),
    "datasets": ("sklearn",),
    "privacy": ("dp_accounting", "opacus"),
    "flower": ("flwr",),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a None placeholder
        return False


def missing_modules(extra: str) -> tuple[str, ...]:
    """The modules of ``extra`` that are not installed (found without importing them)."""
    return tuple(m for m in EXTRAS[extra] if not _installed(m))


def has_extra(extra: str) -> bool:
    """Whether every module of ``extra`` is installed."""
    return not missing_modules(extra)


def extra_message(extra: str, feature: str) -> str:
    """``"<feature> needs the <extra> extra: pip install 'fedlearn[<extra>]'"``."""
    return f"{feature} needs the {extra} extra: pip install 'fedlearn[{extra}]'"


def require_extra(extra: str, feature: str, error: type[FedlearnError] = ConfigError) -> None:
    """Raise ``error`` naming the extra to install if any module of ``extra`` is missing."""
    missing = missing_modules(extra)
    if missing:
        raise error(f"{extra_message(extra, feature)} ({', '.join(missing)} not installed)")
