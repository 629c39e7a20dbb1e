"""Everything that runs on the user's machine: history store, personal adapter, Flower client, daemon."""
