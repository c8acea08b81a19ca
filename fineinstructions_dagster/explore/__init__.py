"""`fineinstructions explore`: look up any pair, document, template or query of a storage root in a browser."""
