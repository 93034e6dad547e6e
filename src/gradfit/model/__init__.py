"""What is fitted: expressions and their derivative programs, Model, built-ins and their
starting guesses, losses, parameters and their bounds."""
