"""Planning from a dataset fingerprint: the rules that turn spacing, shapes and a memory budget into a preset."""
