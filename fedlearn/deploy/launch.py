"""Build the daemons from their configs (what ``fedlearn server`` and ``fedlearn client`` run)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.config.deployment import SiteConfig, SiteDataSection
from fedlearn.data import ClientData, load_dataset, partition_dataset
from fedlearn.deploy.site import Backoff, SiteClient
from fedlearn.engine.client_app import ClientApp, build_app
from fedlearn.engine.client_state import open_state_store
from fedlearn.engine.references import resolve
from fedlearn.errors import ConfigError, DataError
from fedlearn.privacy.local import LocalDPFloor
from fedlearn.security.certs import load_pem
from fedlearn.security.keys import load_private_key

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

log = logging.getLogger("fedlearn.site")


@dataclass(frozen=True)
class LocalData:
    """A site's own data: every client id it is asked about is this one site."""

    data: ClientData
    num_classes: int

    def client(self, cid: int) -> ClientData:
        """The site's data (the coordinator's client id does not select anything here)."""
        return self.data


def load_npz(path: str | Path) -> LocalData:
    """Read ``x_train, y_train, x_test, y_test`` from an .npz file (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (need {list(NPZ_KEYS)})")
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read site data {path}: {exc}") from exc
    classes = np.unique(np.concatenate([arrays["y_train"], arrays["y_test"]]))
    return LocalData(ClientData(**arrays), int(classes.max()) + 1 if classes.size else 0)


def site_data(section: SiteDataSection) -> Any:
    """The data source a site's ClientApp factory receives."""
    if section.path is not None:
        return load_npz(section.path)
    assert section.simulated is not None and section.num_clients is not None
    spec = section.simulated
    return partition_dataset(
        load_dataset(spec.dataset),
        spec.partitioner,
        section.num_clients,
        section.seed,
        alpha=spec.alpha,
        shards_per_client=spec.shards_per_client,
        test_fraction=spec.test_fraction,
    )


def site_app(config: SiteConfig) -> ClientApp:
    """The site's ClientApp: ``client.app`` over its data, or the Flower app project of
    ``client.flower_app`` (its ServerApp's fixed train/evaluate configs filled in under
    what the coordinator sends; its ``context.state`` is the site's client state, in memory
    or in ``client.state_dir``)."""
    section = config.client
    if section.flower_app is not None:
        from fedlearn.apps.flower_project import (
            fuse_run_config,
            make_client_app,
            plan_server,
            read_project,
        )

        project = read_project(section.flower_app)
        run_config = fuse_run_config(project.config, section.run_config)
        plan = plan_server(project, run_config, None)
        return make_client_app(project, run_config, plan, node_config=section.node_config)
    assert section.app is not None and config.data is not None  # the config validates this
    factory = resolve(section.app, "client.app")
    return build_app(factory, site_data(config.data), dict(section.params))


def build_site(config: SiteConfig) -> SiteClient:
    """A SiteClient ready to ``run()``."""
    app = site_app(config)
    conn = config.coordinator
    client_cert: tuple[str, str] | None = None
    if conn.insecure:
        roots = None
        unused = [name for name in ("ca", "cert", "key") if getattr(conn, name) is not None]
        if unused:
            log.warning(
                "coordinator.insecure: plaintext, so coordinator.%s %s not used",
                " and ".join(unused),
                "is" if len(unused) == 1 else "are",
            )
        if conn.server_id is None:
            log.warning(
                "plaintext without coordinator.server_id: nothing binds this site's join "
                "proof to one coordinator; pin the coordinator's server_id"
            )
    elif conn.ca is None:
        raise ConfigError("coordinator.ca: TLS is on by default; set ca or insecure = true")
    else:
        roots = load_pem(conn.ca)
        if conn.cert is not None and conn.key is not None:
            client_cert = (conn.cert, conn.key)
    return SiteClient(
        conn.address,
        app,
        load_private_key(config.site.key),
        config.site.name,
        root_certificates=roots,
        server_name=conn.server_name,
        backoff=Backoff(conn.backoff_initial_s, conn.backoff_max_s),
        exit_when_finished=conn.exit_when_finished,
        always_digest=conn.payload_digest == "always",
        client_cert_files=client_cert,
        server_id=conn.server_id,
        local_dp_floor=site_dp_floor(config),
        states=open_state_store(config.client.state_dir),
    )


def site_dp_floor(config: SiteConfig) -> LocalDPFloor | None:
    """The local DP ``[privacy]`` of ``config`` demands of every update (None: nothing)."""
    section = config.privacy
    if section.min_noise_multiplier is None:
        return None
    return LocalDPFloor(section.min_noise_multiplier, section.clip, section.noise)
