"""Model classes: encoder wrapper, projectors, feature merge, the multimodal model and its config."""
