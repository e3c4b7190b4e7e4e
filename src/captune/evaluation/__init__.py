"""Evaluation: captioning a split, the COCO metrics, the seed's single-reference metrics and the comparison."""
