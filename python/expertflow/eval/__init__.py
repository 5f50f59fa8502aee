"""Evaluation harnesses; `expertflow.eval.pope` answers the project's research question."""
