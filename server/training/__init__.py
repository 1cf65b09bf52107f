"""Training pipelines for the server's learned models (torch; never imported by the server at
run time)."""
