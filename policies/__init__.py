"""Policy presets shipped as package data: `LayerPolicy.from_yaml("<name>")` finds them from any directory."""
