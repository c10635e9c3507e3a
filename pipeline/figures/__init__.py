"""Figures and tables, built only from results/."""
