"""What the user sees while waiting or after a mistake: plain or rich output, progress, what exists instead."""
