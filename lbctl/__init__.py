"""lbctl: command-line client for lbd."""
