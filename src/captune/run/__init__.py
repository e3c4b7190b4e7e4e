"""One run = one folder: its layout, the models it loads, the feature cache and the phases."""
