"""loraflow's spine: plugins, the adapter registry, base models, data, the Hub and the CLI."""
