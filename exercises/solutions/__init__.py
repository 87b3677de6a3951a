"""Solutions mode: each chapter's functions implemented by calling tinyqwen's own code (`pytest exercises/ --solutions`)."""
