"""GPU side of labelassist: models, the pre-annotation pipeline and the RQ worker.

Importing this package loads nothing heavy; torch is imported by the modules that need it.
"""
