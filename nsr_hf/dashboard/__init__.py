"""The dashboard of a run or a sweep: static, self-contained HTML pages that open from disk (``nsr report``)."""
from nsr_hf.dashboard.build import DASHBOARD_DIR, build_dashboard, build_dashboard_after

__all__ = ["DASHBOARD_DIR", "build_dashboard", "build_dashboard_after"]
