"""Pipeline stages: each module does one stage's work; none imports Prefect."""
