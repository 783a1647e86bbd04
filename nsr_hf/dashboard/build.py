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
import sys
from pathlib import Path

from nsr_hf.dashboard.any_neuron_page import any_neuron_page, any_neuron_sweep_page, is_any_neuron_folder
from nsr_hf.dashboard.neuron_page import neuron_page
from nsr_hf.dashboard.run_files import is_run_folder, is_sweep_folder, read_json, read_run
from nsr_hf.dashboard.sweep_page import sweep_page
from nsr_hf.errors import UserError
from nsr_hf.methods import is_evaluation
from nsr_hf.run_folder import write_text_atomically

logger = logging.getLogger(__name__)

DASHBOARD_DIR = "dashboard"
INDEX = "index.html"
SWEEP_LINK_MARK = "data-sweep-link"  # on a run page's link back to its sweep's page


def environment():
    """The Jinja2 environment of the package's templates (``nsr_hf/dashboard/templates``), HTML autoescaped."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("nsr_hf.dashboard", "templates"), autoescape=select_autoescape(["html", "j2"]),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def page_name(neuron: str, first: bool) -> str:
    """The file of a neuron's page: ``index.html`` for the run's first neuron, ``neuron-<layer.index>.html`` otherwise."""
    return INDEX if first else f"neuron-{neuron}.html"


def build_run_dashboard(folder) -> Path:
    """The neuron pages of the run (or evaluation) folder ``folder`` in ``folder/dashboard/``; returns ``index.html``. A run
    of a sweep (``<sweep>/<neuron>/seed-<k>``, the sweep's ``sweep.json`` written) links back to the sweep's page."""
    folder = Path(folder)
    run = read_run(folder)
    neurons = run.neurons or ["?"]
    template = environment().get_template("neuron.html.j2")
    out = folder / DASHBOARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    nav = [(n, page_name(n, i == 0)) for i, n in enumerate(neurons)]
    for i, neuron in enumerate(neurons):
        context = neuron_page(run, neuron)
        _write_page(out / page_name(neuron, i == 0), template.render(**context, nav=nav, sweep_link=_sweep_link(folder)))
    return out / INDEX


def _write_page(path: Path, text: str) -> Path:
    write_text_atomically(path, text)
    path.chmod(0o644)  # a page others may read (mkstemp's files are the owner's only)
    return path


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
    if result.get("kind") == "any_neuron":
        return build_any_neuron_sweep_dashboard(folder, result, rebuild_runs)

    context = sweep_page(folder, result, run_pages(is_run_folder, build_run_dashboard, rebuild_runs))
    out = folder / DASHBOARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / INDEX
    return _write_page(path, environment().get_template("sweep.html.j2").render(**context))


def build_any_neuron_dashboard(folder) -> Path:
    """The page of an any-neuron run (``any_neuron.json``)."""
    folder = Path(folder)
    env = environment()
    env.globals["zip"] = zip
    sweep = folder.parent  # a run of an any-neuron sweep (<sweep>/seed-<k>) links back to the sweep's page
    link = (os.path.relpath(sweep / DASHBOARD_DIR / INDEX, folder / DASHBOARD_DIR)
            if is_sweep_folder(sweep) and read_json(sweep / "sweep.json").get("kind") == "any_neuron" else None)
    return _write_page(folder / DASHBOARD_DIR / INDEX,
                       env.get_template("any_neuron.html.j2").render(**any_neuron_page(folder), sweep_link=link))


def run_pages(is_run, build, rebuild_runs: bool):
    """``page_of_run(run_folder)`` for a sweep's page: the path of that run's page, built first (``build``) when it is missing, when
    it lacks the link back to the sweep (a run trained by the sweep's first invocation got its page before ``sweep.json``
    existed), or when ``rebuild_runs``; None for a folder that is not such a run (``is_run``) or whose page failed (logged: one
    run's page must not cost the sweep's)."""

    def page_of_run(run_folder: Path) -> Path | None:
        index = run_folder / DASHBOARD_DIR / INDEX
        if not is_run(run_folder):
            return None
        if rebuild_runs or not index.is_file() or SWEEP_LINK_MARK not in index.read_text():
            try:
                build(run_folder)
            except Exception as err:  # noqa: BLE001 (one run's page must not cost the sweep's)
                logger.warning("The dashboard of %s could not be built (%s: %s); rebuild it with: nsr report %s",
                               run_folder, type(err).__name__, err, run_folder)
        return index if index.is_file() else None

    return page_of_run


def build_any_neuron_sweep_dashboard(folder: Path, result: dict, rebuild_runs: bool = True) -> Path:
    """The page of an any-neuron sweep (``sweep.json`` ``kind: any_neuron``) and each finished run's page (only those missing
    unless ``rebuild_runs``; a run's page links back to the sweep's). Returns ``index.html``."""
    env = environment()
    env.globals["zip"] = zip
    context = any_neuron_sweep_page(folder, result, run_pages(is_any_neuron_folder, build_any_neuron_dashboard, rebuild_runs))
    return _write_page(folder / DASHBOARD_DIR / INDEX, env.get_template("any_neuron_sweep.html.j2").render(**context))


def build_dashboard(folder, rebuild_runs: bool = True) -> Path:
    """The dashboard of a sweep folder (``sweep.json``) or a run folder (``metrics.json``: ``nsr train`` or ``nsr evaluate``);
    returns the path of its ``index.html``. A folder that is neither is a ``UserError`` that says what it lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass a run folder (nsr train / nsr quickstart / nsr evaluate) or a sweep folder.")
    if is_sweep_folder(folder):
        return build_sweep_dashboard(folder, rebuild_runs=rebuild_runs)
    if is_any_neuron_folder(folder):
        return build_any_neuron_dashboard(folder)
    if is_run_folder(folder):
        return build_run_dashboard(folder)
    raise UserError(f"{folder} is neither a run nor a sweep: it has no metrics.json (nsr train, nsr quickstart, nsr evaluate), no "
                    "sweep.json (nsr sweep) and no any_neuron.json (nsr any-neuron). Pass the folder such a command wrote "
                    "(its --output_dir).")


def dashboard_owner(evaluation_dir) -> Path:
    """Whose dashboard an evaluation belongs on: the train run's when ``evaluation_dir`` is a run's ``evaluation/`` folder,
    else the evaluation folder's own."""
    evaluation_dir = Path(evaluation_dir)
    parent = evaluation_dir.parent
    if evaluation_dir.name == "evaluation" and is_run_folder(parent) and not is_evaluation(read_json(parent / "metrics.json")):
        return parent
    return evaluation_dir


def build_dashboard_after(folder, what: str = "run", rebuild_runs: bool = False) -> Path | None:
    """``build_dashboard`` at the end of a command whose results are already saved: a failure costs only the dashboard. It
    prints one line that says what failed and how to build it again (``nsr report``), and returns None."""
    try:
        return build_dashboard(folder, rebuild_runs=rebuild_runs)
    except Exception as err:  # noqa: BLE001 (the results are saved: a dashboard that cannot be built must not fail the command)
        print(f"dashboard not built ({type(err).__name__}: {' '.join(str(err).split())[:300]}). The {what} itself is saved in {folder}; "
              f"build its dashboard again with: nsr report {folder}", file=sys.stderr, flush=True)
        logger.debug("dashboard failure", exc_info=True)
        return None
