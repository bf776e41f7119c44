"""The search driver: Optuna proposes, the budget filters, Ray Tune trains, reports come out."""
