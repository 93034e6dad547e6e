"""Views of results: figures and text and HTML reports. Results never import them."""
