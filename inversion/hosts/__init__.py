"""Host adapters that implement ``inversion.host`` protocols over concrete model libraries."""
