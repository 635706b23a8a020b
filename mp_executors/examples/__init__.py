"""Small runnable examples built only from the public API."""
