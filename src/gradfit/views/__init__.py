"""Views of results: figures, text and HTML reports, progress bars. Results never import
them."""
