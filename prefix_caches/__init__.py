"""The persistent store of named prefix caches (built in the prefix-cache issue)."""
