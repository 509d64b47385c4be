"""The audit report: one self-contained HTML page with the verdict, its checks and figures."""

from __future__ import annotations

from cdi.report._page import render_report, write_report
from cdi.report.summary import summary_markdown

__all__ = ["render_report", "summary_markdown", "write_report"]
