"""Models shared by several papers."""
