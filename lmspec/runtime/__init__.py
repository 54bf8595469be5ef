"""runtime stage: what generated code imports, and what it takes to load a generated model. See README.md."""
