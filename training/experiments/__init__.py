"""Experiments: commands that train and measure, and write result tables into docs/results/ (not tests)."""
