"""Where things are kept: the catalog (registry lookups, the one assembly of a composed model), MLflow tracking, artifact storage, and names.py, the registry's vocabulary."""
