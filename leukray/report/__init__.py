"""Reports: what a run prints (`console`), the run report, report.md + report.html +
figures (`document`), both made from a finished run folder, and the listing of run folders
(`runs`).

May import: pandas, yaml, matplotlib, scikit-learn's metrics, jinja2, `leukray.io`. Nothing imports
it but the stages and the CLI.
"""

from leukray.report.console import leaderboard_markdown, print_leaderboard
from leukray.report.document import write_report

__all__ = ["leaderboard_markdown", "print_leaderboard", "write_report"]
