"""The reproduction study (`fedcycle study`): `plan` (the profile, its runs and their run
configs), `runs` (running them, each leaving a summary), `report` (REPORT.md, summary.json and
plots from the summaries alone) and `__main__` (the command that runs the rest, then reports)."""
