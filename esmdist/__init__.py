"""esmdist."""
