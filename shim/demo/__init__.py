"""`make demo`: a scripted day of billing against the real stack on loopback."""
