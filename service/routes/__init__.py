"""One router per resource: recognition, the gallery, health and info."""
