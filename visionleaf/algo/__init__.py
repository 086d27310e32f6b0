"""Losses and advantages: pure torch, registered in verl's registries by the plugin (visionleaf.verl)."""
