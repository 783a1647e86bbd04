"""``build_dashboard``: a run's or a sweep's static, self-contained dashboard in ``<folder>/dashboard/``.

    from nsr_hf.dashboard import build_dashboard
    build_dashboard("outputs/quickstart")      # -> outputs/quickstart/dashboard/index.html
    build_dashboard("outputs/sweep")           # -> outputs/sweep/dashboard/index.html, and each run's page

Every page is one HTML file with its CSS, its script and its figures (SVG) inline: it opens from disk in any browser, with
no server and no network. A run's ``index.html`` is the page of its first neuron (a predictor of several neurons gets one
``neuron-<layer.index>.html`` each, linked from every page). Only the run's files are read, never a model.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from nsr_hf.dashboard.neuron_page import neuron_page
from nsr_hf.dashboard.run_files import is_run_folder, is_sweep_folder, read_json, read_run
from nsr_hf.dashboard.sweep_page import sweep_page
from nsr_hf.errors import UserError
from nsr_hf.run_folder import write_text_atomically

logger = logging.getLogger(__name__)

DASHBOARD_DIR = "dashboard"
INDEX = "index.html"


def environment():
    """The Jinja2 environment of the package's templates (``nsr_hf/dashboard/templates``), HTML autoescaped."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("nsr_hf.dashboard", "templates"), autoescape=select_autoescape(["html", "j2"]),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def page_name(neuron: str, first: bool) -> str:
    """The file of a neuron's page: ``index.html`` for the run's first neuron, ``neuron-<layer.index>.html`` otherwise."""
    return INDEX if first else f"neuron-{neuron}.html"


def build_run_dashboard(folder) -> Path:
    """The neuron pages of the run (or evaluation) folder ``folder`` in ``folder/dashboard/``; returns ``index.html``."""
    folder = Path(folder)
    run = read_run(folder)
    neurons = run.neurons or ["?"]
    template = environment().get_template("neuron.html.j2")
    out = folder / DASHBOARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    nav = [(n, page_name(n, i == 0)) for i, n in enumerate(neurons)]
    for i, neuron in enumerate(neurons):
        context = neuron_page(run, neuron)
        write_text_atomically(out / page_name(neuron, i == 0), template.render(**context, nav=nav, sweep_link=_sweep_link(folder)))
    return out / INDEX


def _sweep_link(folder: Path) -> str | None:
    """The relative link from a run's dashboard to its sweep's page, when the run sits in a sweep (``<neuron>/seed-<k>``)."""
    sweep = folder.parent.parent
    if is_sweep_folder(sweep):
        return os.path.relpath(sweep / DASHBOARD_DIR / INDEX, folder / DASHBOARD_DIR)
    return None


def build_sweep_dashboard(folder, rebuild_runs: bool = True) -> Path:
    """The sweep page of ``folder`` (``sweep.json``) and, for every finished run, its neuron pages (only those missing
    unless ``rebuild_runs``); a run whose page cannot be built is logged and left without a link. Returns ``index.html``."""
    folder = Path(folder)
    result = read_json(folder / "sweep.json")

    def page_of_run(run_folder: Path) -> Path | None:
        index = run_folder / DASHBOARD_DIR / INDEX
        if not is_run_folder(run_folder):
            return None
        if rebuild_runs or not index.is_file():
            try:
                build_run_dashboard(run_folder)
            except Exception as err:  # noqa: BLE001 (one run's page must not cost the sweep's)
                logger.warning("The dashboard of %s could not be built (%s: %s); rebuild it with: nsr report %s",
                               run_folder, type(err).__name__, err, run_folder)
        return index if index.is_file() else None

    context = sweep_page(folder, result, page_of_run)
    out = folder / DASHBOARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / INDEX
    write_text_atomically(path, environment().get_template("sweep.html.j2").render(**context))
    return path


def build_dashboard(folder, rebuild_runs: bool = True) -> Path:
    """The dashboard of a sweep folder (``sweep.json``) or a run folder (``metrics.json``: ``nsr train`` or ``nsr evaluate``);
    returns the path of its ``index.html``. A folder that is neither is a ``UserError`` that says what it lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass a run folder (nsr train / nsr quickstart / nsr evaluate) or a sweep folder.")
    if is_sweep_folder(folder):
        return build_sweep_dashboard(folder, rebuild_runs=rebuild_runs)
    if is_run_folder(folder):
        return build_run_dashboard(folder)
    raise UserError(f"{folder} is neither a run nor a sweep: it has no metrics.json (nsr train, nsr quickstart, nsr evaluate) and no "
                    "sweep.json (nsr sweep). Pass the folder such a command wrote (its --output_dir).")


def rebuild_hint(folder) -> str:
    """The line that says how to build a dashboard again after a failure."""
    return f"The run itself is saved; build its dashboard again with: nsr report {folder}"
