"""The recipe schema: every key, its type, default and doc; loading, --set, checks."""
