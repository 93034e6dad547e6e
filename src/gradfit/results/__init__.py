"""What a fit returns: ``FitResult``, ``BatchResult``, their statistics and warnings."""
