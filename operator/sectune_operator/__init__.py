"""sectune operator: the control plane."""
