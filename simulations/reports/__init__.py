"""What runs write for people: the tables, plots and pages of a finished run (run_outputs), the
privacy ablation's page (ablation_page), the one-page report of one or several runs (page,
`oppu report`), and the figures (plots)."""
