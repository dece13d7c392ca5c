"""Datasets: readers for the public formats, preprocessing into sequences, the one data loader."""
