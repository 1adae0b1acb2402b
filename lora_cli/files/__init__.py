"""Writing whole (atomic), output-folder ownership, and defensive reading of user input."""
