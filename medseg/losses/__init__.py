"""Segmentation losses: focal, Dice and their combinations."""
