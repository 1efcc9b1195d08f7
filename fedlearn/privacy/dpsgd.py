"""Example-level DP-SGD for :class:`~fedlearn.apps.torch_app.TorchClientApp`, through Opacus.

When a training task's config carries ``dp.mode = "example"`` (:mod:`fedlearn.privacy.keys`)
the app trains with :func:`fit_private` instead of its plain SGD loop: Opacus's
``PrivacyEngine.make_private`` wraps the model (per-sample gradients), the optimizer (each
example's gradient clipped to ``dp.clip``, Gaussian noise ``dp.noise_multiplier *
dp.clip`` added to each batch's sum) and the data (Poisson sampling: each example joins
each batch with probability ``q = 1 / ceil(n / batch_size)``), and its RDP accountant
counts the steps. The reply's train metrics are ``dp.noise_multiplier``,
``dp.sample_rate`` (q), ``dp.steps`` (this round's steps) and ``dp.epsilon`` (Opacus's
RDP epsilon at ``dp.delta`` for this round's steps alone; composing rounds is the
coordinator's accountant's job). The app's own loss and accuracy on the training data are
not private, so they are not reported.

Randomness (noise and Poisson sampling) by ``dp.noise``:

* ``"seeded"``: two ``torch.Generator``s seeded from the task seed, so a seeded run is
  reproducible bit for bit (tests, replays; it protects nobody who knows the seed).
* ``"secure"``: Opacus's ``secure_mode`` (a CSPRNG from ``torchcsprng``, and noise
  hardened against floating-point attacks) when ``torchcsprng`` is installed. It has no
  builds for current torch; without it the generators are seeded with 63 bits from
  :mod:`secrets`, so the noise cannot be reproduced from the run's seed, but torch's
  generator is not a CSPRNG (a warning says so once per process).

Opacus needs layers it can compute per-sample gradients for (``Conv2d``, ``Linear``,
``GroupNorm``, ... but not ``BatchNorm``); a model it refuses is a ConfigError naming
``opacus.validators.ModuleValidator.fix``, to be applied in the app's ``model_fn`` (so every
client and the coordinator share the fixed architecture).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import secrets
import warnings
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedlearn.config.extras import require_extra
from fedlearn.engine.records import Metrics
from fedlearn.errors import ConfigError
from fedlearn.privacy import keys
from fedlearn.privacy.keys import TaskDP

if TYPE_CHECKING:
    import torch
    from torch import nn

EXAMPLE_DP_STREAM = 0x45_4450
"""Second word of the seed sequence ``(task seed, EXAMPLE_DP_STREAM, i)`` that seeds the
noise (``i = 0``) and sampling (``i = 1``) generators of a seeded task."""

_warned_insecure = False


class SGDSettings(Protocol):
    """The local SGD settings DP-SGD takes (``fedlearn.apps.torch_app.TrainSettings``)."""

    @property
    def epochs(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def lr(self) -> float: ...

    @property
    def momentum(self) -> float: ...

    @property
    def weight_decay(self) -> float: ...

    @property
    def proximal_mu(self) -> float: ...


def import_opacus() -> None:
    """Import Opacus (ConfigError naming the ``privacy`` extra if it is missing), without
    the root-logger handler its import installs.

    ``opacus.utils.module_utils`` calls ``logging.basicConfig(stream=sys.stderr)`` when
    imported: that binds the process's logging to whatever ``sys.stderr`` is at that
    moment and makes the application's own ``basicConfig`` a no-op. Handlers the import
    added are removed again (a process that imported Opacus before keeps its own).
    """
    require_extra("privacy", "example-level DP-SGD (dp.mode = 'example')")
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # type: ignore[import-untyped]  # noqa: F401

    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)


def check_model(model: nn.Module) -> None:
    """ConfigError unless Opacus can compute per-sample gradients for ``model`` (in
    training mode)."""
    import_opacus()
    from opacus.validators import ModuleValidator  # type: ignore[import-untyped]

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        detail = "; ".join(str(e) for e in errors[:3])
        raise ConfigError(
            f"example-level DP-SGD: Opacus cannot train this model ({detail}); build it "
            "with layers Opacus supports, e.g. model_fn returning "
            "opacus.validators.ModuleValidator.fix(model) (BatchNorm becomes GroupNorm)"
        )


def fit_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: SGDSettings,
    dp: TaskDP,
    seed: int,
) -> Metrics:
    """Train ``model`` in place with DP-SGD (Opacus); return the ``dp.*`` train metrics.

    ``settings`` as for plain training (epochs, batch size as the expected Poisson batch,
    lr, momentum, weight decay); ``proximal_mu`` is refused (its gradient is not an
    example's). Opacus's hooks live on a copy of ``model``, whose weights are copied back.
    """
    import torch
    from torch.nn import functional as F

    work = copy.deepcopy(model)
    work.train()  # Opacus validates a model in training mode
    check_model(work)
    if settings.proximal_mu > 0:
        raise ConfigError("example-level DP-SGD does not take proximal_mu (FedProx)")
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("cannot train on an empty training split")
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    secure_mode = dp.noise == "secure" and importlib.util.find_spec("torchcsprng") is not None
    device = next(model.parameters()).device
    noise_gen, sample_gen = (None, None) if secure_mode else _generators(dp, seed, device)
    optimizer = torch.optim.SGD(
        [p for p in work.parameters() if p.requires_grad],
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=settings.batch_size, generator=sample_gen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
        private, optimizer, loader = engine.make_private(
            module=work,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip,
            poisson_sampling=True,
            noise_generator=noise_gen,
        )
        for _ in range(settings.epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(private(xb), yb)
                torch.autograd.backward(loss)
                optimizer.step()
    history = engine.accountant.history
    model.load_state_dict(work.state_dict())
    return {
        keys.NOISE_MULTIPLIER: dp.noise_multiplier,
        keys.SAMPLE_RATE: float(history[-1][1]) if history else 0.0,
        keys.STEPS: int(sum(h[2] for h in history)),
        keys.EPSILON: float(engine.get_epsilon(dp.delta)) if history else 0.0,
    }


def _generators(
    dp: TaskDP, seed: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """Noise (on ``device``, where the gradients are) and sampling (CPU) generators: from
    the task seed, or (secure without torchcsprng) from :mod:`secrets`."""
    import torch

    global _warned_insecure
    if dp.noise == "seeded":
        seq = np.random.SeedSequence([seed, EXAMPLE_DP_STREAM])
        words = seq.generate_state(2, dtype=np.uint64) >> np.uint64(1)
        first, second = (int(w) for w in words)
    else:
        if not _warned_insecure:
            _warned_insecure = True
            warnings.warn(
                "example-level DP-SGD with dp.noise = 'secure': torchcsprng is not "
                "installed, so Opacus's secure_mode is off; noise and sampling come from "
                "torch generators under secret seeds (unpredictable from the run's seed, "
                "but torch's generator is not a CSPRNG)",
                stacklevel=3,
            )
        first, second = secrets.randbits(63), secrets.randbits(63)
    noise = torch.Generator(device=device).manual_seed(first)
    return noise, torch.Generator().manual_seed(second)
