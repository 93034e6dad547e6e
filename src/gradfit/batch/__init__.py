"""Many independent curves at once: ``fit_batch``, ``fit-many`` over tables, streamed output."""
