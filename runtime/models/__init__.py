"""The shipped default model (see README: "The default model")."""
