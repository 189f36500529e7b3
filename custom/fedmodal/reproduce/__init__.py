"""Reproductions of the papers' tables: resumable stages, each command recorded."""
