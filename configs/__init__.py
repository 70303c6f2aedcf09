"""Ready-made YAML configs, installed as package data (see ``resolve_config``)."""
