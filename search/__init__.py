"""Searching an archive: the index on disk, the exact scan, the page; retrieve.py is the command."""
