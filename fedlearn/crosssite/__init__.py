"""Cross-site evaluation: chosen models on every site's evaluation data, as a matrix."""
