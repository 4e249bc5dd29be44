"""MONAI transforms for landmark localization (array transforms and dictionary wrappers)."""
